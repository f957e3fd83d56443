"""Tests for dms_jax.data: sources, packing with the real SmolLM2 tokenizer, held-out split, batches."""

from __future__ import annotations

import gzip
import json
import sys
import types

import numpy as np
import pytest

from dms_jax import data


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


@pytest.fixture(scope="module")
def topics_ds(tok):
    return data.build_dataset(tok, 256, "pydoc-topics", heldout_fraction=0.05)


# ------------------------------------------------------------------------------------------------ corpora


def test_builtin_corpora_are_real_deterministic_text():
    docs = data.builtin_documents("pydoc-topics")
    assert len(docs) > 100
    assert sum(map(len, docs)) > 300_000
    assert data.builtin_documents("pydoc-topics") == docs
    joined = "\n".join(docs)
    assert "Assignment statements" in joined and "assignment" in joined
    # English prose: mostly letters and spaces, and common words.
    assert sum(c.isalpha() or c.isspace() for c in joined) / len(joined) > 0.8
    assert joined.count(" the ") > 1000
    assert all(len(d) >= 80 for d in docs)
    unique = list(dict.fromkeys(docs))
    assert data.load_documents("pydoc-topics") == unique
    full = data.load_documents("default")
    assert full[: len(unique)] == unique and len(full) > 2 * len(unique)  # + standard library docstrings


def test_builtin_text_ids_are_the_corpus_prefix(tok):
    docs = data.builtin_documents()
    want = [i for d in docs[:3] for i in tok(d)["input_ids"]]
    n = len(want) - 5  # ends inside the third document
    ids = data.builtin_text_ids(tok, n)
    assert len(ids) == n and ids == want[:n]
    assert data.builtin_text_ids(tok, 7, "pydoc-topics") == tok(data.builtin_documents("pydoc-topics")[0])[
        "input_ids"][:7]
    with pytest.raises(ValueError, match="n must be >= 1"):
        data.builtin_text_ids(tok, 0)
    with pytest.raises(ValueError, match="has only"):  # a tokenizer that gives one id per document
        data.builtin_text_ids(lambda doc: {"input_ids": [1]}, 10**7)


# ------------------------------------------------------------------------------------------------ packing


def test_packing_rows_are_full_and_decode_to_corpus_text(tok, topics_ds):
    train = topics_ds.train
    assert train.tokens.dtype == np.int32 and train.tokens.shape[1] == 256
    assert train.valid.shape == train.tokens.shape == train.segment_ids.shape
    assert train.valid[:-1].all()  # every row but perhaps the last is full length
    docs = data.load_documents("pydoc-topics")
    corpus = "\n".join(docs)
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
                assert text.strip() and text in corpus
            else:
                assert text in docset  # a whole document between two EOS tokens
    # The stream is exactly the documents joined by EOS: the first document starts row 0.
    train_docs, _ = data.split_documents(docs, 0.05)
    first = tok(train_docs[0], add_special_tokens=False)["input_ids"]
    n = min(len(first), 256)
    assert train.tokens[0, :n].tolist() == first[:n]


def test_pack_pad_and_drop():
    docs = [np.arange(1, 6), np.arange(10, 13)]  # 5 + 1 + 3 + 1 = 10 tokens
    p = data.pack_tokens(docs, 4, eos_id=0, pad_id=99, last="pad")
    assert p.tokens.tolist() == [[1, 2, 3, 4], [5, 0, 10, 11], [12, 0, 99, 99]]
    assert p.valid.tolist() == [[True] * 4, [True] * 4, [True, True, False, False]]
    assert p.segment_ids.tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [1, 1, -1, -1]]
    assert p.num_tokens == 10 and len(p) == 3 and p.seq_len == 4
    d = data.pack_tokens(docs, 4, eos_id=0, last="drop")
    assert d.tokens.tolist() == [[1, 2, 3, 4], [5, 0, 10, 11]] and d.valid.all()
    exact = data.pack_tokens(docs, 5, eos_id=0, last="pad")
    assert exact.tokens.shape == (2, 5) and exact.valid.all()


# ------------------------------------------------------------------------------------------------ held-out


