#!/bin/sh
# Ignores SIGTERM (its children inherit the ignore), records its pids and never finishes:
# only the SIGKILL after kill_grace can stop it.
trap '' TERM
sleep 600 &
echo "$$ $!" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
while true; do sleep 0.1; done
