"""Tests for dms_jax.eval.prompts: the natural filler (held-out prose, nothing that passes for an answer)."""

from __future__ import annotations

import re

from dms_jax.eval import prompts


def test_natural_filler_is_heldout_prose_without_answer_lookalikes():
    from dms_jax.data import corpus

    sentences = prompts.natural_filler_sentences()
    assert len(sentences) > 100 and len(set(sentences)) > 0.9 * len(sentences)
    assert all(25 <= len(s) <= 160 and not re.search(r"\d{5}|\b[A-Z]{5}\b|VAR", s) for s in sentences)
    train, heldout = corpus.split_documents(corpus.builtin_documents(), 0.05, "dms-jax-heldout")
    flat = lambda docs: " ".join(" ".join(d.split()) for d in docs)  # noqa: E731 - the prose with lines joined
    held_text, train_text = flat(heldout), flat(train)
    picked = sentences[:: max(1, len(sentences) // 25)]
    assert all(s in held_text for s in picked)
    assert not any(s in train_text for s in sentences)  # not even a stock phrase that training documents share
