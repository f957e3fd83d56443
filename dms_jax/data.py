"""Text data for DMS distillation: sources, tokenisation, packing, held-out split, resumable batches.

Plain numpy; no JAX needed.  The pipeline is

    load_documents(source)            -> list[str]       (real text: built-in, .txt, JSONL, HF datasets)
    split_documents(docs)             -> train, heldout  (document level, by a hash of the text)
    tokenize_documents(docs, tok)     -> list[np.ndarray]
    pack_tokens(token_docs, seq_len)  -> PackedData(tokens, valid, segment_ids)
    build_dataset(tok, seq_len, ...)  -> Dataset(train=PackedData, heldout=PackedData, meta)
    get_batch(data, step, batch_size, seed, process_index, process_count) -> dict of arrays

Built-in corpora (no download; text that Python itself ships):

* ``"pydoc-topics"``: the language reference topics of ``pydoc_data.topics`` (~0.46 MB of English prose,
  ~0.12 M SmolLM2 tokens), split into section documents.
* ``"python-docs"`` (the default): the above plus the docstrings (>= 200 characters) of the standard library's
  modules, classes and functions, read with ``ast`` from the source files (no module is imported),
  ~1.5 MB of text in all.

Both are deterministic for a given Python installation; ``Dataset.meta["fingerprint"]`` hashes the documents
so that a run can record exactly what it trained on.

Recall rows (``recall_fraction`` of ``build_dataset``): synthetic training rows in which a few facts ("the
number of the blue lantern is 48213") sit in real filler text and are asked for again at the end of the row,
far outside the DMS window.  Natural text rarely needs a token again hundreds of positions later, so a
retrofit on it alone learns to evict exactly what retrieval needs (a passkey, a variable's value); on these
rows the teacher's answers can only be matched by keeping the facts.  The wording differs from the
evaluation tasks in ``tasks.py`` (no "pass key", no "VAR"), and the rows are only ever added to ``train``.

Batches are a pure function of ``(seed, step)``: the row stream is the concatenation of one seeded
permutation of the rows per epoch, and the global batch at ``step`` is the slice
``[step * batch_size, (step + 1) * batch_size)`` of that stream.  A resumed run therefore continues at the
same data position with no iterator state to save; process ``p`` of ``P`` takes the ``p``-th contiguous
``batch_size // P`` rows of the global batch.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import importlib
import json
import os
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "BUILTIN_SOURCES",
    "DEFAULT_SOURCE",
    "PackedData",
    "Dataset",
    "builtin_documents",
    "load_documents",
    "split_documents",
    "is_heldout",
    "tokenize_documents",
    "pack_tokens",
    "build_dataset",
    "batch_indices",
    "get_batch",
    "iterate_batches",
    "documents_fingerprint",
    "make_recall_rows",
]

DEFAULT_SOURCE = "python-docs"
BUILTIN_SOURCES = ("python-docs", "pydoc-topics")
_SOURCE_ALIASES = {"default": DEFAULT_SOURCE}

# Longest built-in document, in characters, before a section is cut at paragraph boundaries.
_HF_SAVED_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")  # a `save_to_disk` folder
_MAX_DOC_CHARS = 4000
_MIN_DOC_CHARS = 80
_MIN_DOCSTRING_CHARS = 200
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo",
     "__pycache__", "ensurepip", "tkinter", "unittest", "config-3"}
)


# --------------------------------------------------------------------------------------------------------
# Built-in corpora
# --------------------------------------------------------------------------------------------------------

_HEADING_RULE = re.compile(r"^([*=\-~^#+])\1{2,}\s*$")


def _split_sections(text: str) -> list[str]:
    """Split reStructuredText-like plain text at headings (a line underlined with *, =, -, ~, ^ ...)."""
    lines = text.split("\n")
    starts = [0]
    for i in range(1, len(lines)):
        if _HEADING_RULE.match(lines[i]) and lines[i - 1].strip() and not _HEADING_RULE.match(lines[i - 1]):
            if i - 1 > starts[-1]:
                starts.append(i - 1)
    starts.append(len(lines))
    return ["\n".join(lines[a:b]).strip() for a, b in zip(starts[:-1], starts[1:])]


def _chunk_paragraphs(text: str, max_chars: int = _MAX_DOC_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` at blank lines (a paragraph is never cut)."""
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for p in paragraphs:
        if cur and size + len(p) + 2 > max_chars:
            chunks.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(p)
        size += len(p) + 2
    if cur:
        chunks.append("\n\n".join(cur))
    return chunks


