"""Documents for DMS distillation: built-in corpora, text / JSONL / Hugging Face sources, the held-out split,
tokenisation.

Plain numpy; no JAX needed.  See ``dms_jax.data`` for the whole pipeline.

Built-in corpora (no download; text that Python itself ships):

* ``"pydoc-topics"``: the language reference topics of ``pydoc_data.topics`` (~0.46 MB of English prose,
  ~0.12 M SmolLM2 tokens), split into section documents.
* ``"python-docs"`` (the default): the above plus the docstrings (>= 200 characters) of the standard library's
  modules, classes and functions, read with ``ast`` from the source files (no module is imported),
  ~1.5 MB of text in all.

Both are deterministic for a given Python installation; ``Dataset.meta["fingerprint"]`` hashes the documents
so that a run can record exactly what it trained on.
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
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = [
    "BUILTIN_SOURCES",
    "DEFAULT_SOURCE",
    "builtin_documents",
    "builtin_text_ids",
    "load_documents",
    "documents_fingerprint",
    "split_documents",
    "is_heldout",
    "tokenize_documents",
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


def _path_documents(src: str, text_field: str, text_split: str, hf_split: str, hf_config: str | None) -> list[str]:
    """The documents of a file or folder: JSONL, a saved Hugging Face dataset, or text."""
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
        return _jsonl_documents(path, text_field)
    if path.is_dir() and any((path / f).exists() for f in _HF_SAVED_MARKERS):
        return _hf_documents(str(path), text_field, hf_split, hf_config)
    return _text_documents(path, text_split)


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
        docs = _path_documents(src, text_field, text_split, hf_split, hf_config)

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
# Tokenisation
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