def test_heldout_shares_no_document_with_train(tok, topics_ds):
    docs = data.load_documents("pydoc-topics")
    train_docs, held_docs = data.split_documents(docs, 0.05)
    assert held_docs and train_docs
    assert not set(train_docs) & set(held_docs)
    assert len(train_docs) + len(held_docs) == len(docs)
    assert 0.01 < len(held_docs) / len(docs) < 0.12
    assert all(data.is_heldout(d, 0.05) for d in held_docs)
    # Deterministic and independent of order: it is a function of the text.
    assert set(data.split_documents(docs[::-1], 0.05)[1]) == set(held_docs)
    # No held-out text reaches a training row (check by decoding the whole training stream).
    ds = topics_ds
    assert ds.meta["heldout_documents"] == len(held_docs) and len(ds.heldout) >= 1
    train_text = tok.decode(ds.train.tokens[ds.train.valid])
    held_text = tok.decode(ds.heldout.tokens[ds.heldout.valid])
    for d in held_docs:
        assert d not in train_text
        assert d in held_text
    for d in train_docs[:20]:
        assert d in train_text


def test_small_corpus_still_gets_a_heldout_document():
    docs = [f"document number {i} about something" for i in range(5)]
    train, held = data.split_documents(docs, 0.05)
    assert len(held) >= 1 and len(train) + len(held) == 5
    assert data.split_documents(docs, 0.0) == (docs, [])


# ------------------------------------------------------------------------------------------------ sources


def test_text_file_folder_and_jsonl_sources(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text("First paragraph,\nstill first.\n\n\n  \nSecond paragraph.\n\nThird.\n")
    assert data.load_documents(f) == ["First paragraph,\nstill first.", "Second paragraph.", "Third."]
    assert data.load_documents(f, text_split="file") == [f.read_text().strip()]
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Doc B.\n\nStill doc B.")
    (folder / "sub" / "c.txt").write_text("Doc C.")
    (folder / "ignored.md").write_text("not text")
    assert data.load_documents(folder) == ["Doc B.\n\nStill doc B.", "Doc C."]
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "alpha beta", "id": 1}) + "\n\n" + json.dumps({"text": "gamma", "id": 2}) + "\n")
    assert data.load_documents(j) == ["alpha beta", "gamma"]
    j2 = tmp_path / "e.jsonl.gz"
    with gzip.open(j2, "wt") as g:
        g.write(json.dumps({"content": "delta"}) + "\n")
    assert data.load_documents(j2, text_field="content") == ["delta"]
    ds = data.build_dataset(tok, 4, j, heldout_fraction=0.0)
    assert len(ds.heldout) == 0 and ds.train.tokens.shape[1] == 4


def test_hf_dataset_source_with_a_stand_in_module(tmp_path, monkeypatch):
    """The `datasets` code path, with a stand-in module (the package is optional)."""
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")

    class FakeDataset(list):
        @property
        def column_names(self):
            return sorted(self[0])

        def __getitem__(self, key):
            if isinstance(key, str):
                return [r[key] for r in self]
            return list.__getitem__(self, key)

    calls = {}

    def load_from_disk(path):
        calls["disk"] = path
        return {"train": FakeDataset([{"text": "one"}, {"text": "two"}]), "test": FakeDataset([{"text": "three"}])}

    def load_dataset(name, config, split):
        calls["hub"] = (name, config, split)
        return FakeDataset([{"body": "hub text"}])

    fake = types.ModuleType("datasets")
    fake.load_from_disk = load_from_disk
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.load_documents(saved) == ["one", "two"]
    assert data.load_documents(f"hf:{saved}", hf_split="test") == ["three"]
    assert data.load_documents("hf:org/name", text_field="body", hf_config="c") == ["hub text"]
    assert calls["hub"] == ("org/name", "c", "train")
    with pytest.raises(ValueError, match="text_field"):
        data.load_documents("hf:org/name")
    with pytest.raises(ValueError, match="hf_split"):
        data.load_documents(saved, hf_split="validation")


def test_hf_source_without_datasets_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        data.load_documents("hf:org/name")


# ------------------------------------------------------------------------------------------------ batches


def test_batches_are_deterministic_and_resumable(topics_ds):
    train = topics_ds.train
    run = [b for b in data.iterate_batches(train, 4, seed=7, num_steps=12)]
    resumed = [b for b in data.iterate_batches(train, 4, seed=7, start_step=9, num_steps=3)]
    for a, b in zip(run[9:], resumed):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["valid"], b["valid"])
    again = data.get_batch(train, 5, 4, seed=7)
    np.testing.assert_array_equal(again["indices"], run[5]["indices"])
    other = data.get_batch(train, 5, 4, seed=8)
    assert not np.array_equal(other["indices"], run[5]["indices"])
    assert run[0]["tokens"].shape == (4, 256) and run[0]["tokens"].dtype == np.int32


