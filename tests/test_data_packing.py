"""Tests for dms_jax.data.packing and dms_jax.data.dataset: packing with the real SmolLM2 tokenizer, pad / drop,
the dataset's settings checked."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dms_jax.data import corpus, dataset, packing


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


@pytest.fixture(scope="module")
def topics_ds(tok):
    return dataset.build_dataset(tok, 256, "pydoc-topics", heldout_fraction=0.05)


def test_packing_rows_are_full_and_decode_to_corpus_text(tok, topics_ds):
    train = topics_ds.train
    assert train.tokens.dtype == np.int32 and train.tokens.shape[1] == 256
    assert train.valid.shape == train.tokens.shape == train.segment_ids.shape
    assert train.valid[:-1].all()  # every row but perhaps the last is full length
    docs = corpus.load_documents("pydoc-topics")
    corpus_text = "\n".join(docs)
    eos = tok.eos_token_id
    rng = np.random.default_rng(0)
    docset = set(docs)
    for r in rng.choice(len(train) - 1, 8, replace=False):
        row = train.tokens[r]
        pieces = [p[p != eos] for p in np.split(row, np.flatnonzero(row == eos))]
        for k, piece in enumerate(pieces):
            first, last = k == 0, k == len(pieces) - 1
            # Row edges may cut a document (and, rarely, a multi-byte character): trim a token there.
            piece = piece[(1 if first else 0) : len(piece) - (1 if last else 0)]
            if len(piece) < 4:
                continue
            text = tok.decode(piece)
            if first or last:
                assert text.strip() and text in corpus_text
            else:
                assert text in docset  # a whole document between two EOS tokens
    # The stream is exactly the documents joined by EOS: the first document starts row 0.
    train_docs, _ = corpus.split_documents(docs, 0.05)
    first = tok(train_docs[0], add_special_tokens=False)["input_ids"]
    n = min(len(first), 256)
    assert train.tokens[0, :n].tolist() == first[:n]


def test_pack_pad_and_drop():
    docs = [np.arange(1, 6), np.arange(10, 13)]  # 5 + 1 + 3 + 1 = 10 tokens
    p = packing.pack_tokens(docs, 4, eos_id=0, pad_id=99, last="pad")
    assert p.tokens.tolist() == [[1, 2, 3, 4], [5, 0, 10, 11], [12, 0, 99, 99]]
    assert p.valid.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]
    assert p.segment_ids.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, -1, -1]]
    assert p.num_tokens == 10 and len(p) == 3 and p.seq_len == 4
    d = packing.pack_tokens(docs, 4, eos_id=0, last="drop")
    assert d.tokens.tolist() == [[1, 2, 3, 4], [5, 0, 10, 11]] and d.valid.all()
    exact = packing.pack_tokens(docs, 5, eos_id=0, last="pad")
    assert exact.tokens.shape == (2, 5) and exact.valid.all()


def test_packing_errors_name_the_parameter(tmp_path, tok):
    with pytest.raises(ValueError, match="seq_len"):
        packing.pack_tokens([np.arange(3)], 1, eos_id=0)
    with pytest.raises(ValueError, match="seq_len"):
        dataset.build_dataset(tok, 1, "pydoc-topics")
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="last"):
        packing.pack_tokens([np.arange(3)], 2, eos_id=0, last="keep")
    with pytest.raises(ValueError, match="seq_len"):
        dataset.build_dataset(tok, 100_000, j, text_field="body", heldout_fraction=0.0, last="drop")
