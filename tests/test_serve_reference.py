"""dms_jax.serve.reference and the experiments.generate CLI: greedy generation equal to transformers token for
token, batched == alone, sampling (seeded; top-k 1 is greedy), stop tokens, left padding, clear errors.
(sample_next and SamplingConfig themselves: test_serve_sampling.py.)

Each distinct (batch, prompt width, max_new_tokens, sampling) compiles the decode loop once (seconds on CPU),
so tests reuse the same prompts and settings where they can.
"""

import re

import chex
import numpy as np
import pytest

from conftest import CHAT_MESSAGES
from dms_jax.chat import chat_prompt
from dms_jax.serve.reference import generate, left_pad
from dms_jax.serve.sampling import SamplingConfig

NEW_TOKENS = 32
FRANCE = "What is the capital of France?"  # SmolLM2 answers in 8 tokens and emits <|im_end|> (EOS)


@pytest.fixture(scope="module")
def real_prompts(tokenizer):
    return [chat_prompt(tokenizer, m) for m in CHAT_MESSAGES + [FRANCE]]


@pytest.fixture(scope="module")
def hf_greedy(hf_default_model, real_prompts):
    """transformers' greedy continuation of each prompt alone (stops at EOS, which it includes)."""
    import torch

    outs = []
    for p in real_prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            g = hf_default_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                          do_sample=False, pad_token_id=2)
        outs.append(g[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def ours_alone(default_model, real_prompts):
    return [generate(default_model, [p], max_new_tokens=NEW_TOKENS)[0] for p in real_prompts]


def test_greedy_equals_transformers(ours_alone, hf_greedy, tokenizer):
    for i, (ours, ref) in enumerate(zip(ours_alone, hf_greedy)):
        assert ours == ref, f"prompt {i}: ours {tokenizer.decode(ours)!r} vs transformers {tokenizer.decode(ref)!r}"
    # Three prompts run the full 32 new tokens; the fourth stops on EOS, which is the last token returned.
    assert [len(o) for o in ours_alone[:3]] == [NEW_TOKENS] * 3
    assert len(ours_alone[3]) < NEW_TOKENS and ours_alone[3][-1] == 2
    assert "Paris" in tokenizer.decode(ours_alone[3])


def test_batched_equals_alone_real_model(default_model, real_prompts, ours_alone):
    assert len({len(p) for p in real_prompts}) == len(real_prompts)  # all different lengths
    batched = generate(default_model, real_prompts, max_new_tokens=NEW_TOKENS)
    assert batched == ours_alone


# ----------------------------------------------------------------------------------------------- tiny model

TINY_PROMPTS = [[5, 6, 7], list(range(10, 29)), list(range(40, 48))]
# Untied output layer: its logits are spread out enough for sampling to be random (the tied tiny models put almost
# all mass on repeating the input token).
TINY_FAMILY = "qwen2"


@pytest.fixture(scope="module")
def tiny(tiny_model):
    return tiny_model(TINY_FAMILY)


@pytest.fixture(scope="module")
def tiny_greedy(tiny):
    return generate(tiny, TINY_PROMPTS, max_new_tokens=12, stop_ids=[])


def test_batched_equals_alone_tiny(tiny, tiny_greedy, tiny_hf_model):
    import torch

    assert [len(o) for o in tiny_greedy] == [12] * 3
    for p, out in zip(TINY_PROMPTS, tiny_greedy):
        assert generate(tiny, [p], max_new_tokens=12, stop_ids=[])[0] == out
        # transformers agrees on the tiny model too; it stops at EOS (2), so compare up to the first EOS.
        ids = torch.tensor([p])
        with torch.no_grad():
            ref = tiny_hf_model(TINY_FAMILY).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                                      do_sample=False, pad_token_id=0)
        until_eos = out[: out.index(2) + 1] if 2 in out else out
        assert until_eos == ref[0, len(p):].tolist()


def test_stop_tokens_end_rows(tiny, tiny_greedy):
    """A stop id ends its row (the stop token is the last one returned); other rows are unaffected."""
    stop = tiny_greedy[1][4]
    out = generate(tiny, TINY_PROMPTS, max_new_tokens=12, stop_ids=[stop])
    for full, got in zip(tiny_greedy, out):
        expected = full[: full.index(stop) + 1] if stop in full else full
        assert got == expected
    assert out[1][-1] == stop and len(out[1]) <= 5


def test_sampling_is_seeded(tiny):
    s = SamplingConfig(temperature=1.5)
    a = generate(tiny, TINY_PROMPTS, max_new_tokens=12, sampling=s, stop_ids=[], seed=7)
    b = generate(tiny, TINY_PROMPTS, max_new_tokens=12, sampling=s, stop_ids=[], seed=7)
    c = generate(tiny, TINY_PROMPTS, max_new_tokens=12, sampling=s, stop_ids=[], seed=8)
    assert a == b
    assert a != c


def test_top_k_1_is_greedy(tiny, tiny_greedy):
    out = generate(tiny, TINY_PROMPTS, max_new_tokens=12, sampling=SamplingConfig(temperature=1.0, top_k=1),
                   stop_ids=[], seed=3)
    assert out == tiny_greedy


def test_left_pad():
    tokens, positions, valid = left_pad([[4, 5, 6], [7]], pad_id=0)
    np.testing.assert_array_equal(tokens, [[4, 5, 6], [0, 0, 7]])
    np.testing.assert_array_equal(positions, [[0, 1, 2], [0, 0, 0]])
    np.testing.assert_array_equal(valid, [[True, True, True], [False, False, True]])
    chex.assert_type([tokens, positions], np.int32)


# ----------------------------------------------------------------------------------------------- errors


def test_generate_errors(tiny):
    context = tiny.cfg.max_position_embeddings  # 512
    with pytest.raises(ValueError, match=r"prompt of 500 tokens \+ max_new_tokens=13 exceeds the model's context "
                                         r"of 512 tokens"):
        generate(tiny, [[5] * 500, [5]], max_new_tokens=13)
    assert context == 512
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0"):
        generate(tiny, [[5]], max_new_tokens=0)
    with pytest.raises(ValueError, match=r"non-empty list of non-empty token lists"):
        generate(tiny, [[5], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"non-empty list of non-empty token lists"):
        generate(tiny, [], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"prompt token ids must be in \[0, 256\), got \[256, -1\]"):
        generate(tiny, [[5, 256, -1]], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"top_k=300 exceeds the vocabulary size 256"):
        generate(tiny, [[5]], max_new_tokens=4, sampling=SamplingConfig(temperature=1.0, top_k=300))


# ----------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_with_loaded_model(monkeypatch, default_model, tokenizer):
    """The CLI, with the session's already-loaded default model and tokenizer (loading is tested elsewhere)."""
    from dms_jax import weights
    from experiments import generate as cli

    monkeypatch.setattr(weights, "load_model", lambda path=None, **kw: default_model)
    monkeypatch.setattr(weights, "load_tokenizer", lambda path=None: tokenizer)
    return cli


def test_cli_generate(cli_with_loaded_model, capsys, ours_alone, tokenizer):
    # The same prompt and length as test_greedy_equals_transformers: the compiled decode loop is reused.
    answers = cli_with_loaded_model.main(["--prompt", CHAT_MESSAGES[0], "--max-new-tokens", str(NEW_TOKENS)])
    out, err = capsys.readouterr()
    assert answers == [tokenizer.decode(ours_alone[0], skip_special_tokens=True)]
    assert answers[0] in out and CHAT_MESSAGES[0] in out
    assert "tokens/s" in err


def test_cli_no_chat(cli_with_loaded_model, capsys, tokenizer, ours_alone):
    """--no-chat feeds raw text: the chat template's own text gives the chat answer (same compiled loop)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MESSAGES[0]}],
                                         add_generation_prompt=True, tokenize=False)
    answers = cli_with_loaded_model.main(["--prompt", text, "--no-chat", "--max-new-tokens", str(NEW_TOKENS)])
    assert answers == [tokenizer.decode(ours_alone[0], skip_special_tokens=True)]


def test_cli_parses_sampling_flags():
    from experiments.generate import build_parser

    args = build_parser().parse_args(["--prompt", "a", "--prompt", "b", "--temperature", "0.7", "--top-p", "0.9",
                                      "--top-k", "40", "--seed", "3", "--model", "/some/dir", "--no-chat"])
    assert args.prompt == ["a", "b"] and (args.temperature, args.top_p, args.top_k, args.seed) == (0.7, 0.9, 40, 3)
    assert args.model == "/some/dir" and args.no_chat and args.max_new_tokens == 128


@pytest.mark.parametrize("argv, match", [
    (["--prompt", "x", "--max-new-tokens", "0"], r"--max-new-tokens: must be an integer >= 1, got 0"),
    (["--prompt", "x", "--temperature", "-1"], r"--temperature: must be >= 0, got -1"),
    (["--prompt", "x", "--top-p", "1.5"], r"--top-p: must be in \(0, 1\], got 1.5"),
    (["--prompt", "x", "--top-k", "-3"], r"--top-k: must be an integer >= 0, got -3"),
    (["--prompt", "x", "--top-k", "two"], r"--top-k: invalid _non_negative_int value"),
    ([], r"the following arguments are required: --prompt"),
])
def test_cli_argument_errors(argv, match, capsys):
    from experiments import generate as cli

    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_missing_model(capsys, tmp_path):
    from experiments import generate as cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--prompt", "x", "--model", str(tmp_path / "nope")])
    assert e.value.code == 2
    assert "model path does not exist" in capsys.readouterr().err


def test_cli_prompt_too_long(cli_with_loaded_model, capsys):
    with pytest.raises(SystemExit):
        cli_with_loaded_model.main(["--prompt", "word " * 8300, "--no-chat", "--max-new-tokens", "8"])
    assert "exceeds the model's context of 8192 tokens" in capsys.readouterr().err


def test_demo_table_lists_original_and_dms_columns():
    from experiments import demo

    result = {"ppl_vanilla": 15.0, "ppl_heldout": 16.5, "kl_heldout": 0.05, "compression_ratio": 3.2,
              "cache_ratio": 2.9, "eval_seq_len": 512, "passkey_cases": 4,
              "passkey_accuracy": {"512": 0.75}, "passkey_accuracy_vanilla": {"512": 1.0}}
    table = demo.before_after_table(result).splitlines()
    assert "original" in table[0] and "DMS" in table[0]
    rows = {line.split("  ")[0].strip(): line.split()[-2:] for line in table[2:]}
    assert rows["held-out perplexity"] == ["15.000", "16.500"]
    assert rows["compression outside the window"] == ["1.000", "3.200"]
    assert rows["passkey accuracy at 512 tokens (4 cases)"] == ["1.000", "0.750"]
