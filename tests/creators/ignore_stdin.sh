#!/bin/sh
# Never reads the task from stdin: waits a moment (so the daemon is still writing to a full
# pipe if the task is large), then prints a valid article.
echo "$$" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
sleep 0.5
printf '{"title": "stdin ignored", "content": "# stdin ignored\\n\\nNever read it.\\n"}\n'
