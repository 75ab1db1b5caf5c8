"""Publishable articles: review history that cannot be undone by accident, honest drafts,
summaries of prose, export trees with their images."""

from __future__ import annotations

import http.server
import json
import os
import pwd
import re
import threading
from pathlib import Path

from conftest import CREATORS, command_creator, wait_until

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


def test_chinese_paragraphs_run_on_without_a_space_english_ones_get_one():
    md = "# 标题\n\n第一段。\n\n“引号”开头的第二段。\n\nEnglish follows. “Quoted” too.\n"
    assert plain_summary(md) == "第一段。“引号”开头的第二段。 English follows. “Quoted” too."


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


# -- media capture and export ----------------------------------------------------------------


class ImageServer:
    """Serves each image once, then answers 403 like an expired signed URL. In `mode`
    "unavailable" it answers 503 without counting; "html" serves a page instead of a PNG."""

    def __init__(self, images: dict[str, bytes]):
        self.images = images
        self.served: dict[str, int] = {}
        self.mode = "serve"
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.split("?")[0].rsplit("/", 1)[-1]
                if server.mode == "unavailable":
                    return self._reply(503, "text/plain", b"try later")
                if server.mode == "html":
                    return self._reply(200, "text/html", b"<html>login</html>")
                if self.path.startswith("/redirect/"):
                    self.send_response(302)
                    self.send_header("Location", f"/img/{name}?X-Tos-Expires=86400")
                    self.end_headers()
                    return None
                if name not in server.images or server.served.get(name):
                    return self._reply(403, "application/xml", b"<Error>AccessDenied</Error>")
                server.served[name] = 1
                return self._reply(200, "image/png", server.images[name])

            def _reply(self, status, content_type, body):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, name: str, redirect: bool = False) -> str:
        return f"{self.base}/{'redirect' if redirect else 'img'}/{name}?X-Tos-Expires=86400&sig=x"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def png(seed: int, size: int = 5000) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + bytes((seed * 31 + i * 7) % 256 for i in range(size))


MEDIA_TEST_CONFIG = """
[media]
allow_private = ["127.0.0.0/8"]
retry_backoff = "0.2s"
"""


def media_daemon(daemon_factory, urls: list[str], extra: str = MEDIA_TEST_CONFIG,
                 local: bool = False):
    return daemon_factory(creator=command_creator("article_with_images.py"), extra=extra,
                          env={"ARTICLE_IMAGES": json.dumps(urls),
                               "ARTICLE_LOCAL_IMAGE": "1" if local else "0"})


def saved_media(daemon, task_id: str, count: int) -> list[dict]:
    daemon.wait_status(task_id, "completed")

    def done():
        media = daemon.call("content.show", {"id": task_id})["media"]
        return len(media) == count and all(m["status"] != "pending" for m in media) and media
    return wait_until(done, 30, message="media to be captured")


def test_images_are_saved_before_their_urls_expire_and_export_links_them(daemon_factory,
                                                                         tmp_path):
    images = {"cover.png": png(1), "second.png": png(2, 70_000), "moved.png": png(3)}
    server = ImageServer(images)
    try:
        urls = [server.url("cover.png"), server.url("second.png"),
                server.url("moved.png", redirect=True)]
        daemon = media_daemon(daemon_factory, urls, local=True).start()
        task_id = daemon.submit("电池技术：续航解析", auto_approve=True)
        daemon.wait_status(task_id, "completed")
        media = saved_media(daemon, task_id, 4)
        assert [m["status"] for m in media] == ["saved"] * 4, media
        content = daemon.call("content.show", {"id": task_id})
        content_id = content["id"]
        for item, name in zip(media, images, strict=False):
            assert Path(item["path"]).read_bytes() == images[name]
            assert item["bytes"] == len(images[name]) and item["content_type"] == "image/png"
            assert Path(item["path"]).parent == daemon.state / "media" / str(content_id)
        local_copy = Path(media[3]["path"]).read_bytes()
        assert local_copy == (daemon.dir / "state" / "creator" / "data" / "images"
                              / f"{task_id}.png").read_bytes()
        # The URLs are dead now; the export works from the saved copies.
        assert server.served == {"cover.png": 1, "second.png": 1, "moved.png": 1}

        out = tmp_path / "export"
        exported = daemon.ctl("content", "export", "--dir", str(out))
        assert exported.returncode == 0, exported.stderr
        [document] = out.glob("*.md")
        text = document.read_text(encoding="utf-8")
        links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
        assert len(links) == 4 and not any("://" in link for link in links)
        for link, name in zip(links, images, strict=False):
            assert (document.parent / link).read_bytes() == images[name]
        front, body = text[4:].split("\n---\n\n", 1)
        assert body.index(links[0]) < body.index("第一段正文") < body.index(links[1])
        assert f'"{links[0]}"' in front  # images: the local copies

        jsonl = [json.loads(line) for line in
                 daemon.ctl("content", "export", "--jsonl").stdout.splitlines()]
        assert [m["path"] for m in jsonl[0]["media"]] == [m["path"] for m in media]

        # Cleanup prunes the task, not the article or its images; deleting the article does.
        assert daemon.ctl("task", "cleanup", "--days", "0").returncode == 0
        assert all(Path(m["path"]).exists() for m in media)
        deleted = daemon.ctl("content", "delete", str(content_id))
        assert deleted.returncode == 0, deleted.stderr
        assert not (daemon.state / "media" / str(content_id)).exists()
        assert daemon.scalar("SELECT COUNT(*) FROM content_media") == 0
    finally:
        server.close()


