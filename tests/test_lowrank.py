"""Low-rank retrofits (dms_jax.lowrank): factors beside the kernels, folded against a numpy reference, trained by
the distillation loss, shipped in an adapter file, and a tiny retrofit run end to end with --lowrank."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402
from dms_jax import adapter, lowrank, weights  # noqa: E402
from dms_jax.config import DMSConfig, ModelConfig  # noqa: E402
from dms_jax.model import abstract_model, create_model  # noqa: E402
from dms_jax.train import step as train  # noqa: E402

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True,
                  eos_token_ids=(1,))
DMS = DMSConfig(variant="adapter", window=4)
TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(2, 24)).astype(np.int32)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


def logits(model):
    return np.asarray(model(jnp.asarray(TOKENS), dms_mode="off")[0])


def with_random_factors(model, rank=3, seed=1, scale=0.3):
    """``model`` with factors attached and both drawn at random (as if trained: b is no longer zero)."""
    lowrank.attach(model, rank)
    rng = np.random.default_rng(seed)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and hasattr(node, "lora_a"):
            node.lora_a[...] = jnp.asarray(rng.normal(0, scale, node.lora_a[...].shape), jnp.float32)
            node.lora_b[...] = jnp.asarray(rng.normal(0, scale, node.lora_b[...].shape), jnp.float32)
    return model


def numpy_reference(base, model_with_factors):
    """The base's HF weights with B @ A added in numpy (HF layout [out, in]), built into a fresh model."""
    tensors = weights.to_hf_state_dict(base)
    flat = {path: np.asarray(var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model_with_factors))}
    for path, a in flat.items():  # a [in, r], b [r, out]
        if path[-1] == "lora_a":
            module = "model." + ".".join(str(p) for p in path[:-1])
            tensors[module + ".weight"] = tensors[module + ".weight"] + (a @ flat[path[:-1] + ("lora_b",)]).T
    return weights.from_hf_state_dict(CFG, tensors, base.dms_cfg)


@pytest.fixture(scope="module")
def base():
    return create_model(CFG, DMS, seed=0)


def test_attach_adds_zero_started_factors_to_every_projection(base):
    model = weights.from_hf_state_dict(CFG, weights.to_hf_state_dict(base), DMS)
    before = logits(model)
    paths = lowrank.attach(model, 3)
    assert sorted(paths) == sorted(f"layers.{i}.{p}" for i in range(CFG.num_layers) for p in PROJECTIONS)
    attn = model.layers[0].self_attn
    assert not hasattr(attn.dms_proj_alpha, "lora_a")  # the decision adapter trains in full
    assert attn.q_proj.lora_a[...].shape == (32, 3) and attn.q_proj.lora_b[...].shape == (3, 32)
    assert model.layers[1].mlp.down_proj.lora_a[...].shape == (64, 3)
    assert np.all(np.asarray(attn.k_proj.lora_b[...]) == 0)
    bound = 1 / np.sqrt(32)
    a = np.asarray(attn.k_proj.lora_a[...])
    assert np.abs(a).max() <= bound and a.std() > bound / 3
    np.testing.assert_array_equal(logits(model), before)  # b = 0: the retrofit starts at the base model
    lowrank.fold(model)
    np.testing.assert_array_equal(logits(model), before)


@pytest.mark.parametrize("kwargs,message", [
    (dict(rank=0), "lowrank rank must be an integer >= 1, got 0"),
    (dict(rank=17), "lowrank rank must be <= 16 (the smaller side of layers.0.self_attn.k_proj)"),
    (dict(rank=2, targets="q_proj("), "lowrank targets must be a valid regex"),
    (dict(rank=2, targets="no_such_layer"), "match no Linear of the model"),
    (dict(rank=2, init_scale=0.0), "lowrank init_scale must be > 0, got 0.0"),
])
def test_attach_refuses_bad_settings(base, kwargs, message):
    model = create_model(CFG, DMS, seed=0)
    with pytest.raises(ValueError, match=re.escape(message)):
        lowrank.attach(model, **kwargs)
    assert not lowrank.has_factors(nnx.state(model))  # a refused model is left as it was


def test_init_scale_widens_the_first_factor():
    model = create_model(CFG, DMS, seed=0)
    lowrank.attach(model, 3, init_scale=4.0)
    a = np.asarray(model.layers[0].self_attn.k_proj.lora_a[...])
    assert np.abs(a).max() <= 4 / np.sqrt(32) and np.abs(a).max() > 2 / np.sqrt(32)
    assert np.all(np.asarray(model.layers[0].self_attn.k_proj.lora_b[...]) == 0)


