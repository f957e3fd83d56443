"""Tests for dms_jax.tasks with the real SmolLM2 tokenizer: lengths, depths, chains, scorers, voting."""

from __future__ import annotations

import hashlib
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
    assert set(tasks.TASKS) == {"passkey", "variable_tracking", "arithmetic", "multikey"}
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


# ------------------------------------------------------------------------------------------------ wording families

FAMILIES = [(task, family) for task, families in tasks.WORDINGS.items() for family in families]
NATURAL_TOLERANCE = 16  # natural sentences are 25-160 characters: the closest count lands within ~half of one
REPEATED_TOLERANCE = 8  # the repeated fillers' sentences are ~5-12 tokens
FAMILY_PARAMS = {"variable_tracking": {"num_chains": 2, "num_hops": 2}}  # a second chain: a wrong answer to give


def _family_cases(tok, task, family, n=3, seed=4, target=1024):
    return tasks.make_cases(task, tok, n, seed, wording=family, target_tokens=target, **FAMILY_PARAMS.get(task, {}))


def _right_and_wrong(case):
    """(a right answer text, a wrong answer text) for the case's task."""
    task = case.meta["task"]
    if task == "variable_tracking":
        other = [c for c in case.meta["chains"] if tuple(c) != case.meta["variables"]][0]
        return " ".join(case.meta["variables"]), " ".join(other)
    if task == "multikey":  # another key of the same haystack: the distractor the task is about
        other = [v for v in case.meta["values"] if v != case.answer][0]
        return f"The number is {case.answer}.", f"The number is {other}."
    if task == "passkey":
        return f"{case.answer}.", f"{int(case.answer) % 90000 + 10001}."
    return f" {case.answer}", f" {int(case.answer) + 1}"


@pytest.mark.parametrize("task,family", FAMILIES)
def test_every_family_has_the_length_the_answer_and_a_working_scorer(tok, task, family):
    w = {"passkey": tasks.PASSKEY_WORDINGS, "variable_tracking": tasks.VT_WORDINGS,
         "multikey": tasks.MULTIKEY_WORDINGS}.get(task, {}).get(family)
    natural = w is not None and w.filler == "natural"
    for case in _family_cases(tok, task, family):
        assert case.meta["task"] == task and case.meta["wording"] == family
        assert abs(case.num_tokens - 1024) <= (NATURAL_TOLERANCE if natural else REPEATED_TOLERANCE)
        text = tok.decode(case.prompt_ids)
        assert text.endswith("<|im_start|>assistant\n") or task in ("variable_tracking", "arithmetic")
        if task in ("passkey", "multikey"):
            assert text == case.meta["prompt"] and case.meta["needle"] in text and case.answer in case.meta["needle"]
            i = case.meta["needle_token"]
            assert tok.decode(case.prompt_ids[i : i + 12]).strip().startswith(case.meta["needle"][:10])
        if task == "multikey":
            assert 3 <= len(case.meta["labels"]) <= 6 and len(set(case.meta["values"])) == len(case.meta["labels"])
            assert case.meta["label"] in case.meta["question"] and all(v in text for v in case.meta["values"])
        if task == "variable_tracking":
            env = tasks.resolve_assignments(case.meta["question"], family)
            assert len(env) == 6  # two chains of three, every statement found in this family's forms
            assert sorted(v for v, x in env.items() if x == case.meta["value"]) == sorted(case.meta["variables"])
        if task == "arithmetic":
            assert case.meta["question"] in text
        right, wrong = _right_and_wrong(case)
        assert tasks.score(case, right) == 1.0 and tasks.score(case, wrong) == 0.0
        extracted = tasks.TASKS[task].extract(right)
        assert tasks.score_answer(task, extracted, case.answer) == 1.0


def test_families_are_seeded_and_prefix_stable(tok):
    for task, family in FAMILIES:
        five = _family_cases(tok, task, family, n=5, seed=9)
        assert _family_cases(tok, task, family, n=3, seed=9) == five[:3], (task, family)
        assert [c.meta["prompt"] if "prompt" in c.meta else None for c in five] == [
            c.meta["prompt"] if "prompt" in c.meta else None for c in _family_cases(tok, task, family, n=5, seed=9)
        ]
        other = _family_cases(tok, task, family, n=5, seed=10)
        assert [c.prompt_ids for c in other] != [c.prompt_ids for c in five], (task, family)


def _digest(cases) -> str:
    h = hashlib.sha256()
    for c in cases:
        h.update(repr((c.prompt_ids, c.answer)).encode())
    return h.hexdigest()[:16]


def test_default_families_give_the_prompts_from_before_the_families(tok):
    # Digests of the prompts made by the code before wording families existed (same calls, same tokenizer).
    calls = {
        "d0bb8bb8bca8f0af": lambda **kw: tasks.make_passkey_cases(tok, 3, seed=7, target_tokens=700, **kw),
        "43c2cc37a6de42b3": lambda **kw: tasks.make_passkey_cases(
            tok, 2, seed=1, target_tokens=500, depth=[0.0, 1.0], assistant_prefix="The pass key is", **kw),
        "758290d5fb48267a": lambda **kw: tasks.make_variable_tracking_cases(
            tok, 3, seed=7, target_tokens=700, num_chains=2, num_hops=2, **kw),
        "c5adcbbe4ddc35aa": lambda **kw: tasks.make_arithmetic_cases(tok, 3, seed=7, target_tokens=400, **kw),
        "7126da3664f974f2": lambda **kw: tasks.make_arithmetic_cases(tok, 3, seed=7, **kw),
    }
    for digest, make in calls.items():
        assert _digest(make()) == digest
        family = tasks.WORDINGS[make()[0].meta["task"]][0]
        assert _digest(make(wording=family)) == digest
    assert tasks.WORDINGS["passkey"][0] == "ruler" and tasks.WORDINGS["variable_tracking"][0] == "ruler"
    short = tasks.make_passkey_cases(tok, 1, seed=0, target_tokens=120, wording="ruler")[0]
    assert short.meta["prompt"].split("<|im_start|>user\n")[1] == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
        "you about the important information there.\n\nThe grass is green. The sky is blue. The sun is yellow. "
        "The pass key is 41792. Remember it. 41792 is the pass key. Here we go. There and back again.\n\n"
        "What is the pass key?<|im_end|>\n<|im_start|>assistant\n"
    )


