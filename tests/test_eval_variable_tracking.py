"""Tests for dms_jax.eval.variable_tracking with the real SmolLM2 tokenizer: chains, shots, the scorer."""

from __future__ import annotations

import re

import pytest

from dms_jax.eval import tasks, variable_tracking
from dms_jax.eval.prompts import Case


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


# ------------------------------------------------------------------------------------------------ variable tracking


def test_variable_tracking_chains_are_consistent(tok):
    cases = variable_tracking.make_variable_tracking_cases(tok, 5, seed=2, target_tokens=1024, num_chains=2, num_hops=3)
    for case in cases:
        text = tok.decode(case.prompt_ids)
        assert text == case.meta["prompt"]
        assert abs(case.num_tokens - 1024) <= 10
        value = case.meta["value"]
        chain = case.meta["variables"]
        assert len(chain) == 4 and case.answer == " ".join(chain)
        assert f"assigned the value {value} in the text above" in text
        question = case.meta["question"]
        assert question in text and text.index(question) > text.rindex("<|im_start|>user")
        env = variable_tracking.resolve_assignments(question)
        assert len(env) == 8  # every statement present, all names distinct
        # One solved example first (RULER's in-context example), with other names and values.
        shot_env = variable_tracking.resolve_assignments(text[: text.rindex("<|im_start|>user")])
        assert len(shot_env) == 8 and not set(shot_env) & set(env) and value not in shot_env.values()
        shot_value = re.search(r"assigned the value (\d{5}) in the text above", text).group(1)
        shot_vars = sorted(v for v, x in shot_env.items() if x == shot_value)
        shot_answer = text[: text.rindex("<|im_start|>user")].rsplit("they are:", 1)[1]
        assert len(shot_vars) == 4 and all(v in shot_answer for v in shot_vars)
        assert sorted(v for v, x in env.items() if x == value) == sorted(chain)
        # Chain order: each variable is assigned from the previous one, after it.
        assert f"VAR {chain[0]} = {value}." in text
        for prev, cur in zip(chain, chain[1:]):
            assert question.index(f"VAR {cur} = VAR {prev}.") > question.index(f"VAR {prev} =")
        other = [c for c in case.meta["chains"] if c != chain]
        assert len(other) == 1 and env[other[0][-1]] != value
        assert text.endswith("they are:")
    bare = variable_tracking.make_variable_tracking_cases(
        tok, 1, seed=2, target_tokens=300, num_hops=4, num_shots=0, answer_prefix=False
    )[0]
    assert tok.decode(bare.prompt_ids).count("<|im_start|>user") == 1
    assert len(variable_tracking.resolve_assignments(tok.decode(bare.prompt_ids))) == 5


def test_variable_tracking_scorer():
    answer = "ABCDE FGHIJ KLMNO"
    assert variable_tracking.score_variable_tracking("ABCDE, FGHIJ and KLMNO", answer) == 1.0
    assert variable_tracking.score_variable_tracking("ABCDE FGHIJ", answer) == pytest.approx(2 / 3)
    assert variable_tracking.score_variable_tracking("ABCDE FGHIJ", answer, mode="all") == 0.0
    assert variable_tracking.score_variable_tracking("XABCDEX", answer) == 0.0  # whole names only
    case = Case((1,), answer, {"task": "variable_tracking"})
    assert tasks.score(case, "KLMNO") == pytest.approx(1 / 3)