def _pydoc_topic_documents() -> list[str]:
    from pydoc_data.topics import topics  # ships with CPython

    docs: list[str] = []
    for key in sorted(topics):
        for section in _split_sections(topics[key]):
            for chunk in _chunk_paragraphs(section):
                chunk = chunk.strip()
                if len(chunk) >= _MIN_DOC_CHARS and not _HEADING_RULE.match(chunk.splitlines()[-1]):
                    docs.append(chunk)
    return docs


def _stdlib_files() -> list[Path]:
    root = sysconfig.get_paths().get("stdlib")
    if not root or not os.path.isdir(root):
        return []
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith((".", "config-"))
        )
        files.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return files


def _stdlib_docstring_documents() -> list[str]:
    """One document per long docstring of the standard library: ``"<qualified name>\\n\\n<docstring>"``."""
    root = sysconfig.get_paths().get("stdlib") or ""
    docs: list[str] = []
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        module = os.path.relpath(path, root)[: -len(".py")].replace(os.sep, ".")
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}.{child.name}"
                    doc = ast.get_docstring(child)
                    if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                        for chunk in _chunk_paragraphs(doc):
                            docs.append(f"{name}\n\n{chunk}")
                    if isinstance(child, ast.ClassDef):
                        visit(child, name)

        doc = ast.get_docstring(tree)
        if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
            for chunk in _chunk_paragraphs(doc):
                docs.append(f"{module}\n\n{chunk}")
        visit(tree, module)
    return docs


@functools.lru_cache(maxsize=None)
def _builtin_documents_cached(name: str) -> tuple[str, ...]:
    if name == "pydoc-topics":
        return tuple(_pydoc_topic_documents())
    if name == "python-docs":
        return tuple(_pydoc_topic_documents() + _stdlib_docstring_documents())
    raise ValueError(f"source: unknown built-in corpus {name!r}; choose from {BUILTIN_SOURCES}")


def builtin_documents(name: str = DEFAULT_SOURCE) -> list[str]:
    """Documents of a built-in corpus (``"python-docs"``, ``"pydoc-topics"``; ``"default"`` is an alias)."""
    return list(_builtin_documents_cached(_SOURCE_ALIASES.get(name, name)))


