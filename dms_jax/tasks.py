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

* ``multikey``: several (3-6) labelled five-digit numbers ("The code for Oslo is 12345.") at seeded depths of
  the filler; the question asks for one by its label, the others are distractors.  Score: as passkey.

Wording families
----------------
Every task comes in several wordings (``WORDINGS[task]``, the default first; ``make_cases(..., wording=name)``)
that differ in intro, delimiters around the haystack, needle or statement phrasing, question and filler, so
that accuracy can be reported per family and for the worst one.  The default families ("ruler" for passkey and
variable tracking, "plain" for the others) give exactly the prompts from before the families existed.  The
"natural" families use real text as filler: sentences of the built-in corpus's held-out documents
(``natural_filler_sentences``, never in training rows; about 4.5K tokens, cycled beyond).  None of the wordings
reuses the training rows' templates (``data.make_recall_rows``, ``synthetic_rows``).  Case ``i`` draws the
same key / names / values / question in every family, so families compare case by case.

``score_answer(task, extracted, answer)`` scores an extracted answer (e.g. the winner of a majority vote).

``score(case, text)`` dispatches on ``case.meta["task"]``.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from dms_jax.chat import chat_messages, chat_prompt, chat_text, encode

__all__ = [
    "Case",
    "Task",
    "TASKS",
    "FILLER_SENTENCES",
    "WORDINGS",
    "PASSKEY_WORDINGS",
    "VT_WORDINGS",
    "MULTIKEY_WORDINGS",
    "ARITHMETIC_WORDINGS",
    "natural_filler_sentences",
    "make_multikey_cases",
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
    "user_message",
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


def user_message(tokenizer, case: "Case") -> str:
    """The user message of a single-turn case made without a system message or assistant prefix: its prompt text
    (``meta["prompt"]``) without the chat template around it, e.g. to ask a second question in a later turn
    (``chat_prompt(tokenizer, question, history=[(user_message(tokenizer, case), answer)])``)."""
    marker = "\x00USER\x00"
    head, tail = chat_text(tokenizer, chat_messages(marker, None, ())).split(marker)
    text = case.meta.get("prompt", "")
    if len(text) < len(head) + len(tail) or not (text.startswith(head) and text.endswith(tail)):
        raise ValueError("case: its prompt is not one user message in this tokenizer's chat template "
                         "(made with a system message, an assistant prefix or another tokenizer?)")
    return text[len(head):len(text) - len(tail)]


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


class Filler(NamedTuple):
    """The sentences a haystack is made of: filler sentence ``i`` is ``sentences[(start + i) % len]``, joined
    by ``sep``."""

    sentences: tuple[str, ...]
    start: int = 0
    sep: str = " "

    def sentence(self, i: int) -> str:
        return self.sentences[(self.start + i) % len(self.sentences)]


CLASSIC_FILLER = Filler(FILLER_SENTENCES)

# A second repeated filler (one sentence a line), so that a family differs from the classic one in its filler
# too; plain scenes, no numbers or capitalised names that could pass for an answer.
LINE_FILLER_SENTENCES = (
    "A boat drifts slowly down the quiet river.",
    "The old clock on the kitchen wall keeps ticking.",
    "Birds sing in the tall trees behind the house.",
    "Rain taps softly against the window.",
    "A cat sleeps curled up next to the stove.",
    "The narrow road winds over the green hill.",
)


def _haystack(
    n_filler: int, inserts: Sequence[tuple[int, str]], filler: Filler = CLASSIC_FILLER
) -> tuple[str, list[tuple[int, int]]]:
    """``n_filler`` filler sentences joined by ``filler.sep``, with ``(position, sentence)`` inserted before
    filler sentence ``position`` (positions sorted, 0..n_filler). Returns the text and the character spans
    of the inserted sentences in it."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    j = 0
    gap = len(filler.sep)
    for i in range(n_filler + 1):
        while j < len(inserts) and inserts[j][0] == i:
            if parts:
                pos += gap
            spans.append((pos, pos + len(inserts[j][1])))
            parts.append(inserts[j][1])
            pos += len(inserts[j][1])
            j += 1
        if i < n_filler:
            if parts:
                pos += gap
            s = filler.sentence(i)
            parts.append(s)
            pos += len(s)
    return filler.sep.join(parts), spans


# Natural filler: sentences of the built-in corpus's held-out documents (never in training rows), in their
# order, without code blocks, headings, or anything that could pass for an answer (five-digit numbers,
# five-capital names) or for a task's own wording.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")
_ANSWER_LOOKALIKE = re.compile(r"\d{5}|(?<![A-Za-z])[A-Z]{5}(?![A-Za-z])|VAR|[Pp]ass key|[Ss]ecret code")


def _prose_sentences(doc: str) -> list[str]:
    """The sentences of a document's prose paragraphs (indented code and underlined headings dropped)."""
    out = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.split("\n")
        if any(line.startswith(" ") for line in lines) or re.fullmatch(r"[*=\-~^#+]{3,}", lines[-1].strip()):
            continue
        out += _SENTENCE_END.split(" ".join(para.split()))  # one space between words, as prose reads
    return out


def _keep_natural(sentence: str) -> bool:
    # Short sentences keep the prompt length within a few tokens of the target; long ones would not.
    fits = 25 <= len(sentence) <= 160 and sentence[0].isupper() and sentence[-1] in ".!?"
    return fits and not _ANSWER_LOOKALIKE.search(sentence)


@functools.lru_cache(maxsize=1)
def natural_filler_sentences() -> tuple[str, ...]:
    """Filler sentences of real text: the prose of the held-out documents of ``data.builtin_documents()``, as
    split by ``data.split_documents(docs, 0.05, "dms-jax-heldout")`` (the split training never sees), without
    the sentences that a training document contains too."""
    from dms_jax import data

    train, heldout = data.split_documents(data.builtin_documents(), 0.05, "dms-jax-heldout")
    # The split is by document; some sentences (stock phrases, text that both a topic page and a docstring
    # carry) also occur in training documents, and a model trained on them would know them: those are dropped.
    train_prose = " ".join(" ".join(doc.split()) for doc in train)
    sentences = tuple(
        s for doc in heldout for s in _prose_sentences(doc) if _keep_natural(s) and s not in train_prose
    )
    if len(sentences) < 50:
        raise ValueError("wording: the built-in corpus has too little held-out prose for natural filler")
    return sentences


_FILLER_KINDS = ("classic", "lines", "natural")


def _case_filler(kind: str, seed: int, index: int) -> Filler:
    """The filler of case ``index``: the classic or line filler from its first sentence, or natural text from
    a seeded sentence of the held-out documents (a salt of its own, so the case's other draws do not move)."""
    if kind == "classic":
        return CLASSIC_FILLER
    if kind == "lines":
        return Filler(LINE_FILLER_SENTENCES, sep="\n")
    sentences = natural_filler_sentences()
    start = int(_case_rng(seed, index, 0xF111).integers(len(sentences)))
    return Filler(sentences, start)


def _shot_filler(kind: str, filler: Filler) -> Filler:
    """Filler for a solved example: natural text other than the question's haystack starts with (the repeated
    fillers stay as they are, as RULER's examples do)."""
    if kind != "natural":
        return filler
    return filler._replace(start=filler.start + len(filler.sentences) // 2)


def _pick_wording(task: str, wording: str, families: Mapping[str, Any]):
    if not isinstance(wording, str) or wording not in families:
        raise ValueError(f"wording: unknown family {wording!r} for {task}; choose from {tuple(families)}")
    return families[wording]


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
    filler: Filler = CLASSIC_FILLER,
) -> _Built:
    """Find the number of filler sentences whose full prompt is closest to ``target_tokens`` tokens.

    ``render(haystack)`` returns ``(user_message, assistant_prefix)`` with the haystack inside; ``place(n)``
    returns the sorted ``(position, sentence)`` inserts for ``n`` filler sentences.
    """
    marker = "\x00HAYSTACK\x00"
    user_t, prefix = render(marker)
    text_t = chat_text(tokenizer, chat_messages(user_t, system, history), prefix)
    if text_t.count(marker) != 1:
        raise ValueError("tokenizer: its chat template altered the prompt; cannot place the haystack")
    start = text_t.index(marker)
    head, tail = text_t[:start], text_t[start + len(marker) :]

    def assemble(n: int) -> _Built:
        inserts = place(n)
        hay, spans = _haystack(n, inserts, filler)
        text = head + hay + tail
        ids = encode(tokenizer, text)
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
        _, offsets = encode(tokenizer, text, offsets=True)
        return [_token_index(offsets, c) for c in char_positions]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        # Slow tokenizers have no offsets: count the tokens of the text before each position.
        return [len(encode(tokenizer, text[:c])) for c in char_positions]


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


def _check_target(target_tokens) -> None:
    if not isinstance(target_tokens, (int, np.integer)) or target_tokens < 1:
        raise ValueError(f"target_tokens: must be an integer >= 1, got {target_tokens!r}")


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
# Variable tracking (RULER)
# ----------------------------------------------------------------------------------------------------------

VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {value} in the text above."
VT_ANSWER_PREFIX = (
    "Answer: According to the chain(s) of variable assignment in the text above, {count} variables are "
    "assigned the value {value}, they are:"
)


class VTWording(NamedTuple):
    """One wording family of variable tracking: ``intro + before + haystack + after + question`` as the user
    message, ``answer_prefix`` (``{count}``, ``{value}``) to start the answer, and the two statement forms:
    ``assign_value`` (``{name}``, ``{value}``) starts a chain, ``assign_copy`` (``{name}``, ``{prev}``) extends
    it. ``filler`` as in ``HaystackWording``."""

    intro: str
    before: str
    after: str
    assign_value: str
    assign_copy: str
    question: str
    answer_prefix: str
    filler: str = "classic"


VT_WORDINGS: dict[str, VTWording] = {
    # RULER's prompt, unchanged.
    "ruler": VTWording(
        VT_INTRO, "\n\n", "\n\n", "VAR {name} = {value}.", "VAR {name} = VAR {prev}.", VT_QUESTION,
        VT_ANSWER_PREFIX,
    ),
    "rules": VTWording(
        "Between the two rules, numbers are stored in variables and copied from one variable to another. "
        "Keep track of them.",
        "\n---\n", "\n---\n",
        "Store {value} in {name}.", "Copy {prev} into {name}.",
        "Which variables end up containing {value}? List every one of them.",
        "The {count} variables containing {value} are:",
    ),
    "document": VTWording(
        "Read the document and follow the variables it defines.",
        "\n\nDocument:\n", "\nEnd of document.\n\n",
        "{name} is {value}.", "{name} is the same as {prev}.",
        "List all variables in the document whose value is {value}.",
        "Variables whose value is {value} ({count} of them):",
    ),
    "natural": VTWording(
        "The excerpt below comes from technical documentation, with a few variable definitions mixed in. "
        "Follow the variables.",
        "\n\n", "\n\n",
        "Variable {name} gets {value}.", "Variable {name} gets the value of {prev}.",
        "Name every variable that ends up with the value {value}.",
        "The {count} variables that end up with {value} are",
        "natural",
    ),
    "lines": VTWording(
        "Each line below is a short sentence; some lines give variables their values. Track them.",
        "\n", "\n",
        "Give {name} the value {value}.", "Give {name} the value of {prev}.",
        "Which variables were given the value {value}, directly or through another variable?",
        "Those {count} variables are:",
        "lines",
    ),
}


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


def _vt_problem(
    rng: np.random.Generator, num_chains: int, num_hops: int, exclude_names=(), exclude_values=(),
    wording: VTWording = VT_WORDINGS["ruler"],
) -> _VTProblem:
    names = _random_names(rng, num_chains * (num_hops + 1), exclude_names)
    chains = [names[c * (num_hops + 1) : (c + 1) * (num_hops + 1)] for c in range(num_chains)]
    values: list[str] = []
    while len(values) < num_chains:
        v = str(int(rng.integers(10000, 100000)))
        if v not in values and v not in exclude_values:
            values.append(v)
    per_chain = []
    for chain, value in zip(chains, values):
        stm = [wording.assign_value.format(name=chain[0], value=value)]
        stm += [wording.assign_copy.format(name=chain[k], prev=chain[k - 1]) for k in range(1, len(chain))]
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


def _vt_user(hay: str, value: str, wording: VTWording) -> str:
    return f"{wording.intro}{wording.before}{hay}{wording.after}{wording.question.format(value=value)}"


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
    wording: str = "ruler",
) -> list[Case]:
    """RULER variable tracking: ``num_chains`` chains of ``num_hops + 1`` variables each (one value per chain,
    all five-digit and distinct) spread in order through filler; the question asks for the variables of
    chain 0.  As in RULER, ``num_shots`` solved examples (same shape, ``shot_filler`` filler sentences, other
    names and values) come first, as earlier chat turns.  The whole prompt is about ``target_tokens`` long.

    ``answer`` is the space-joined variable names of chain 0 in chain order; ``meta["variables"]`` the same as
    a tuple, ``meta["chains"]`` all chains, ``meta["value"]`` the queried value, ``meta["question"]`` the last
    user message.  With ``answer_prefix`` the assistant turn starts with the family's answer prefix.
    ``wording``: a family of ``VT_WORDINGS`` (statement forms, intro, delimiters, question, answer prefix,
    filler); names and values of case ``i`` are the same in every family.

    RULER's default is ``num_hops=4``; that is at the floor for SmolLM2-135M-Instruct, so the default here is
    one hop.  Measured (Q4_1 GGUF, transformers fp32, greedy, 10 cases, ~1K tokens, mean fraction score):
    ``num_hops=1`` 0.6, ``num_hops=4`` 0.08; with no in-context example (``num_shots=0``) 0.0 at any depth.
    """
    _check_common(tokenizer, n, seed)
    w = _pick_wording("variable_tracking", wording, VT_WORDINGS)
    _check_target(target_tokens)
    _check_counts(num_chains=(num_chains, 1), num_hops=(num_hops, 0), num_shots=(num_shots, 0),
                  shot_filler=(shot_filler, 0))

    def prefix_for(value: str) -> str:
        return w.answer_prefix.format(count=num_hops + 1, value=value) if answer_prefix else ""

    cases = []
    for i in range(n):
        rng = _case_rng(seed, i, 0x7A7A)
        prob = _vt_problem(rng, num_chains, num_hops, wording=w)
        filler = _case_filler(w.filler, seed, i)
        history = _vt_shots(rng, prob, num_shots, shot_filler, w, _shot_filler(w.filler, filler), prefix_for)
        value = prob.values[0]

        def render(hay: str, value=value) -> tuple[str, str]:
            return _vt_user(hay, value, w), prefix_for(value)

        b = _build_to_length(
            tokenizer, int(target_tokens), render, lambda nf, prob=prob: _vt_place(prob, nf), system, history,
            filler,
        )
        meta = {
            "task": "variable_tracking", "wording": wording, "value": value,
            "variables": tuple(prob.chains[0]), "chains": tuple(tuple(c) for c in prob.chains),
            "values": tuple(prob.values), "num_hops": int(num_hops), "num_shots": int(num_shots),
            "target_tokens": int(target_tokens), "num_tokens": len(b.ids), "n_filler": b.n_filler,
            "question": render(b.text[b.hay_start : b.hay_end])[0], "prompt": b.text,
        }
        cases.append(Case(prompt_ids=tuple(int(t) for t in b.ids), answer=" ".join(prob.chains[0]), meta=meta))
    return cases


