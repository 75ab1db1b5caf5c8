#!/usr/bin/env python3
"""Topic research through Tavily search, for `[creator] topics_command`.

contenthubd's `topic_research` executor runs this once per account with the request on
stdin, {"account_id", "account_name", "category", "count", "hint", "avoid": [...]}, and reads
a JSON array of {"topic", "keywords"} on stdout. The search query is the hint (else the
category, else the account name); news results from the last TAVILY_DAYS days become topics,
titles close to one in "avoid" left out (contenthubd deduplicates again against the pool and
the account's history).

Environment: TAVILY_API_KEY (required), TAVILY_BASE_URL (default https://api.tavily.com),
TAVILY_DAYS (default 7). Standard library only. Exit 0 topics printed, 1 retryable failure
(network, 429, 5xx), 2 permanent (no key, bad request, the API refusing the key).

    [creator]
    topics_command = ["/usr/bin/python3", "/srv/contenthubd/examples/tavily_topics.py"]
    env = { TAVILY_API_KEY = "${TAVILY_API_KEY}" }
"""

import json
import os
import re
import sys
import unicodedata
import urllib.error
import urllib.request

TIMEOUT_S = 30


def key(text: str) -> str:
    """The daemon's topic normalisation: NFKC, case-folded, no whitespace or punctuation."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(char for char in text if not char.isspace()
                   and not unicodedata.category(char).startswith(("P", "Z", "Cc", "Cf")))


def headline(title: str) -> str:
    """A result title as a topic: one line, without a trailing " - Site name" or " | Site"."""
    title = " ".join(title.split())
    return re.sub(r"\s+[-|_–—]\s+[^-|_–—]{1,30}$", "", title).strip()


def search(query: str, count: int, api_key: str) -> list[dict]:
    base = os.environ.get("TAVILY_BASE_URL", "https://api.tavily.com").rstrip("/")
    body = json.dumps({"query": query, "topic": "news", "max_results": min(20, count * 2),
                       "days": int(os.environ.get("TAVILY_DAYS", "7")),
                       "search_depth": "basic"}, ensure_ascii=False).encode()
    request = urllib.request.Request(f"{base}/search", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return json.loads(response.read()).get("results") or []


def main() -> int:
    api_key = os.environ.get("TAVILY_API_KEY", "").strip()
    if not api_key:
        print("tavily_topics: TAVILY_API_KEY is not set", file=sys.stderr)
        return 2
    try:
        request = json.loads(sys.stdin.read())
        count = int(request.get("count") or 5)
    except (ValueError, AttributeError) as exc:
        print(f"tavily_topics: expected the research request as JSON on stdin: {exc}",
              file=sys.stderr)
        return 2
    query = (request.get("hint") or request.get("category") or request.get("account_name")
             or "").strip()
    if not query:
        print("tavily_topics: nothing to search for (no hint, category or account name)",
              file=sys.stderr)
        return 2
    try:
        results = search(query, count, api_key)
    except urllib.error.HTTPError as exc:
        print(f"tavily_topics: Tavily answered HTTP {exc.code}", file=sys.stderr)
        return 1 if exc.code == 429 or exc.code >= 500 else 2
    except (OSError, ValueError) as exc:
        print(f"tavily_topics: search failed: {exc}", file=sys.stderr)
        return 1
    taken = {key(text) for text in request.get("avoid") or [] if isinstance(text, str)}
    topics = []
    for result in results:
        topic = headline(str(result.get("title") or ""))
        if topic and key(topic) not in taken:
            taken.add(key(topic))
            topics.append({"topic": topic, "keywords": query})
    print(json.dumps(topics[:count], ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
