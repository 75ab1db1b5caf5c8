#!/bin/sh
# Never finishes: starts a sleeping grandchild, records both pids, then waits forever.
sleep 1000 &
echo "$$ $!" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
echo '{"progress": 5, "stage": "hanging"}'
while true; do sleep 1; done
