"""An adapter-only DMS retrofit as one small file: save it, load it onto its base model, export it from training.

A retrofit trained with ``--trainable adapter`` (DMSConfig variant "adapter") changes only the decision adapter of
every layer (``dms_proj_alpha``: Linear hidden -> KV heads, and its RMSNorm); the base model stays frozen. So the
retrofit is the base model plus these few tensors: ``save_adapter`` writes them alone to a safetensors file whose
metadata holds the DMSConfig, the base model's identity and the provenance (command, step, results file, ...).
``load_adapter`` (or ``weights.load_model(path, dms="adapter.safetensors")``) builds the base model with that
DMSConfig and fills in the adapter, after checking that the base is the one the adapter was trained on.

The base model's identity is its architecture (the ModelConfig fields, token ids excepted) and a fingerprint:
a SHA-256 of a few base tensors (the embedding, the last layer's input norm, the final norm) rounded to
bfloat16, so the same base loaded in float32 or bfloat16 matches and another checkpoint of the same architecture
(another fine-tune, another quantisation) does not.

Tensors are stored under their Hugging Face names (``model.layers.{i}.self_attn.dms_proj_alpha.weight`` [Hkv,
hidden], ``...dms_proj_alpha_norm.weight`` [hidden]), as in a full export.

A retrofit trained with ``--trainable adapter --lowrank R`` also changed the base model's projections, by rank-R
products (``dms_jax.lowrank``). Its file (format version 2) adds those factors under PEFT's names
(``...q_proj.lora_A.weight`` [R, in], ``...q_proj.lora_B.weight`` [out, R], in float16); loading adds
``lora_B @ lora_A`` into each base weight, so the loaded model is a plain one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from dms_jax import lowrank, weights
from dms_jax.config import DMSConfig, ModelConfig
from dms_jax.model import CausalLM

FORMAT = "dms-jax-adapter"
FORMAT_VERSION = "1"  # the decision adapter alone
FORMAT_VERSION_LOWRANK = "2"  # with low-rank factors of the base model's projections (dms_jax.lowrank)
ADAPTER_PARAM = "dms_proj_alpha"  # in the names of both adapter tensors of a layer
SHIPPED_ADAPTER = Path(__file__).parent / "assets" / "smollm2_dms_adapter.safetensors"
# Token ids are not architecture: another file of the same weights may name them differently.
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_ids", "pad_token_id")


@dataclasses.dataclass(frozen=True)
class AdapterFile:
    """What an adapter file holds: HF-named float32 tensors and the metadata."""

    path: Path
    tensors: dict[str, np.ndarray]
    dms_config: DMSConfig
    model_config: dict  # ModelConfig fields of the base model (JSON types)
    base_fingerprint: str
    provenance: dict

    @property
    def has_lowrank(self) -> bool:
        """Whether it also changes base weights (low-rank factors), so the base alone is not the retrofit's original
        model run without eviction."""
        return any(lowrank.is_hf_factor(k) for k in self.tensors)


# ----------------------------------------------------------------------------------------------- base identity


def model_config_dict(cfg: ModelConfig) -> dict:
    """ModelConfig fields as they come back from JSON (tuples as lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fingerprint_tensor_names(num_layers: int) -> tuple[str, ...]:
    return ("model.embed_tokens.weight", f"model.layers.{num_layers - 1}.input_layernorm.weight", "model.norm.weight")


def base_fingerprint(base: CausalLM | Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the fingerprint tensors of a model, or of HF-named arrays (as weights.py reads them)."""
    if isinstance(base, CausalLM):
        arrays = [base.embed_tokens.embedding[...], base.layers[-1].input_layernorm.weight[...], base.norm.weight[...]]
        names = fingerprint_tensor_names(base.cfg.num_layers)
    else:
        layers = {int(m.group(1)) for k in base if (m := re.match(r"model\.layers\.(\d+)\.", k))}
        names = fingerprint_tensor_names(max(layers) + 1)
        missing = [n for n in names if n not in base]
        if missing:
            raise ValueError(f"base model: tensors {missing} are missing, cannot fingerprint it")
        arrays = [base[n] for n in names]
    h = hashlib.sha256()
    for name, arr in zip(names, arrays):
        a = np.asarray(np.asarray(arr, np.float32).astype(jnp.bfloat16))
        h.update(f"{name}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def check_base(adapter: AdapterFile, cfg: ModelConfig, fingerprint: str, base_name: str = "the base model") -> None:
    """ValueError unless the base model is the one the adapter was trained on (architecture and fingerprint)."""
    found = model_config_dict(cfg)
    wrong = [f"{k}: adapter expects {v!r}, {base_name} has {found.get(k)!r}"
             for k, v in adapter.model_config.items() if k not in TOKEN_ID_FIELDS and found.get(k) != v]
    if wrong:
        raise ValueError(f"base model: {adapter.path} was trained on another architecture: " + "; ".join(wrong))
    if fingerprint != adapter.base_fingerprint:
        raise ValueError(
            f"base model: {adapter.path} was trained on another base model of the same architecture: base "
            f"fingerprint expected {adapter.base_fingerprint[:16]}..., {base_name} has {fingerprint[:16]}... "
            f"(trained on {adapter.provenance.get('base_model', 'an unrecorded base')})")


def expected_adapter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(cfg.num_layers):
        out[f"model.layers.{i}.self_attn.{ADAPTER_PARAM}.weight"] = (cfg.num_kv_heads, cfg.hidden_size)
        out[f"model.layers.{i}.self_attn.{ADAPTER_PARAM}_norm.weight"] = (cfg.hidden_size,)
    return out


def check_adapter_shapes(adapter: AdapterFile, cfg: ModelConfig) -> None:
    """ValueError naming every adapter tensor that is missing, unexpected or of the wrong shape for cfg (low-rank
    factors are checked against their weights when they are added: lowrank.add_hf_deltas)."""
    expected = expected_adapter_shapes(cfg)
    problems = [f"{n}: missing (expected shape {s})" for n, s in expected.items() if n not in adapter.tensors]
    problems += [f"{n}: not an adapter tensor of this model" for n in adapter.tensors
                 if n not in expected and not lowrank.is_hf_factor(n)]
    problems += [f"{n}: expected shape {expected[n]}, found {tuple(a.shape)}"
                 for n, a in adapter.tensors.items() if n in expected and tuple(a.shape) != expected[n]]
    if problems:
        raise ValueError(f"adapter: {adapter.path} does not fit the model: " + "; ".join(problems[:6])
                         + (f"; and {len(problems) - 6} more" if len(problems) > 6 else ""))


# ----------------------------------------------------------------------------------------------- save / read


def write_adapter_file(path, tensors: Mapping[str, np.ndarray], dms_cfg: DMSConfig, model_config: dict,
                       fingerprint: str, provenance: dict | None) -> Path:
    from safetensors.numpy import save_file

    if dms_cfg.variant != "adapter":
        raise ValueError(f"dms_config: an adapter file needs variant 'adapter', got {dms_cfg.variant!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    factors = any(lowrank.is_hf_factor(k) for k in tensors)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION_LOWRANK if factors else FORMAT_VERSION,
                "dms_config": json.dumps(dataclasses.asdict(dms_cfg)), "model_config": json.dumps(model_config),
                "base_fingerprint": fingerprint, "provenance": json.dumps(provenance or {})}
    # Factors in float16 (half the file; their product moves each weight by well under float16's resolution of it),
    # the decision adapter in float32.
    save_file({k: np.ascontiguousarray(v, np.float16 if lowrank.is_hf_factor(k) else np.float32)
               for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def save_adapter(model: CausalLM, path: str | os.PathLike, provenance: dict | None = None) -> Path:
    """Writes only the DMS adapter of `model` (variant "adapter"; and its low-rank factors, if it has them) to a
    safetensors file, with its DMSConfig, the base model's identity and `provenance` (e.g. command, step, results
    file, base_model) in the metadata."""
    if model.dms_cfg is None or model.dms_cfg.variant != "adapter":
        found = None if model.dms_cfg is None else model.dms_cfg.variant
        raise ValueError(f"model: save_adapter needs a DMS model of variant 'adapter', got variant {found!r}")
    tensors = weights.to_hf_state_dict(model, only=ADAPTER_PARAM)
    tensors.update(lowrank.hf_factors(model))
    return write_adapter_file(path, tensors, model.dms_cfg, model_config_dict(model.cfg), base_fingerprint(model),
                              provenance)


def read_adapter(path: str | os.PathLike) -> AdapterFile:
    """Reads an adapter file; FileNotFoundError if absent, ValueError if it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter: no adapter file at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"adapter: {path} is not a safetensors file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise ValueError(f"adapter: {path} is not a DMS adapter file: metadata format is "
                         f"{metadata.get('format')!r}, expected {FORMAT!r} (a full model loads with "
                         f"weights.load_model(directory))")
    if metadata.get("format_version") not in (FORMAT_VERSION, FORMAT_VERSION_LOWRANK):
        raise ValueError(f"adapter: {path} has format version {metadata.get('format_version')!r}; this version "
                         f"of dms_jax reads {FORMAT_VERSION!r} and {FORMAT_VERSION_LOWRANK!r}")
    return AdapterFile(path, tensors, DMSConfig(**json.loads(metadata["dms_config"])),
                       json.loads(metadata["model_config"]), metadata["base_fingerprint"],
                       json.loads(metadata["provenance"]))


