#!/usr/bin/env python3
"""A stand-in for the real `content-creator` CLI (npm llm-content-creator 0.2.0).

It replays the real captures in tests/fixtures/content-creator/ byte for byte, choosing
the capture the real CLI would have produced, checked in the real CLI's order:
  1. any of LLM_API_KEY, LLM_BASE_URL, TAVILY_API_KEY, ARK_API_KEY unset -> missing-env (exit 1)
  2. no ./data directory in the working directory -> no-data-dir (exit 1, empty stderr);
     like the real CLI this happens at import time, so --help and --version need it too
  3. commander: --version/-V, --help/-h, `help [create]`, `create --help`; an unknown option,
     a missing option value or stray arguments -> commander's error on stderr (exit 1)
  4. create without -t/-r -> `❌ 错误: 必须提供…` on stderr (exit 1)
  5. otherwise a sync run, exit 0, with the header block rebuilt from argv, the article's H1
     set to `# <topic>` and a fresh task id (UUID, or task-<ms> for repo-head scenarios).
     With the captured argv the output equals the capture except for the task id.

Knobs (environment):
  FAKE_CC_SCENARIO  success (default) | color | prod | failure | repo-head-success |
                    repo-head-failure: which capture a sync run replays;
                    quality-failure: sync-failure with the reason 0.2.0 logs when its quality
                    gate gives up (it prints no article then); quality-failure-article: the
                    same with sync-success's article and a failed quality block after the
                    result block, as a CLI that prints what it wrote on failure would. These
                    two are built from the captures: nothing real was captured for them.
  FAKE_CC_DELAY     seconds to sleep after the header block, before the result blocks
  FAKE_CC_FIXTURES  fixture directory (default: tests/fixtures/content-creator)
  FAKE_CC_ARGV_LOG  file to which each run appends its argv as one JSON line
Like the real CLI it never reads stdin. Only `--type content-creator --mode sync` runs are
replayed; other commands and modes exit 2 with a note, since nothing real was captured.
"""
import json
import os
import re
import sys
import time
import uuid
from pathlib import Path

FIXTURES = Path(os.environ.get("FAKE_CC_FIXTURES")
                or Path(__file__).resolve().parents[1] / "fixtures/content-creator")
SCENARIOS = {
    "success": "sync-success",
    "color": "sync-success-color",
    "prod": "sync-success-prod",
    "failure": "sync-failure",
    "repo-head-success": "repo-head/sync-success",
    "repo-head-failure": "repo-head/sync-failure",
    "quality-failure": "sync-failure",
    "quality-failure-article": "sync-failure",
}
CAPTURED_REASON = "Request failed with status code 500"
QUALITY_REASON = "Text quality check failed after 3 attempts"
REQUIRED_ENV = ("LLM_API_KEY", "LLM_BASE_URL", "TAVILY_API_KEY", "ARK_API_KEY")
SEPARATOR = "\u2500" * 40
CAPTURED_TOPIC = "AI 技术解析 1"
CAPTURED_TITLE_LINE = "# AI 技术解析：从大模型到智能应用的演进之路"
CAPTURED_TASK_ID = re.compile(r"任务ID: (?:\x1b\[[0-9;]*m)*([^\x1b\n]+)")
ANSI = r"(?:\x1b\[[0-9;]*m)*"
HEADER_LINE = re.compile(rf"^(?P<pre>{ANSI})(?P<key>[^:\x1b\n]+): (?P<value>.*?)(?P<post>{ANSI})$")
# 1x1 transparent PNG, for the image files the repo-head CLI downloads into data/images.
PNG_1X1 = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000"
                        "001f15c4890000000b4944415478da636000020000050001e9fadcd8"
                        "0000000049454e44ae426082")

# `create` options of 0.2.0: name -> (flags, default); None default = boolean flag.
CREATE_OPTIONS = {
    "topic": (("-t", "--topic"), ""),
    "requirements": (("-r", "--requirements"), ""),
    "audience": (("-a", "--audience"), "普通读者"),
    "keywords": (("--keywords",), ""),
    "tone": (("--tone",), "专业"),
    "min_words": (("--min-words",), "500"),
    "max_words": (("--max-words",), "2000"),
    "type": (("--type",), "content-creator"),
    "mode": (("--mode",), "sync"),
    "priority": (("--priority",), "normal"),
    "sync": (("--sync",), None),
}
OPTION_TERMS = {
    "topic": "-t, --topic <topic>", "requirements": "-r, --requirements <requirements>",
    "audience": "-a, --audience <audience>", "keywords": "--keywords <keywords>",
    "tone": "--tone <tone>", "min_words": "--min-words <number>",
    "max_words": "--max-words <number>", "type": "--type <type>", "mode": "--mode <mode>",
    "priority": "--priority <priority>",
}
COMMANDS = ("create", "list", "retry", "status", "result", "cancel", "workflow", "help")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def emit(stdout: bytes = b"", stderr: bytes = b"") -> None:
    sys.stdout.buffer.write(stdout)
    sys.stdout.buffer.flush()
    sys.stderr.buffer.write(stderr)
    sys.stderr.buffer.flush()


