"""run_process on its own: real children, no daemon."""

from __future__ import annotations

import contenthubd


async def test_quick_child_over_the_cap_is_output_too_large():
    # 10 KB fits the pipe buffer, so the child exits before any live read: the cap must
    # still be noticed when the output is read after exit.
    result = await contenthubd.run_process(
        ["/bin/sh", "-c", "head -c 10000 /dev/zero | tr '\\0' x"], timeout=10,
        max_output=1024)
    assert result.output_too_large and result.exit_code == 0


async def test_quick_child_output_is_read_whole_after_exit():
    result = await contenthubd.run_process(["/bin/sh", "-c", "echo out; echo err >&2"],
                                           timeout=10)
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 0)
