"""Tests for dms_jax.data.corpus: built-in corpora, text / JSONL / Hugging Face sources, the held-out split."""

from __future__ import annotations

import gzip
import json
import sys
import types

import pytest

from dms_jax.data import corpus, dataset


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The default model's real tokenizer (session fixture in conftest.py)."""
    return tokenizer


@pytest.fixture(scope="module")
def topics_ds(tok):
    return dataset.build_dataset(tok, 256, "pydoc-topics", heldout_fraction=0.05)


# ------------------------------------------------------------------------------------------------ corpora


def test_builtin_corpora_are_real_deterministic_text():
    docs = corpus.builtin_documents("pydoc-topics")
    assert len(docs) > 100
    assert sum(map(len, docs)) > 300_000
    assert corpus.builtin_documents("pydoc-topics") == docs
    joined = "\n".join(docs)
    assert "Assignment statements" in joined and "assignment" in joined
    # English prose: mostly letters and spaces, and common words.
    assert sum(c.isalpha() or c.isspace() for c in joined) / len(joined) > 0.8
    assert joined.count(" the ") > 1000
    assert all(len(d) >= 80 for d in docs)
    unique = list(dict.fromkeys(docs))
    assert corpus.load_documents("pydoc-topics") == unique
    full = corpus.load_documents("default")
    assert full[: len(unique)] == unique and len(full) > 2 * len(unique)  # + standard library docstrings


def test_builtin_text_ids_are_the_corpus_prefix(tok):
    docs = corpus.builtin_documents()
    want = [i for d in docs[:3] for i in tok(d)["input_ids"]]
    n = len(want) - 5  # ends inside the third document
    ids = corpus.builtin_text_ids(tok, n)
    assert len(ids) == n and ids == want[:n]
    assert corpus.builtin_text_ids(tok, 7, "pydoc-topics") == tok(corpus.builtin_documents("pydoc-topics")[0])[
        "input_ids"][:7]
    with pytest.raises(ValueError, match="n must be >= 1"):
        corpus.builtin_text_ids(tok, 0)
    with pytest.raises(ValueError, match="has only"):  # a tokenizer that gives one id per document
        corpus.builtin_text_ids(lambda doc: {"input_ids": [1]}, 10**7)


# ------------------------------------------------------------------------------------------------ held-out


def test_heldout_shares_no_document_with_train(tok, topics_ds):
    docs = corpus.load_documents("pydoc-topics")
    train_docs, held_docs = corpus.split_documents(docs, 0.05)
    assert held_docs and train_docs
    assert not set(train_docs) & set(held_docs)
    assert len(train_docs) + len(held_docs) == len(docs)
    assert 0.01 < len(held_docs) / len(docs) < 0.12
    assert all(corpus.is_heldout(d, 0.05) for d in held_docs)
    # Deterministic and independent of order: it is a function of the text.
    assert set(corpus.split_documents(docs[::-1], 0.05)[1]) == set(held_docs)
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
    train, held = corpus.split_documents(docs, 0.05)
    assert len(held) >= 1 and len(train) + len(held) == 5
    assert corpus.split_documents(docs, 0.0) == (docs, [])


# ------------------------------------------------------------------------------------------------ sources


def test_text_file_folder_and_jsonl_sources(tmp_path, tok):
    f = tmp_path / "a.txt"
    f.write_text("First paragraph,\nstill first.\n\n\n  \nSecond paragraph.\n\nThird.\n")
    assert corpus.load_documents(f) == ["First paragraph,\nstill first.", "Second paragraph.", "Third."]
    assert corpus.load_documents(f, text_split="file") == [f.read_text().strip()]
    folder = tmp_path / "dir"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("Doc B.\n\nStill doc B.")
    (folder / "sub" / "c.txt").write_text("Doc C.")
    (folder / "ignored.md").write_text("not text")
    assert corpus.load_documents(folder) == ["Doc B.\n\nStill doc B.", "Doc C."]
    j = tmp_path / "d.jsonl"
    j.write_text(json.dumps({"text": "alpha beta", "id": 1}) + "\n\n" + json.dumps({"text": "gamma", "id": 2}) + "\n")
    assert corpus.load_documents(j) == ["alpha beta", "gamma"]
    j2 = tmp_path / "e.jsonl.gz"
    with gzip.open(j2, "wt") as g:
        g.write(json.dumps({"content": "delta"}) + "\n")
    assert corpus.load_documents(j2, text_field="content") == ["delta"]
    ds = dataset.build_dataset(tok, 4, j, heldout_fraction=0.0)
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
    assert corpus.load_documents(saved) == ["one", "two"]
    assert corpus.load_documents(f"hf:{saved}", hf_split="test") == ["three"]
    assert corpus.load_documents("hf:org/name", text_field="body", hf_config="c") == ["hub text"]
    assert calls["hub"] == ("org/name", "c", "train")
    with pytest.raises(ValueError, match="text_field"):
        corpus.load_documents("hf:org/name")
    with pytest.raises(ValueError, match="hf_split"):
        corpus.load_documents(saved, hf_split="validation")


def test_hf_source_without_datasets_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ImportError, match="pip install datasets"):
        corpus.load_documents("hf:org/name")


# ------------------------------------------------------------------------------------------------ errors


def test_corpus_errors_name_the_parameter(tmp_path):
    with pytest.raises(ValueError, match="source"):
        corpus.load_documents(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match="source"):
        corpus.load_documents(empty)
    j = tmp_path / "x.jsonl"
    j.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="text_field.*'text'.*body"):
        corpus.load_documents(j)
    with pytest.raises(ValueError, match="heldout_fraction"):
        corpus.split_documents(["a", "b"], 1.0)