def replay(name: str, stderr: bytes | None = None) -> int:
    emit(fixture(f"{name}.stdout"), fixture(f"{name}.stderr") if stderr is None else stderr)
    return int(fixture(f"{name}.exitcode"))


def usage_error(message: str) -> int:
    """commander's error path: the usual start-up stdout, the error on stderr, exit 1."""
    return replay("unknown-option", f"error: {message}\n".encode())


def not_replayed(what: str) -> int:
    sys.stderr.write(f"fake_content_creator: {what} is not replayed (no real capture)\n")
    return 2


def parse_create(args: list[str]) -> dict | int:
    """commander's parsing of `create` options: `--opt value`, `--opt=value`, `-tvalue`."""
    by_flag = {flag: name for name, (flags, _) in CREATE_OPTIONS.items() for flag in flags}
    values = {name: default for name, (_, default) in CREATE_OPTIONS.items()}
    values["sync"] = False
    operands: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        index += 1
        if arg == "--":
            operands.extend(args[index:])
            break
        if not arg.startswith("-") or arg == "-":
            operands.append(arg)
            continue
        flag, inline = arg, None
        if arg.startswith("--") and "=" in arg:
            flag, inline = arg.split("=", 1)
        elif not arg.startswith("--") and len(arg) > 2:
            flag, inline = arg[:2], arg[2:]
        name = by_flag.get(flag)
        if name is None:
            return usage_error(f"unknown option '{arg}'")
        if CREATE_OPTIONS[name][1] is None:
            values[name] = True
        elif inline is not None:
            values[name] = inline
        elif index < len(args):
            values[name] = args[index]
            index += 1
        else:
            return usage_error(f"option '{OPTION_TERMS[name]}' argument missing")
    if operands:
        return usage_error(f"too many arguments for 'create'. Expected 0 arguments but got "
                           f"{len(operands)}.")
    return values


def header_values(options: dict, repo_head: bool) -> dict[str, str | None]:
    """What the real CLI prints for each argv-derived header key; None drops the line (0.2.0
    prints 关键词 only when non-empty). Keys not listed keep the captured line."""
    keywords = options["keywords"]
    values = {
        "主题": options["topic"], "文章主题": options["topic"],
        "要求": options["requirements"], "创作要求": options["requirements"],
        "受众": options["audience"], "目标受众": options["audience"],
        "语气": options["tone"], "语气风格": options["tone"],
        "关键词": keywords or None,
        "关键词列表（逗号分隔）": ", ".join(k.strip() for k in keywords.split(",")) or None,
        "执行模式": options["mode"], "优先级": options["priority"],
    }
    if not repo_head:
        values["工作流类型"] = options["type"]
    return values


def personalise(text: str, options: dict, repo_head: bool) -> tuple[str, str, str]:
    """The capture with this run's arguments and a fresh task id, split after the header
    block so a delay can fall between the header and the results; and the new task id."""
    captured_id = CAPTURED_TASK_ID.search(text).group(1)
    new_id = f"task-{int(time.time() * 1000)}" if repo_head else str(uuid.uuid4())
    text = text.replace(captured_id, new_id)
    text = text.replace(json.dumps(CAPTURED_TOPIC, ensure_ascii=False),
                        json.dumps(options["topic"], ensure_ascii=False))
    if options["topic"] != CAPTURED_TOPIC:  # the captured argv replays the capture exactly
        text = text.replace(f"\n{CAPTURED_TITLE_LINE}\n", f"\n# {options['topic']}\n", 1)
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if "🚀" in line)
    opening = next(i for i in range(start, len(lines)) if SEPARATOR in lines[i])
    closing = next(i for i in range(opening + 1, len(lines)) if SEPARATOR in lines[i])
    values = header_values(options, repo_head)
    header = []
    for line in lines[opening + 1:closing]:
        match = HEADER_LINE.match(line)
        if not match or match["key"] not in values:
            header.append(line)
        elif values[match["key"]] is not None:
            header.append(f"{match['pre']}{match['key']}: {values[match['key']]}{match['post']}")
    head = "\n".join(lines[:opening + 1] + header + [lines[closing]]) + "\n"
    return head, "\n".join(lines[closing + 1:]), new_id


