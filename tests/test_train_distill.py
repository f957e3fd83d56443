"""The retrofit (dms_jax.train.distill) end to end on a tiny model, through `python -m experiments.distill` and as a
library call (a resumed run continues the same metrics), its refusal of invalid settings before any compute,
and NVIDIA's DMS checkpoint format (nvidia/Qwen3-8B-DMS-8x style: Qwen3 + dms_* config fields + adapter weights
`model.layers.N.self_attn.dms_proj_alpha{,_norm}.weight`) read by weights.load_model and written by export_hf.

Tolerances: decisions from the loaded adapter against numpy / transformers hidden states: identical wherever the
reference logit is more than 1e-3 away from 0 (float32 rounding cannot flip those); logits against transformers:
relative 1e-5; an export reloaded: bit-identical (float32 weights copied exactly).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402
from dms_jax import weights  # noqa: E402
from dms_jax.config import DMSConfig  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return th.tiny_assets(tmp_path_factory.getbasetemp() / "tiny_assets")


# ----------------------------------------------------------------------------------------------- invalid settings

INVALID = [
    (["--cr-final", "0.5"], "cr_final"),
    (["--cr-initial", "0"], "cr_initial"),
    (["--window", "0"], "window must be an integer >= 1"),
    (["--window", "-3"], "window must be an integer >= 1"),
    (["--tau", "0"], "tau must be > 0"),
    (["--tau", "-0.1"], "tau must be > 0"),
    (["--variant", "merge"], "variant must be 'neuron' or 'adapter'"),
    (["--alpha-per", "token"], "alpha_per must be 'head' or 'layer'"),
    (["--mesh", "3,1,1"], "available devices"),  # 3 divides neither 1 nor 8 (XLA_FLAGS) devices
    (["--mesh", "1,1"], "--mesh must be three integers"),
    (["--mesh", "1,0,1"], "fsdp must be >= 1"),
    (["--batch-size", "3", "--grad-accum", "2"], "batch_size (3) must be a multiple of grad_accum (2)"),
    (["--trainable", "layers.(0"], "trainable must be 'all', 'adapter' or a valid regex"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--lr", "0"], "lr must be > 0"),
    (["--cr-loss-weight", "-1"], "cr_loss_weight must be > 0"),
    (["--seq-len", "1"], "seq_len must be >= 2"),
    (["--checkpoint-every", "0"], "--checkpoint-every is out of range"),
    (["--num-processes", "2"], "--num-processes > 1 needs --coordinator"),
    (["--num-processes", "2", "--process-id", "2", "--coordinator", "127.0.0.1:1"], "--process-id must be in [0, 2)"),
    (["--compute-dtype", "float16"], "--compute-dtype: invalid choice"),
    (["--answer-weight", "0.5"], "--answer-weight must be >= 1"),
    (["--answer-weight", "4"], "it needs --synthetic-kind longrange"),
]


@pytest.mark.parametrize("extra,message", INVALID, ids=[" ".join(e) for e, _ in INVALID])
def test_invalid_settings_stop_before_any_compute(extra, message, assets, tmp_path, capsys, monkeypatch):
    from experiments import distill

    def refuse(*a, **k):
        raise AssertionError("the model was loaded: the check must come before any compute")

    monkeypatch.setattr(weights, "load_model", refuse)
    monkeypatch.setattr(weights, "load_tokenizer", refuse)
    argv = th.tiny_cli_args(assets, tmp_path / "run", *extra)
    with pytest.raises(SystemExit) as exc:
        distill.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "run").exists()  # nothing written


def test_sequence_longer_than_the_context_is_refused(assets, tmp_path, capsys):
    from experiments import distill

    with pytest.raises(SystemExit):
        distill.main(th.tiny_cli_args(assets, tmp_path / "run", "--seq-len", "1024"))
    assert "--seq-len 1024 exceeds the model's context of 512" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- end to end


def test_cli_adapter_run_writes_metrics_results_plot_and_a_loadable_export(assets, tmp_path):
    """The adapter variant, alpha per layer, tau 0.2, 2 micro-batches, held-out evaluation and export."""
    run_dir, results = tmp_path / "run", tmp_path / "docs" / "retrofit.json"
    args = th.tiny_cli_args(assets, run_dir, "--variant", "adapter", "--alpha-per", "layer", "--tau", "0.2",
                            "--grad-accum", "2", "--eval-seqs", "2", "--eval-seq-len", "64", "--results", str(results),
                            steps=5)
    args.remove("--no-export")
    th.assert_ok(th.run_cli(args, th.cli_env(assets), tmp_path / "log.txt"))

    rows = th.read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert {"loss", "kl", "loss_cr", "target_cr", "eviction_fraction", "grad_norm", "tokens_per_s"} <= set(r)
        assert np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["kl"] + r["loss_cr"], rel=1e-5)
    assert rows[0]["target_cr"] == 1.0 and rows[-1]["target_cr"] == 3.0
    assert rows[0]["kl"] < 1e-2  # zero-initialised adapter: only noise-flipped tokens differ from the teacher
    assert (run_dir / "training.png").stat().st_size > 1000 and results.with_suffix(".png").exists()

    res = json.loads(results.read_text())
    assert res == json.loads((run_dir / "results.json").read_text())
    for key in ("command", "date", "machine", "model", "variant", "window", "steps", "tokens_per_step",
                "wall_seconds", "compression", "compression_outside_window", "kl_heldout", "ppl_heldout", "ppl_vanilla"):
        assert key in res, key
    assert res["variant"] == "adapter" and res["window"] == 4 and res["tokens_per_step"] == 2 * 16
    assert res["command"].startswith("python -m experiments.distill ") and "--variant adapter" in res["command"]
    assert res["compression"] >= 1 and res["compression_outside_window"] >= 1 and res["kl_heldout"] >= 0 and res["eval_seqs"] == 2

    # The export: NVIDIA's field names, our DMS settings, the adapter weights; loads back to the same DMS setup.
    cfg = json.loads((run_dir / "export" / "config.json").read_text())
    assert cfg["dms_separate_alpha"] is True and cfg["dms_alpha_per"] == "layer" and cfg["dms_window_size"] == 4
    assert cfg["dms_tau"] == 0.2 and cfg["dms_alpha_scale"] == 100.0 and cfg["dms_initial_alpha_offset"] == 5.0
    assert cfg["dms_cr"] == round(res["compression"], 3)
    assert 0 < cfg["dms_paged_attention_block_size"] < cfg["dms_window_size"]  # NVIDIA's config asserts this
    tensors = th.read_export(run_dir / "export")
    assert tensors["model.layers.1.self_attn.dms_proj_alpha.weight"].shape == (2, 32)
    assert np.abs(tensors["model.layers.1.self_attn.dms_proj_alpha.weight"]).max() > 0  # it trained
    model = weights.load_model(run_dir / "export")
    assert model.dms_cfg == DMSConfig(variant="adapter", window=4, tau=0.2, alpha_per="layer")
    assert (run_dir / "export" / "tokenizer.json").exists()


# ----------------------------------------------------------------------------------------------- the library


def test_settings_from_args_carry_the_flags(assets, tmp_path):
    from dms_jax.train import distill as retrofit
    from experiments import distill

    args, _ = distill.parse_args(th.tiny_cli_args(assets, tmp_path / "run", "--variant", "adapter", "--resume",
                                                  "--passkey-cases", "3", "--passkey-lengths", "64,128"))
    s = retrofit.settings_from_args(args, "cmd")
    assert s.method == "dms" and s.dmc_cfg is None and s.dms_cfg == DMSConfig(variant="adapter", window=4)
    assert s.train_cfg.steps == 6 and s.train_cfg.seq_len == 16 and s.train_cfg.compute_dtype == "float32"
    assert s.run_dir == tmp_path / "run" and s.resume and s.command == "cmd" and s.mesh_sizes == (-1, 1, 1)
    assert s.passkey_cases == 3 and s.passkey_lengths == (64, 128) and not s.export and not s.progress
    assert s.checkpoint_every == 2 and s.keep_checkpoints == 2 and s.async_checkpoint and s.eval_seqs == 0
    with pytest.raises(retrofit.SettingsError, match="needs a passkey function"):
        retrofit.run_retrofit(s)  # before anything is loaded or written
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # three tiny in-process runs; ~2 min quiet
def test_library_run_then_resume_continues_the_same_metrics(assets, tmp_path):
    """run_retrofit without the CLI: 3 steps, then a resume to 5, against 5 uninterrupted steps (the same schedule:
    cr_final_step is fixed); the passkey function receives the trained and the original model."""
    from dms_jax.train import distill as retrofit
    from dms_jax.train.step import DistillConfig

    calls = []

    def passkey(model, tokenizer, lengths, n, *, dms, dmc=False, cache_ratios=None):
        calls.append((type(model).__name__, list(lengths), n, dms, dmc))
        return {str(length): 0.5 for length in lengths}

    def settings(run_dir, steps, resume=False):
        cfg = DistillConfig(steps=steps, batch_size=2, seq_len=16, lr=1e-3, cr_final=3.0, cr_final_step=3,
                            compute_dtype="float32", remat=False)
        return retrofit.RetrofitSettings(
            train_cfg=cfg, dms_cfg=DMSConfig(variant="adapter", window=4), dmc_cfg=None, mesh_sizes=(1, 1, 1),
            run_dir=run_dir, command="test", model=str(assets["model"]), data=str(assets["data"]), resume=resume,
            checkpoint_every=2, eval_seqs=0, passkey_cases=2, passkey_lengths=(32,), export=False, progress=False)

    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    ref = retrofit.run_retrofit(settings(reference, 5), passkey=passkey)
    retrofit.run_retrofit(settings(run_dir, 3), passkey=passkey)
    res = retrofit.run_retrofit(settings(run_dir, 5, resume=True), passkey=passkey)
    rows, ref_rows = th.read_metrics(run_dir), th.read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, 6))
    for key in ("loss", "kl", "loss_cr", "eviction_fraction", "grad_norm", "target_cr"):
        assert [r[key] for r in rows] == [r[key] for r in ref_rows], key
    assert [(s["from_step"], s["resumed"]) for s in res["starts"]] == [(0, False), (3, True)]
    assert res["passkey_accuracy"] == res["passkey_accuracy_vanilla"] == {"32": 0.5} and res["passkey_cases"] == 2
    assert res == json.loads((run_dir / "results.json").read_text()) and ref["steps"] == res["steps"] == 5
    assert calls[-2:] == [("CausalLM", [32], 2, True, False), ("CausalLM", [32], 2, False, False)]
    assert th.committed_steps(run_dir / "checkpoints" / "latest") == [4, 5]


@pytest.mark.slow  # two tiny in-process runs and an export; ~2 min quiet
def test_warm_start_from_a_milestone_adapter_continues_the_run(assets, tmp_path):
    """A run whose checkpoints are lost goes on from its milestone adapter file in a new run directory: the first
    step after the milestone sees the same weights and batch as the uninterrupted run (same loss, KL and gradient
    norm); Adam's state restarts, which the start record says."""
    from dms_jax import adapter
    from dms_jax.train import distill as retrofit
    from dms_jax.train.step import DistillConfig

    def settings(run_dir, warm_start=None):
        cfg = DistillConfig(steps=5, batch_size=2, seq_len=16, lr=1e-3, cr_final=3.0, cr_final_step=3,
                            trainable="adapter", compute_dtype="float32", remat=False)
        return retrofit.RetrofitSettings(
            train_cfg=cfg, dms_cfg=DMSConfig(variant="adapter", window=4), dmc_cfg=None, mesh_sizes=(1, 1, 1),
            run_dir=run_dir, command="test", model=str(assets["model"]), data=str(assets["data"]),
            warm_start=warm_start, checkpoint_every=2, eval_seqs=0, export=False, progress=False)

    reference = tmp_path / "reference"
    retrofit.run_retrofit(settings(reference))
    milestone = th.committed_steps(reference / "checkpoints" / "milestones")[0]
    assert 0 < milestone < 4
    file = adapter.export_adapter(reference, tmp_path / "milestone.safetensors", step=milestone,
                                  base_model=assets["model"])
    res = retrofit.run_retrofit(settings(tmp_path / "warm", warm_start=str(file)))
    rows, ref_rows = th.read_metrics(tmp_path / "warm"), th.read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(milestone + 1, 6))
    first, ref_first = rows[0], ref_rows[milestone]
    assert first["step"] == ref_first["step"]
    for key in ("loss", "kl", "grad_norm", "target_cr"):
        np.testing.assert_allclose(first[key], ref_first[key], rtol=1e-5, err_msg=key)
    assert [(s["from_step"], s["resumed"], s["optimizer_state"]) for s in res["starts"]] == [
        (milestone, False, "fresh")]
    with pytest.raises(retrofit.SettingsError, match="--warm-start"):
        retrofit.run_retrofit(dataclasses.replace(settings(tmp_path / "bad", warm_start=str(file)), resume=True))


