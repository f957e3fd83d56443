"""Adapter files (dms_jax.adapter): round trip, base-model identity, errors, export from a distill checkpoint."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dms_jax import adapter, weights
from dms_jax.config import DMSConfig, ModelConfig
from dms_jax.model import create_model
from dms_jax.train import step as train

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True,
                  eos_token_ids=(1,))
DMS = DMSConfig(variant="adapter", window=4)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 24)).astype(np.int32)


def retrofit(base, seed: int = 1):
    """The base model with a DMS adapter of random (as if trained) weights: every logit differs from -offset."""
    model = weights.from_hf_state_dict(base.cfg, weights.to_hf_state_dict(base), DMS)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        attn = layer.self_attn
        attn.dms_proj_alpha.kernel[...] = jnp.asarray(rng.normal(0, 0.05, attn.dms_proj_alpha.kernel.shape),
                                                      jnp.float32)
        attn.dms_proj_alpha_norm.weight[...] = jnp.asarray(1 + 0.1 * rng.normal(size=CFG.hidden_size), jnp.float32)
    return model


@pytest.fixture(scope="module")
def base():
    return create_model(CFG, None, seed=0)


@pytest.fixture(scope="module")
def base_dir(base, tmp_path_factory):
    return weights.export_hf(base, tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def saved(base, tmp_path_factory):
    """(retrofitted model, its adapter file, its decision logits as numpy)."""
    model = retrofit(base)
    path = adapter.save_adapter(model, tmp_path_factory.mktemp("adapter") / "a.safetensors",
                                {"command": "python -m experiments.distill --trainable adapter", "step": 7})
    return model, path, adapter.decision_logits(model, TOKENS)


def test_file_holds_only_the_adapter_and_its_metadata(saved):
    from safetensors import safe_open

    model, path, _ = saved
    with safe_open(str(path), framework="numpy") as f:
        names, meta = set(f.keys()), f.metadata()
    assert names == set(adapter.expected_adapter_shapes(CFG))  # 2 tensors per layer, nothing of the base
    assert path.stat().st_size < 4 * (CFG.num_layers * (CFG.num_kv_heads + 1) * CFG.hidden_size) + 4096
    assert json.loads(meta["dms_config"]) == dataclasses.asdict(DMS)
    assert json.loads(meta["model_config"]) == adapter.model_config_dict(CFG)
    assert json.loads(meta["provenance"])["step"] == 7
    assert meta["base_fingerprint"] == adapter.base_fingerprint(model)


@pytest.mark.parametrize("how", ["model", "path", "load_model"])
def test_round_trip_gives_the_saved_decision_logits(saved, base, base_dir, how):
    model, path, logits = saved
    assert np.abs(logits + DMS.alpha_offset).max() > 1.0  # the adapter is not the zero initialisation
    if how == "model":
        loaded = adapter.load_adapter(base, path)
    elif how == "path":
        loaded = adapter.load_adapter(base_dir, path)
    else:
        loaded = weights.load_model(base_dir, dms=path)
    assert loaded.dms_cfg == DMS
    np.testing.assert_array_equal(adapter.decision_logits(loaded, TOKENS), logits)
    hard = lambda m: np.asarray(m(jnp.asarray(TOKENS), dms_mode="hard")[0])  # noqa: E731
    np.testing.assert_allclose(hard(loaded), hard(model), rtol=1e-6, atol=1e-6)
    assert base.dms_cfg is None  # the given base model is not changed


def test_fingerprint_is_the_same_in_bfloat16_and_differs_for_another_base(base):
    bf16 = weights.from_hf_state_dict(CFG, weights.to_hf_state_dict(base), param_dtype=jnp.bfloat16)
    assert adapter.base_fingerprint(bf16) == adapter.base_fingerprint(base)
    assert adapter.base_fingerprint(weights.to_hf_state_dict(base)) == adapter.base_fingerprint(base)
    assert adapter.base_fingerprint(create_model(CFG, None, seed=5)) != adapter.base_fingerprint(base)


def test_another_base_of_the_same_architecture_is_refused(saved):
    _, path, _ = saved
    with pytest.raises(ValueError, match="another base model of the same architecture.*fingerprint expected"):
        adapter.load_adapter(create_model(CFG, None, seed=5), path)


def test_another_architecture_is_refused_naming_the_fields(saved):
    _, path, _ = saved
    other = create_model(dataclasses.replace(CFG, hidden_size=48, num_kv_heads=4), None, seed=0)
    with pytest.raises(ValueError, match=r"hidden_size: adapter expects 32, the given model has 48.*num_kv_heads"):
        adapter.load_adapter(other, path)


def test_a_shape_mismatch_names_the_tensor(saved, base, tmp_path):
    _, path, _ = saved
    good = adapter.read_adapter(path)
    tensors = dict(good.tensors)
    name = "model.layers.1.self_attn.dms_proj_alpha.weight"
    tensors[name] = np.zeros((3, CFG.hidden_size), np.float32)
    bad = adapter.write_adapter_file(tmp_path / "bad.safetensors", tensors, DMS, good.model_config,
                                     good.base_fingerprint, {})
    with pytest.raises(ValueError, match=rf"{name}: expected shape \(2, 32\), found \(3, 32\)"):
        adapter.load_adapter(base, bad)
    del tensors[name]
    missing = adapter.write_adapter_file(tmp_path / "missing.safetensors", tensors, DMS, good.model_config,
                                         good.base_fingerprint, {})
    with pytest.raises(ValueError, match=rf"{name}: missing"):
        adapter.load_adapter(base, missing)


def test_a_missing_file_and_files_that_are_not_adapters(base, base_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter: no adapter file at .*nothing.safetensors"):
        adapter.load_adapter(base, tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="is not a DMS adapter file: metadata format is 'pt'"):
        weights.load_model(base_dir, dms=base_dir / "model.safetensors")  # a whole model
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not a safetensors file"):
        adapter.read_adapter(tmp_path / "notes.txt")


def test_save_refuses_a_model_without_an_adapter(base):
    with pytest.raises(ValueError, match="variant 'adapter', got variant None"):
        adapter.save_adapter(base, "unused.safetensors")
    with pytest.raises(ValueError, match="got variant 'neuron'"):
        adapter.save_adapter(create_model(CFG, DMSConfig(), seed=0), "unused.safetensors")


def _milestone(model, run_dir, step, trainable="adapter"):
    """A milestone checkpoint as experiments.distill writes it (RetrofitCheckpoints, the same meta)."""
    from dms_jax.checkpoint import RetrofitCheckpoints

    _, params, _ = nnx.split(model, train.trainable_filter(trainable), ...)
    arch = {"model_config": adapter.model_config_dict(model.cfg), "dms_config": dataclasses.asdict(DMS),
            "trainable": trainable, "neuron_init": "zero"}
    meta = {"arch": arch, "step": step, "target_cr": 2.0,
            "command": "python -m experiments.distill --trainable adapter --results docs/results/x.json"}
    ckpt = RetrofitCheckpoints(run_dir / "checkpoints", async_save=False)
    ckpt.save_milestone(step, params, meta)
    ckpt.wait()
    ckpt.close()


def test_export_from_a_distill_milestone(saved, base_dir, tmp_path):
    model, _, logits = saved
    _milestone(model, tmp_path / "run", 40)
    out = adapter.export_adapter(tmp_path / "run", tmp_path / "exported.safetensors", base_model=base_dir,
                                 provenance={"note": "test"})
    file = adapter.read_adapter(out)
    assert file.provenance["step"] == 40 and file.provenance["target_cr"] == 2.0
    assert file.provenance["results_file"] == "docs/results/x.json" and file.provenance["note"] == "test"
    assert file.provenance["checkpoint"].endswith("checkpoints/milestones/40")
    np.testing.assert_array_equal(adapter.decision_logits(weights.load_model(base_dir, dms=out), TOKENS), logits)
    same = adapter.checkpoint_step_dir(tmp_path / "run" / "checkpoints" / "milestones" / "40")
    assert same == adapter.checkpoint_step_dir(tmp_path / "run", step=40)
    with pytest.raises(FileNotFoundError, match=r"no finished checkpoint of step 41 \(steps found: \[40\]\)"):
        adapter.checkpoint_step_dir(tmp_path / "run", step=41)


def test_export_refuses_a_run_that_trained_the_base_too(saved, base_dir, tmp_path):
    model, _, _ = saved
    _milestone(model, tmp_path / "run", 40, trainable="all")
    with pytest.raises(ValueError, match="not an adapter-only DMS retrofit.*trainable 'all'"):
        adapter.export_adapter(tmp_path / "run", tmp_path / "x.safetensors", base_model=base_dir)


def test_an_adapter_file_is_an_evaluation_point(saved, base_dir, tmp_path):
    """experiments.evaluate --dms-model FILE.safetensors: the point carries the file's step, and its loader puts
    the adapter on the base model."""
    from dms_jax.eval import sweep

    model, path, logits = saved
    cid, label, info, loader = sweep.adapter_checkpoint(path, base_dir)
    assert (label, info["step"], info["target_cr"]) == ("dms (a)", 7, None)
    np.testing.assert_allclose(adapter.decision_logits(loader(), TOKENS), logits, atol=1e-5)
    not_adapter = tmp_path / "b.safetensors"
    not_adapter.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit, match="--dms-model"):
        sweep.adapter_checkpoint(not_adapter, base_dir)
