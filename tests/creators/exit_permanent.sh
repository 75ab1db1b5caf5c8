#!/bin/sh
# Rejects its input: exit code 2 is listed in permanent_exit_codes.
echo "invalid topic" >&2
exit 2
