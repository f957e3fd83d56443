"""Train and held-out rows of one source: ``Dataset`` and ``build_dataset``.

``build_dataset(tok, seq_len, source, ...)`` loads the documents (``dms_jax.data.corpus``), splits held-out
documents off before packing (so held-out text never reaches a training row), tokenises and packs both splits
(``dms_jax.data.packing``), and appends synthetic rows to the training split on request
(``dms_jax.data.synthetic``).  ``Dataset.meta`` records what was built, with fingerprints of the documents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from dms_jax.data.corpus import (_special_id, documents_fingerprint, load_documents, split_documents,
                                 tokenize_documents)
from dms_jax.data.packing import PackedData, concat_rows, pack_tokens
from dms_jax.data.synthetic import SYNTHETIC_KINDS, make_longrange_rows, make_recall_rows

__all__ = ["Dataset", "build_dataset"]


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
    answer_weight: float = 1.0,
) -> Dataset:
    """Load ``source``, split held-out documents off, tokenise and pack both splits into ``seq_len`` rows.

    The held-out split is taken before packing, at the document level (``split_documents``), so held-out
    text never reaches a training row.  ``recall_fraction`` of the training rows are synthetic:
    ``synthetic_kind="recall"`` (``make_recall_rows``, one wording) or ``"longrange"``
    (``make_longrange_rows``: facts and variable chains in many wordings, each at least
    ``2 * window`` tokens before its question; ``answer_weight``: the loss weight of their question blocks).
    ``eos_id`` defaults to the tokenizer's EOS, ``pad_id`` to its pad
    token or else EOS.
    """
    _check_dataset_args(seq_len, last, heldout_fraction, recall_fraction, synthetic_kind)
    if answer_weight != 1.0 and synthetic_kind != "longrange":
        raise ValueError(f"answer_weight: only synthetic_kind='longrange' marks its answers; got {answer_weight!r} "
                         f"with {synthetic_kind!r} (use 1.0)")
    eos, pad = _eos_and_pad(tokenizer, eos_id, pad_id)
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
        rows = _synthetic_rows(tokenizer, synthetic_kind, train_docs, train_tokens, seq_len, num_recall,
                               recall_seed, window, answer_weight)
        train = concat_rows(train, rows)
    heldout = pack_tokens(tokenize_documents(heldout_docs, tokenizer, add_bos=add_bos), seq_len,
                          eos_id=eos, pad_id=pad, last=last)
    if len(train) == 0:
        raise ValueError(
            f"seq_len: {seq_len} is longer than the {int(sum(len(d) for d in train_docs))}-character training "
            f"text of {os.fspath(source)!r} with last='drop'; use a shorter seq_len or last='pad'"
        )
    settings = {"source": os.fspath(source), "seq_len": int(seq_len), "heldout_fraction": float(heldout_fraction),
                "split_salt": split_salt, "last": last, "recall_fraction": float(recall_fraction),
                "synthetic_kind": synthetic_kind, "answer_weight": float(answer_weight), "eos_id": int(eos),
                "pad_id": int(pad)}
    meta = _dataset_meta(settings, docs, train_docs, heldout_docs, train, heldout, num_recall)
    return Dataset(train=train, heldout=heldout, meta=meta)


def _check_dataset_args(seq_len, last, heldout_fraction, recall_fraction, synthetic_kind) -> None:
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


def _eos_and_pad(tokenizer, eos_id: int | None, pad_id: int | None) -> tuple[int, int]:
    """(EOS, pad) ids: ``eos_id`` or the tokenizer's EOS; ``pad_id`` or the tokenizer's pad token or else EOS."""
    eos = eos_id if eos_id is not None else _special_id(tokenizer, "eos_token_id")
    if eos is None:
        raise ValueError("eos_id: the tokenizer has no EOS token; pass eos_id explicitly")
    if pad_id is None:
        pad_id = _special_id(tokenizer, "pad_token_id")
    pad = eos if pad_id is None else pad_id
    return eos, pad


def _synthetic_rows(tokenizer, kind: str, train_docs: Sequence[str], train_tokens: Sequence[np.ndarray],
                    seq_len: int, n_rows: int, seed: int, window: int, answer_weight: float) -> PackedData:
    """``n_rows`` synthetic rows of ``kind``, their filler taken from the training documents."""
    if kind == "recall":
        return make_recall_rows(tokenizer, train_tokens, seq_len, n_rows, seed)
    return make_longrange_rows(tokenizer, train_docs, seq_len, n_rows, seed, window, answer_weight)


def _dataset_meta(settings: dict, docs, train_docs, heldout_docs, train: PackedData, heldout: PackedData,
                  num_recall: int) -> dict:
    """``Dataset.meta``: the settings and what they gave (counts, fingerprints), in the order results files show."""
    s = settings
    return {
        "source": s["source"],
        "seq_len": s["seq_len"],
        "heldout_fraction": s["heldout_fraction"],
        "split_salt": s["split_salt"],
        "last": s["last"],
        "num_documents": len(docs),
        "train_documents": len(train_docs),
        "heldout_documents": len(heldout_docs),
        "train_rows": len(train),
        "recall_rows": num_recall,
        "recall_fraction": s["recall_fraction"],
        "synthetic_kind": s["synthetic_kind"],
        "answer_weight": s["answer_weight"],
        "heldout_rows": len(heldout),
        "train_tokens": train.num_tokens,
        "heldout_tokens": heldout.num_tokens,
        "eos_id": s["eos_id"],
        "pad_id": s["pad_id"],
        "fingerprint": documents_fingerprint(docs),
        "train_fingerprint": documents_fingerprint(train_docs),
        "heldout_fingerprint": documents_fingerprint(heldout_docs),
    }