def with_failed_article(text: str) -> str:
    """A failure's output with sync-success's article, images and a failed quality block
    printed after its result block."""
    success = fixture("sync-success.stdout").decode("utf-8")
    start = success.index("\n📝 生成的内容:\n")
    quality = success.index("\n🔍 文本质检:\n", start)
    end = success.index(f"{SEPARATOR}\n", success.index(f"{SEPARATOR}\n", quality) + 1)
    blocks = success[start:end + len(SEPARATOR) + 1]
    blocks = blocks.replace("状态: 通过", "状态: 未通过").replace("评分: 8.55/100", "评分: 5.2/100")
    result = text.index("\n✅ 执行成功\n")
    closing = text.index(f"{SEPARATOR}\n", text.index(f"{SEPARATOR}\n", result) + 1)
    cut = closing + len(SEPARATOR) + 1
    return text[:cut] + blocks + text[cut:]


def run_sync(options: dict) -> int:
    scenario = os.environ.get("FAKE_CC_SCENARIO", "success")
    if scenario not in SCENARIOS:
        sys.stderr.write(f"fake_content_creator: unknown FAKE_CC_SCENARIO {scenario!r}; "
                         f"choose from {', '.join(SCENARIOS)}\n")
        return 2
    name = SCENARIOS[scenario]
    repo_head = name.startswith("repo-head/")
    text = fixture(f"{name}.stdout").decode("utf-8")
    if scenario.startswith("quality-failure"):
        text = text.replace(CAPTURED_REASON, QUALITY_REASON)
    if scenario == "quality-failure-article":
        text = with_failed_article(text)
    head, rest, task_id = personalise(text, options, repo_head)
    spinner = fixture(f"{name}.stderr")
    split = spinner.index(b"\n") + 1
    emit(head.encode("utf-8"), spinner[:split])
    time.sleep(float(os.environ.get("FAKE_CC_DELAY") or 0))
    if repo_head:
        images = Path("data/images")
        images.mkdir(exist_ok=True)
        for path in re.findall(rf"^data/images/{re.escape(task_id)}_\d+_\d+\.png$", rest,
                               re.MULTILINE):
            Path(path).write_bytes(PNG_1X1)
    emit(rest.encode("utf-8"), spinner[split:])
    return int(fixture(f"{name}.exitcode"))


def main(argv: list[str]) -> int:
    log = os.environ.get("FAKE_CC_ARGV_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps(argv, ensure_ascii=False) + "\n")
    if any(not os.environ.get(key) for key in REQUIRED_ENV):
        return replay("missing-env")
    if not Path("data").is_dir():
        return replay("no-data-dir")
    if "-V" in argv or "--version" in argv:
        emit(fixture("version.txt"))
        return 0
    args = [arg for arg in argv if arg not in ("-v", "--verbose")]
    command = next((arg for arg in args if not arg.startswith("-")), None)
    if command is None:
        if args and args[0] not in ("-h", "--help"):
            return usage_error(f"unknown option '{args[0]}'")
        if args:
            emit(fixture("help.txt"))
            return 0
        # commander with subcommands and none given: the start-up stdout, then its help text
        # on stderr, exit 1.
        help_text = fixture("help.txt")
        usage = help_text.index(b"\nUsage: ") + 1
        emit(help_text[:usage], help_text[usage:])
        return 1
    before, after = args[:args.index(command)], args[args.index(command) + 1:]
    if "-h" in before or "--help" in before:
        emit(fixture("help.txt"))
        return 0
    if before:
        return usage_error(f"unknown option '{before[0]}'")
    if command not in COMMANDS:
        return usage_error(f"unknown command '{command}'")
    if command == "help":
        emit(fixture("create-help.txt" if after[:1] == ["create"] else "help.txt"))
        return 0
    if command != "create":
        return not_replayed(f"`{command}`")
    if "-h" in after or "--help" in after:
        emit(fixture("create-help.txt"))
        return 0
    options = parse_create(after)
    if isinstance(options, int):
        return options
    if not options["topic"]:
        return replay("missing-requirements", "❌ 错误: 必须提供文章主题 (-t, --topic)\n".encode())
    if not options["requirements"]:
        return replay("missing-requirements")
    if options["type"] != "content-creator" or options["mode"] != "sync":
        return not_replayed(f"--type {options['type']} --mode {options['mode']}")
    return run_sync(options)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
