#!/bin/sh
# A creator whose grandchild escapes into a session of its own (setsid), out of reach of a
# kill of the creator's process group. The grandchild records its pid in
# CREATOR_STATE_DIR/escapee-<task id>. With topic "hang" (argument 1 `--topic=hang`, as
# command_creator() passes it) the creator then hangs (for timeout, cancel and stop);
# otherwise it prints an article and exits.
setsid sh -c 'echo $$ > "${CREATOR_STATE_DIR}/escapee-${CONTENTHUB_TASK_ID}"; exec sleep 600' \
    </dev/null >/dev/null 2>&1 &
while [ ! -s "${CREATOR_STATE_DIR}/escapee-${CONTENTHUB_TASK_ID}" ]; do sleep 0.01; done
[ "$1" = "--topic=hang" ] && exec sleep 600
printf '{"title": "escaped", "content": "# escaped\\n\\nA grandchild left in its own session.\\n"}\n'
