"""Packing token documents into fixed-length rows: ``PackedData`` and ``pack_tokens``.

Plain numpy; no JAX needed.  Documents follow one another in one stream, each ended by EOS, cut into rows of
``seq_len``; ``segment_ids`` records which document every token comes from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["PackedData", "pack_tokens", "concat_rows"]


@dataclass(frozen=True)
class PackedData:
    """Rows of packed tokens.

    tokens:      int32 [N, seq_len] token ids; documents follow one another, each ended by ``eos_id``.
    valid:       bool  [N, seq_len] True for real tokens, False for padding (only in a short last row).
                 For next-token losses, the target at position t is valid when ``valid[:, t + 1]`` is.
    segment_ids: int32 [N, seq_len] index of the document (within this split) a token comes from, -1 on
                 padding; a document's EOS carries its index. Use it for per-document attention if wanted.
    loss_weight: float32 [N, seq_len] or None: the weight of each position's distillation loss (None: 1 on every
                 valid position). Synthetic rows weigh the answers that need a far-away fact more
                 (``make_longrange_rows``' ``answer_weight``); padding always weighs 0.
    """

    tokens: np.ndarray
    valid: np.ndarray
    segment_ids: np.ndarray
    loss_weight: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    @property
    def weights(self) -> np.ndarray:
        """float32 [N, seq_len]: ``loss_weight``, or 1 on valid positions; 0 on padding either way."""
        ones = self.valid.astype(np.float32)
        return ones if self.loss_weight is None else (self.loss_weight * ones).astype(np.float32)


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


def concat_rows(a: PackedData, b: PackedData) -> PackedData:
    """The rows of ``a`` then those of ``b``, ``b``'s document indices shifted past ``a``'s (padding stays -1)."""
    offset = int(a.segment_ids.max(initial=-1)) + 1
    weighted = a.loss_weight is not None or b.loss_weight is not None
    return PackedData(tokens=np.concatenate([a.tokens, b.tokens]), valid=np.concatenate([a.valid, b.valid]),
                      segment_ids=np.concatenate([a.segment_ids, np.where(b.segment_ids >= 0,
                                                                          b.segment_ids + offset, -1)]),
                      loss_weight=np.concatenate([a.weights, b.weights]) if weighted else None)
