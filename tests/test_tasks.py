"""Tests for dms_jax.tasks with the real SmolLM2 tokenizer: lengths, depths, chains, scorers, voting."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dms_jax import tasks
from dms_jax.tasks import Case


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


# ------------------------------------------------------------------------------------------------ passkey


@pytest.mark.parametrize("target", [1024, 2048, 4096])
def test_passkey_length_depth_and_key(tok, target):
    depths = [0.0, 0.25, 0.5, 0.9, 1.0]
    cases = tasks.make_passkey_cases(tok, len(depths), seed=3, target_tokens=target, depth=depths)
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
    a = tasks.make_passkey_cases(tok, 6, seed=11, target_tokens=600)
    b = tasks.make_passkey_cases(tok, 3, seed=11, target_tokens=600)
    assert a[:3] == b
    assert [c.meta["depth"] for c in a] == [c.meta["depth"] for c in b] + [c.meta["depth"] for c in a[3:]]
    c = tasks.make_passkey_cases(tok, 6, seed=12, target_tokens=600)
    assert [x.answer for x in a] != [x.answer for x in c]
    assert len({x.answer for x in a}) > 1 and len({round(x.meta["depth"], 3) for x in a}) > 1
    # Using the chat template directly gives the same ids.
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert tasks.chat_prompt_ids(tok, "hello") == tok(ids, add_special_tokens=False)["input_ids"]
    pref = tasks.make_passkey_cases(tok, 1, seed=11, target_tokens=600, assistant_prefix="The pass key is")
    assert tok.decode(pref[0].prompt_ids).endswith("<|im_start|>assistant\nThe pass key is")


def test_passkey_scorer():
    assert tasks.score_passkey("The pass key is 41792.", "41792") == 1.0
    assert tasks.score_passkey("41792", "41792") == 1.0
    assert tasks.score_passkey("It is 12345, not 41792.", "41792") == 0.0  # the first 5-digit number counts
    assert tasks.score_passkey("The pass key is 417921.", "41792") == 0.0  # not a five-digit number
    assert tasks.score_passkey("The pass key is 4179.", "41792") == 0.0
    assert tasks.score_passkey("I do not know.", "41792") == 0.0
    assert tasks.score_passkey("", "41792") == 0.0
    case = Case((1, 2, 3), "41792", {"task": "passkey"})
    assert tasks.score(case, "key: 41792") == 1.0 and tasks.score(case, "key: 41793") == 0.0


# ------------------------------------------------------------------------------------------------ variable tracking


def test_variable_tracking_chains_are_consistent(tok):
    cases = tasks.make_variable_tracking_cases(tok, 5, seed=2, target_tokens=1024, num_chains=2, num_hops=3)
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
        env = tasks.resolve_assignments(question)
        assert len(env) == 8  # every statement present, all names distinct
        # One solved example first (RULER's in-context example), with other names and values.
        shot_env = tasks.resolve_assignments(text[: text.rindex("<|im_start|>user")])
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
    bare = tasks.make_variable_tracking_cases(
        tok, 1, seed=2, target_tokens=300, num_hops=4, num_shots=0, answer_prefix=False
    )[0]
    assert tok.decode(bare.prompt_ids).count("<|im_start|>user") == 1
    assert len(tasks.resolve_assignments(tok.decode(bare.prompt_ids))) == 5


def test_variable_tracking_scorer():
    answer = "ABCDE FGHIJ KLMNO"
    assert tasks.score_variable_tracking("ABCDE, FGHIJ and KLMNO", answer) == 1.0
    assert tasks.score_variable_tracking("ABCDE FGHIJ", answer) == pytest.approx(2 / 3)
    assert tasks.score_variable_tracking("ABCDE FGHIJ", answer, mode="all") == 0.0
    assert tasks.score_variable_tracking("XABCDEX", answer) == 0.0  # whole names only
    case = Case((1,), answer, {"task": "variable_tracking"})
    assert tasks.score(case, "KLMNO") == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------ arithmetic + voting


def test_arithmetic_cases_and_scoring(tok):
    cases = tasks.make_arithmetic_cases(tok, 20, seed=0, ops=("+", "-"), num_shots=2)
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
    assert tasks.make_arithmetic_cases(tok, 20, seed=0, ops=("+", "-"), num_shots=2) == cases
    bare = tasks.make_arithmetic_cases(tok, 1, seed=0, answer_prefix=False)[0]
    assert tok.decode(bare.prompt_ids).endswith("Answer with the number only.<|im_end|>\n<|im_start|>assistant\n")


def test_extract_number_and_majority_vote():
    assert tasks.extract_number(" 42\n\nThis is") == "42"
    assert tasks.extract_number("The answer is 1,024.") == "1024"
    assert tasks.extract_number("-7 degrees") == "-7"
    assert tasks.extract_number("42.0") == "42"
    assert tasks.extract_number("no digits") is None
    assert tasks.majority_vote(["3", "4", "4", None, "3", "4"]) == "4"
    assert tasks.majority_vote(["5", "6", "6", "5"]) == "5"  # tie: first seen wins
    assert tasks.majority_vote([None, None]) is None
    assert tasks.majority_vote([]) is None
    samples = [" 12", "13", "the answer is 12", "12.", "x"]
    assert tasks.majority_vote(tasks.extract_number(s) for s in samples) == "12"


def test_arithmetic_behind_a_long_system_filler(tok):
    short = tasks.make_arithmetic_cases(tok, 3, seed=5)
    long = tasks.make_arithmetic_cases(tok, 3, seed=5, target_tokens=1024)
    for s, c in zip(short, long):
        assert abs(c.num_tokens - 1024) <= 8 and c.meta["n_filler"] > 100
        assert c.answer == s.answer and c.meta["shots"] == s.meta["shots"]  # the same question and examples
        text = tok.decode(c.prompt_ids)
        assert text.startswith(f"<|im_start|>system\n{tasks.ARITHMETIC_BACKGROUND} The grass is green.")
        # The question and its examples come after the filler, unchanged.
        assert text.endswith(tok.decode(s.prompt_ids).split("<|im_end|>\n", 1)[1])
    assert tasks.make_arithmetic_cases(tok, 3, seed=5, target_tokens=1024) == long
    sys_case = tasks.make_arithmetic_cases(tok, 1, seed=5, target_tokens=600, system="Be brief.")[0]
    assert tok.decode(sys_case.prompt_ids).startswith("<|im_start|>system\nBe brief.\n\nBackground text")
    with pytest.raises(ValueError, match="target_tokens"):
        tasks.make_arithmetic_cases(tok, 1, target_tokens=20)
    with pytest.raises(ValueError, match="target_tokens"):
        tasks.make_arithmetic_cases(tok, 1, target_tokens=0)


def test_score_answer_scores_extracted_answers_like_texts():
    samples = {
        "passkey": ("12345", ["The pass key is 12345.", "It is 1234567", "12345 or 54321", "no"]),
        "arithmetic": ("12", [" 12", "13", "the answer is 12.0", "x"]),
        "variable_tracking": ("ABCDE FGHIJ", [" ABCDE FGHIJ", "FGHIJ, KLMNO", "VAR ABCDE = 3", "none", "ABCDEF"]),
    }
    for task, (answer, texts) in samples.items():
        for text in texts:
            got = tasks.score_answer(task, tasks.TASKS[task].extract(text), answer)
            assert got == tasks.TASKS[task].score(text, answer), (task, text)
        assert tasks.score_answer(task, None, answer) == 0.0
    # A majority vote's winner scores like any extracted answer (variable tracking: the fraction named).
    voted = tasks.majority_vote([("ABCDE",), ("ABCDE", "FGHIJ"), ("ABCDE",)])
    assert tasks.score_answer("variable_tracking", voted, "ABCDE FGHIJ") == 0.5
    assert tasks.score_answer("variable_tracking", ["ABCDE", "FGHIJ"], "ABCDE FGHIJ") == 1.0  # lists (from JSON)
    with pytest.raises(ValueError, match="task"):
        tasks.score_answer("nope", "1", "1")


# ------------------------------------------------------------------------------------------------ registry + errors


def test_registry_and_errors(tok):
    assert set(tasks.TASKS) == {"passkey", "variable_tracking", "arithmetic"}
    c = tasks.make_cases("arithmetic", tok, 2, seed=1)
    assert len(c) == 2 and all(x.meta["task"] == "arithmetic" for x in c)
    assert isinstance(c[0].ids, np.ndarray) and c[0].ids.dtype == np.int32
    assert tasks.make_passkey_cases(tok, 0, seed=0) == []
    with pytest.raises(ValueError, match="task"):
        tasks.make_cases("nope", tok, 1)
    with pytest.raises(ValueError, match="depth"):
        tasks.make_passkey_cases(tok, 1, depth=1.5)
    with pytest.raises(ValueError, match="target_tokens"):
        tasks.make_passkey_cases(tok, 1, target_tokens=20)
    with pytest.raises(ValueError, match="n"):
        tasks.make_passkey_cases(tok, -1)
    with pytest.raises(ValueError, match="num_hops"):
        tasks.make_variable_tracking_cases(tok, 1, num_hops=-1)
    with pytest.raises(ValueError, match="ops"):
        tasks.make_arithmetic_cases(tok, 1, ops=("/",))
    with pytest.raises(ValueError, match="mode"):
        tasks.score_variable_tracking("A", "ABCDE", mode="any")
