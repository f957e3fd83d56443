"""Retrieval tasks: a passkey, or one of several labelled keys, hidden in filler (pure Python / numpy).

* ``passkey``: a five-digit key hidden in the classic repeated filler ("The grass is green. The sky is blue.
  ..."), at a depth in [0, 1] of the filler, with the whole prompt about ``target_tokens`` tokens long; the
  question is asked at the end.  Score: the first five-digit number of the answer equals the key.
* ``multikey``: several (3-6) labelled five-digit numbers ("The code for Oslo is 12345.") at seeded depths of
  the filler; the question asks for one by its label, the others are distractors.  Score: as passkey.

Both are haystack tasks in wording families of ``HaystackWording`` (``PASSKEY_WORDINGS``, ``MULTIKEY_WORDINGS``)
and share the needle machinery: ``_needle_case`` records where the asked needle sits in the prompt.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np

from dms_jax.eval.prompts import (Case, _Built, _build_to_length, _case_filler, _case_rng, _check_common,
                                  _check_counts, _check_target, _pick_wording, _token_positions)

__all__ = [
    "HaystackWording",
    "MULTIKEY_LABELS",
    "MULTIKEY_WORDINGS",
    "PASSKEY_WORDINGS",
    "extract_passkey",
    "make_multikey_cases",
    "make_passkey_cases",
    "score_passkey",
]


# ----------------------------------------------------------------------------------------------------------
# Passkey retrieval
# ----------------------------------------------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"


class HaystackWording(NamedTuple):
    """One wording family of a haystack task: the user message is ``intro + before + haystack + after +
    question``. ``needle`` and ``question`` are formats of the task's fields; ``filler`` is "classic" (the
    repeated grass-and-sky sentences), "lines" (another repeated filler, one sentence a line) or "natural"
    (held-out real text)."""

    intro: str
    before: str
    after: str
    needle: str
    question: str
    filler: str = "classic"


PASSKEY_WORDINGS: dict[str, HaystackWording] = {
    # The classic passkey prompt, unchanged (results before the families existed stay comparable).
    "ruler": HaystackWording(PASSKEY_INTRO, "\n\n", "\n\n", PASSKEY_NEEDLE, PASSKEY_QUESTION),
    "rules": HaystackWording(
        "A single five-digit number is hidden in the text between the two rules. Find it; you will be asked "
        "for it afterwards.",
        "\n---\n", "\n---\n",
        "The number to recall later is {key}.",
        "Which number were you asked to recall?",
    ),
    "document": HaystackWording(
        "Read the following document carefully.",
        "\n\nDocument:\n", "\nEnd of document.\n\n",
        "The secret code is {key}. Once more, the secret code is {key}.",
        "What is the secret code in the document?",
    ),
    "natural": HaystackWording(
        "Below is an excerpt of technical documentation. Someone slipped a five-digit access number into it.",
        "\n\n", "\n\n",
        "The access number is {key}.",
        "What access number was slipped into the excerpt?",
        "natural",
    ),
    "lines": HaystackWording(
        "Each line below is a short sentence. One line carries a number you must not forget.",
        "\n", "\n",
        "Do not forget this number: {key}.",
        "Which number were you told not to forget? Reply with the digits.",
        "lines",
    ),
}


def make_passkey_cases(
    tokenizer,
    n: int,
    seed: int = 0,
    *,
    target_tokens: int = 1024,
    depth: float | Sequence[float] | None = None,
    assistant_prefix: str = "",
    system: str | None = None,
    wording: str = "ruler",
) -> list[Case]:
    """Passkey retrieval cases of about ``target_tokens`` tokens in all (chat template included).

    ``depth``: where the needle sits in the filler (0 = first sentence, 1 = last): a float for all cases, a
    sequence cycled over the cases, or None for a seeded uniform draw per case.  ``assistant_prefix`` (e.g.
    ``"The pass key is"``) is appended after the generation prompt.  ``wording``: a family of
    ``PASSKEY_WORDINGS`` (intro, delimiters, needle, question, filler); the key and depth of case ``i`` are the
    same in every family, so families compare case by case.  ``meta``: task, wording, key, depth (asked),
    depth_tokens (the fraction of the filler's tokens that come before the needle), needle_token (index of the
    needle's first token in ``prompt_ids``), needle (its text), target_tokens, num_tokens, n_filler, prompt.
    """
    _check_common(tokenizer, n, seed)
    w = _pick_wording("passkey", wording, PASSKEY_WORDINGS)
    _check_target(target_tokens)
    depths = _depth_list(depth, n, seed)
    cases = []
    for i in range(n):
        rng = _case_rng(seed, i, 0x5A55)
        key = str(int(rng.integers(10000, 100000)))
        d = depths[i] if depths is not None else float(rng.uniform(0.0, 1.0))
        needle = w.needle.format(key=key)

        def render(hay: str) -> tuple[str, str]:
            return f"{w.intro}{w.before}{hay}{w.after}{w.question}", assistant_prefix

        def place(nf: int, d=d, needle=needle) -> list[tuple[int, str]]:
            return [(int(round(d * nf)), needle)]

        filler = _case_filler(w.filler, seed, i)
        b = _build_to_length(tokenizer, int(target_tokens), render, place, system, filler=filler)
        meta = {"task": "passkey", "wording": wording, "key": key, "depth": float(d), "needle": needle}
        cases.append(_needle_case(tokenizer, b, key, meta, int(target_tokens)))
    return cases


def _needle_case(tokenizer, b: _Built, answer: str, meta: dict, target_tokens: int, needle: int = 0) -> Case:
    """A Case for a built prompt whose insert ``needle`` is the one asked about: adds where it sits (token index,
    fraction of the filler's tokens before it) and the prompt's size to ``meta``."""
    hay_tok, needle_tok, needle_end, end_tok = _token_positions(
        tokenizer, b.text, [b.hay_start, b.spans[needle][0], b.spans[needle][1], b.hay_end]
    )
    filler_tokens = max((end_tok - hay_tok) - (needle_end - needle_tok), 1)
    meta.update(
        depth_tokens=(needle_tok - hay_tok) / filler_tokens,
        needle_token=needle_tok,
        target_tokens=target_tokens,
        num_tokens=len(b.ids),
        n_filler=b.n_filler,
        prompt=b.text,
    )
    return Case(prompt_ids=tuple(int(t) for t in b.ids), answer=answer, meta=meta)


def _depth_list(depth, n: int, seed: int) -> list[float] | None:
    if depth is None:
        return None
    values = [float(depth)] if np.isscalar(depth) else [float(x) for x in depth]
    if not values:
        raise ValueError("depth: an empty sequence; give a float in [0, 1], a sequence of them, or None")
    for v in values:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"depth: must be in [0, 1], got {v!r}")
    return [values[i % len(values)] for i in range(n)]


_FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")


def extract_passkey(text: str) -> str | None:
    """The first five-digit number of ``text`` (not part of a longer number), or None."""
    m = _FIVE_DIGITS.search(text or "")
    return m.group(0) if m else None


def score_passkey(text: str, answer: str) -> float:
    """1.0 when the first five-digit number of ``text`` is ``answer``, else 0.0."""
    return float(extract_passkey(text) == str(answer))


# ----------------------------------------------------------------------------------------------------------
# Several keys: labelled numbers in the haystack, one asked for by its label
# ----------------------------------------------------------------------------------------------------------

# Labels are city names: short, distinct, single words that the fillers never contain.
MULTIKEY_LABELS = (
    "Oslo", "Lima", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Riga", "Tunis", "Bern", "Accra", "Sofia",
    "Havana", "Kyoto", "Nairobi", "Porto", "Tbilisi", "Zagreb", "Manila", "Bogota",
)

MULTIKEY_WORDINGS: dict[str, HaystackWording] = {
    "plain": HaystackWording(
        "Several numbers, each tied to a city, are scattered through the text below. Keep track of them.",
        "\n\n", "\n\n",
        "The code for {label} is {value}.",
        "Which code was given for {label}?",
    ),
    "rules": HaystackWording(
        "Between the two rules there are a few labelled numbers among unrelated sentences.",
        "\n---\n", "\n---\n",
        "{label} has the number {value}.",
        "Give the number that {label} has, only the five digits.",
    ),
    "document": HaystackWording(
        "Read the following document; it lists the numbers used by some offices.",
        "\n\nDocument:\n", "\nEnd of document.\n\n",
        "The {label} office uses the number {value}.",
        "According to the document, which number does the {label} office use?",
    ),
    "natural": HaystackWording(
        "Below is an excerpt of technical documentation with a few numbers linked to city names slipped in.",
        "\n\n", "\n\n",
        "The number linked to {label} is {value}.",
        "Which number is linked to {label}?",
        "natural",
    ),
    "lines": HaystackWording(
        "Each line below is a short sentence. A few lines pair a city with a number.",
        "\n", "\n",
        "{label} goes with {value}.",
        "Which number goes with {label}?",
        "lines",
    ),
}


def _multikey_problem(rng: np.random.Generator, num_keys: int | None):
    """(labels, values, depths, asked index): 3-6 keys (or ``num_keys``), distinct labels and five-digit values,
    sorted seeded depths, one key asked."""
    count = int(rng.integers(3, 7)) if num_keys is None else int(num_keys)
    labels = [MULTIKEY_LABELS[j] for j in rng.permutation(len(MULTIKEY_LABELS))[:count]]
    values: list[str] = []
    while len(values) < count:
        v = str(int(rng.integers(10000, 100000)))
        if v not in values:
            values.append(v)
    depths = np.sort(rng.uniform(0.0, 1.0, size=count))
    return labels, values, depths, int(rng.integers(count))


def make_multikey_cases(
    tokenizer,
    n: int,
    seed: int = 0,
    *,
    target_tokens: int = 1024,
    num_keys: int | None = None,
    assistant_prefix: str = "",
    system: str | None = None,
    wording: str = "plain",
) -> list[Case]:
    """Several keys: ``num_keys`` labelled five-digit numbers (None: a seeded 3-6 per case) at seeded depths of
    the filler; the question asks for one of them by its label, so the other numbers are distractors.  The
    prompt is about ``target_tokens`` tokens.  ``answer`` is the asked number.  ``wording``: a family of
    ``MULTIKEY_WORDINGS``.  ``meta``: task, wording, label (asked), labels, values, depth and depth_tokens of
    the asked key, needle_token, needle, target_tokens, num_tokens, n_filler, prompt."""
    _check_common(tokenizer, n, seed)
    w = _pick_wording("multikey", wording, MULTIKEY_WORDINGS)
    _check_target(target_tokens)
    if num_keys is not None:
        _check_counts(num_keys=(num_keys, 1))
        if num_keys > len(MULTIKEY_LABELS):
            raise ValueError(f"num_keys: at most {len(MULTIKEY_LABELS)} labels, got {num_keys}")
    cases = []
    for i in range(n):
        labels, values, depths, asked = _multikey_problem(_case_rng(seed, i, 0x3C3C), num_keys)
        needles = [w.needle.format(label=lab, value=val) for lab, val in zip(labels, values)]
        question = w.question.format(label=labels[asked])

        def render(hay: str, question=question) -> tuple[str, str]:
            return f"{w.intro}{w.before}{hay}{w.after}{question}", assistant_prefix

        def place(nf: int, depths=depths, needles=needles) -> list[tuple[int, str]]:
            return [(int(round(d * nf)), text) for d, text in zip(depths, needles)]

        filler = _case_filler(w.filler, seed, i)
        b = _build_to_length(tokenizer, int(target_tokens), render, place, system, filler=filler)
        meta = {
            "task": "multikey", "wording": wording, "label": labels[asked], "labels": tuple(labels),
            "values": tuple(values), "depth": float(depths[asked]), "needle": needles[asked], "question": question,
        }
        cases.append(_needle_case(tokenizer, b, values[asked], meta, int(target_tokens), asked))
    return cases
