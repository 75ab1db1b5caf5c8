#!/bin/sh
# The cheapest well-behaved creator: no interpreter start-up, one JSON article at once.
# CREATOR_SLEEP (seconds) stretches the run so a test can land signals mid-flight. A topic
# (argument 1, `--topic=<topic>` as command_creator() passes it) containing "fail-now" exits 1
# instead, so error paths can be mixed into a run.
case "$1" in
  --topic=*fail-now*) echo "asked to fail" >&2; exit 1 ;;
esac
if [ -n "$CREATOR_SLEEP" ]; then sleep "$CREATOR_SLEEP"; fi
printf '{"title": "instant article", "content": "# instant article\\n\\nwritten at once.\\n"}\n'
