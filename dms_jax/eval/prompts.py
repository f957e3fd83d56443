"""Evaluation prompts: the Case, chat-formatted prompts, fillers and haystacks sized in tokens (pure Python / numpy).

What every task module (``passkey``, ``variable_tracking``, ``arithmetic``; the registry in ``tasks``) builds on:
``Case``; the per-case random generator (``_case_rng``: case ``i`` depends only on ``(seed, i, params)``) and the
argument checks the generators share; ``user_message``, the user turn of a single-turn case.

Haystacks: filler sentences with the task's statements inserted (``_haystack``), inside the chat template
(``dms_jax.chat``), with as many filler sentences as bring the whole prompt closest to a target length
(``_build_to_length``); ``_token_positions`` maps characters of the prompt to token indices.  Fillers: the classic
repeated sentences (``FILLER_SENTENCES``: "The grass is green. The sky is blue. ..."), a second repeated filler
one sentence a line (``LINE_FILLER_SENTENCES``), and real text (``natural_filler_sentences``): sentences of the
built-in corpus's held-out documents (never in training rows; about 4.5K tokens, cycled beyond).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from dms_jax.chat import chat_messages, chat_text, encode
from dms_jax.data.corpus import builtin_documents, split_documents

__all__ = [
    "Case",
    "CLASSIC_FILLER",
    "FILLER_SENTENCES",
    "Filler",
    "LINE_FILLER_SENTENCES",
    "natural_filler_sentences",
    "user_message",
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


def _check_target(target_tokens) -> None:
    if not isinstance(target_tokens, (int, np.integer)) or target_tokens < 1:
        raise ValueError(f"target_tokens: must be an integer >= 1, got {target_tokens!r}")



def _check_counts(**counts: tuple[Any, int]) -> None:
    """``name=(value, minimum)``: each value must be an integer >= its minimum."""
    for name, (value, minimum) in counts.items():
        if not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")



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
    """Filler sentences of real text: the prose of the held-out documents of ``corpus.builtin_documents()``, as
    split by ``corpus.split_documents(docs, 0.05, "dms-jax-heldout")`` (the split training never sees), without
    the sentences that a training document contains too."""
    train, heldout = split_documents(builtin_documents(), 0.05, "dms-jax-heldout")
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
