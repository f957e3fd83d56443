"""Tests for dms_jax.eval.tasks with the real SmolLM2 tokenizer: the registry, scoring extracted answers, errors,
and every task's wording families."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from dms_jax.eval import arithmetic, passkey, prompts, tasks, variable_tracking


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


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
    assert passkey.make_passkey_cases(tok, 0, seed=0) == []
    with pytest.raises(ValueError, match="task"):
        tasks.make_cases("nope", tok, 1)
    with pytest.raises(ValueError, match="depth"):
        passkey.make_passkey_cases(tok, 1, depth=1.5)
    with pytest.raises(ValueError, match="target_tokens"):
        passkey.make_passkey_cases(tok, 1, target_tokens=20)
    with pytest.raises(ValueError, match="n"):
        passkey.make_passkey_cases(tok, -1)
    with pytest.raises(ValueError, match="num_hops"):
        variable_tracking.make_variable_tracking_cases(tok, 1, num_hops=-1)
    with pytest.raises(ValueError, match="ops"):
        arithmetic.make_arithmetic_cases(tok, 1, ops=("/",))
    with pytest.raises(ValueError, match="mode"):
        variable_tracking.score_variable_tracking("A", "ABCDE", mode="any")


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
    w = {"passkey": passkey.PASSKEY_WORDINGS, "variable_tracking": variable_tracking.VT_WORDINGS,
         "multikey": passkey.MULTIKEY_WORDINGS}.get(task, {}).get(family)
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
            env = variable_tracking.resolve_assignments(case.meta["question"], family)
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
        "d0bb8bb8bca8f0af": lambda **kw: passkey.make_passkey_cases(tok, 3, seed=7, target_tokens=700, **kw),
        "43c2cc37a6de42b3": lambda **kw: passkey.make_passkey_cases(
            tok, 2, seed=1, target_tokens=500, depth=[0.0, 1.0], assistant_prefix="The pass key is", **kw),
        "758290d5fb48267a": lambda **kw: variable_tracking.make_variable_tracking_cases(
            tok, 3, seed=7, target_tokens=700, num_chains=2, num_hops=2, **kw),
        "c5adcbbe4ddc35aa": lambda **kw: arithmetic.make_arithmetic_cases(tok, 3, seed=7, target_tokens=400, **kw),
        "7126da3664f974f2": lambda **kw: arithmetic.make_arithmetic_cases(tok, 3, seed=7, **kw),
    }
    for digest, make in calls.items():
        assert _digest(make()) == digest
        family = tasks.WORDINGS[make()[0].meta["task"]][0]
        assert _digest(make(wording=family)) == digest
    assert tasks.WORDINGS["passkey"][0] == "ruler" and tasks.WORDINGS["variable_tracking"][0] == "ruler"
    short = passkey.make_passkey_cases(tok, 1, seed=0, target_tokens=120, wording="ruler")[0]
    assert short.meta["prompt"].split("<|im_start|>user\n")[1] == (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz "
        "you about the important information there.\n\nThe grass is green. The sky is blue. The sun is yellow. "
        "The pass key is 41792. Remember it. 41792 is the pass key. Here we go. There and back again.\n\n"
        "What is the pass key?<|im_end|>\n<|im_start|>assistant\n"
    )


def _family_templates(task):
    registry = {"passkey": passkey.PASSKEY_WORDINGS, "variable_tracking": variable_tracking.VT_WORDINGS,
                "multikey": passkey.MULTIKEY_WORDINGS, "arithmetic": arithmetic.ARITHMETIC_WORDINGS}[task]
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
    texts = [tok.decode(_family_cases(tok, task, f, n=1)[0].prompt_ids) for f in tasks.WORDINGS[task]]
    assert len(set(texts)) == len(texts)
    if task == "arithmetic":
        return
    by_family = dict(zip(tasks.WORDINGS[task], texts))
    classic = "The grass is green. The sky is blue."
    natural = by_family["natural"]
    assert classic not in natural and prompts.LINE_FILLER_SENTENCES[0] not in natural
    assert sum(s in natural for s in prompts.natural_filler_sentences()) > 20  # real text, many sentences
    lines = by_family["lines"]
    assert classic not in lines and "\n".join(prompts.LINE_FILLER_SENTENCES[:2]) in lines
    assert "\n---\n" in by_family["rules"] and "Document:\n" in by_family["document"]


def test_wordings_do_not_reuse_the_training_rows_templates():
    from dms_jax.data import synthetic

    texts = [str(x) for task in tasks.WORDINGS for t in _family_templates(task).values() for x in t]
    texts += list(prompts.LINE_FILLER_SENTENCES) + list(passkey.MULTIKEY_LABELS)
    blob = "\n".join(texts)
    assert "Note: the number of the" not in blob and "Q: " not in blob and "\nA: " not in blob
    fixed_parts = [part for tpl in synthetic._FACT_TEMPLATES for x in tpl for part in re.split(r"\{\w\}", x)]
    fixed_parts += list(synthetic._HEADERS) + [q for q, _ in synthetic._CHAIN_QUESTIONS]
    for part in fixed_parts:
        if len(part.strip()) >= 8:
            assert part.strip() not in blob, part
    # Chain notations ("{a} = {b}", "set {a} to {b}", ...); "ruler" keeps RULER's "VAR X = ..." (training avoids "VAR").
    new_forms = [w.assign_value for name, w in variable_tracking.VT_WORDINGS.items() if name != "ruler"]
    for form in synthetic._ASSIGN_FORMS:
        notation = form.replace("{a}", "{name}").replace("{b}", "{value}")
        assert not any(notation in f for f in new_forms), notation


def test_bad_wording_names_the_parameter_and_the_families(tok):
    for task, families in tasks.WORDINGS.items():
        with pytest.raises(ValueError, match=r"^wording: .*'nope'.*choose from") as err:
            tasks.make_cases(task, tok, 1, wording="nope")
        assert all(repr(f) in str(err.value) for f in families)
    with pytest.raises(ValueError, match="wording"):
        passkey.make_passkey_cases(tok, 1, wording=None)
    with pytest.raises(ValueError, match="wording"):
        variable_tracking.resolve_assignments("VAR ABCDE = 1", wording="RULER")