def test_init_adapter_starts_a_fresh_run_from_the_file(assets, tmp_path):
    """--init-adapter: step 0 of this run's schedule, with the file's adapter (not the zero one): the first step's
    eviction fraction is the file's hard decisions', where a zero adapter evicts nothing; a file made with
    another DMSConfig is refused before any compute."""
    from dms_jax.train import distill as retrofit
    from dms_jax.train.step import DistillConfig

    base = weights.load_model(str(assets["model"]), dms=DMSConfig(variant="adapter", window=4))
    for layer in base.layers:  # an adapter that marks about half of the tokens
        w = layer.self_attn.dms_proj_alpha.kernel
        w[...] = jax.random.normal(jax.random.key(1), w[...].shape) * 0.5
    from dms_jax import adapter

    file = adapter.save_adapter(base, tmp_path / "init.safetensors", {"step": 0})

    def settings(run_dir, init=None, window=4):
        cfg = DistillConfig(steps=1, batch_size=2, seq_len=16, lr=1e-3, cr_final=3.0, cr_final_step=1,
                            trainable="adapter", compute_dtype="float32", remat=False)
        return retrofit.RetrofitSettings(
            train_cfg=cfg, dms_cfg=DMSConfig(variant="adapter", window=window), dmc_cfg=None, mesh_sizes=(1, 1, 1),
            run_dir=run_dir, command="test", model=str(assets["model"]), data=str(assets["data"]),
            init_adapter=init, checkpoint_every=1, eval_seqs=0, export=False, progress=False)

    res = retrofit.run_retrofit(settings(tmp_path / "init", str(file)))
    retrofit.run_retrofit(settings(tmp_path / "zero"))
    first, first_zero = th.read_metrics(tmp_path / "init")[0], th.read_metrics(tmp_path / "zero")[0]
    assert first["step"] == first_zero["step"] == 1
    # Logistic noise takes a zero adapter's -5 logits over 0 about 0.7% of the time.
    assert first_zero["eviction_fraction"] < 0.03 and first["eviction_fraction"] > 0.1
    assert res["starts"][0]["init_adapter"] == str(file) and res["starts"][0]["from_step"] == 0
    with pytest.raises(retrofit.SettingsError, match="--init-adapter"):
        retrofit.run_retrofit(settings(tmp_path / "bad", str(file), window=6))