# ----------------------------------------------------------------------------------------------- load


def attach_adapter_tensors(adapter_path, cfg: ModelConfig, tensors: dict, base_name: str) -> DMSConfig:
    """Checks the adapter against a base model's HF-named arrays and adds its tensors to them, its low-rank factors
    folded into the base weights (weights.load_model with dms=PATH); returns the adapter's DMSConfig."""
    adapter = read_adapter(adapter_path)
    check_base(adapter, cfg, base_fingerprint(tensors), base_name)
    check_adapter_shapes(adapter, cfg)
    factors = {k: v for k, v in adapter.tensors.items() if lowrank.is_hf_factor(k)}
    lowrank.add_hf_deltas(tensors, factors)  # checks them all before it changes a weight
    for name in [k for k in tensors if ADAPTER_PARAM in k]:
        del tensors[name]
    tensors.update({k: v for k, v in adapter.tensors.items() if k not in factors})
    return adapter.dms_config


def load_adapter(base: CausalLM | str | os.PathLike | None, adapter_path: str | os.PathLike, *, dtype=None,
                 param_dtype=None) -> CausalLM:
    """The base model (a loaded CausalLM, or a path for weights.load_model; None: the embedded default) with the
    adapter's DMSConfig and trained adapter. A loaded base is not changed; its dtypes are kept unless given."""
    if not isinstance(base, CausalLM):
        return weights.load_model(base, dms=adapter_path, dtype=dtype or jnp.float32,
                                  param_dtype=param_dtype or jnp.float32)
    if base.dmc_cfg is not None:
        raise ValueError("base: a DMC model cannot take a DMS adapter")
    tensors = weights.to_hf_state_dict(base)
    dms_cfg = attach_adapter_tensors(adapter_path, base.cfg, tensors, "the given model")
    return weights.from_hf_state_dict(base.cfg, tensors, dms_cfg, dtype=dtype or base.dtype,
                                      param_dtype=param_dtype or base.embed_tokens.embedding[...].dtype)


