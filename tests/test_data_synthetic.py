"""Tests for dms_jax.data.synthetic. Recall rows (recipe v2): every fact asked for outside the window, mixed into the
training split only. Long-range rows (recipe v3): exact length, determinism, answers far behind their statements,
variety, and none of the evaluation tasks' wording."""

import re

import numpy as np
import pytest

from dms_jax.data import corpus, dataset, packing, synthetic
from dms_jax.data.synthetic import make_longrange_rows

SEQ, WINDOW = 512, 32
_HEADERS = ("Answer from the text above.", "Now some questions about what you read.", "Quiz time.",
            "Please look back at the passage.", "Questions:", "Use only the document to answer.")


@pytest.fixture(scope="module")
def docs():
    return corpus.builtin_documents("pydoc-topics")[:60]


@pytest.fixture(scope="module")
def rows(tokenizer, docs):
    return make_longrange_rows(tokenizer, docs, SEQ, 24, seed=5, window=WINDOW)


def _question_block(text):
    """Character index of the question block: the last header of the row."""
    return max(text.rfind(h) for h in _HEADERS)


def _answers(text, start):
    """The answer values after the question block: the last token run of each assistant answer or 'A:' line."""
    block = text[start:]
    answers = re.findall(r"(?:^A: |<\|im_start\|>assistant\n)(.*?)\.(?:<\|im_end\|>|\n)", block, flags=re.M)
    return [a.split(" ")[-1] if not re.search(r"\d+ [A-Z][a-z]+ \d{4}$", a) else " ".join(a.split(" ")[-3:])
            for a in answers]


# ------------------------------------------------------------------------------------------------ recall rows


def test_recall_rows_ask_for_every_fact_outside_the_window(tokenizer):
    docs = corpus.tokenize_documents(corpus.builtin_documents("pydoc-topics")[:40], tokenizer)
    rows = synthetic.make_recall_rows(tokenizer, docs, 256, 12, seed=3)
    assert rows.tokens.shape == (12, 256) and rows.tokens.dtype == np.int32 and rows.valid.all()
    again = synthetic.make_recall_rows(tokenizer, docs, 256, 12, seed=3)
    np.testing.assert_array_equal(rows.tokens, again.tokens)
    assert not np.array_equal(rows.tokens, synthetic.make_recall_rows(tokenizer, docs, 256, 12, seed=4).tokens)
    import re
    for row in rows.tokens:
        text = tokenizer.decode(row)
        facts = dict(re.findall(r"Note: the number of the (\w+ \w+) is (\d+)\.", text))
        answers = dict(re.findall(r"Q: What is the number of the (\w+ \w+)\?\nA: (\d+)", text))
        assert 2 <= len(facts) <= 4 and answers == facts
        # Each answer is far behind its fact: the last fact sits in the first ~half, the questions at the end.
        assert text.rfind("Note: the number") < text.find("Answer from the text above.") - 200
        assert "pass key" not in text and "VAR " not in text  # not the evaluation tasks' wording


def test_build_dataset_mixes_recall_rows_into_train_only(tokenizer):
    plain = dataset.build_dataset(tokenizer, 256, "pydoc-topics", last="drop", max_documents=80)
    mixed = dataset.build_dataset(tokenizer, 256, "pydoc-topics", last="drop", max_documents=80, recall_fraction=0.25)
    n_recall = mixed.meta["recall_rows"]
    assert n_recall == round(len(plain.train) / 3) and len(mixed.train) == len(plain.train) + n_recall
    np.testing.assert_array_equal(mixed.train.tokens[: len(plain.train)], plain.train.tokens)
    np.testing.assert_array_equal(mixed.heldout.tokens, plain.heldout.tokens)
    assert len(set(mixed.train.segment_ids[len(plain.train):, 0])) == n_recall
    assert mixed.train.segment_ids[len(plain.train):].min() > plain.train.segment_ids.max()
    with pytest.raises(ValueError, match="recall_fraction"):
        dataset.build_dataset(tokenizer, 256, "pydoc-topics", recall_fraction=1.0)


# ------------------------------------------------------------------------------------------------ long-range rows


def test_rows_are_exact_and_deterministic(tokenizer, docs, rows):
    assert rows.tokens.shape == (24, SEQ) and rows.tokens.dtype == np.int32 and rows.valid.all()
    np.testing.assert_array_equal(rows.segment_ids[:, 0], np.arange(24))
    again = make_longrange_rows(tokenizer, docs, SEQ, 24, seed=5, window=WINDOW)
    np.testing.assert_array_equal(rows.tokens, again.tokens)
    other = make_longrange_rows(tokenizer, docs, SEQ, 24, seed=6, window=WINDOW)
    assert not np.array_equal(rows.tokens, other.tokens)