# ----------------------------------------------------------------------------------------------- NVIDIA format

QWEN3 = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-6,
             tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False)
# The DMS fields of NVIDIA's Qwen3ConfigDMS (Model-Optimizer experimental/dms), at a tiny window (NVIDIA's config
# asserts dms_window_size > dms_paged_attention_block_size).
DMS_FIELDS = dict(dms_alpha_scale=100.0, dms_initial_alpha_offset=5.0, dms_window_size=8,
                  dms_paged_attention_block_size=4, dms_cr=8, dms_disable_eviction=False, dms_alpha_per="head",
                  dms_tau=0.1, dms_manual_inference_mode=False, dms_chunked_prefill=None,
                  dms_preallocate_for_tokens=4096)
T = 24


@pytest.fixture(scope="module")
def qwen3_hf():
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**QWEN3)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_((1.0 if "embed" in name else 0.2) * torch.randn(p.shape, generator=g))
    return model


def write_nvidia_dms_dir(hf_model, directory: Path, separate_alpha: bool, seed: int = 0) -> dict:
    """save_pretrained, then the DMS config fields and (adapter variant) the adapter weights, as NVIDIA ships them."""
    from safetensors.numpy import load_file, save_file

    hf_model.save_pretrained(directory)
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(DMS_FIELDS, dms_separate_alpha=separate_alpha, architectures=["Qwen3ForCausalLMDMS"],
               auto_map={"AutoConfig": "configuration_qwen3_dms.Qwen3ConfigDMS",
                         "AutoModelForCausalLM": "modeling_qwen3_dms.Qwen3ForCausalLMDMS"})
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    adapter = {}
    if separate_alpha:
        rng = np.random.default_rng(seed)
        (file,) = directory.glob("*.safetensors")
        tensors = load_file(str(file))
        for i in range(QWEN3["num_hidden_layers"]):
            pre = f"model.layers.{i}.self_attn."
            # std 0.02: 100 * <normed x, w> ~ N(0, 11^2), so with the -5 offset about a third of the tokens evict.
            adapter[pre + "dms_proj_alpha.weight"] = (0.02 * rng.standard_normal((2, 32))).astype(np.float32)
            adapter[pre + "dms_proj_alpha_norm.weight"] = (1 + 0.1 * rng.standard_normal(32)).astype(np.float32)
        save_file({**tensors, **adapter}, str(file), metadata={"format": "pt"})
    return adapter