def test_refused_images_fail_without_retries_and_do_not_block_completion(daemon_factory):
    server = ImageServer({"big.png": png(4, 300_000), "page.png": png(5)})
    try:
        daemon = media_daemon(daemon_factory, [server.url("big.png"), server.url("page.png")],
                              extra=MEDIA_TEST_CONFIG + 'max_bytes = "100KiB"\n').start()
        task_id = daemon.submit("图片太大", auto_approve=True)
        daemon.wait_status(task_id, "completed")
        big, page = saved_media(daemon, task_id, 2)
        assert big["status"] == "failed" and "max_bytes" in big["error"]
        assert big["attempts"] == 1
        assert page["status"] == "saved"
        health = daemon.call("monitor.health")
        [media] = [check for check in health["checks"] if check["name"] == "media"]
        assert media["detail"] == "on; 0 image(s) waiting, 1 given up in the last day"
        content_id = daemon.call("content.show", {"id": task_id})["id"]
        assert f"content show {content_id}" in " ".join(health["warnings"])
    finally:
        server.close()


def test_private_addresses_and_non_images_are_refused(daemon_factory):
    server = ImageServer({"a.png": png(6)})
    try:
        server.mode = "html"
        daemon = media_daemon(daemon_factory, [server.url("a.png")], extra="").start()
        first = daemon.submit("不允许回环", auto_approve=True)
        [refused] = saved_media(daemon, first, 1)
        assert refused["status"] == "failed" and "allow_private" in refused["error"]
        assert server.served == {}
        daemon.stop()
        daemon.config_path.write_text(daemon.config_path.read_text() + MEDIA_TEST_CONFIG)
        daemon.start()
        second = daemon.submit("不是图片", auto_approve=True)
        [page] = saved_media(daemon, second, 1)
        assert page["status"] == "failed" and "text/html" in page["error"]
    finally:
        server.close()


def test_kill_9_with_downloads_pending_loses_no_image(daemon_factory):
    images = {"one.png": png(7), "two.png": png(8)}
    server = ImageServer(images)
    try:
        server.mode = "unavailable"
        extra = MEDIA_TEST_CONFIG + "max_attempts = 100\n"
        daemon = media_daemon(daemon_factory, [server.url(n) for n in images],
                              extra=extra).start()
        task_id = daemon.submit("断电测试")
        daemon.wait_status(task_id, "completed")  # the completion never waits for images
        wait_until(lambda: daemon.scalar("SELECT MIN(attempts) FROM content_media") >= 1, 30)
        assert daemon.scalar("SELECT COUNT(*) FROM content_media WHERE status = 'pending'") == 2
        daemon.kill9()
        server.mode = "serve"
        daemon.start()
        media = saved_media(daemon, task_id, 2)
        assert [Path(m["path"]).read_bytes() for m in media] == list(images.values())
        assert daemon.scalar("SELECT COUNT(*) FROM contents") == 1
    finally:
        server.close()


