#!/bin/sh
# Dies by a signal it sends itself: SELF_SIGNAL (default SEGV), without a core dump.
echo "$$" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
ulimit -c 0
echo "about to die by SIG${SELF_SIGNAL:-SEGV}" >&2
kill -"${SELF_SIGNAL:-SEGV}" $$
sleep 5