def np_rms(x, w, eps=1e-6):
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def np_owner_decisions(logits):
    """[B, T, Hkv] logits computed at each position -> [B, Hkv, T] hard decisions for each token (one-token shift)
    and the logits they came from (the last token, not decided yet, is kept)."""
    owner = np.concatenate([logits[:, 1:], np.full_like(logits[:, :1], -np.inf)], axis=1).transpose(0, 2, 1)
    return owner > 0, owner


def assert_decisions_equal(ours, want, owner_logits, margin=1e-3):
    sure = np.abs(owner_logits) > margin
    assert sure.mean() > 0.9
    np.testing.assert_array_equal(np.asarray(ours)[sure] > 0.5, want[sure])
    assert 0.05 < want.mean() < 0.95  # a mix of kept and evicted tokens: the check has teeth


def tokens_(seed=0, b=2):
    return np.random.default_rng(seed).integers(0, QWEN3["vocab_size"], size=(b, T), dtype=np.int32)


def hard_forward(model, tokens):
    from flax import nnx

    graphdef, state = nnx.split(model)
    logits, aux = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t, dms_mode="hard"))(state, jnp.asarray(tokens))
    return np.asarray(logits), np.asarray(aux["decisions"])


def test_nvidia_adapter_checkpoint_loads_with_its_fields_and_weights(qwen3_hf, tmp_path):
    path = tmp_path / "qwen3_dms_adapter"
    adapter = write_nvidia_dms_dir(qwen3_hf, path, separate_alpha=True)
    cfg, dms_cfg = weights.load_config(path)
    assert cfg.model_type == "qwen3" and cfg.qk_norm and cfg.head_dim == 16
    assert dms_cfg == DMSConfig(variant="adapter", window=8, alpha_scale=100.0, alpha_offset=5.0, tau=0.1,
                                alpha_per="head")
    model = weights.load_model(path)
    assert model.dms_cfg == dms_cfg
    for i, layer in enumerate(model.layers):
        pre = f"model.layers.{i}.self_attn."
        np.testing.assert_array_equal(np.asarray(layer.self_attn.dms_proj_alpha.kernel[...]),
                                      adapter[pre + "dms_proj_alpha.weight"].T)
        np.testing.assert_array_equal(np.asarray(layer.self_attn.dms_proj_alpha_norm.weight[...]),
                                      adapter[pre + "dms_proj_alpha_norm.weight"])

    # Layer 0's decisions, in numpy from the checkpoint's own tensors: the adapter reads the residual stream
    # before the input norm, which at layer 0 is the token embedding.
    tokens = tokens_()
    _, decisions = hard_forward(model, tokens)
    emb = qwen3_hf.model.embed_tokens.weight.detach().numpy()[tokens]
    pre = "model.layers.0.self_attn."
    proj = np_rms(emb, adapter[pre + "dms_proj_alpha_norm.weight"]) @ adapter[pre + "dms_proj_alpha.weight"].T
    want, owner = np_owner_decisions(100.0 * proj - 5.0)
    assert_decisions_equal(decisions[0], want, owner)

    # Every layer, with a window covering the sequence (then nothing is masked and the residual streams are
    # transformers' own hidden states): decisions from transformers' hidden states, logits = transformers'.
    import torch

    wide = weights.load_model(path, dms=dataclasses.replace(dms_cfg, window=T))
    logits, decisions = hard_forward(wide, tokens)
    with torch.no_grad():
        out = qwen3_hf(torch.as_tensor(tokens, dtype=torch.long), output_hidden_states=True)
    ref_logits = out.logits.numpy()
    assert np.max(np.abs(logits - ref_logits)) <= 1e-5 * np.max(np.abs(ref_logits))
    for i in range(QWEN3["num_hidden_layers"]):
        pre = f"model.layers.{i}.self_attn."
        x = out.hidden_states[i].numpy()  # the input of layer i
        proj = np_rms(x, adapter[pre + "dms_proj_alpha_norm.weight"]) @ adapter[pre + "dms_proj_alpha.weight"].T
        want, owner = np_owner_decisions(100.0 * proj - 5.0)
        assert_decisions_equal(decisions[i], want, owner)