def test_attach_twice_is_refused_and_targets_select_layers():
    model = create_model(CFG, DMS, seed=0)
    assert sorted(lowrank.attach(model, 2, targets=r"layers\.1\..*(q|v)_proj$")) == [
        "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"]
    with pytest.raises(ValueError, match="already has low-rank factors"):
        lowrank.attach(model, 2)


def test_fold_states_and_fold_match_a_numpy_reference(base):
    model = with_random_factors(weights.from_hf_state_dict(CFG, weights.to_hf_state_dict(base), DMS))
    expected = logits(numpy_reference(base, model))
    assert np.abs(expected - logits(base)).max() > 0.1  # the factors change the model visibly
    # The train step's way: fold the frozen state, the factors stay in the trainable one.
    graphdef, params, frozen = nnx.split(model, train.trainable_filter("adapter"), ...)
    plain, folded = lowrank.fold_states(params, frozen)
    assert not lowrank.has_factors(plain) and lowrank.has_factors(params)
    merged = nnx.merge(nnx.split(abstract_model(CFG, DMS))[0], plain, folded)
    np.testing.assert_allclose(logits(merged), expected, atol=2e-5, rtol=1e-5)
    # The model's way: in place, the factors removed.
    lowrank.fold(model)
    assert not lowrank.has_factors(nnx.state(model))
    np.testing.assert_allclose(logits(model), expected, atol=2e-5, rtol=1e-5)


def test_the_distillation_gradient_reaches_the_factors(base):
    """d loss / d lora_b from jax.grad against a central finite difference, for one element of a projection whose
    a is random and b zero; the frozen kernels are not trainable parameters."""
    model = weights.from_hf_state_dict(CFG, weights.to_hf_state_dict(base), DMS)
    lowrank.attach(model, 2)
    graphdef, params, frozen, teacher = train.split_model(model, train.DistillConfig(trainable="adapter",
                                                                                      lowrank=2))
    names = {".".join(str(p) for p in path) for path, _ in nnx.to_flat_state(params)}
    assert not any(n.endswith("kernel") and "dms_proj_alpha" not in n for n in names)
    toks, valid = jnp.asarray(TOKENS), jnp.ones(TOKENS.shape, bool)

    def loss(p):
        return train.distill_loss(graphdef, p, frozen, teacher, toks, valid, jax.random.key(3), 0.5, False)[0]

    grads = jax.grad(loss)(params)
    g = float(grads["layers"][0]["self_attn"]["v_proj"]["lora_b"].get_value()[1, 5])
    assert abs(g) > 1e-6

    def shifted(eps):
        p = jax.tree.map(lambda x: x, params)
        var = p["layers"][0]["self_attn"]["v_proj"]["lora_b"]
        var.set_value(var.get_value().at[1, 5].add(eps))
        return float(loss(p))

    eps = 1e-3
    assert g == pytest.approx((shifted(eps) - shifted(-eps)) / (2 * eps), rel=0.05, abs=1e-5)


def test_adapter_file_ships_the_factors_and_loads_as_a_plain_model(base, tmp_path):
    model = with_random_factors(weights.from_hf_state_dict(CFG, weights.to_hf_state_dict(base), DMS), scale=0.2)
    reference = numpy_reference(base, model)
    path = adapter.save_adapter(model, tmp_path / "a.safetensors", {"step": 3})
    file = adapter.read_adapter(path)
    factors = {k: v for k, v in file.tensors.items() if lowrank.is_hf_factor(k)}
    assert len(factors) == 2 * len(PROJECTIONS) * CFG.num_layers
    assert all(v.dtype == np.float16 for v in factors.values())
    assert factors["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (3, 64)  # [r, in]
    assert factors["model.layers.0.mlp.down_proj.lora_B.weight"].shape == (32, 3)  # [out, r]
    base_dir = weights.export_hf(base, tmp_path / "base")
    loaded = weights.load_model(base_dir, dms=path)
    assert not lowrank.has_factors(nnx.state(loaded))
    # float16 factors: each product element is off by ~1e-3 of its size
    np.testing.assert_allclose(logits(loaded), logits(reference), atol=2e-2)
    assert np.abs(logits(loaded) - logits(base)).max() > 0.1


def test_bad_factors_in_a_file_are_refused_naming_the_module(base, tmp_path):
    tensors = weights.to_hf_state_dict(base)
    kept = {k: v.copy() for k, v in tensors.items()}
    a, b = np.ones((2, 32), np.float32), np.ones((32, 2), np.float32)
    q = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=f"{q} has only lora_A"):
        lowrank.add_hf_deltas(tensors, {f"{q}.lora_A.weight": a})
    with pytest.raises(ValueError, match=r"low-rank factors of model.layers.0.self_attn.k_proj have shapes.*\[16, r\]"):
        lowrank.add_hf_deltas(tensors, {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b,
                                        "model.layers.0.self_attn.k_proj.lora_A.weight": a,
                                        "model.layers.0.self_attn.k_proj.lora_B.weight": b})
    with pytest.raises(ValueError, match="has no model.layers.9.self_attn.q_proj.weight"):
        lowrank.add_hf_deltas(tensors, {"model.layers.9.self_attn.q_proj.lora_A.weight": a,
                                        "model.layers.9.self_attn.q_proj.lora_B.weight": b})
    for k, v in kept.items():  # nothing was changed by a refused file
        np.testing.assert_array_equal(tensors[k], v)


