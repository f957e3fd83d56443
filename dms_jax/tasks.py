"""Evaluation tasks: seeded case generators and scorers (pure Python / numpy).

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

``score_answer(task, extracted, answer)`` scores an extracted answer (e.g. the winner of a majority vote).

``score(case, text)`` dispatches on ``case.meta["task"]``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

__all__ = [
    "Case",
    "Task",
    "TASKS",
    "FILLER_SENTENCES",
    "make_cases",
    "make_passkey_cases",
    "make_variable_tracking_cases",
    "make_arithmetic_cases",
    "score",
    "score_passkey",
    "score_variable_tracking",
    "score_arithmetic",
    "extract_passkey",
    "extract_number",
    "majority_vote",
    "score_answer",
    "chat_prompt_ids",
    "resolve_assignments",
]


@dataclass(frozen=True)
class Case:
    """One evaluation case: the prompt's token ids, the reference answer, and details (task, depth, ...)."""

    prompt_ids: tuple[int, ...]
    answer: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def ids(self) -> np.ndarray:
        """``prompt_ids`` as an int32 numpy array."""
        return np.asarray(self.prompt_ids, dtype=np.int32)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids)


# ----------------------------------------------------------------------------------------------------------
# Prompt formatting
# ----------------------------------------------------------------------------------------------------------


def _chat_text(tokenizer, messages: Sequence[Mapping[str, str]], assistant_prefix: str = "") -> str:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    else:  # a tokenizer without a template: a plain transcript
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
        if assistant_prefix:
            assistant_prefix = " " + assistant_prefix
    return text + assistant_prefix


def _encode(tokenizer, text: str, offsets: bool = False):
    if offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_ids(
    tokenizer, user: str, *, system: str | None = None, history: Sequence[tuple[str, str]] = (),
    assistant_prefix: str = "",
) -> list[int]:
    """Token ids of a chat prompt: optional system message, earlier (user, assistant) turns, the user message,
    the generation prompt, then ``assistant_prefix`` (the start of the answer, may be empty)."""
    return _encode(tokenizer, _chat_text(tokenizer, _messages(user, system, history), assistant_prefix))


def _messages(user: str, system: str | None, history: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    msgs: list[dict[str, str]] = []
    if system is not None:
        msgs.append({"role": "system", "content": system})
    for u, a in history:
        msgs.append({"role": "user", "content": u})
        msgs.append({"role": "assistant", "content": a})
    msgs.append({"role": "user", "content": user})
    return msgs


def _case_rng(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), salt])


def _check_common(tokenizer, n, seed) -> None:
    if tokenizer is None:
        raise ValueError("tokenizer: a tokenizer is required")
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n: must be an integer >= 0, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")


# ----------------------------------------------------------------------------------------------------------
# Haystack: filler sentences with inserted statements, sized in tokens
# ----------------------------------------------------------------------------------------------------------

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)