def test_nvidia_neuron_reuse_checkpoint_loads(qwen3_hf, tmp_path):
    """dms_separate_alpha=False: no adapter; the decision is 100 * q[..., d-1] - 5 of each group's first query
    head, after q_norm and before RoPE."""
    path = tmp_path / "qwen3_dms_neuron"
    write_nvidia_dms_dir(qwen3_hf, path, separate_alpha=False)
    model = weights.load_model(path)
    assert model.dms_cfg == DMSConfig(variant="neuron", window=8, tau=0.1, alpha_per="head")
    assert not hasattr(model.layers[0].self_attn, "dms_proj_alpha")
    tokens = tokens_(seed=1)
    _, decisions = hard_forward(model, tokens)
    sd = {k: v.detach().numpy() for k, v in qwen3_hf.state_dict().items()}
    h = np_rms(sd["model.embed_tokens.weight"][tokens], sd["model.layers.0.input_layernorm.weight"])
    q = (h @ sd["model.layers.0.self_attn.q_proj.weight"].T).reshape(2, T, 4, 16)
    q = np_rms(q, sd["model.layers.0.self_attn.q_norm.weight"])
    want, owner = np_owner_decisions(100.0 * q[:, :, [0, 2], 15] - 5.0)  # G = 2: heads 0 and 2 lead the groups
    assert_decisions_equal(decisions[0], want, owner)


