"""Publishable articles: review history that cannot be undone by accident, honest drafts,
summaries of prose, export trees with their images."""

from __future__ import annotations

import json
import os
import pwd

from conftest import command_creator

from contenthubd import plain_summary

ZH_ARTICLE = """# AI 技术解析：从大模型到智能应用

![配图一](data/images/a.png)

人工智能（AI）正在以前所未有的速度改变我们的工作与生活。从最早的规则系统，到今天能够理解和\
生成自然语言的大语言模型（LLM），AI 技术经历了数次范式转移。本文将从技术原理、关键能力和落地\
实践三个方面，系统解析当前 AI 技术的核心脉络。

## 一、技术原理

现代 LLM 的基础是 2017 年提出的 **Transformer** 架构。
"""

EN_ARTICLE = """Why *batteries* matter
======================

Electric cars live or die by their [batteries](https://example.com/b). Range, price and \
charging speed all follow from the cell chemistry, which is why version 2.5 of the report \
spends most of its pages on it. The rest of this article walks through the three \
chemistries that matter today and what each one means for drivers.

## Lithium iron phosphate

Cheap and durable.
"""


def ctl_json(daemon, *args):
    result = daemon.ctl("--format", "json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- summary ---------------------------------------------------------------------------------


def test_chinese_summary_is_whole_first_sentences_without_title_or_markdown():
    summary = plain_summary(ZH_ARTICLE)
    assert summary == ("人工智能（AI）正在以前所未有的速度改变我们的工作与生活。从最早的规则系统，"
                       "到今天能够理解和生成自然语言的大语言模型（LLM），AI 技术经历了数次范式转移。"
                       "本文将从技术原理、关键能力和落地实践三个方面，系统解析当前 AI 技术的核心脉络。"
                       "现代 LLM 的基础是 2017 年提出的 Transformer 架构。")
    assert "技术解析：" not in summary and "#" not in summary and len(summary) <= 200


def test_english_summary_stops_at_the_last_sentence_that_fits():
    summary = plain_summary(EN_ARTICLE)
    assert summary == ("Electric cars live or die by their batteries. Range, price and charging"
                       " speed all follow from the cell chemistry, which is why version 2.5 of"
                       " the report spends most of its pages on it.")
    assert "batteries matter" not in summary


def test_a_first_sentence_over_the_limit_is_cut_at_a_word_boundary():
    english = plain_summary("# T\n\n" + "unbelievably " * 30 + "long.")
    assert len(english) <= 200 and english.endswith("unbelievably…")
    chinese = plain_summary("# 标题\n\n" + "这是一个没有句号的很长的句子，" * 20)
    assert len(chinese) <= 200 and chinese.endswith("…")
    assert chinese[:-1].endswith("句子")  # cut after a comma, the comma dropped


def test_summary_skips_images_code_tables_and_setext_headings():
    md = ("Heading\n-------\n\n```\ncode.\n```\n\n| a | b |\n|---|---|\n\n"
          "![x](y.png)\n\n- First item\n- Second item.\n\nLast paragraph.\n")
    assert plain_summary(md) == "First item Second item. Last paragraph."


# -- review history --------------------------------------------------------------------------


def test_review_history_conflicts_force_and_unchanged(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    task_id = daemon.submit("审核历史")
    daemon.wait_status(task_id, "completed")
    content_id = daemon.call("content.show", {"id": task_id})["id"]
    me = pwd.getpwuid(os.getuid()).pw_name

    rejected = daemon.ctl("content", "reject", str(content_id), "--reason", "标题不够吸引人")
    assert rejected.returncode == 0, rejected.stderr
    # Approving a rejected article is a conflict; nothing changes, the reason stays.
    conflict = daemon.ctl("content", "approve", str(content_id))
    assert conflict.returncode == 1
    assert "conflict" in conflict.stderr and "--force" in conflict.stderr
    shown = daemon.call("content.show", {"id": content_id})
    assert shown["review_status"] == "rejected" and shown["review_reason"] == "标题不够吸引人"

    forced = ctl_json(daemon, "content", "approve", str(content_id), "--force",
                      "--reason", "重新评估")
    assert forced == {"updated": [content_id], "unchanged": [], "missing": []}
    again = daemon.ctl("content", "approve", str(content_id))
    assert again.returncode == 0 and "unchanged" in again.stdout
    history = daemon.call("content.show", {"id": content_id})["history"]
    assert [(h["action"], h["from_status"], h["to_status"], h["reason"]) for h in history] == [
        ("created", None, "pending_review", None),
        ("reject", "pending_review", "rejected", "标题不够吸引人"),
        ("approve", "rejected", "approved", "重新评估")]
    assert history[1]["actor"] == me and history[1]["actor_uid"] == os.getuid()
    assert history[0]["actor"] == "contenthubd" and history[0]["actor_uid"] is None
    table = daemon.ctl("content", "show", str(content_id)).stdout
    assert "history:" in table and "标题不够吸引人" in table


def test_a_conflict_in_a_batch_changes_none_of_it(daemon_factory):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    first, second = (daemon.submit(f"批量审核 {i}") for i in range(2))
    ids = [daemon.wait_status(t, "completed")["content_id"] for t in (first, second)]
    daemon.call("content.approve", {"ids": [ids[0]]})
    reply = daemon.request("content.reject", {"ids": ids, "reason": "x"})
    assert not reply["ok"] and reply["error"]["code"] == "conflict"
    assert reply["error"]["data"] == {"conflicts": [ids[0]]}
    statuses = [daemon.call("content.show", {"id": i})["review_status"] for i in ids]
    assert statuses == ["approved", "pending_review"]


# -- honest drafts ---------------------------------------------------------------------------


def test_offline_drafts_say_so_in_show_list_and_export(daemon_factory, tmp_path):
    daemon = daemon_factory().start()
    task_id = daemon.submit("新能源汽车 电池技术解析", keywords="电池,续航", auto_approve=True)
    daemon.wait_status(task_id, "completed")
    content = daemon.call("content.show", {"id": task_id})
    assert content["generator"] == "offline-template"
    assert content["keywords"] == "电池,续航" and content["category"] == "技术"
    assert "offline-template (a placeholder draft" in daemon.ctl("content", "show",
                                                                task_id).stdout
    assert "offline-template (placeholder)" in daemon.ctl("content", "list").stdout
    out = tmp_path / "export"
    assert daemon.ctl("content", "export", "--dir", str(out)).returncode == 0
    [document] = list(out.rglob("*.md"))
    front = document.read_text(encoding="utf-8").split("---\n")[1]
    assert 'generator: "offline-template"' in front and 'keywords: "电池,续航"' in front
