#!/bin/sh
# A valid JSON article whose strings carry bytes that are not UTF-8 (\377 \376 \300\257).
echo "$$" > "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
printf '{"title": "caf\351", "content": "# Broken \377\376 bytes\\n\\nOverlong \300\257 slash.\\n"}\n'