def decision_logits(model: CausalLM, tokens) -> np.ndarray:
    """DMS decision logits [L, B, Hkv, T] of every layer (computed at each position, before the one-token shift)
    for tokens [B, T], on the original model's residual stream (attention without eviction)."""
    from dms_jax.model import attend, causal_bias

    tokens = jnp.asarray(tokens)
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    bias = causal_bias(positions, positions, jnp.ones((b, t), bool))
    x = model.embed_tokens(tokens)
    out = []
    for layer in model.layers:
        def attention(p):
            out.append(p.decision_logits)
            return attend(p.q, p.k, p.v, bias), None

        x, _ = layer(x, positions, attention, True)
    return np.asarray(jnp.stack(out))


# ----------------------------------------------------------------------------------------------- export


def checkpoint_step_dir(path: str | os.PathLike, step: int | None = None) -> Path:
    """The step directory of an experiments.distill checkpoint: `path` is a run directory, its checkpoints/,
    checkpoints/milestones or checkpoints/latest, or a step directory itself. step None: the newest milestone
    (of a run or checkpoints directory) or the newest step (of a milestones / latest directory)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint: {p} does not exist")
    if (p / "state").is_dir() and (p / "meta").is_dir():
        return p
    for sub in ("checkpoints/milestones", "milestones"):
        if (p / sub).is_dir():
            p = p / sub
            break
    steps = sorted(int(d.name) for d in p.iterdir() if d.name.isdigit() and (d / "state").is_dir()) \
        if p.is_dir() else []
    if step is None and steps:
        return p / str(steps[-1])
    if step is not None and step in steps:
        return p / str(step)
    raise FileNotFoundError(f"checkpoint: {p} has no finished checkpoint{'' if step is None else f' of step {step}'}"
                            f" (steps found: {steps})")


def checkpoint_adapter_tensors(step_dir: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(HF-named adapter tensors and low-rank factors, meta) of a distill checkpoint step; ValueError if it trained
    more than those (then the base changed in full and an adapter file would not reproduce the retrofit)."""
    import orbax.checkpoint as ocp

    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    arch = meta.get("arch", {})
    dms_cfg = arch.get("dms_config") or {}
    if dms_cfg.get("variant") != "adapter" or arch.get("trainable") != "adapter":
        raise ValueError(f"checkpoint: {step_dir} is not an adapter-only DMS retrofit (variant "
                         f"{dms_cfg.get('variant')!r}, trainable {arch.get('trainable')!r}; expected 'adapter' for "
                         f"both): export the whole model with weights.export_hf instead")
    params = ocp.StandardCheckpointer().restore(step_dir.absolute() / "state")["params"]
    tensors = {}

    def walk(tree, path):
        if isinstance(tree, Mapping):
            for k, v in tree.items():
                walk(v, path + (k,))
            return
        factor = lowrank.hf_factor(path)
        name, transposed = (factor, True) if factor else weights.hf_name(path[:-1] if path[-1] == "value" else path)
        arr = np.asarray(tree, np.float32)
        tensors[name] = arr.T if transposed else arr

    walk(params, ())
    others = sorted(n for n in tensors if ADAPTER_PARAM not in n and not lowrank.is_hf_factor(n))
    if others:
        raise ValueError(f"checkpoint: {step_dir} holds trained parameters outside the adapter: {others[:3]}")
    return tensors, meta


