#!/bin/sh
# Fails the first attempt of every task (exit 1, retryable), writes an article on the next:
# the task succeeds while half of its attempts failed.
marker="${CREATOR_STATE_DIR}/attempted-${CONTENTHUB_TASK_ID}"
if [ ! -e "$marker" ]; then
  : > "$marker"
  echo "first attempt always fails" >&2
  exit 1
fi
printf '{"title": "second try", "content": "# second try\\n\\nworked the second time.\\n"}\n'
