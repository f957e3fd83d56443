"""experiments.demo: its own --help, and the side-by-side run (dms_jax.eval.side_by_side) on a tiny random model."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import REPO, save_byte_tokenizer

from dms_jax import adapter, weights
from dms_jax.config import DMSConfig, ModelConfig
from dms_jax.eval import side_by_side, tasks
from dms_jax.eval.prompts import user_message
from dms_jax.model import create_model

CFG = ModelConfig(model_type="llama", vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=2048, tie_word_embeddings=True,
                  eos_token_ids=(256,))
TOKENS = 1500  # bytes of the byte-level tokenizer: room for the variable-tracking prompt's solved example


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"base": dir with a random base model and the byte tokenizer, "adapter": a random adapter for it}."""
    root = tmp_path_factory.mktemp("demo")
    base = create_model(CFG, None, seed=0)
    base_dir = weights.export_hf(base, root / "base")
    save_byte_tokenizer(base_dir)
    model = weights.from_hf_state_dict(CFG, weights.to_hf_state_dict(base), DMSConfig(variant="adapter", window=16))
    rng = np.random.default_rng(0)
    for layer in model.layers:  # random decisions: about half the tokens are marked for eviction
        kernel = layer.self_attn.dms_proj_alpha.kernel
        kernel[...] = jnp.asarray(rng.normal(0, 0.05, kernel.shape), jnp.float32)
    path = adapter.save_adapter(model, root / "adapter.safetensors", {"step": 3, "target_cr": 2.0})
    return {"base": base_dir, "adapter": path, "tokenizer": weights.load_tokenizer(base_dir)}


def test_help_is_the_demos_own():
    out = subprocess.run([sys.executable, "-m", "experiments.demo", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: python -m experiments.demo")
    for flag in ("--adapter", "--cases", "--out", "--no-plot", "--retrofit"):
        assert flag in out.stdout
    assert "--cr-final" not in out.stdout and "--trainable" not in out.stdout  # distill's flags


def test_bad_flags_and_a_missing_adapter_are_reported(tmp_path, capsys):
    from experiments import demo

    with pytest.raises(SystemExit):
        demo.main(["--steps", "3"])
    assert "only --retrofit passes flags on to experiments.distill" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--adapter", str(tmp_path / "none.safetensors")])
    assert "--adapter: no adapter file at" in capsys.readouterr().err


def test_follow_up_asks_another_key_after_the_models_answer(tiny):
    tok = tiny["tokenizer"]
    case = tasks.make_cases("multikey", tok, 1, wording="plain", target_tokens=600)[0]
    second = side_by_side.follow_up_case(tok, case, "The code is 12345.")
    text = tok.decode(second.prompt_ids)
    assert text.startswith("User: ")  # the byte tokenizer has no chat template: a plain transcript
    assert user_message(tok, case) in text and "The code is 12345." in text
    assert second.meta["label"] != case.meta["label"] and text.rstrip().endswith("Assistant:")
    assert second.answer == case.meta["values"][list(case.meta["labels"]).index(second.meta["label"])]


def test_document_question_sits_in_the_middle(tiny):
    case = side_by_side.document_question_case(tiny["tokenizer"], TOKENS)
    assert TOKENS - 200 <= case.num_tokens <= TOKENS
    text = tiny["tokenizer"].decode(case.prompt_ids)
    assert 0.3 < text.index(case.meta["fact"]) / len(text) < 0.7
    assert side_by_side.score(case, "It is green.") == 1.0 and side_by_side.score(case, "Blue.") == 0.0


def test_demo_side_by_side_on_a_tiny_model(tiny, tmp_path, capsys):
    from experiments import demo

    out = tmp_path / "demo.json"
    result = demo.main(["--base", str(tiny["base"]), "--adapter", str(tiny["adapter"]), "--tokens", str(TOKENS),
                        "--max-new-tokens", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "original" in printed and "DMS" in printed and "whole-cache compression" in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("compression", "seconds", "accuracy_original", "accuracy_dms", "command", "machine", "date"):
        assert key in saved
    assert saved["command"].startswith("python -m experiments.demo")
    assert out.with_suffix(".png").stat().st_size > 1000
    names = [r["prompt"] for r in saved["rows"]]
    assert names[-2:] == ["two turns, turn 1 (multikey)", "two turns, turn 2 (multikey)"]
    assert len(names) == len(side_by_side.RETRIEVAL) + 3
    for row in saved["rows"]:
        o, d = row["original"], row["dms"]
        assert o["final_live_tokens"] == o["dense_tokens"] and o["compression_ratio"] == 1.0
        assert d["final_live_tokens"] <= d["dense_tokens"]
        if "turn 2" not in row["prompt"]:  # a second turn holds each model's own first answer
            assert d["prompt_tokens"] == o["prompt_tokens"]
    dense = sum(r["dms"]["dense_tokens"] for r in saved["rows"])
    live = sum(r["dms"]["final_live_tokens"] for r in saved["rows"])
    assert saved["compression"] == pytest.approx(dense / live) and saved["compression"] > 1.2


@pytest.mark.slow  # two demo runs; ~40 s quiet
def test_a_low_rank_retrofit_is_compared_with_the_base_model(tiny, tmp_path):
    """A file with low-rank factors changes base weights: the demo's original must be the base model alone, so its
    original answers are those of the adapter-only file (whose original is the base), while the retrofit's change."""
    from dms_jax import lowrank
    from experiments import demo

    model = weights.load_model(tiny["base"], dms=tiny["adapter"])
    lowrank.attach(model, 2)
    rng = np.random.default_rng(1)
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.down_proj):
            proj.lora_a[...] = jnp.asarray(rng.normal(0, 1.0, proj.lora_a[...].shape), jnp.float32)
            proj.lora_b[...] = jnp.asarray(rng.normal(0, 1.0, proj.lora_b[...].shape), jnp.float32)
    path = adapter.save_adapter(model, tmp_path / "lowrank.safetensors", {"step": 3})
    assert adapter.read_adapter(path).has_lowrank and not adapter.read_adapter(tiny["adapter"]).has_lowrank
    runs = {}
    for name, file in (("plain", tiny["adapter"]), ("lowrank", path)):
        runs[name] = demo.main(["--base", str(tiny["base"]), "--adapter", str(file), "--tokens", str(TOKENS),
                                "--max-new-tokens", "4", "--out", str(tmp_path / f"{name}.json"), "--no-plot"])
    answers = {name: [(r["original"]["answer"], r["dms"]["answer"]) for r in run["rows"] if "turn 2" not in
                      r["prompt"]] for name, run in runs.items()}
    assert [o for o, _ in answers["plain"]] == [o for o, _ in answers["lowrank"]]
    assert [d for _, d in answers["plain"]] != [d for _, d in answers["lowrank"]]