def _check_counts(**counts: tuple[Any, int]) -> None:
    """``name=(value, minimum)``: each value must be an integer >= its minimum."""
    for name, (value, minimum) in counts.items():
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def _vt_shots(rng, prob: _VTProblem, num_shots: int, shot_filler: int, w: VTWording, filler: Filler,
              prefix_for: Callable[[str], str]) -> list[tuple[str, str]]:
    """``num_shots`` solved examples (user message, answer) with names and values other than ``prob``'s."""
    used_names = [v for c in prob.chains for v in c]
    used_values = list(prob.values)
    history = []
    for _ in range(num_shots):
        shot = _vt_problem(rng, len(prob.chains), len(prob.chains[0]) - 1, used_names, used_values, w)
        used_names += [v for c in shot.chains for v in c]
        used_values += shot.values
        hay, _ = _haystack(shot_filler, _vt_place(shot, shot_filler), filler)
        answer = " ".join(shot.chains[0])
        pre = prefix_for(shot.values[0])
        history.append((_vt_user(hay, shot.values[0], w), f"{pre} {answer}" if pre else answer))
    return history


def _statement_pattern(wording: VTWording) -> re.Pattern:
    """A regex for both statement forms of ``wording`` (the final period optional, as in free text)."""

    def form(fmt: str, fields: Mapping[str, str]) -> str:
        out = re.escape(fmt.rstrip("."))
        for field_name, group in fields.items():
            out = out.replace(re.escape("{" + field_name + "}"), group)
        return out

    value = form(wording.assign_value, {"name": r"(?P<name>[A-Z]{5})", "value": r"(?P<value>\d+)"})
    copy = form(wording.assign_copy, {"name": r"(?P<copy>[A-Z]{5})", "prev": r"(?P<prev>[A-Z]{5})"})
    return re.compile(f"{value}|{copy}")


def resolve_assignments(text: str, wording: str = "ruler") -> dict[str, str]:
    """Follow the assignment statements of ``text`` (in family ``wording``'s forms, ``VAR X = ...`` for
    "ruler") in order: variable -> value (for checking cases)."""
    pattern = _statement_pattern(_pick_wording("variable_tracking", wording, VT_WORDINGS))
    env: dict[str, str] = {}
    for m in pattern.finditer(text):
        if m.group("name"):
            env[m.group("name")] = m.group("value")
        else:
            env[m.group("copy")] = env.get(m.group("prev"), "")
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
        return w.question.format(a=a, op=op, b=b), (f"{a} {op} {b} =" if answer_prefix else "")

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
            ids = chat_prompt(tokenizer, question, system=system, history=shots, assistant_prefix=prefix)
        else:
            ids, n_filler = _pad_with_system_filler(
                tokenizer, int(target_tokens), system, question, shots, prefix, w.background
            )
        cases.append(
            Case(
                prompt_ids=tuple(int(t) for t in ids),
                answer=answer,
                meta={
                    "task": "arithmetic",
                    "wording": wording,
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