def test_every_answer_is_stated_far_before_its_question(tokenizer, rows):
    checked = 0
    for row in rows.tokens:
        text = tokenizer.decode(row)
        q = _question_block(text)
        assert q > 0, text[-300:]
        answers = _answers(text, q)
        assert answers, text[q:]
        q_token = len(tokenizer(text[:q], add_special_tokens=False)["input_ids"])
        for value in answers:
            stated = text.rfind(value, 0, q)
            assert stated >= 0, (value, text)
            # Re-tokenising decoded text can merge a token or two at the seams: allow 8 tokens of slack.
            end_token = len(tokenizer(text[: stated + len(value)], add_special_tokens=False)["input_ids"])
            assert q_token - end_token >= 2 * WINDOW - 8, (value, q_token, end_token)
            checked += 1
    assert checked >= 24


def test_rows_vary_in_kind_form_and_format(tokenizer, rows):
    texts = [tokenizer.decode(r) for r in rows.tokens]
    chats = sum("<|im_start|>assistant" in t for t in texts)
    assert 0 < chats < len(texts)  # plain and chat rows
    headers = {h for t in texts for h in _HEADERS if h in t}
    assert len(headers) >= 3
    chain_forms = {f for t in texts for f in (":=", "<-", " takes ", "let ", "set ") if f in t}
    assert len(chain_forms) >= 2


def test_rows_avoid_the_evaluation_wording(tokenizer, rows):
    for row in rows.tokens:
        text = tokenizer.decode(row)
        for phrase in ("pass key", "VAR ", "Memorize and track", "important info hidden"):
            assert phrase not in text


def test_answer_weight_marks_the_question_block(tokenizer, docs, rows):
    weighted = make_longrange_rows(tokenizer, docs, SEQ, 24, seed=5, window=WINDOW, answer_weight=6.0)
    np.testing.assert_array_equal(weighted.tokens, rows.tokens)  # the weight changes no token
    assert rows.loss_weight is None and np.all(rows.weights == 1.0)
    assert set(np.unique(weighted.loss_weight)) == {1.0, 6.0}
    for toks, w in zip(weighted.tokens, weighted.loss_weight):
        first = int(np.argmax(w == 6.0))
        assert np.all(w[first:] == 6.0) and np.all(w[:first] == 1.0)  # one weighted span, to the row's end
        # The span starts one position before the question block (that position's logits predict its first
        # token), and the block holds every answer: the decoded tail starts at the block's header.
        text = tokenizer.decode(toks)
        tail = tokenizer.decode(toks[first + 1:])
        start = _question_block(text)
        assert tail.lstrip().startswith(text[start:start + 20])
        assert _answers(text, start) and all(a in tail for a in _answers(text, start))
    # Natural rows concatenated after weighted ones keep weight 1; padding weighs 0.
    both = packing.concat_rows(weighted, rows)
    assert both.loss_weight.shape == both.tokens.shape
    np.testing.assert_array_equal(both.loss_weight[len(weighted):], 1.0)
    with pytest.raises(ValueError, match="answer_weight"):
        make_longrange_rows(tokenizer, docs, SEQ, 2, window=WINDOW, answer_weight=0.5)


def test_bad_arguments_name_the_parameter(tokenizer, docs):
    with pytest.raises(ValueError, match="seq_len"):
        make_longrange_rows(tokenizer, docs, 64, 2, window=WINDOW)
    with pytest.raises(ValueError, match="n_rows"):
        make_longrange_rows(tokenizer, docs, SEQ, -1, window=WINDOW)
    with pytest.raises(ValueError, match="window"):
        make_longrange_rows(tokenizer, docs, SEQ, 2, window=0)
    with pytest.raises(ValueError, match="filler_texts"):
        make_longrange_rows(tokenizer, [], SEQ, 2, window=WINDOW)


def test_build_dataset_mixes_longrange_rows_into_train_only(tokenizer):
    plain = dataset.build_dataset(tokenizer, SEQ, "pydoc-topics", last="drop", max_documents=80)
    mixed = dataset.build_dataset(tokenizer, SEQ, "pydoc-topics", last="drop", max_documents=80, recall_fraction=0.5,
                                  synthetic_kind="longrange", window=WINDOW)
    assert mixed.meta["synthetic_kind"] == "longrange" and mixed.meta["recall_rows"] == len(plain.train)
    np.testing.assert_array_equal(mixed.heldout.tokens, plain.heldout.tokens)
    with pytest.raises(ValueError, match="synthetic_kind"):
        dataset.build_dataset(tokenizer, SEQ, "pydoc-topics", synthetic_kind="other")
    weighted = dataset.build_dataset(tokenizer, SEQ, "pydoc-topics", last="drop", max_documents=80,
                                     recall_fraction=0.5, synthetic_kind="longrange", window=WINDOW, answer_weight=4.0)
    assert weighted.meta["answer_weight"] == 4.0 and weighted.heldout.loss_weight is None
    w = weighted.train.loss_weight
    assert np.all(w[:len(plain.train)] == 1.0) and np.all(w[len(plain.train):].max(axis=1) == 4.0)
    with pytest.raises(ValueError, match="answer_weight"):
        dataset.build_dataset(tokenizer, SEQ, "pydoc-topics", recall_fraction=0.5, answer_weight=4.0)
