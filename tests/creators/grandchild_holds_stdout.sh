#!/bin/sh
# Prints a valid article and exits 0, leaving a grandchild (same process group) that keeps
# the inherited stdout and stderr open for 600 s. A second later the grandchild prints another
# article: only a daemon that waits on the pipes instead of killing the group reads it.
sh -c 'sleep 1; echo "{\"title\": \"printed after the exit\", \"content\": \"# too late\"}"
       exec sleep 600' &
echo "$$ $!" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
printf '{"title": "left a grandchild", "content": "# left a grandchild\\n\\nIt still holds stdout.\\n"}\n'
exit 0
