"""Sizes of text requests for the batcher's ``size=`` (docs/serving.md, "Sizes").

An encoder's forward costs about its tokens' work: the projections are linear
in the tokens, attention grows with L^2 per text (at L = 200, 8% of MiniLM's
FLOPs; 2% at 56). ``EncoderWork(model)`` prices a text as the FLOPs of
``model.describe(tokens)`` at its token count, so the batcher's unit for a
class is the FLOPs of the op its profile measured (``op.flops()``, the
batcher's default, or ``work_of(tokens)`` of the texts measured).
"""
from __future__ import annotations

from typing import Dict


class EncoderWork:
    """``size(text)``: the FLOPs of the model's forward of ``text``
    (``model.count_tokens`` then ``model.describe``; cached per token count,
    at most the tokenizer's truncation length of entries)."""

    def __init__(self, model):
        self.model = model
        self._flops: Dict[int, float] = {}

    def work_of(self, tokens: int) -> float:
        """FLOPs of the forward of one text of ``tokens`` tokens."""
        tokens = max(1, int(tokens))
        f = self._flops.get(tokens)
        if f is None:
            f = self._flops[tokens] = float(self.model.describe(tokens).flops())
        return f

    def __call__(self, text) -> float:
        return self.work_of(self.model.count_tokens(text))

    def mean_work(self, texts) -> float:
        """Mean work of ``texts`` (a unit_size for a profile measured on them)."""
        texts = list(texts)
        return sum(self(t) for t in texts) / max(1, len(texts))


__all__ = ["EncoderWork"]
