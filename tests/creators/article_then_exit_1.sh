#!/bin/sh
# Prints a perfectly valid article, then fails: the exit code must win over the output.
echo "$$" >> "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
printf '{"title": "half done", "content": "# half done\\n\\nThis must never be stored.\\n"}\n'
echo "upload step failed after writing" >&2
exit 1
