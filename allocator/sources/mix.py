"""A calibration text for causal LMs of several domains: news, code, documentation and dialogue.

A causal LM calibrated on one small news corpus alone lost about twice as much, in log
perplexity, on encyclopedia text as on held-out news (SmolLM2-135M at 3.0-4.25 bpw). The mix
draws its calibration windows from four kinds of text that ship with Python packages, each
tokenized into windows of its own (`text.token_windows`) and drawn in a fixed share:

| part | text | package |
|---|---|---|
| news | the 300 articles of `lee_background.cor` | gensim |
| code | Python modules of the standard library (`CODE_MODULES`, whole files) | Python |
| docs | the language reference's topics (`pydoc_data.topics`, English prose with code) | Python |
| dialogue | conversations in English and nine other languages (`DIALOGUE_LANGUAGES`) | chatterbot-corpus |

Held-out windows stay news windows, so that held-out figures compare with plans calibrated on the
news alone. gensim's other test texts (the Wikipedia dump, ...) are evaluation text and never
part of the mix.

It is `--data mix`, not the default: on SmolLM2-135M its plans measured worse than plans
calibrated on 32 news windows, on held-out news and on Wikipedia alike (perplexity / FP on
Wikipedia 1.617 / 1.297 / 1.095 at 3.0 / 3.5 / 4.25 bpw, against 1.531 / 1.257 / 1.087).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import ModelError
from .text import lee_documents

__all__ = ["CODE_MODULES", "DIALOGUE_LANGUAGES", "MIX_PARTS", "MIX_SHARES", "mix_documents", "mix_shares"]

MIX_PARTS = ("news", "code", "docs", "dialogue")
MIX_SHARES = {"news": 0.375, "code": 0.25, "docs": 0.1875, "dialogue": 0.1875}  # of the calibration windows

# Standard-library modules of many styles (parsing, numerics, data structures, I/O, text, classes).
CODE_MODULES = (
    "argparse", "ast", "asyncio.tasks", "base64", "bisect", "calendar", "collections", "configparser", "copy", "csv",
    "dataclasses", "datetime", "difflib", "email.message", "enum", "fractions", "functools", "gettext",
    "heapq", "html.parser", "http.client", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging",
    "mailbox", "operator", "pathlib", "pickle", "pprint", "queue", "random", "shlex", "shutil", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "tokenize", "typing", "unittest.case",
    "urllib.parse", "uuid", "wave", "zipfile",
)  # fmt: skip
DIALOGUE_LANGUAGES = (
    "english", "spanish", "portuguese", "italian", "german", "french", "dutch", "russian", "chinese", "japanese",
)  # fmt: skip


def mix_shares(windows: int) -> dict[str, int]:
    """Calibration windows per part for `windows` in all (each part at least one; the news takes
    what rounding leaves)."""
    if windows < len(MIX_PARTS):
        raise ModelError(f"the calibration mix draws from {len(MIX_PARTS)} texts: use --calibration {len(MIX_PARTS)}"
                         " or more, or --data news for the news text alone")  # fmt: skip
    counts = {p: max(1, round(windows * MIX_SHARES[p])) for p in MIX_PARTS if p != "news"}
    counts["news"] = windows - sum(counts.values())
    return {p: counts[p] for p in MIX_PARTS}


def mix_documents() -> dict[str, list[str]]:
    """The documents of each part of the mix, in a fixed order."""
    return {"news": lee_documents(), "code": _code(), "docs": _docs(), "dialogue": _dialogue()}


def _code() -> list[str]:
    docs = []
    for name in CODE_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue  # a module this Python builds without sources
        docs.append(Path(spec.origin).read_text(encoding="utf-8"))
    if not docs:
        raise ModelError("this Python ships no standard-library sources; give --data news or your own --data text")
    return docs


def _docs() -> list[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        raise ModelError("this Python lacks pydoc_data; give --data news or your own --data text") from None
    return [topics[k].strip() for k in sorted(topics) if len(topics[k]) >= 200]


def _dialogue() -> list[str]:
    try:
        import chatterbot_corpus
        import yaml
    except ImportError:
        raise ModelError("the calibration mix's dialogue needs chatterbot-corpus and pyyaml:"
                         " pip install 'allocator[examples]' (or --data news)") from None  # fmt: skip
    root = Path(chatterbot_corpus.__file__).parent / "data"
    docs = []
    for language in DIALOGUE_LANGUAGES:
        for path in sorted((root / language).glob("*.yml")):
            record = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for talk in record.get("conversations") or []:
                lines = [str(line).strip() for line in talk if str(line).strip()]
                if len(lines) >= 2:
                    docs.append("\n".join(lines))
    return docs