def test_every_row_once_per_epoch_and_epochs_reshuffle():
    n, bs = 10, 4  # batches straddle epochs
    stream = np.concatenate([data.batch_indices(n, s, bs, seed=3) for s in range(10)])  # 4 epochs
    e0, e1, e2 = stream[:10], stream[10:20], stream[20:30]
    for e in (e0, e1, e2):
        assert sorted(e.tolist()) == list(range(n))
    assert not np.array_equal(e0, e1)
    plain = np.concatenate([data.batch_indices(n, s, bs, seed=3, shuffle=False) for s in range(5)])
    assert plain.tolist() == (list(range(10)) * 2)


def test_process_split_partitions_the_global_batch():
    n, bs = 37, 8
    for step in (0, 3, 11):
        glob = data.batch_indices(n, step, bs, seed=1)
        parts = [data.batch_indices(n, step, bs, seed=1, process_index=p, process_count=4) for p in range(4)]
        assert all(len(p) == 2 for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), glob)


# ------------------------------------------------------------------------------------------------ errors


def test_errors_name_the_parameter(tmp_path, tok):
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_tokens([np.arange(3)], 1, eos_id=0)
    with pytest.raises(ValueError, match="seq_len"):
        data.build_dataset(tok, 1, "pydoc-topics")
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_indices(10, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        data.batch_indices(10, 0, 6, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        data.batch_indices(10, 0, 4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="step"):
        data.batch_indices(10, -1, 4)
    with pytest.raises(ValueError, match="source"):
        data.load_documents(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="source"):
        data.load_documents(empty)
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="text_field.*'text'.*body"):
        data.load_documents(j)
    with pytest.raises(ValueError, match="heldout_fraction"):
        data.split_documents(["a", "b"], 1.0)
    with pytest.raises(ValueError, match="last"):
        data.pack_tokens([np.arange(3)], 2, eos_id=0, last="keep")
    with pytest.raises(ValueError, match="seq_len"):
        data.build_dataset(tok, 100_000, j, text_field="body", heldout_fraction=0.0, last="drop")


# ------------------------------------------------------------------------------------------------ recall rows


def test_recall_rows_ask_for_every_fact_outside_the_window(tok):
    docs = data.tokenize_documents(data.builtin_documents("pydoc-topics")[:40], tok)
    rows = data.make_recall_rows(tok, docs, 256, 12, seed=3)
    assert rows.tokens.shape == (12, 256) and rows.tokens.dtype == np.int32 and rows.valid.all()
    again = data.make_recall_rows(tok, docs, 256, 12, seed=3)
    np.testing.assert_array_equal(rows.tokens, again.tokens)
    assert not np.array_equal(rows.tokens, data.make_recall_rows(tok, docs, 256, 12, seed=4).tokens)
    import re
    for row in rows.tokens:
        text = tok.decode(row)
        facts = dict(re.findall(r"Note: the number of the (\w+ \w+) is (\d+)\.", text))
        answers = dict(re.findall(r"Q: What is the number of the (\w+ \w+)\?\nA: (\d+)", text))
        assert 2 <= len(facts) <= 4 and answers == facts
        # Each answer is far behind its fact: the last fact sits in the first ~half, the questions at the end.
        assert text.rfind("Note: the number") < text.find("Answer from the text above.") - 200
        assert "pass key" not in text and "VAR " not in text  # not the evaluation tasks' wording


def test_build_dataset_mixes_recall_rows_into_train_only(tok):
    plain = data.build_dataset(tok, 256, "pydoc-topics", last="drop", max_documents=80)
    mixed = data.build_dataset(tok, 256, "pydoc-topics", last="drop", max_documents=80, recall_fraction=0.25)
    n_recall = mixed.meta["recall_rows"]
    assert n_recall == round(len(plain.train) / 3) and len(mixed.train) == len(plain.train) + n_recall
    np.testing.assert_array_equal(mixed.train.tokens[: len(plain.train)], plain.train.tokens)
    np.testing.assert_array_equal(mixed.heldout.tokens, plain.heldout.tokens)
    assert len(set(mixed.train.segment_ids[len(plain.train):, 0])) == n_recall
    assert mixed.train.segment_ids[len(plain.train):].min() > plain.train.segment_ids.max()
    with pytest.raises(ValueError, match="recall_fraction"):
        data.build_dataset(tok, 256, "pydoc-topics", recall_fraction=1.0)
