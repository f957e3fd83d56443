"""Tests for dms_jax.eval.passkey (passkey, multikey) with the real SmolLM2 tokenizer: lengths, depths, keys,
scorers."""

from __future__ import annotations

import re

import pytest

from dms_jax.eval import passkey, tasks
from dms_jax.eval.prompts import Case


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


# ------------------------------------------------------------------------------------------------ passkey


@pytest.mark.parametrize("target", [1024, 2048, 4096])
def test_passkey_length_depth_and_key(tok, target):
    depths = [0.0, 0.25, 0.5, 0.9, 1.0]
    cases = passkey.make_passkey_cases(tok, len(depths), seed=3, target_tokens=target, depth=depths)
    for case, depth in zip(cases, depths):
        assert isinstance(case, Case)
        assert abs(case.num_tokens - target) <= max(8, 0.01 * target)
        assert re.fullmatch(r"[1-9]\d{4}", case.answer)
        # The prompt is the chat template with the question asked at the end.
        text = tok.decode(case.prompt_ids)
        assert text == case.meta["prompt"]
        assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
        assert text.rstrip().endswith("What is the pass key?<|im_end|>\n<|im_start|>assistant")
        assert text.count(case.answer) == 2  # "The pass key is K. Remember it. K is the pass key."
        assert "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again." in text
        # The needle sits at the requested depth of the filler, measured in tokens.
        assert case.meta["depth"] == depth
        assert abs(case.meta["depth_tokens"] - depth) < 0.02
        i = case.meta["needle_token"]
        assert tok.decode(case.prompt_ids[i : i + 12]).strip().startswith(f"The pass key is {case.answer}")
        hay = text.index("\n\n") + 2
        hay_end = text.rindex("\n\nWhat is the pass key?")
        needle = f"The pass key is {case.answer}. Remember it. {case.answer} is the pass key."
        frac = (text.index(needle) - hay) / (hay_end - hay - len(needle))
        assert abs(frac - depth) < 0.03


def test_passkey_cases_are_seeded_and_prefix_stable(tok):
    a = passkey.make_passkey_cases(tok, 6, seed=11, target_tokens=600)
    b = passkey.make_passkey_cases(tok, 3, seed=11, target_tokens=600)
    assert a[:3] == b
    assert [c.meta["depth"] for c in a] == [c.meta["depth"] for c in b] + [c.meta["depth"] for c in a[3:]]
    c = passkey.make_passkey_cases(tok, 6, seed=12, target_tokens=600)
    assert [x.answer for x in a] != [x.answer for x in c]
    assert len({x.answer for x in a}) > 1 and len({round(x.meta["depth"], 3) for x in a}) > 1
    pref = passkey.make_passkey_cases(tok, 1, seed=11, target_tokens=600, assistant_prefix="The pass key is")
    assert tok.decode(pref[0].prompt_ids).endswith("<|im_start|>assistant\nThe pass key is")


def test_passkey_scorer():
    assert passkey.score_passkey("The pass key is 41792.", "41792") == 1.0
    assert passkey.score_passkey("41792", "41792") == 1.0
    assert passkey.score_passkey("It is 12345, not 41792.", "41792") == 0.0  # the first 5-digit number counts
    assert passkey.score_passkey("The pass key is 417921.", "41792") == 0.0  # not a five-digit number
    assert passkey.score_passkey("The pass key is 4179.", "41792") == 0.0
    assert passkey.score_passkey("I do not know.", "41792") == 0.0
    assert passkey.score_passkey("", "41792") == 0.0
    case = Case((1, 2, 3), "41792", {"task": "passkey"})
    assert tasks.score(case, "key: 41792") == 1.0 and tasks.score(case, "key: 41793") == 0.0


def test_multikey_places_every_key_and_asks_one(tok):
    cases = passkey.make_multikey_cases(tok, 6, seed=1, target_tokens=2048, num_keys=5)
    assert len({c.meta["label"] for c in cases}) > 1
    for case in cases:
        text = case.meta["prompt"]
        assert abs(case.num_tokens - 2048) <= 8 and len(case.meta["labels"]) == 5
        assert case.answer == case.meta["values"][case.meta["labels"].index(case.meta["label"])]
        for label, value in zip(case.meta["labels"], case.meta["values"]):
            assert text.count(f"The code for {label} is {value}.") == 1
        assert text.endswith(f"Which code was given for {case.meta['label']}?<|im_end|>\n<|im_start|>assistant\n")
        assert abs(case.meta["depth_tokens"] - case.meta["depth"]) < 0.03
    assert [c.meta["labels"] for c in cases] != [c.meta["labels"] for c in cases[::-1]]
    with pytest.raises(ValueError, match="num_keys"):
        passkey.make_multikey_cases(tok, 1, num_keys=0)