# ----------------------------------------------------------------------------------------------- a retrofit run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return th.tiny_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


def test_lowrank_retrofit_run_milestone_export_and_resume(assets, tmp_path):
    """--trainable adapter --lowrank 2: the base kernels stay frozen, the factors train; the run's export, its
    milestone (through evaluate's loader) and the adapter file exported from the milestone are one model; a
    resume with another rank is refused."""
    from dms_jax.eval import sweep

    run_dir = tmp_path / "run"
    args = th.tiny_cli_args(assets, run_dir, "--variant", "adapter", "--trainable", "adapter", "--lowrank", "2",
                            "--lr", "1e-2", "--cr-final-step", "4", steps=4)  # the last milestone: the last step
    args.remove("--no-export")
    th.assert_ok(th.run_cli(args, th.cli_env(assets), tmp_path / "log.txt"))
    res = json.loads((run_dir / "results.json").read_text())
    assert res["lowrank"] == 2 and res["trainable"] == "adapter"

    original = weights.load_model(str(assets["model"]), dms=DMS)
    exported = weights.load_model(run_dir / "export")
    tokens = jnp.asarray(TOKENS % 200)
    out_export = np.asarray(exported(tokens, dms_mode="off")[0])
    moved = np.abs(out_export - np.asarray(original(tokens, dms_mode="off")[0])).max()
    assert moved > 1e-3  # the factors trained (the adapter alone cannot move dms_mode="off" logits)

    *_, (_, info, load) = sweep.milestone_loaders(run_dir, str(assets["model"]))
    assert info["step"] == 4
    np.testing.assert_allclose(np.asarray(load()(tokens, dms_mode="off")[0]), out_export, atol=1e-5)

    file = adapter.export_adapter(run_dir, tmp_path / "lowrank.safetensors", base_model=str(assets["model"]))
    shipped = weights.load_model(str(assets["model"]), dms=file)
    np.testing.assert_allclose(np.asarray(shipped(tokens, dms_mode="off")[0]), out_export, atol=1e-2)

    again = th.tiny_cli_args(assets, run_dir, "--variant", "adapter", "--trainable", "adapter", "--lowrank", "3",
                             "--resume", steps=6)
    proc = th.run_cli(again, th.cli_env(assets), tmp_path / "log2.txt")
    assert proc.returncode == 2 and "another architecture" in Path(tmp_path / "log2.txt").read_text()
    wrong = th.tiny_cli_args(assets, tmp_path / "run2", "--variant", "adapter", "--trainable", "adapter",
                             "--lowrank", "2", "--lowrank-targets", "no_such_layer")
    proc = th.run_cli(wrong, th.cli_env(assets), tmp_path / "log3.txt")
    assert proc.returncode == 2 and "--lowrank-targets: lowrank targets 'no_such_layer' match no Linear" in \
        Path(tmp_path / "log3.txt").read_text()


def test_lowrank_needs_a_frozen_base():
    with pytest.raises(ValueError, match="lowrank > 0 .* needs trainable='adapter'"):
        train.DistillConfig(trainable="all", lowrank=4)
    with pytest.raises(ValueError, match="lowrank must be >= 0"):
        train.DistillConfig(trainable="adapter", lowrank=-1)
