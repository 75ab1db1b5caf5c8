#!/bin/sh
# Prints 100 MB as fast as it can, to stdout (or to stderr with FLOOD_STREAM=stderr).
echo "$$" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
if [ "${FLOOD_STREAM}" = "stderr" ]; then
  head -c 100000000 /dev/zero | tr '\0' 'x' >&2
else
  head -c 100000000 /dev/zero | tr '\0' 'x'
fi
