"""Arithmetic: short questions with an exact answer, for majority voting (pure Python / numpy).

"What is 17 + 5? Answer with the number only.", with a few solved examples as earlier chat turns and the answer
started as "17 + 5 =".  Score: exact match of the first integer of the answer; ``tasks.majority_vote`` combines
several samples.  ``target_tokens`` pads the prompt to a long context with a system message of filler sentences
that the question does not need.  Wording families: ``ARITHMETIC_WORDINGS``.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Sequence

import numpy as np

from dms_jax.chat import chat_prompt
from dms_jax.eval.prompts import Case, _case_rng, _check_common, _haystack, _pick_wording

__all__ = [
    "ARITHMETIC_BACKGROUND",
    "ARITHMETIC_WORDINGS",
    "ArithmeticWording",
    "extract_number",
    "make_arithmetic_cases",
    "score_arithmetic",
]


# ----------------------------------------------------------------------------------------------------------
# Arithmetic (short answer, exact match, majority voting)
# ----------------------------------------------------------------------------------------------------------

ARITHMETIC_QUESTION = "What is {a} {op} {b}? Answer with the number only."
ARITHMETIC_BACKGROUND = "Background text (not needed for the questions):"


class ArithmeticWording(NamedTuple):
    """A wording family of arithmetic: the question (``{a}``, ``{op}``, ``{b}``) and the label of the filler
    system message that ``target_tokens`` adds."""

    question: str
    background: str


ARITHMETIC_WORDINGS: dict[str, ArithmeticWording] = {
    "plain": ArithmeticWording(ARITHMETIC_QUESTION, ARITHMETIC_BACKGROUND),
    "compute": ArithmeticWording("Compute {a} {op} {b}. Reply with just the result.", "Unrelated reading material:"),
    "equation": ArithmeticWording("{a} {op} {b} = ? Give only the number.", "Some text you can ignore:"),
}
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def _arith_problem(rng: np.random.Generator, ops: Sequence[str], lo: int, hi: int) -> tuple[int, str, int, str]:
    op = ops[int(rng.integers(len(ops)))]
    a, b = (int(x) for x in rng.integers(lo, hi + 1, size=2))
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b, str(_OPS[op](a, b))


def make_arithmetic_cases(
    tokenizer,
    n: int,
    seed: int = 0,
    *,
    ops: Sequence[str] = ("+",),
    min_value: int = 1,
    max_value: int = 20,
    num_shots: int = 3,
    answer_prefix: bool = True,
    system: str | None = None,
    target_tokens: int | None = None,
    wording: str = "plain",
) -> list[Case]:
    """Arithmetic questions ("What is 17 + 5? Answer with the number only.") after ``num_shots`` solved
    examples given as earlier chat turns.  With ``answer_prefix`` the assistant turn starts by restating the
    sum ("17 + 5 =") and the examples are answered the same way ("3 + 4 = 7"); otherwise they are answered
    with the bare number.  Operands are drawn from ``[min_value, max_value]``; ``-`` keeps results
    non-negative.  ``answer`` is the result as a string.

    Measured on SmolLM2-135M-Instruct (Q4_1 GGUF, transformers fp32, greedy): defaults (1..20, three shots,
    prefix) 0.65 on 40 cases; the same without the prefix 0.15 (20 cases); operands 1..9 with no shots
    0.75-0.95 (20 cases) -- a task the model does in part, where sampling several answers and voting has
    room to help.

    ``target_tokens``: pad the prompt to about that many tokens with a system message of filler sentences
    (``ARITHMETIC_BACKGROUND`` then the passkey filler, after ``system`` if given) that the question does not
    need -- a long context for the hyper-scaling runs where the answer depends only on the last turns.
    Measured (vanilla SmolLM2, temperature 0.7, 8 samples, 6 cases): 0.56 of samples right at ~920 tokens vs
    0.54 with no padding (154 tokens); many solved examples instead (33 shots to reach 1K) drop it to ~0.06.

    ``wording``: a family of ``ARITHMETIC_WORDINGS`` (question and background label; the examples use it too).
    """
    _check_common(tokenizer, n, seed)
    w = _pick_wording("arithmetic", wording, ARITHMETIC_WORDINGS)
    ops = tuple(ops)
    _check_arithmetic_args(ops, min_value, max_value, num_shots, target_tokens)

    def render(a: int, op: str, b: int) -> tuple[str, str]:
        return w.question.format(a=a, op=op, b=b), (f"{a} {op} {b} =" if answer_prefix else "")

    cases = []
    for i in range(n):
        rng = _case_rng(seed, i, 0xA217)
        a, op, b, answer = _arith_problem(rng, ops, min_value, max_value)
        question, prefix = render(a, op, b)
        shots = _arith_shots(rng, ops, min_value, max_value, num_shots, question, render)
        n_filler = 0
        if target_tokens is None:
            ids = chat_prompt(tokenizer, question, system=system, history=shots, assistant_prefix=prefix)
        else:
            ids, n_filler = _pad_with_system_filler(
                tokenizer, int(target_tokens), system, question, shots, prefix, w.background
            )
        meta = {"task": "arithmetic", "wording": wording, "question": question, "assistant_prefix": prefix,
                "shots": tuple(shots), "num_tokens": len(ids), "n_filler": n_filler, "target_tokens": target_tokens}
        cases.append(Case(prompt_ids=tuple(int(t) for t in ids), answer=answer, meta=meta))
    return cases


def _check_arithmetic_args(ops: tuple[str, ...], min_value, max_value, num_shots, target_tokens) -> None:
    if not ops or any(op not in _OPS for op in ops):
        raise ValueError(f"ops: must be a non-empty sequence of {sorted(_OPS)}, got {ops!r}")
    if not (isinstance(min_value, (int, np.integer)) and isinstance(max_value, (int, np.integer))) or not (
        0 <= min_value <= max_value
    ):
        raise ValueError(f"max_value: need 0 <= min_value <= max_value, got {min_value!r}, {max_value!r}")
    if not isinstance(num_shots, (int, np.integer)) or num_shots < 0:
        raise ValueError(f"num_shots: must be an integer >= 0, got {num_shots!r}")
    if target_tokens is not None and (
        isinstance(target_tokens, bool) or not isinstance(target_tokens, (int, np.integer)) or target_tokens < 1
    ):
        raise ValueError(f"target_tokens: must be None or an integer >= 1, got {target_tokens!r}")
    if num_shots and (max_value - min_value + 1) ** 2 <= num_shots:
        raise ValueError(f"num_shots: {num_shots} distinct examples need a wider [min_value, max_value]")


def _arith_shots(rng: np.random.Generator, ops: Sequence[str], lo: int, hi: int, num_shots: int, question: str,
                 render: Callable[[int, str, int], tuple[str, str]]) -> list[tuple[str, str]]:
    """``num_shots`` solved examples (question, answer), distinct and none the asked ``question``, drawn from ``rng``
    after the asked problem."""
    shots: list[tuple[str, str]] = []
    while len(shots) < num_shots:
        x, o, y, z = _arith_problem(rng, ops, lo, hi)
        q, pre = render(x, o, y)
        if q != question and all(q != s[0] for s in shots):
            shots.append((q, f"{pre} {z}" if pre else z))
    return shots


def _pad_with_system_filler(
    tokenizer, target_tokens, system, question, shots, prefix, background: str = ARITHMETIC_BACKGROUND
) -> tuple[list[int], int]:
    """Prompt ids with a system message ``[system + blank line +] background + filler`` whose number of
    filler sentences puts the whole prompt closest to ``target_tokens`` tokens; returns (ids, filler sentences)."""

    def build(n: int) -> list[int]:
        hay, _ = _haystack(n, [])
        text = f"{background} {hay}" if n else background
        sys_text = f"{system}\n\n{text}" if system else text
        return chat_prompt(tokenizer, question, system=sys_text, history=shots, assistant_prefix=prefix)

    base = build(0)
    if len(base) > target_tokens:
        raise ValueError(
            f"target_tokens: {target_tokens} is shorter than the prompt without filler ({len(base)} tokens)"
        )
    per = max((len(build(50)) - len(base)) / 50.0, 1e-6)
    n = max(0, int(round((target_tokens - len(base)) / per)))
    best = build(n)
    seen = {n}
    while len(best) != target_tokens:
        diff = len(best) - target_tokens
        nxt = n - 1 if diff > 0 else n + 1
        if nxt < 0 or nxt in seen:
            break
        seen.add(nxt)
        cand = build(nxt)
        if abs(len(cand) - target_tokens) > abs(diff):
            break
        best, n = cand, nxt
    return best, n


_INTEGER = re.compile(r"(?<![\d.])-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The first number of ``text`` in canonical form ("1,024" -> "1024", "42.0" -> "42"), or None."""
    m = _INTEGER.search(text or "")
    if not m:
        return None
    s = m.group(0).replace(",", "")
    if "." in s:
        f = float(s)
        s = str(int(f)) if f.is_integer() else repr(f)
    else:
        s = str(int(s))
    return s


def score_arithmetic(text: str, answer: str) -> float:
    """1.0 when the first number of ``text`` equals ``answer`` exactly, else 0.0."""
    return float(extract_number(text) == str(answer))
