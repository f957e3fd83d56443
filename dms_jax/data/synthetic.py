"""Synthetic training rows for the DMS retrofit: facts asked for again far outside the DMS window.

A retrofit learns from the teacher's outputs only where a token is needed again after the DMS window. In
natural text that is rare, so a retrofit on it alone learns to evict exactly what retrieval needs (a passkey, a
variable's value). These rows put a few statements into real filler text and ask about them at the end of the
row, hundreds of tokens later; the teacher's answers can only be matched by keeping the statements. They are
only ever added to the training split (``dms_jax.data.dataset.build_dataset``, ``recall_fraction``).

Two kinds (``SYNTHETIC_KINDS``):

``"recall"`` (recipe v2, ``make_recall_rows``): a few facts ("the number of the blue lantern is 48213") in real
filler text, asked for again at the end of the row, in one wording.  The wording differs from the evaluation
tasks' (no "pass key", no "VAR").

``"longrange"`` (recipe v3, ``make_longrange_rows``): facts and variable chains asked for far away.
What makes a retrofit keep a needle it has never seen is variety, not one wording learned by heart, so every
part of a row is drawn from many shapes:
- filler: a slice of real training documents, or a few sentences of one repeated (a repetitive haystack);
- statements: facts ("<key> ... <value>") in many templates, with values of several kinds (digit strings of
  3-8 digits, code words, dates), or chains of assignments in several notations;
- the question block: several headers and question forms, one or several questions, as plain text or as a chat
  (system / user / assistant turns in the tokenizer's template).
None of it uses the evaluation's wordings (``dms_jax.eval.tasks`` and its wording families): no "pass key", no
"VAR", no RULER intro.

``make_longrange_rows(tokenizer, filler_docs, seq_len, n_rows, seed, window)`` returns ``PackedData`` rows of
exactly ``seq_len`` tokens, deterministic in ``seed``; every statement ends at least ``2 * window`` tokens
before the first question.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import numpy as np

from dms_jax.data.packing import PackedData

__all__ = ["SYNTHETIC_KINDS", "make_recall_rows", "make_longrange_rows", "ROW_KINDS"]

SYNTHETIC_KINDS = ("recall", "longrange")


# --------------------------------------------------------------------------------------------------------
# Recall rows (recipe v2)
# --------------------------------------------------------------------------------------------------------

_RECALL_COLORS = ("red", "blue", "green", "yellow", "black", "white", "silver", "golden", "purple", "orange",
                  "brown", "grey", "pink", "violet", "copper", "amber")
_RECALL_OBJECTS = ("lantern", "bicycle", "teapot", "compass", "ladder", "violin", "umbrella", "anchor", "kettle",
                   "mirror", "helmet", "basket", "candle", "hammer", "wagon", "saddle", "clock", "barrel",
                   "feather", "ribbon")


def _recall_row(rng: np.random.Generator, filler: np.ndarray, seq_len: int, encode) -> np.ndarray | None:
    """One row: facts in the first ~40% of the filler, the questions (with answers) at the end."""
    num_facts = int(rng.integers(2, 5))
    picks = rng.choice(len(_RECALL_COLORS) * len(_RECALL_OBJECTS), size=num_facts, replace=False)
    keys = [f"{_RECALL_COLORS[p // len(_RECALL_OBJECTS)]} {_RECALL_OBJECTS[p % len(_RECALL_OBJECTS)]}"
            for p in picks]
    values = [str(int(rng.integers(10 ** (d - 1), 10**d))) for d in rng.integers(3, 7, size=num_facts)]
    facts = [encode(f" Note: the number of the {k} is {v}. ") for k, v in zip(keys, values)]
    order = rng.permutation(num_facts)
    qa = encode("\n\nAnswer from the text above.\n" +
                "".join(f"Q: What is the number of the {keys[i]}?\nA: {values[i]}\n" for i in order))
    n_filler = seq_len - len(qa) - sum(len(f) for f in facts)
    if n_filler < seq_len // 4 or filler.size < n_filler:
        return None
    start = int(rng.integers(0, filler.size - n_filler + 1))
    text = filler[start : start + n_filler]
    cuts = np.sort(rng.integers(0, int(0.4 * n_filler) + 1, size=num_facts))
    pieces, prev = [], 0
    for cut, fact in zip(cuts, facts):
        pieces += [text[prev:cut], fact]
        prev = cut
    pieces += [text[prev:], qa]
    row = np.concatenate(pieces).astype(np.int32)
    assert row.size == seq_len
    return row


def make_recall_rows(tokenizer, filler_docs: Sequence[np.ndarray], seq_len: int, n_rows: int,
                     seed: int = 0) -> PackedData:
    """``n_rows`` synthetic recall rows of exactly ``seq_len`` tokens, deterministic in ``seed``.

    ``filler_docs`` are token arrays of real text (the training documents): each row takes a contiguous slice
    of one of them as filler, so the facts are the only synthetic text besides the questions.
    """
    if not isinstance(n_rows, (int, np.integer)) or n_rows < 0:
        raise ValueError(f"n_rows: must be an integer >= 0, got {n_rows!r}")
    if seq_len < 64:
        raise ValueError(f"seq_len: recall rows need seq_len >= 64, got {seq_len}")

    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)

    long_docs = [d for d in filler_docs if d.size >= seq_len]
    if n_rows and not long_docs:
        raise ValueError(f"recall rows: no filler document has {seq_len} tokens; lower seq_len")
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x5EC411])
    rows = []
    while len(rows) < n_rows:
        row = _recall_row(rng, long_docs[int(rng.integers(len(long_docs)))], seq_len, encode)
        if row is not None:
            rows.append(row)
    tokens = np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)
    return PackedData(tokens=tokens, valid=np.ones_like(tokens, bool),
                      segment_ids=np.repeat(np.arange(len(rows), dtype=np.int32)[:, None], seq_len, axis=1))


# --------------------------------------------------------------------------------------------------------
# Long-range rows (recipe v3)
# --------------------------------------------------------------------------------------------------------

ROW_KINDS = ("facts", "chain")

_ADJECTIVES = ("amber", "quiet", "northern", "hollow", "bright", "rusty", "lucky", "frozen", "gentle", "crimson",
               "ancient", "narrow", "silent", "velvet", "wild", "sunny", "broken", "tiny", "distant", "royal")
_NOUNS = ("harbor", "falcon", "orchard", "tunnel", "lighthouse", "glacier", "meadow", "engine", "library", "canyon",
          "pyramid", "workshop", "island", "bridge", "tower", "garden", "station", "forest", "castle", "market")
_PEOPLE = ("Ada", "Boris", "Chen", "Dalia", "Emil", "Farah", "Gustav", "Hana", "Ivo", "Jun", "Kofi", "Lena",
           "Mateo", "Nadia", "Oskar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yara")
_CODE_WORDS = ("walnut", "cobalt", "saffron", "tundra", "quartz", "marble", "juniper", "obsidian", "lotus", "ember",
               "zephyr", "basalt", "indigo", "mosaic", "nebula", "thistle", "cinder", "harvest", "pebble", "orbit")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December")

# (statement, question, answer prefix): {k} the key, {v} the value.
_FACT_TEMPLATES = (
    ("The {k} is registered under number {v}.", "Under which number is the {k} registered?", "It is registered under"),
    ("Remember this: {k} -> {v}.", "What did {k} map to?", "{k} maps to"),
    ("Inventory note: {k}, item {v}.", "Which item number was noted for {k}?", "The item number is"),
    ("For the record, the {k} code reads {v}.", "What does the {k} code read?", "The code reads"),
    ("({k}: {v})", "What value was given in brackets for {k}?", "The value was"),
    ("Keep in mind that {k} stands for {v}.", "What does {k} stand for?", "{k} stands for"),
    ("Log entry - {k} set to {v}.", "To what was {k} set in the log?", "It was set to"),
    ("The secret word for the {k} is {v}.", "Tell me the secret word for the {k}.", "The secret word is"),
    ("{k} was assigned ticket {v} earlier today.", "Which ticket was {k} assigned?", "The ticket is"),
    ("Write down {v} as the {k} entry.", "What was written down as the {k} entry?", "The entry is"),
)
_HEADERS = ("Answer from the text above.", "Now some questions about what you read.", "Quiz time.",
            "Please look back at the passage.", "Questions:", "Use only the document to answer.")
_ASSIGN_FORMS = ("{a} = {b}", "let {a} = {b}", "{a} := {b}", "set {a} to {b}", "{a} <- {b}", "{a} takes {b}")
_CHAIN_QUESTIONS = (
    ("What is the final value of {x}?", "{x} ends up as"),
    ("Trace the assignments: which number does {x} hold?", "{x} holds"),
    ("Following the statements above, {x} equals what?", "{x} equals"),
)


def _key(rng: np.random.Generator) -> str:
    kind = int(rng.integers(3))
    if kind == 0:
        return f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} {_NOUNS[rng.integers(len(_NOUNS))]}"
    if kind == 1:
        return f"{_PEOPLE[rng.integers(len(_PEOPLE))]}'s {_NOUNS[rng.integers(len(_NOUNS))]}"
    return f"project {_CODE_WORDS[rng.integers(len(_CODE_WORDS))].capitalize()}"


def _value(rng: np.random.Generator) -> str:
    kind = int(rng.integers(4))
    if kind <= 1:  # digit strings are what retrieval evaluations ask for most: half of the values
        digits = int(rng.integers(3, 9))
        return str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    if kind == 2:
        return f"{_CODE_WORDS[rng.integers(len(_CODE_WORDS))]}-{int(rng.integers(10, 1000))}"
    return f"{int(rng.integers(1, 29))} {_MONTHS[rng.integers(12)]} {int(rng.integers(1900, 2100))}"


def _name(rng: np.random.Generator, used: set) -> str:
    while True:
        letters = "abcdefghijklmnopqrstuvwxyz"
        n = int(rng.integers(2, 6))
        s = "".join(letters[i] for i in rng.integers(0, 26, size=n))
        s = s.upper() if rng.random() < 0.5 else s
        if s not in used:
            used.add(s)
            return s


def _facts(rng: np.random.Generator):
    """(statements, [(question, answer_prefix, answer)]) for 2-6 facts, a random subset of them asked."""
    n = int(rng.integers(2, 7))
    keys, values = [], []
    while len(keys) < n:
        k = _key(rng)
        if k not in keys:
            keys.append(k)
            values.append(_value(rng))
    statements, qas = [], []
    for k, v in zip(keys, values):
        st, q, pre = _FACT_TEMPLATES[rng.integers(len(_FACT_TEMPLATES))]
        statements.append(st.format(k=k, v=v))
        qas.append((q.format(k=k), pre.format(k=k), v))
    asked = rng.permutation(n)[: int(rng.integers(1, n + 1))]
    return statements, [qas[i] for i in asked]


def _chain(rng: np.random.Generator):
    """(statements, [(question, answer_prefix, answer)]): 1-3 chains of 1-4 hops, in one notation per row."""
    form = _ASSIGN_FORMS[rng.integers(len(_ASSIGN_FORMS))]
    used: set = set()
    chains, qas = [], []
    for _ in range(int(rng.integers(1, 4))):
        value = str(int(rng.integers(10, 100000)))
        names = [_name(rng, used) for _ in range(int(rng.integers(2, 6)))]
        q, pre = _CHAIN_QUESTIONS[rng.integers(len(_CHAIN_QUESTIONS))]
        chains.append([form.format(a=names[0], b=value)] + [form.format(a=b, b=a) for a, b in zip(names, names[1:])])
        qas.append((q.format(x=names[-1]), pre.format(x=names[-1]), value))
    # Interleave the chains but keep each chain's order, so every hop points back to an earlier statement.
    owners = rng.permutation(np.repeat(np.arange(len(chains)), [len(c) for c in chains]))
    statements = [chains[c].pop(0) for c in owners]
    return statements, qas


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _filler(rng: np.random.Generator, docs: Sequence[str], encode: Callable, n_tokens: int) -> np.ndarray:
    """n_tokens of real text: consecutive documents from a random one on, or (a third of the rows) a few sentences
    of one document repeated."""
    first = int(rng.integers(len(docs)))
    if rng.random() < 2 / 3:
        parts, chars, i = [], 0, first
        while chars < 6 * n_tokens and i < first + len(docs):  # ~4 characters a token; 6 leaves a margin
            parts.append(docs[i % len(docs)])
            chars, i = chars + len(parts[-1]), i + 1
        ids = encode("\n\n".join(parts))
        if ids.size >= n_tokens:
            start = int(rng.integers(0, ids.size - n_tokens + 1))
            return ids[start : start + n_tokens]
    doc_text = docs[first]
    sentences = [s for s in _SENTENCE.split(doc_text) if 20 <= len(s) <= 200] or [doc_text[:200]]
    picks = [sentences[i] for i in rng.integers(0, len(sentences), size=int(rng.integers(2, 6)))]
    unit = encode(" " + " ".join(picks))
    reps = -(-n_tokens // max(unit.size, 1))
    return np.tile(unit, reps)[:n_tokens]


def _layout(rng, tokenizer, encode, statements, qas, chat: bool):
    """(prefix ids, statement ids, suffix ids): everything of the row but the filler."""
    header = _HEADERS[rng.integers(len(_HEADERS))]
    stmt_ids = [encode(" " + s + " ") for s in statements]
    if not chat:
        qa_text = "".join(f"Q: {q}\nA: {pre} {a}.\n" for q, pre, a in qas)
        return encode(""), stmt_ids, encode(f"\n\n{header}\n{qa_text}")
    # A chat: the document and the first question in the user's turn, then one turn per question.
    first_q, first_pre, first_a = qas[0]
    msgs = [{"role": "user", "content": "\x00"}, {"role": "assistant", "content": f"{first_pre} {first_a}."}]
    for q, pre, a in qas[1:]:
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": f"{pre} {a}."}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    before, after = text.split("\x00")
    return encode(before), stmt_ids, encode(f"\n{header} {first_q}" + after)


def _row(rng, tokenizer, docs: Sequence[str], seq_len: int, window: int, encode):
    """(row of ``seq_len`` ids, index of its first question-block token), or None where the pieces do not fit."""
    kind = ROW_KINDS[int(rng.integers(len(ROW_KINDS)))]
    statements, qas = _facts(rng) if kind == "facts" else _chain(rng)
    chat = bool(getattr(tokenizer, "chat_template", None)) and rng.random() < 0.5
    prefix, stmt_ids, suffix = _layout(rng, tokenizer, encode, statements, qas, chat)
    n_filler = seq_len - prefix.size - suffix.size - sum(s.size for s in stmt_ids)
    gap = 2 * window  # every statement ends this far before the question block, beyond the window
    if n_filler < gap + len(stmt_ids):
        return None
    filler = _filler(rng, docs, encode, n_filler)
    cuts = np.sort(rng.integers(0, n_filler - gap + 1, size=len(stmt_ids)))
    pieces, prev = [prefix], 0
    for cut, st in zip(cuts, stmt_ids):
        pieces += [filler[prev:cut], st]
        prev = cut
    pieces += [filler[prev:], suffix]
    row = np.concatenate(pieces).astype(np.int32)
    return (row, seq_len - suffix.size) if row.size == seq_len else None


def make_longrange_rows(tokenizer, filler_texts: Sequence[str], seq_len: int, n_rows: int, seed: int = 0,
                        window: int = 64, answer_weight: float = 1.0):
    """``n_rows`` rows of exactly ``seq_len`` tokens (see the module docstring), deterministic in ``seed``.

    ``filler_texts``: real training documents (strings); each row takes its filler from one of them.
    ``answer_weight``: the loss weight of the question block's positions (``PackedData.loss_weight``; the other
    positions weigh 1). In a 1K-token row the ~10 answer tokens are the only ones that need a statement from
    outside the window, so at weight 1 they carry ~1% of the row's loss, and the retrofit learns mostly from
    text that the window already serves.
    """
    if not isinstance(n_rows, (int, np.integer)) or n_rows < 0:
        raise ValueError(f"n_rows: must be an integer >= 0, got {n_rows!r}")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window: must be an integer >= 1, got {window!r}")
    if not answer_weight >= 1.0:
        raise ValueError(f"answer_weight: must be >= 1, got {answer_weight!r}")
    if seq_len < 4 * window + 128:
        raise ValueError(f"seq_len: long-range rows need seq_len >= 4 * window + 128 = {4 * window + 128}, "
                         f"got {seq_len}")
    if n_rows and not filler_texts:
        raise ValueError("filler_texts: no document to take filler from")

    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)

    docs = [t for t in filler_texts if len(t) >= 400] or list(filler_texts)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x10A6E])
    rows, question_starts, tries = [], [], 0
    while len(rows) < n_rows:
        tries += 1
        if tries > 20 * n_rows + 100:
            raise ValueError(f"seq_len: could not build long-range rows of {seq_len} tokens from these documents")
        made = _row(rng, tokenizer, docs, seq_len, window, encode)
        if made is not None:
            rows.append(made[0])
            question_starts.append(made[1])
    tokens = np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)
    weight = None
    if answer_weight != 1.0:
        # The logits at position t predict token t + 1: the block's first token is predicted from t = start - 1.
        first = np.asarray(question_starts, np.int64)[:, None] - 1
        weight = np.where(np.arange(seq_len)[None, :] >= first, np.float32(answer_weight), np.float32(1.0))
    return PackedData(tokens=tokens, valid=np.ones_like(tokens, bool),
                      segment_ids=np.repeat(np.arange(len(rows), dtype=np.int32)[:, None], seq_len, axis=1),
                      loss_weight=weight)
