"""Evaluation tasks: the registry of seeded case generators and scorers (pure Python / numpy).

Every generator has the signature ``make_*_cases(tokenizer, n, seed, **params) -> list[Case]``; case ``i``
depends only on ``(seed, i, params)``, so the first 30 cases of ``n=50`` are the cases of ``n=30``.
Prompts are formatted with the tokenizer's chat template (``add_generation_prompt=True``), optionally followed
by the start of the assistant's answer (``assistant_prefix``).

Tasks
-----
* ``passkey``: a five-digit key hidden in the classic repeated filler ("The grass is green. The sky is blue.
  ..."), at a depth in [0, 1] of the filler, with the whole prompt about ``target_tokens`` tokens long; the
  question is asked at the end.  Score: the first five-digit number of the answer equals the key.
* ``variable_tracking`` (RULER): chains ``VAR ABCDE = 12345``, ``VAR FGHIJ = VAR ABCDE``, ... hidden in the
  same filler; "find all variables that are assigned the value 12345".  Score: the fraction of the queried
  chain's variables named in the answer (``mode="all"``: 1 only when all are).
* ``arithmetic``: "What is 17 + 5? Answer with the number only.", with a few solved examples as earlier chat
  turns and the answer started as "17 + 5 =".  Score: exact match of the first integer of the answer;
  ``majority_vote`` combines several samples.  ``target_tokens`` pads the prompt to a long context with a system
  message of filler sentences that the question does not need.

* ``multikey``: several (3-6) labelled five-digit numbers ("The code for Oslo is 12345.") at seeded depths of
  the filler; the question asks for one by its label, the others are distractors.  Score: as passkey.

Wording families
----------------
Every task comes in several wordings (``WORDINGS[task]``, the default first; ``make_cases(..., wording=name)``)
that differ in intro, delimiters around the haystack, needle or statement phrasing, question and filler, so
that accuracy can be reported per family and for the worst one.  The default families ("ruler" for passkey and
variable tracking, "plain" for the others) give exactly the prompts from before the families existed.  The
"natural" families use real text as filler: sentences of the built-in corpus's held-out documents
(``prompts.natural_filler_sentences``, never in training rows; about 4.5K tokens, cycled beyond).  None of the wordings
reuses the training rows' templates (``dms_jax.data.synthetic``).  Case ``i`` draws the
same key / names / values / question in every family, so families compare case by case.

``score_answer(task, extracted, answer)`` scores an extracted answer (e.g. the winner of a majority vote).

``score(case, text)`` dispatches on ``case.meta["task"]``.

Layout: ``prompts`` (``Case``, fillers, haystacks sized in tokens, shared checks) <- ``passkey`` (passkey,
multikey), ``variable_tracking``, ``arithmetic`` <- this module (``TASKS``, ``WORDINGS``, ``make_cases``,
``score_answer``, ``score``, ``majority_vote``).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable, Iterable, NamedTuple

from dms_jax.eval.arithmetic import ARITHMETIC_WORDINGS, extract_number, make_arithmetic_cases, score_arithmetic
from dms_jax.eval.passkey import (MULTIKEY_WORDINGS, PASSKEY_WORDINGS, extract_passkey, make_multikey_cases,
                                  make_passkey_cases, score_passkey)
from dms_jax.eval.prompts import Case
from dms_jax.eval.variable_tracking import (VT_WORDINGS, extract_variables, make_variable_tracking_cases,
                                            score_variable_tracking)

__all__ = [
    "TASKS",
    "Task",
    "WORDINGS",
    "make_cases",
    "majority_vote",
    "score",
    "score_answer",
]


def majority_vote(answers: Iterable[Hashable | None]) -> Hashable | None:
    """The most frequent answer, ignoring None; ties go to the one seen first; None if there is none."""
    answers = [a for a in answers if a is not None]
    if not answers:
        return None
    counts = Counter(answers)
    top = max(counts.values())
    return next(a for a in answers if counts[a] == top)


# ----------------------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------------------


class Task(NamedTuple):
    """A task: its case generator, its scorer ``(generated_text, answer) -> float``, and an answer extractor
    (what ``majority_vote`` should vote on)."""

    make_cases: Callable[..., list[Case]]
    score: Callable[[str, str], float]
    extract: Callable[[str], Hashable | None]


TASKS: dict[str, Task] = {
    "passkey": Task(make_passkey_cases, score_passkey, extract_passkey),
    "variable_tracking": Task(make_variable_tracking_cases, score_variable_tracking, extract_variables),
    "arithmetic": Task(make_arithmetic_cases, score_arithmetic, extract_number),
    "multikey": Task(make_multikey_cases, score_passkey, extract_passkey),
}

# Task -> its wording families, the default first: report accuracy per family and for the worst one.
WORDINGS: dict[str, tuple[str, ...]] = {
    "passkey": tuple(PASSKEY_WORDINGS),
    "variable_tracking": tuple(VT_WORDINGS),
    "arithmetic": tuple(ARITHMETIC_WORDINGS),
    "multikey": tuple(MULTIKEY_WORDINGS),
}


def make_cases(task: str, tokenizer, n: int, seed: int = 0, **params) -> list[Case]:
    """``TASKS[task].make_cases(tokenizer, n, seed, **params)``; ``wording=`` picks one of ``WORDINGS[task]``."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; choose from {sorted(TASKS)}")
    return TASKS[task].make_cases(tokenizer, n, seed, **params)


def score_answer(task: str, extracted: Hashable | None, answer: str) -> float:
    """Score an *extracted* answer (what ``TASKS[task].extract`` returns, e.g. the winner of ``majority_vote``)
    against ``answer``; ``None`` scores 0. For one generated text, ``score_answer(task, TASKS[task].extract(text),
    answer)`` equals ``TASKS[task].score(text, answer)``."""
    if task not in TASKS:
        raise ValueError(f"task: unknown task {task!r}; choose from {sorted(TASKS)}")
    if extracted is None:
        return 0.0
    if task == "variable_tracking":
        names = [extracted] if isinstance(extracted, str) else list(extracted)
        return score_variable_tracking(" ".join(names), answer)
    return float(str(extracted) == str(answer))


def score(case: Case, text: str) -> float:
    """Score generated ``text`` for ``case`` with its task's scorer."""
    task = case.meta.get("task")
    if task not in TASKS:
        raise ValueError(f"case: meta['task'] is {task!r}, not one of {sorted(TASKS)}")
    return TASKS[task].score(text, case.answer)