def _haystack(n_filler: int, inserts: Sequence[tuple[int, str]]) -> tuple[str, list[tuple[int, int]]]:
    """``n_filler`` filler sentences (cycled) joined by spaces, with ``(position, sentence)`` inserted before
    filler sentence ``position`` (positions sorted, 0..n_filler). Returns the text and the character spans
    of the inserted sentences in it."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    j = 0
    for i in range(n_filler + 1):
        while j < len(inserts) and inserts[j][0] == i:
            if parts:
                pos += 1
            spans.append((pos, pos + len(inserts[j][1])))
            parts.append(inserts[j][1])
            pos += len(inserts[j][1])
            j += 1
        if i < n_filler:
            if parts:
                pos += 1
            s = FILLER_SENTENCES[i % len(FILLER_SENTENCES)]
            parts.append(s)
            pos += len(s)
    return " ".join(parts), spans


class _Built(NamedTuple):
    ids: list[int]
    text: str
    n_filler: int
    inserts: list[tuple[int, str]]
    hay_start: int  # character offsets of the haystack inside ``text``
    hay_end: int
    spans: list[tuple[int, int]]  # character spans of the inserted sentences inside ``text``


def _build_to_length(
    tokenizer,
    target_tokens: int,
    render: Callable[[str], tuple[str, str]],
    place: Callable[[int], list[tuple[int, str]]],
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> _Built:
    """Find the number of filler sentences whose full prompt is closest to ``target_tokens`` tokens.

    ``render(haystack)`` returns ``(user_message, assistant_prefix)`` with the haystack inside; ``place(n)``
    returns the sorted ``(position, sentence)`` inserts for ``n`` filler sentences.
    """
    marker = "\x00HAYSTACK\x00"
    user_t, prefix = render(marker)
    text_t = _chat_text(tokenizer, _messages(user_t, system, history), prefix)
    if text_t.count(marker) != 1:
        raise ValueError("tokenizer: its chat template altered the prompt; cannot place the haystack")
    start = text_t.index(marker)
    head, tail = text_t[:start], text_t[start + len(marker) :]

    def assemble(n: int) -> _Built:
        inserts = place(n)
        hay, spans = _haystack(n, inserts)
        text = head + hay + tail
        ids = _encode(tokenizer, text)
        return _Built(ids, text, n, inserts, start, start + len(hay), [(start + a, start + c) for a, c in spans])

    base = assemble(0)
    if len(base.ids) > target_tokens:
        raise ValueError(
            f"target_tokens: {target_tokens} is shorter than the prompt without filler ({len(base.ids)} tokens)"
        )
    probe = assemble(50)
    per = max((len(probe.ids) - len(base.ids)) / 50.0, 1e-6)
    best = assemble(max(0, int(round((target_tokens - len(base.ids)) / per))))
    seen = {best.n_filler}
    # Walk to the closest length (a step or two: filler sentences have nearly constant lengths).
    while len(best.ids) != target_tokens:
        diff = len(best.ids) - target_tokens
        nxt = best.n_filler - 1 if diff > 0 else best.n_filler + 1
        if nxt < 0 or nxt in seen:
            break
        seen.add(nxt)
        cand = assemble(nxt)
        if abs(len(cand.ids) - target_tokens) > abs(diff):
            break
        best = cand
    return best


def _token_index(offsets: Sequence[tuple[int, int]], char_pos: int) -> int:
    """Index of the first token whose span ends after ``char_pos`` (the token holding that character)."""
    for i, (a, b) in enumerate(offsets):
        if b > char_pos:
            return i
    return len(offsets)


def _token_positions(tokenizer, text: str, char_positions: Sequence[int]) -> list[int]:
    try:
        _, offsets = _encode(tokenizer, text, offsets=True)
        return [_token_index(offsets, c) for c in char_positions]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        # Slow tokenizers have no offsets: count the tokens of the text before each position.
        return [len(_encode(tokenizer, text[:c])) for c in char_positions]


# ----------------------------------------------------------------------------------------------------------
# Passkey retrieval
# ----------------------------------------------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"


def make_passkey_cases(
    tokenizer,
    n: int,
    seed: int = 0,
    *,
    target_tokens: int = 1024,
    depth: float | Sequence[float] | None = None,
    assistant_prefix: str = "",
    system: str | None = None,
) -> list[Case]:
    """Passkey retrieval cases of about ``target_tokens`` tokens in all (chat template included).

    ``depth``: where the needle sits in the filler (0 = first sentence, 1 = last): a float for all cases, a
    sequence cycled over the cases, or None for a seeded uniform draw per case.  ``assistant_prefix`` (e.g.
    ``"The pass key is"``) is appended after the generation prompt.  ``meta``: task, key, depth (asked),
    depth_tokens (the fraction of the filler's tokens that come before the needle), needle_token (index of the
    needle's first token in ``prompt_ids``), target_tokens, num_tokens, n_filler, prompt (the text).
    """
    _check_common(tokenizer, n, seed)
    if not isinstance(target_tokens, (int, np.integer)) or target_tokens < 1:
        raise ValueError(f"target_tokens: must be an integer >= 1, got {target_tokens!r}")
    depths = _depth_list(depth, n, seed)
    cases = []
    for i in range(n):
        rng = _case_rng(seed, i, 0x5A55)
        key = str(int(rng.integers(10000, 100000)))
        d = depths[i] if depths is not None else float(rng.uniform(0.0, 1.0))
        needle = PASSKEY_NEEDLE.format(key=key)

        def render(hay: str) -> tuple[str, str]:
            return f"{PASSKEY_INTRO}\n\n{hay}\n\n{PASSKEY_QUESTION}", assistant_prefix

        def place(nf: int, d=d, needle=needle) -> list[tuple[int, str]]:
            return [(int(round(d * nf)), needle)]

        b = _build_to_length(tokenizer, int(target_tokens), render, place, system)
        hay_tok, needle_tok, needle_end, end_tok = _token_positions(
            tokenizer, b.text, [b.hay_start, b.spans[0][0], b.spans[0][1], b.hay_end]
        )
        filler_tokens = max((end_tok - hay_tok) - (needle_end - needle_tok), 1)
        cases.append(
            Case(
                prompt_ids=tuple(int(t) for t in b.ids),
                answer=key,
                meta={
                    "task": "passkey",
                    "key": key,
                    "depth": float(d),
                    "depth_tokens": (needle_tok - hay_tok) / filler_tokens,
                    "needle_token": needle_tok,
                    "target_tokens": int(target_tokens),
                    "num_tokens": len(b.ids),
                    "n_filler": b.n_filler,
                    "prompt": b.text,
                },
            )
        )
    return cases


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
# Variable tracking (RULER)
# ----------------------------------------------------------------------------------------------------------

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
    "assigned the value {value}, they are:"
)
_VT_STATEMENT = re.compile(r"VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|(\d+))")


def _random_names(rng: np.random.Generator, count: int, exclude: Iterable[str] = ()) -> list[str]:
    letters = np.array(list(string.ascii_uppercase))
    names: list[str] = []
    seen: set[str] = set(exclude)
    while len(names) < count:
        name = "".join(rng.choice(letters, 5))
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


class _VTProblem(NamedTuple):
    chains: list[list[str]]
    values: list[str]
    statements: list[str]  # all chains interleaved, each chain in order
    unit: np.ndarray  # each statement's position as a fraction of the filler


def _vt_problem(rng: np.random.Generator, num_chains: int, num_hops: int, exclude_names=(), exclude_values=()):
    names = _random_names(rng, num_chains * (num_hops + 1), exclude_names)
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    values: list[str] = []
    while len(values) < num_chains:
        v = str(int(rng.integers(10000, 100000)))
        if v not in values and v not in exclude_values:
            values.append(v)
    per_chain = []
    for chain, value in zip(chains, values):
        stm = [f"VAR {chain[0]} = {value}."]
        stm += [f"VAR {chain[k]} = VAR {chain[k - 1]}." for k in range(1, len(chain))]
        per_chain.append(stm)
    order = np.repeat(np.arange(num_chains), num_hops + 1)
    rng.shuffle(order)
    counters = [0] * num_chains
    statements = []
    for c in order:
        statements.append(per_chain[c][counters[c]])
        counters[c] += 1
    return _VTProblem(chains, values, statements, rng.uniform(size=len(statements)))


def _vt_place(problem: _VTProblem, n_filler: int) -> list[tuple[int, str]]:
    pos = np.sort(np.floor(problem.unit * (n_filler + 1)).astype(int).clip(0, n_filler))
    return [(int(p), s) for p, s in zip(pos, problem.statements)]


def _vt_user(hay: str, value: str) -> str:
    return f"{VT_INTRO}\n\n{hay}\n\n{VT_QUESTION.format(value=value)}"


def make_variable_tracking_cases(
    tokenizer,
    n: int,
    seed: int = 0,
    *,
    target_tokens: int = 1024,
    num_chains: int = 1,
    num_hops: int = 1,
    num_shots: int = 1,
    shot_filler: int = 20,
    answer_prefix: bool = True,
    system: str | None = None,
) -> list[Case]:
    """RULER variable tracking: ``num_chains`` chains of ``num_hops + 1`` variables each (one value per chain,
    all five-digit and distinct) spread in order through filler; the question asks for the variables of
    chain 0.  As in RULER, ``num_shots`` solved examples (same shape, ``shot_filler`` filler sentences, other
    names and values) come first, as earlier chat turns.  The whole prompt is about ``target_tokens`` long.

    ``answer`` is the space-joined variable names of chain 0 in chain order; ``meta["variables"]`` the same as
    a tuple, ``meta["chains"]`` all chains, ``meta["value"]`` the queried value, ``meta["question"]`` the last
    user message.  With ``answer_prefix`` the assistant turn starts with RULER's answer prefix.

    RULER's default is ``num_hops=4``; that is at the floor for SmolLM2-135M-Instruct, so the default here is
    one hop.  Measured (Q4_1 GGUF, transformers fp32, greedy, 10 cases, ~1K tokens, mean fraction score):
    ``num_hops=1`` 0.6, ``num_hops=4`` 0.08; with no in-context example (``num_shots=0``) 0.0 at any depth.
    """
    _check_common(tokenizer, n, seed)
    if not isinstance(target_tokens, (int, np.integer)) or target_tokens < 1:
        raise ValueError(f"target_tokens: must be an integer >= 1, got {target_tokens!r}")
    if not isinstance(num_chains, (int, np.integer)) or num_chains < 1:
        raise ValueError(f"num_chains: must be an integer >= 1, got {num_chains!r}")
    if not isinstance(num_hops, (int, np.integer)) or num_hops < 0:
        raise ValueError(f"num_hops: must be an integer >= 0, got {num_hops!r}")
    if not isinstance(num_shots, (int, np.integer)) or num_shots < 0:
        raise ValueError(f"num_shots: must be an integer >= 0, got {num_shots!r}")
    if not isinstance(shot_filler, (int, np.integer)) or shot_filler < 0:
        raise ValueError(f"shot_filler: must be an integer >= 0, got {shot_filler!r}")

    def prefix_for(value: str) -> str:
        return VT_ANSWER_PREFIX.format(count=num_hops + 1, value=value) if answer_prefix else ""

    cases = []
    for i in range(n):
        rng = _case_rng(seed, i, 0x7A7A)
        prob = _vt_problem(rng, num_chains, num_hops)
        used_names = [v for c in prob.chains for v in c]
        used_values = list(prob.values)
        history = []
        for _ in range(num_shots):
            shot = _vt_problem(rng, num_chains, num_hops, used_names, used_values)
            used_names += [v for c in shot.chains for v in c]
            used_values += shot.values
            hay, _ = _haystack(shot_filler, _vt_place(shot, shot_filler))
            answer = " ".join(shot.chains[0])
            pre = prefix_for(shot.values[0])
            history.append((_vt_user(hay, shot.values[0]), f"{pre} {answer}" if pre else answer))
        value = prob.values[0]

        def render(hay: str, value=value) -> tuple[str, str]:
            return _vt_user(hay, value), prefix_for(value)

        b = _build_to_length(
            tokenizer, int(target_tokens), render, lambda nf, prob=prob: _vt_place(prob, nf), system, history
        )
        cases.append(
            Case(
                prompt_ids=tuple(int(t) for t in b.ids),
                answer=" ".join(prob.chains[0]),
                meta={
                    "task": "variable_tracking",
                    "value": value,
                    "variables": tuple(prob.chains[0]),
                    "chains": tuple(tuple(c) for c in prob.chains),
                    "values": tuple(prob.values),
                    "num_hops": int(num_hops),
                    "num_shots": int(num_shots),
                    "target_tokens": int(target_tokens),
                    "num_tokens": len(b.ids),
                    "n_filler": b.n_filler,
                    "question": render(b.text[b.hay_start : b.hay_end])[0],
                    "prompt": b.text,
                },
            )
        )
    return cases


def resolve_assignments(text: str) -> dict[str, str]:
    """Follow the ``VAR X = ...`` statements of ``text`` in order: variable -> value (for checking cases)."""
    env: dict[str, str] = {}
    for name, ref, value in _VT_STATEMENT.findall(text):
        env[name] = value if value else env.get(ref, "")
    return env


def score_variable_tracking(text: str, answer: str | Sequence[str], mode: str = "fraction") -> float:
    """Fraction of the answer's variables named (as whole words) in ``text``; ``mode="all"``: 1 only if all."""
    if mode not in ("fraction", "all"):
        raise ValueError(f"mode: must be 'fraction' or 'all', got {mode!r}")
    names = answer.split() if isinstance(answer, str) else list(answer)
    if not names:
        raise ValueError("answer: no variables to look for")
    found = [re.search(rf"(?<![A-Za-z]){re.escape(v)}(?![A-Za-z])", text or "") is not None for v in names]
    frac = sum(found) / len(found)
    return frac if mode == "fraction" else float(all(found))


# ----------------------------------------------------------------------------------------------------------
# Arithmetic (short answer, exact match, majority voting)
# ----------------------------------------------------------------------------------------------------------

ARITHMETIC_QUESTION = "What is {a} {op} {b}? Answer with the number only."
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
    """
    _check_common(tokenizer, n, seed)
    ops = tuple(ops)
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

    def render(a: int, op: str, b: int) -> tuple[str, str]:
        return ARITHMETIC_QUESTION.format(a=a, op=op, b=b), (f"{a} {op} {b} =" if answer_prefix else "")

    cases = []
    for i in range(n):
        rng = _case_rng(seed, i, 0xA217)
        a, op, b, answer = _arith_problem(rng, ops, min_value, max_value)
        question, prefix = render(a, op, b)
        shots: list[tuple[str, str]] = []
        while len(shots) < num_shots:
            x, o, y, z = _arith_problem(rng, ops, min_value, max_value)
            q, pre = render(x, o, y)
            if q != question and all(q != s[0] for s in shots):
                shots.append((q, f"{pre} {z}" if pre else z))
        n_filler = 0
        if target_tokens is None:
            ids = chat_prompt_ids(tokenizer, question, system=system, history=shots, assistant_prefix=prefix)
        else:
            ids, n_filler = _pad_with_system_filler(tokenizer, int(target_tokens), system, question, shots, prefix)
        cases.append(
            Case(
                prompt_ids=tuple(int(t) for t in ids),
                answer=answer,
                meta={
                    "task": "arithmetic",
                    "question": question,
                    "assistant_prefix": prefix,
                    "shots": tuple(shots),
                    "num_tokens": len(ids),
                    "n_filler": n_filler,
                    "target_tokens": target_tokens,
                },
            )
        )
    return cases


ARITHMETIC_BACKGROUND = "Background text (not needed for the questions):"


def _pad_with_system_filler(tokenizer, target_tokens, system, question, shots, prefix) -> tuple[list[int], int]:
    """Prompt ids with a system message ``[system + blank line +] ARITHMETIC_BACKGROUND + filler`` whose number of
    filler sentences puts the whole prompt closest to ``target_tokens`` tokens; returns (ids, filler sentences)."""

    def build(n: int) -> list[int]:
        hay, _ = _haystack(n, [])
        text = f"{ARITHMETIC_BACKGROUND} {hay}" if n else ARITHMETIC_BACKGROUND
        sys_text = f"{system}\n\n{text}" if system else text
        return chat_prompt_ids(tokenizer, question, system=sys_text, history=shots, assistant_prefix=prefix)

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


def _extract_variables(text: str) -> tuple[str, ...] | None:
    names = tuple(sorted(set(re.findall(r"(?<![A-Za-z])[A-Z]{5}(?![A-Za-z])", text or ""))))
    return names or None


TASKS: dict[str, Task] = {
    "passkey": Task(make_passkey_cases, score_passkey, extract_passkey),
    "variable_tracking": Task(make_variable_tracking_cases, score_variable_tracking, _extract_variables),
    "arithmetic": Task(make_arithmetic_cases, score_arithmetic, extract_number),
}


def make_cases(task: str, tokenizer, n: int, seed: int = 0, **params) -> list[Case]:
    """``TASKS[task].make_cases(tokenizer, n, seed, **params)``."""
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