def test_dms_disable_eviction_loads_a_vanilla_model(qwen3_hf, tmp_path):
    path = tmp_path / "qwen3_dms_disabled"
    write_nvidia_dms_dir(qwen3_hf, path, separate_alpha=True)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, dms_disable_eviction=True)))
    assert weights.load_model(path).dms_cfg is None


@pytest.mark.parametrize("separate_alpha", [True, False], ids=["adapter", "neuron"])
def test_export_of_a_retrofitted_model_round_trips(qwen3_hf, tmp_path, separate_alpha):
    path = tmp_path / "src"
    write_nvidia_dms_dir(qwen3_hf, path, separate_alpha=separate_alpha)
    model = weights.load_model(path)
    if separate_alpha:  # a retrofit changed the adapter: round-trip trained, not only loaded, weights
        k = model.layers[1].self_attn.dms_proj_alpha.kernel
        k[...] = k[...] + 0.01
    out = weights.export_hf(model, tmp_path / "export", compression_ratio=7.5)
    reloaded = weights.load_model(out)
    assert reloaded.dms_cfg == model.dms_cfg and reloaded.cfg == model.cfg
    tokens = tokens_(seed=2)
    (l1, d1), (l2, d2) = hard_forward(model, tokens), hard_forward(reloaded, tokens)
    np.testing.assert_array_equal(l2, l1)
    np.testing.assert_array_equal(d2, d1)
    assert 0 < d1.mean() < 1
    src, exp = json.loads((path / "config.json").read_text()), json.loads((out / "config.json").read_text())
    for key in ("dms_alpha_scale", "dms_initial_alpha_offset", "dms_window_size", "dms_separate_alpha",
                "dms_alpha_per", "dms_tau"):
        assert exp[key] == src[key], key
    assert exp["dms_cr"] == 7.5 and exp["dms_paged_attention_block_size"] == 4  # < window 8, as NVIDIA asserts
    assert exp["model_type"] == "qwen3" and exp["architectures"] == ["Qwen3ForCausalLM"]
    names = set(th.read_export(out))
    assert ("model.layers.0.self_attn.dms_proj_alpha.weight" in names) == separate_alpha
    assert ("model.layers.0.self_attn.dms_proj_alpha_norm.weight" in names) == separate_alpha
