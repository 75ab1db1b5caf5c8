#!/bin/sh
# A [[hooks]] command that fails its first attempt at each delivery (exit 1), then appends
# the payload from stdin to $CREATOR_STATE_DIR/hooks.jsonl: a receiver that needs a retry.
marker="$CREATOR_STATE_DIR/hook-tried-$CONTENTHUB_DELIVERY"
if [ ! -e "$marker" ]; then
  : > "$marker"
  echo "not yet" >&2
  exit 1
fi
cat >> "$CREATOR_STATE_DIR/hooks.jsonl"
echo >> "$CREATOR_STATE_DIR/hooks.jsonl"