def test_export_defaults_to_approved_articles(daemon_factory, tmp_path):
    daemon = daemon_factory(creator=command_creator("json_article.py")).start()
    tasks = [daemon.submit(f"导出筛选 {i}") for i in range(3)]
    ids = [daemon.wait_status(t, "completed")["content_id"] for t in tasks]
    daemon.call("content.approve", {"ids": [ids[0]]})
    daemon.call("content.reject", {"ids": [ids[1]], "reason": "off topic"})

    def exported(*args):
        lines = daemon.ctl("content", "export", "--jsonl", *args).stdout.splitlines()
        return sorted(json.loads(line)["id"] for line in lines)

    assert exported() == [ids[0]]
    assert exported("--review-status", "rejected") == [ids[1]]
    assert exported("--review-status", "pending_review") == [ids[2]]
    assert exported("--review-status", "any") == sorted(ids)
    assert exported(str(ids[2])) == [ids[2]]


def test_content_publish_hands_the_publisher_the_saved_images(daemon_factory, tmp_path):
    images = {"post.png": png(9)}
    server = ImageServer(images)
    try:
        publish = f"""
[publish]
command = ["{CREATORS / 'publisher.py'}", "--id", "{{content_id}}"]
"""
        daemon = media_daemon(daemon_factory, [server.url("post.png")],
                              extra=MEDIA_TEST_CONFIG + publish).start()
        task_id = daemon.submit("手动发布", auto_approve=True)
        [saved] = saved_media(daemon, task_id, 1)
        waiting = daemon.submit("待审核不能发布")  # its copy of the image meets a 403
        daemon.wait_status(waiting, "completed")
        content_id = daemon.call("content.show", {"id": task_id})["id"]

        refused = daemon.ctl("content", "publish", waiting)
        assert refused.returncode == 1 and "pending_review" in refused.stderr
        published = daemon.ctl("content", "publish", str(content_id))
        assert published.returncode == 0, published.stderr
        assert f"https://example.invalid/posts/{content_id}" in published.stdout
        [record] = [json.loads(line) for line in
                    (tmp_path / "published.jsonl").read_text().splitlines()]
        assert record["media"] == [{"path": saved["path"], "size": len(images["post.png"])}]
        assert record["media_dir"] == str(daemon.state / "media" / str(content_id))
        assert record["env_id"] == str(content_id)
        content = daemon.call("content.show", {"id": content_id})
        assert content["publish_status"] == "published"
        assert content["published_url"] == f"https://example.invalid/posts/{content_id}"
        event = content["history"][-1]
        assert (event["action"], event["from_status"], event["to_status"], event["actor"]) == (
            "publish", "draft", "published", pwd.getpwuid(os.getuid()).pw_name)

        again = daemon.ctl("content", "publish", str(content_id))
        assert again.returncode == 1 and "--force" in again.stderr
        assert daemon.ctl("content", "publish", str(content_id), "--force").returncode == 0
        assert len((tmp_path / "published.jsonl").read_text().splitlines()) == 2
    finally:
        server.close()


def test_export_front_matter_carries_model_and_the_cost_of_every_attempt(daemon_factory,
                                                                         tmp_path):
    prices = ('[budget]\ncurrency = "CNY"\n[budget.prices]\n'
              '"deepseek-chat" = { input = 2.0, output = 8.0 }\n')
    daemon = daemon_factory(creator=command_creator("usage_article.py"), extra=prices, env={
        "USAGE_MODEL": "deepseek-chat", "USAGE_FAIL_FIRST": "1", "USAGE_STYLE": "camel"})
    daemon.start()
    task_id = daemon.submit("成本 测试", keywords="预算", auto_approve=True)
    daemon.wait_status(task_id, "completed")
    out = tmp_path / "export"
    assert daemon.ctl("content", "export", "--dir", str(out)).returncode == 0
    [document] = out.glob("*.md")
    front = document.read_text(encoding="utf-8").split("\n---\n", 1)[0]
    fields = dict(line.split(": ", 1) for line in front.splitlines()[1:])
    # Two attempts of 1000 in + 500 out at 2.0/8.0 per million tokens: 0.006 each.
    assert abs(json.loads(fields["cost"]) - 0.012) < 1e-9
    assert json.loads(fields["model"]) == "deepseek-chat"
    assert json.loads(fields["keywords"]) == "预算" and json.loads(fields["category"]) == "技术"