def _family_templates(task):
    registry = {"passkey": tasks.PASSKEY_WORDINGS, "variable_tracking": tasks.VT_WORDINGS,
                "multikey": tasks.MULTIKEY_WORDINGS, "arithmetic": tasks.ARITHMETIC_WORDINGS}[task]
    return {name: tuple(w) for name, w in registry.items()}


@pytest.mark.parametrize("task", sorted(tasks.WORDINGS))
def test_families_really_differ(tok, task):
    templates = _family_templates(task)
    assert len(templates) >= 3 and tuple(templates) == tasks.WORDINGS[task]
    # Every part that says something (intro, needle or statements, question) differs between any two families.
    for field in range(len(next(iter(templates.values())))):
        values = [t[field] for t in templates.values()]
        if isinstance(values[0], str) and len(values[0]) > 12:
            assert len(set(values)) == len(values), (task, field)
    prompts = [tok.decode(_family_cases(tok, task, f, n=1)[0].prompt_ids) for f in tasks.WORDINGS[task]]
    assert len(set(prompts)) == len(prompts)
    if task == "arithmetic":
        return
    by_family = dict(zip(tasks.WORDINGS[task], prompts))
    classic = "The grass is green. The sky is blue."
    natural = by_family["natural"]
    assert classic not in natural and tasks.LINE_FILLER_SENTENCES[0] not in natural
    assert sum(s in natural for s in tasks.natural_filler_sentences()) > 20  # real text, many sentences
    lines = by_family["lines"]
    assert classic not in lines and "\n".join(tasks.LINE_FILLER_SENTENCES[:2]) in lines
    assert "\n---\n" in by_family["rules"] and "Document:\n" in by_family["document"]


def test_natural_filler_is_heldout_prose_without_answer_lookalikes():
    from dms_jax import data

    sentences = tasks.natural_filler_sentences()
    assert len(sentences) > 100 and len(set(sentences)) > 0.9 * len(sentences)
    assert all(25 <= len(s) <= 160 and not re.search(r"\d{5}|\b[A-Z]{5}\b|VAR", s) for s in sentences)
    train, heldout = data.split_documents(data.builtin_documents(), 0.05, "dms-jax-heldout")
    flat = lambda docs: " ".join(" ".join(d.split()) for d in docs)  # noqa: E731 - the prose with lines joined
    held_text, train_text = flat(heldout), flat(train)
    picked = sentences[:: max(1, len(sentences) // 25)]
    assert all(s in held_text for s in picked)
    assert not any(s in train_text for s in sentences)  # not even a stock phrase that training documents share


def test_wordings_do_not_reuse_the_training_rows_templates():
    from dms_jax import synthetic_rows

    texts = [str(x) for task in tasks.WORDINGS for t in _family_templates(task).values() for x in t]
    texts += list(tasks.LINE_FILLER_SENTENCES) + list(tasks.MULTIKEY_LABELS)
    blob = "\n".join(texts)
    assert "Note: the number of the" not in blob and "Q: " not in blob and "\nA: " not in blob
    fixed_parts = [part for tpl in synthetic_rows._FACT_TEMPLATES for x in tpl for part in re.split(r"\{\w\}", x)]
    fixed_parts += list(synthetic_rows._HEADERS) + [q for q, _ in synthetic_rows._CHAIN_QUESTIONS]
    for part in fixed_parts:
        if len(part.strip()) >= 8:
            assert part.strip() not in blob, part
    # Chain notations ("{a} = {b}", "set {a} to {b}", ...); "ruler" keeps RULER's "VAR X = ..." (training avoids "VAR").
    new_forms = [w.assign_value for name, w in tasks.VT_WORDINGS.items() if name != "ruler"]
    for form in synthetic_rows._ASSIGN_FORMS:
        notation = form.replace("{a}", "{name}").replace("{b}", "{value}")
        assert not any(notation in f for f in new_forms), notation


def test_bad_wording_names_the_parameter_and_the_families(tok):
    for task, families in tasks.WORDINGS.items():
        with pytest.raises(ValueError, match=r"^wording: .*'nope'.*choose from") as err:
            tasks.make_cases(task, tok, 1, wording="nope")
        assert all(repr(f) in str(err.value) for f in families)
    with pytest.raises(ValueError, match="wording"):
        tasks.make_passkey_cases(tok, 1, wording=None)
    with pytest.raises(ValueError, match="wording"):
        tasks.resolve_assignments("VAR ABCDE = 1", wording="RULER")


def test_multikey_places_every_key_and_asks_one(tok):
    cases = tasks.make_multikey_cases(tok, 6, seed=1, target_tokens=2048, num_keys=5)
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
        tasks.make_multikey_cases(tok, 1, num_keys=0)
