#!/bin/sh
# Like grandchild_holds_stdout.sh, but the grandchild escapes into a session (and process
# group) of its own, where killing the creator's group cannot reach it. It records its pid in
# CREATOR_STATE_DIR/escapee-<task id> so the test can kill it.
setsid sh -c 'echo $$ > "${CREATOR_STATE_DIR}/escapee-${CONTENTHUB_TASK_ID}"; exec sleep 600' &
while [ ! -s "${CREATOR_STATE_DIR}/escapee-${CONTENTHUB_TASK_ID}" ]; do sleep 0.01; done
echo "$$" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
printf '{"title": "escaped", "content": "# escaped\\n\\nA grandchild in its own session holds stdout.\\n"}\n'
exit 0