def builtin_text_ids(tokenizer, n: int, name: str = DEFAULT_SOURCE) -> list[int]:
    """The first ``n`` token ids of a built-in corpus, its documents one after another (prompts of real text for
    benchmarks and tests). Only as many documents as needed are tokenized."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ids: list[int] = []
    for doc in builtin_documents(name):
        ids.extend(tokenizer(doc)["input_ids"])
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"n: the built-in corpus {name!r} has only {len(ids)} tokens, asked for {n}")


# --------------------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------------------


def _split_blank_lines(text: str) -> list[str]:
    return [d.strip() for d in re.split(r"\n[ \t\r\f\v]*\n", text) if d.strip()]


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _text_documents(path: Path, text_split: str) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".txt", ".txt.gz")))
        if not files:
            raise ValueError(f"source: folder {str(path)!r} holds no .txt files")
        mode = "file" if text_split == "auto" else text_split
    else:
        files = [path]
        mode = "blank_lines" if text_split == "auto" else text_split
    docs: list[str] = []
    for f in files:
        text = _read_text(f)
        if mode == "file":
            if text.strip():
                docs.append(text.strip())
        else:
            docs.extend(_split_blank_lines(text))
    return docs


def _jsonl_documents(path: Path, text_field: str) -> list[str]:
    docs: list[str] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"source: {str(path)!r} line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"source: {str(path)!r} line {lineno} is not a JSON object")
            if text_field not in record:
                raise ValueError(
                    f"text_field: {text_field!r} is not a field of {str(path)!r} line {lineno} "
                    f"(fields: {sorted(record)})"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(
                    f"text_field: field {text_field!r} of {str(path)!r} line {lineno} is "
                    f"{type(text).__name__}, not a string"
                )
            if text.strip():
                docs.append(text)
    return docs


def _import_datasets():
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise ImportError(
            "source: reading a Hugging Face dataset needs the `datasets` package, which is not installed; "
            "`pip install datasets`, or export the text to a .txt / .jsonl file"
        ) from None


def _hf_documents(name_or_path: str, text_field: str, split: str, config: str | None) -> list[str]:
    datasets = _import_datasets()
    if os.path.exists(name_or_path):
        ds = datasets.load_from_disk(name_or_path)
    else:
        try:
            ds = datasets.load_dataset(name_or_path, config, split=split)
        except Exception as e:  # no network, unknown name, ...
            raise ValueError(
                f"source: could not load Hugging Face dataset {name_or_path!r} (split {split!r}): {e}"
            ) from e
    if isinstance(ds, dict) or isinstance(getattr(ds, "column_names", None), dict):
        # A DatasetDict: pick the split.
        if split not in ds:
            raise ValueError(f"hf_split: {split!r} is not a split of {name_or_path!r} (splits: {sorted(ds)})")
        ds = ds[split]
    columns = list(getattr(ds, "column_names", None) or [])
    if columns and text_field not in columns:
        raise ValueError(f"text_field: {text_field!r} is not a column of {name_or_path!r} (columns: {columns})")
    if columns:
        texts = ds[text_field]
    else:  # a plain sequence of records
        texts = []
        for i, rec in enumerate(ds):
            if text_field not in rec:
                raise ValueError(
                    f"text_field: {text_field!r} is not a field of {name_or_path!r} record {i} "
                    f"(fields: {sorted(rec)})"
                )
            texts.append(rec[text_field])
    return [t for t in texts if isinstance(t, str) and t.strip()]


def load_documents(
    source: str | os.PathLike = "default",
    *,
    text_field: str = "text",
    text_split: str = "auto",
    hf_split: str = "train",
    hf_config: str | None = None,
    max_documents: int | None = None,
    dedupe: bool = True,
) -> list[str]:
    """Read the documents of ``source``.

    ``source`` is one of:

    * ``"default"`` / ``"python-docs"`` / ``"pydoc-topics"``: a built-in corpus (see the module docstring);
    * a ``.txt`` file (documents are runs of text between blank lines; ``text_split="file"`` makes the whole
      file one document) or a folder of ``.txt`` files (one document per file; ``text_split="blank_lines"``
      splits each file too); ``.gz`` works;
    * a ``.jsonl`` / ``.ndjson`` file (optionally ``.gz``) of objects, text in ``text_field``;
    * ``"hf:<name or path>"``: a Hugging Face dataset, from a ``save_to_disk`` folder (``load_from_disk``) or
      from the hub by name when reachable, column ``text_field`` of split ``hf_split``. Needs ``datasets``.

    Exact duplicate documents are dropped (first kept) when ``dedupe``; ``max_documents`` keeps the first N.
    """
    if text_split not in ("auto", "blank_lines", "file"):
        raise ValueError(f"text_split: must be 'auto', 'blank_lines' or 'file', got {text_split!r}")
    if not isinstance(text_field, str) or not text_field:
        raise ValueError(f"text_field: must be a non-empty string, got {text_field!r}")
    if max_documents is not None and max_documents < 1:
        raise ValueError(f"max_documents: must be >= 1 or None, got {max_documents!r}")
    src = os.fspath(source)
    if not isinstance(src, str) or not src:
        raise ValueError(f"source: must be a non-empty string or path, got {source!r}")

    name = _SOURCE_ALIASES.get(src, src)
    if name in BUILTIN_SOURCES:
        docs = builtin_documents(name)
    elif src.startswith("hf:"):
        docs = _hf_documents(src[3:], text_field, hf_split, hf_config)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise ValueError(
                f"source: {src!r} is neither a file or folder that exists nor a built-in corpus "
                f"({', '.join(('default',) + BUILTIN_SOURCES)}) nor 'hf:<dataset>'"
            )
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes = suffixes[:-1]
        if path.is_file() and suffixes and suffixes[-1] in (".jsonl", ".ndjson"):
            docs = _jsonl_documents(path, text_field)
        elif path.is_dir() and any((path / f).exists() for f in _HF_SAVED_MARKERS):
            docs = _hf_documents(str(path), text_field, hf_split, hf_config)
        else:
            docs = _text_documents(path, text_split)

    if dedupe:
        docs = list(dict.fromkeys(docs))
    if max_documents is not None:
        docs = docs[:max_documents]
    if not docs:
        raise ValueError(f"source: {src!r} holds no text (no non-empty documents)")
    return docs


def documents_fingerprint(docs: Sequence[str]) -> str:
    """A short SHA-256 over the documents in order (to record what a run trained on)."""
    h = hashlib.sha256()
    for d in docs:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------
# Held-out split
# --------------------------------------------------------------------------------------------------------


def _doc_unit(doc: str, salt: str) -> float:
    """A uniform number in [0, 1) from the document's text (and a salt)."""
    digest = hashlib.sha256(f"{salt}\x00{doc}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def is_heldout(doc: str, heldout_fraction: float = 0.05, salt: str = "dms-jax-heldout") -> bool:
    """Whether ``doc`` belongs to the held-out split (a pure function of its text; see ``split_documents``)."""
    return _doc_unit(doc, salt) < heldout_fraction


def split_documents(
    docs: Sequence[str], heldout_fraction: float = 0.05, salt: str = "dms-jax-heldout"
) -> tuple[list[str], list[str]]:
    """Split documents into (train, heldout) by a hash of each document's text.

    A document is held out when ``sha256(salt, text)`` maps below ``heldout_fraction``: the decision depends
    on the text alone, so it does not change when documents are added, removed or reordered, and identical
    texts always land on the same side.  When the hash holds out nothing but ``heldout_fraction > 0`` and
    there are at least two distinct documents, the document with the smallest hash is held out, so that a
    held-out set always exists.  Order within each split is the input order.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction!r}")
    units = [_doc_unit(d, salt) for d in docs]
    held = [u < heldout_fraction for u in units]
    if heldout_fraction > 0 and not any(held) and len(set(docs)) >= 2:
        first = min(range(len(docs)), key=units.__getitem__)
        held = [d == docs[first] for d in docs]
    train = [d for d, h in zip(docs, held) if not h]
    heldout = [d for d, h in zip(docs, held) if h]
    return train, heldout


# --------------------------------------------------------------------------------------------------------
# Tokenisation and packing
# --------------------------------------------------------------------------------------------------------


def _special_id(tokenizer, name: str) -> int | None:
    value = getattr(tokenizer, name, None)
    return None if value is None else int(value)


def tokenize_documents(
    docs: Sequence[str], tokenizer, *, add_bos: bool = False, batch_size: int = 256
) -> list[np.ndarray]:
    """Token ids of each document (no special tokens; a BOS first when ``add_bos`` and the tokenizer has one)."""
    bos = _special_id(tokenizer, "bos_token_id") if add_bos else None
    out: list[np.ndarray] = []
    for start in range(0, len(docs), batch_size):
        chunk = list(docs[start : start + batch_size])
        enc = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for ids in enc:
            arr = np.asarray(ids, dtype=np.int32)
            if bos is not None:
                arr = np.concatenate([np.asarray([bos], np.int32), arr])
            out.append(arr)
    return out


@dataclass(frozen=True)
class PackedData:
    """Rows of packed tokens.

    tokens:      int32 [N, seq_len] token ids; documents follow one another, each ended by ``eos_id``.
    valid:       bool  [N, seq_len] True for real tokens, False for padding (only in a short last row).
                 For next-token losses, the target at position t is valid when ``valid[:, t + 1]`` is.
    segment_ids: int32 [N, seq_len] index of the document (within this split) a token comes from, -1 on
                 padding; a document's EOS carries its index. Use it for per-document attention if wanted.
    """

    tokens: np.ndarray
    valid: np.ndarray
    segment_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


def pack_tokens(
    token_docs: Sequence[np.ndarray],
    seq_len: int,
    *,
    eos_id: int,
    pad_id: int | None = None,
    last: str = "pad",
) -> PackedData:
    """Join documents (each followed by ``eos_id``) into one stream and cut it into rows of ``seq_len``.

    ``last="pad"`` pads a short last row with ``pad_id`` (default ``eos_id``) and marks the padding invalid;
    ``last="drop"`` drops it, so every row is all real tokens.
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len: must be an integer >= 2, got {seq_len!r}")
    if last not in ("pad", "drop"):
        raise ValueError(f"last: must be 'pad' or 'drop', got {last!r}")
    if eos_id is None:
        raise ValueError("eos_id: the tokenizer has no EOS token; pass eos_id explicitly")
    pad = int(eos_id if pad_id is None else pad_id)
    seq_len = int(seq_len)
    pieces, segs = [], []
    for i, ids in enumerate(token_docs):
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        pieces.append(ids)
        pieces.append(np.asarray([eos_id], np.int32))
        segs.append(np.full(ids.size + 1, i, np.int32))
    if pieces:
        stream = np.concatenate(pieces)
        seg = np.concatenate(segs)
    else:
        stream = np.zeros(0, np.int32)
        seg = np.zeros(0, np.int32)
    n_full, rem = divmod(stream.size, seq_len)
    n_rows = n_full + (1 if (rem and last == "pad") else 0)
    total = n_rows * seq_len
    tokens = np.full(total, pad, np.int32)
    segment_ids = np.full(total, -1, np.int32)
    valid = np.zeros(total, bool)
    used = min(stream.size, total)
    tokens[:used] = stream[:used]
    segment_ids[:used] = seg[:used]
    valid[:used] = True
    return PackedData(
        tokens=tokens.reshape(n_rows, seq_len),
        valid=valid.reshape(n_rows, seq_len),
        segment_ids=segment_ids.reshape(n_rows, seq_len),
    )


@dataclass(frozen=True)
class Dataset:
    """Packed train and held-out rows; no held-out document appears in ``train``."""

    train: PackedData
    heldout: PackedData
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.train.seq_len


def build_dataset(
    tokenizer,
    seq_len: int,
    source: str | os.PathLike = "default",
    *,
    heldout_fraction: float = 0.05,
    split_salt: str = "dms-jax-heldout",
    last: str = "pad",
    text_field: str = "text",
    text_split: str = "auto",
    hf_split: str = "train",
    hf_config: str | None = None,
    max_documents: int | None = None,
    add_bos: bool = False,
    eos_id: int | None = None,
    pad_id: int | None = None,
    recall_fraction: float = 0.0,
    recall_seed: int = 0,
    synthetic_kind: str = "recall",
    window: int = 64,
) -> Dataset:
    """Load ``source``, split held-out documents off, tokenise and pack both splits into ``seq_len`` rows.

    The held-out split is taken before packing, at the document level (``split_documents``), so held-out
    text never reaches a training row.  ``recall_fraction`` of the training rows are synthetic:
    ``synthetic_kind="recall"`` (``make_recall_rows``, one wording) or ``"longrange"``
    (``synthetic_rows.make_longrange_rows``: facts and variable chains in many wordings, each at least
    ``2 * window`` tokens before its question).  ``eos_id`` defaults to the tokenizer's EOS, ``pad_id`` to its pad
    token or else EOS.
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 2:
        raise ValueError(f"seq_len: must be an integer >= 2, got {seq_len!r}")
    if last not in ("pad", "drop"):
        raise ValueError(f"last: must be 'pad' or 'drop', got {last!r}")
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction: must be in [0, 1), got {heldout_fraction!r}")
    if not 0.0 <= recall_fraction < 1.0:
        raise ValueError(f"recall_fraction: must be in [0, 1), got {recall_fraction!r}")
    if synthetic_kind not in SYNTHETIC_KINDS:
        raise ValueError(f"synthetic_kind: must be one of {SYNTHETIC_KINDS}, got {synthetic_kind!r}")
    eos = eos_id if eos_id is not None else _special_id(tokenizer, "eos_token_id")
    if eos is None:
        raise ValueError("eos_id: the tokenizer has no EOS token; pass eos_id explicitly")
    if pad_id is None:
        pad_id = _special_id(tokenizer, "pad_token_id")
    pad = eos if pad_id is None else pad_id

    docs = load_documents(
        source, text_field=text_field, text_split=text_split, hf_split=hf_split, hf_config=hf_config,
        max_documents=max_documents,
    )
    train_docs, heldout_docs = split_documents(docs, heldout_fraction, split_salt)
    if not train_docs:
        raise ValueError(f"source: {os.fspath(source)!r} leaves no training documents after the held-out split")
    train_tokens = tokenize_documents(train_docs, tokenizer, add_bos=add_bos)
    train = pack_tokens(train_tokens, seq_len, eos_id=eos, pad_id=pad, last=last)
    num_recall = int(round(recall_fraction / (1.0 - recall_fraction) * len(train)))
    if num_recall:
        # Appended after packing, so every recall row is whole; the epoch permutation mixes them in.
        if synthetic_kind == "recall":
            rows = make_recall_rows(tokenizer, train_tokens, seq_len, num_recall, recall_seed)
        else:
            from dms_jax.synthetic_rows import make_longrange_rows

            rows = make_longrange_rows(tokenizer, train_docs, seq_len, num_recall, recall_seed, window)
        train = _concat_rows(train, rows)
    heldout = pack_tokens(tokenize_documents(heldout_docs, tokenizer, add_bos=add_bos), seq_len,
                          eos_id=eos, pad_id=pad, last=last)
    if len(train) == 0:
        raise ValueError(
            f"seq_len: {seq_len} is longer than the {int(sum(len(d) for d in train_docs))}-character training "
            f"text of {os.fspath(source)!r} with last='drop'; use a shorter seq_len or last='pad'"
        )
    meta = {
        "source": os.fspath(source),
        "seq_len": int(seq_len),
        "heldout_fraction": float(heldout_fraction),
        "split_salt": split_salt,
        "last": last,
        "num_documents": len(docs),
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "train_rows": len(train),
        "recall_rows": num_recall,
        "recall_fraction": float(recall_fraction),
        "synthetic_kind": synthetic_kind,
        "heldout_rows": len(heldout),
        "train_tokens": train.num_tokens,
        "heldout_tokens": heldout.num_tokens,
        "eos_id": int(eos),
        "pad_id": int(pad),
        "fingerprint": documents_fingerprint(docs),
        "train_fingerprint": documents_fingerprint(train_docs),
        "heldout_fingerprint": documents_fingerprint(heldout_docs),
    }
    return Dataset(train=train, heldout=heldout, meta=meta)


# --------------------------------------------------------------------------------------------------------
# Synthetic recall rows (see the module docstring)
# --------------------------------------------------------------------------------------------------------

SYNTHETIC_KINDS = ("recall", "longrange")
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


def _concat_rows(a: PackedData, b: PackedData) -> PackedData:
    offset = int(a.segment_ids.max(initial=-1)) + 1
    return PackedData(tokens=np.concatenate([a.tokens, b.tokens]), valid=np.concatenate([a.valid, b.valid]),
                      segment_ids=np.concatenate([a.segment_ids, np.where(b.segment_ids >= 0,
                                                                          b.segment_ids + offset, -1)]))


# --------------------------------------------------------------------------------------------------------
# Deterministic, resumable batches
# --------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _epoch_permutation(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    perm = np.random.default_rng([seed & 0xFFFFFFFF, seed >> 32, epoch, 0x444D53]).permutation(num_rows)
    perm.setflags(write=False)
    return perm


def _check_batch_args(num_rows, step, batch_size, seed, process_index, process_count) -> None:
    if not isinstance(num_rows, (int, np.integer)) or num_rows < 1:
        raise ValueError(f"data: has no rows (num_rows={num_rows!r}); nothing to batch")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: must be an integer >= 0, got {step!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count: must be an integer >= 1, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index: must be in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size: the global batch {batch_size} must divide evenly among process_count={process_count}"
        )


def batch_indices(
    num_rows: int,
    step: int,
    batch_size: int,
    seed: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> np.ndarray:
    """Row indices of this process's part of the global batch at ``step`` (int64 [batch_size // process_count]).

    The row stream is ``concat(perm(seed, 0), perm(seed, 1), ...)``, one seeded permutation of
    ``range(num_rows)`` per epoch; the global batch at ``step`` is stream positions
    ``[step * batch_size, (step + 1) * batch_size)`` (a batch may straddle two epochs), and process ``p`` takes
    the ``p``-th contiguous ``batch_size // process_count`` of them.  Every row is seen once per epoch.
    """
    _check_batch_args(num_rows, step, batch_size, seed, process_index, process_count)
    local = batch_size // process_count
    start = int(step) * int(batch_size) + int(process_index) * local
    pos = np.arange(start, start + local, dtype=np.int64)
    epochs, offsets = np.divmod(pos, int(num_rows))
    out = np.empty(local, np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = _epoch_permutation(int(num_rows), int(seed), int(e), bool(shuffle))[offsets[sel]]
    return out


def get_batch(
    data: PackedData,
    step: int,
    batch_size: int,
    seed: int = 0,
    *,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> dict[str, np.ndarray]:
    """This process's batch at ``step``: ``{"tokens", "valid", "segment_ids", "indices"}`` ([B_local, ...]).

    A pure function of its arguments: resuming at step k gives exactly the batch an uninterrupted run saw.
    ``"epoch"`` (float) is the number of passes over the data completed at the start of this step.
    """
    idx = batch_indices(
        len(data), step, batch_size, seed, process_index=process_index, process_count=process_count,
        shuffle=shuffle,
    )
    return {
        "tokens": data.tokens[idx],
        "valid": data.valid[idx],
        "segment_ids": data.segment_ids[idx],
        "indices": idx,
        "epoch": np.float64(step * batch_size / len(data)),
    }


def iterate_batches(
    data: PackedData,
    batch_size: int,
    seed: int = 0,
    *,
    start_step: int = 0,
    num_steps: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    shuffle: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """``get_batch`` for ``start_step, start_step + 1, ...`` (forever when ``num_steps`` is None)."""
    _check_batch_args(len(data), start_step, batch_size, seed, process_index, process_count)
    step = start_step
    while num_steps is None or step < start_step + num_steps:
        yield get_batch(data, step, batch_size, seed, process_index=process_index,
                        process_count=process_count, shuffle=shuffle)
        step += 1
