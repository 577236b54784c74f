"""A token count where no model reported one.

No tokenizer ships with botline (they download vocabularies at run time,
and vary by model), so this estimates: one token per word or punctuation
mark, one per CJK character. Workers use it for models that report no
usage (upstreams that report usage are believed); gateways use it to
reserve a request's tokens at admission and to charge what a caller who
hung up was sent. One estimator for both, so the two agree.
"""

from __future__ import annotations

import re

from shared.wire import ChatMessage

_TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]|\w+|[^\w\s]", re.UNICODE)


def estimate(text: str) -> int:
    """An estimate of the tokens in a text."""
    return len(_TOKEN.findall(text))


def estimate_prompt(messages: list[ChatMessage]) -> int:
    """An estimate of a prompt's tokens, with OpenAI's few per-message extras."""
    return sum(estimate(m.text) + 4 for m in messages) + 2 if messages else 0
