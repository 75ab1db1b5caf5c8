#!/bin/sh
# Fails the way an HTTP client dump does: the request headers, API key included, on stderr.
echo "$$" >> "${CREATOR_STATE_DIR}/pids-${CONTENTHUB_TASK_ID}"
echo "AxiosError: Request failed with status code 401" >&2
echo "  headers: { Authorization: 'Bearer ${LLM_API_KEY}' }" >&2
echo "{\"success\": false, \"error\": \"401 for key ${LLM_API_KEY}\"}"
exit 1