def export_adapter(checkpoint: str | os.PathLike, out_path: str | os.PathLike, *, step: int | None = None,
                   base_model: str | os.PathLike | None = None, provenance: dict | None = None) -> Path:
    """Writes the adapter of a distill checkpoint (see checkpoint_step_dir) to an adapter file. base_model: the
    run's --model (None: the embedded default), checked against the run's recorded architecture and fingerprinted.
    The provenance records the run's command, step, target CR, results file and base model, plus `provenance`."""
    step_dir = checkpoint_step_dir(checkpoint, step)
    tensors, meta = checkpoint_adapter_tensors(step_dir)
    base_path = weights.resolve_model_path(base_model)
    base = weights.load_model(base_path)
    recorded = meta["arch"]["model_config"]
    found = model_config_dict(base.cfg)
    wrong = [f"{k}: run has {v!r}, base has {found.get(k)!r}" for k, v in recorded.items() if found.get(k) != v]
    if wrong:
        raise ValueError(f"base_model: {base_path} is not the model {step_dir} was trained on: " + "; ".join(wrong))
    command = meta.get("command", "")
    results = re.search(r"--results[= ](\S+)", command)
    record = {"command": command, "step": meta.get("step"), "target_cr": meta.get("target_cr"),
              "results_file": results.group(1) if results else None, "checkpoint": str(step_dir.absolute()),
              "base_model": base_path.name, **(provenance or {})}
    return write_adapter_file(out_path, tensors, DMSConfig(**meta["arch"]["dms_config"]), found,
                              base_fingerprint(base), record)
