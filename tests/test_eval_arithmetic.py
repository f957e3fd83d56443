"""Tests for dms_jax.eval.arithmetic with the real SmolLM2 tokenizer: questions, shots, the long system filler,
number extraction and voting."""

from __future__ import annotations

import re

import pytest

from dms_jax.eval import arithmetic, tasks


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


# ------------------------------------------------------------------------------------------------ arithmetic + voting


def test_arithmetic_cases_and_scoring(tok):
    cases = arithmetic.make_arithmetic_cases(tok, 20, seed=0, ops=("+", "-"), num_shots=2)
    for case in cases:
        q = case.meta["question"]
        m = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\? Answer with the number only\.", q)
        assert m, q
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        assert case.answer == str(a + b if op == "+" else a - b) and int(case.answer) >= 0
        text = tok.decode(case.prompt_ids)
        assert len(case.meta["shots"]) == 2 and all(s[0] in text and s[1] in text for s in case.meta["shots"])
        assert all(re.fullmatch(r"\d+ [+-] \d+ = \d+", s[1]) for s in case.meta["shots"])
        assert text.endswith(f"<|im_start|>assistant\n{a} {op} {b} =")
        assert tasks.score(case, f" {case.answer}\n\nThis is") == 1.0
        assert tasks.score(case, f" {int(case.answer) + 1}") == 0.0
    assert arithmetic.make_arithmetic_cases(tok, 20, seed=0, ops=("+", "-"), num_shots=2) == cases
    bare = arithmetic.make_arithmetic_cases(tok, 1, seed=0, answer_prefix=False)[0]
    assert tok.decode(bare.prompt_ids).endswith("Answer with the number only.<|im_end|>\n<|im_start|>assistant\n")


def test_extract_number_and_majority_vote():
    assert arithmetic.extract_number(" 42\n\nThis is") == "42"
    assert arithmetic.extract_number("The answer is 1,024.") == "1024"
    assert arithmetic.extract_number("-7 degrees") == "-7"
    assert arithmetic.extract_number("42.0") == "42"
    assert arithmetic.extract_number("no digits") is None
    assert tasks.majority_vote(["3", "4", "4", None, "3", "4"]) == "4"
    assert tasks.majority_vote(["5", "6", "6", "5"]) == "5"  # tie: first seen wins
    assert tasks.majority_vote([None, None]) is None
    assert tasks.majority_vote([]) is None
    samples = [" 12", "13", "the answer is 12", "12.", "x"]
    assert tasks.majority_vote(arithmetic.extract_number(s) for s in samples) == "12"


def test_arithmetic_behind_a_long_system_filler(tok):
    short = arithmetic.make_arithmetic_cases(tok, 3, seed=5)
    long = arithmetic.make_arithmetic_cases(tok, 3, seed=5, target_tokens=1024)
    for s, c in zip(short, long):
        assert abs(c.num_tokens - 1024) <= 8 and c.meta["n_filler"] > 100
        assert c.answer == s.answer and c.meta["shots"] == s.meta["shots"]  # the same question and examples
        text = tok.decode(c.prompt_ids)
        assert text.startswith(f"<|im_start|>system\n{arithmetic.ARITHMETIC_BACKGROUND} The grass is green.")
        # The question and its examples come after the filler, unchanged.
        assert text.endswith(tok.decode(s.prompt_ids).split("<|im_end|>\n", 1)[1])
    assert arithmetic.make_arithmetic_cases(tok, 3, seed=5, target_tokens=1024) == long
    sys_case = arithmetic.make_arithmetic_cases(tok, 1, seed=5, target_tokens=600, system="Be brief.")[0]
    assert tok.decode(sys_case.prompt_ids).startswith("<|im_start|>system\nBe brief.\n\nBackground text")
    with pytest.raises(ValueError, match="target_tokens"):
        arithmetic.make_arithmetic_cases(tok, 1, target_tokens=20)
    with pytest.raises(ValueError, match="target_tokens"):
        arithmetic.make_arithmetic_cases(tok, 1, target_tokens=0)
