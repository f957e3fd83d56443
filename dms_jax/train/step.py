"""DMS retrofit by logit distillation: config, trainable-parameter filter, optimizer, sharded train step.

Teacher = the original network with eviction off (a frozen copy of the starting weights). Student = the same
network in DMS "train" mode. Loss = KL(student || teacher) over valid tokens (``dms_jax.train.losses``) + the
one-sided compression hinge at the scheduled target. Everything here is a pure function of arrays, jit-compiled
over a device mesh; ``dms_jax.train.heldout`` evaluates the result, ``dms_jax.train.distill`` runs a whole retrofit.

method="dmc" retrofits Dynamic Memory Compression the same way, in two stages (as the reference,
NVIDIA/Megatron-LM megatron/contrib/dmc, does in two runs): for `neuron_decay_steps` steps the student runs
without compression while the q/k neurons DMC will borrow are multiplied by a factor falling from 1 to 0
(dmc.neuron_decay_scale), KL only; then those neurons' projection weights are zeroed (zero_dmc_neurons: every
merge logit starts at -offset, nothing merges) and the student trains in DMC "train" mode with the same hinge,
the compression-ratio schedule starting over at that step.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dms_jax import dmc, dms, weights
from dms_jax import lowrank as lowrank_mod
from dms_jax.model import CausalLM
from dms_jax.train.losses import kl_student_teacher

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
METHODS = ("dms", "dmc")
# optax.global_norm is deprecated in favour of optax.tree.norm (optax >= 0.2.5); keep older optax working.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Hyper-parameters of a retrofit. Defaults are the reference recipe's where it has one."""

    steps: int = 300
    batch_size: int = 4  # sequences per optimizer step (all micro-batches, all processes)
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-5
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    weight_decay: float = 0.0
    cr_initial: float = 1.0
    cr_final: float = 4.0
    cr_final_step: int | None = None  # step at which the target CR reaches cr_final (default: 80% of steps)
    trainable: str = "all"  # "all" (paper), "adapter" (reference repo), or a regex over HF parameter names
    compute_dtype: str = "bfloat16"  # master weights stay float32
    remat: bool = True
    seed: int = 0
    method: str = "dms"  # "dms" (evict) or "dmc" (merge; needs a model built with a DMCConfig)
    neuron_decay_steps: int = 0  # DMC stage one: steps that decay the borrowed neurons before compression starts
    # Weight of the compression hinge against the KL (the papers use 1). Under Adam only the balance of the two
    # gradients on the decision parameters matters, so > 1 makes the achieved CR follow the schedule more closely
    # at a higher KL: a way to reach a target CR in fewer steps.
    cr_loss_weight: float = 1.0
    # > 0: the base model's projections (those matching lowrank_targets) train only as rank-`lowrank` products
    # (dms_jax.lowrank), beside the decision adapter; needs trainable="adapter". 0: no factors.
    lowrank: int = 0
    lowrank_targets: str = lowrank_mod.DEFAULT_TARGETS
    lowrank_init_scale: float = 1.0  # lora_a's initial range times this (dms_jax.lowrank.attach)

    def __post_init__(self):
        positive = {"steps": self.steps, "batch_size": self.batch_size, "grad_accum": self.grad_accum}
        for name, v in positive.items():
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum ({self.grad_accum})")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.cr_initial < 1 or self.cr_final < 1:
            raise ValueError(f"compression ratios must be >= 1, got cr_initial={self.cr_initial}, "
                             f"cr_final={self.cr_final}")
        if self.cr_final_step is not None and self.cr_final_step < 1:
            raise ValueError(f"cr_final_step must be >= 1, got {self.cr_final_step}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        trainable_filter(self.trainable)  # raises on a bad pattern
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.neuron_decay_steps < 0 or (self.method == "dmc" and self.neuron_decay_steps >= self.steps):
            raise ValueError(f"neuron_decay_steps must be in [0, steps) = [0, {self.steps}), "
                             f"got {self.neuron_decay_steps}")
        if not self.cr_loss_weight > 0:
            raise ValueError(f"cr_loss_weight must be > 0, got {self.cr_loss_weight}")
        if self.lowrank < 0:
            raise ValueError(f"lowrank must be >= 0, got {self.lowrank}")
        if not self.lowrank_init_scale > 0:
            raise ValueError(f"lowrank_init_scale must be > 0, got {self.lowrank_init_scale}")
        if self.lowrank and (self.trainable != "adapter" or self.method != "dms"):
            raise ValueError("lowrank > 0 trains low-rank factors beside the DMS decision adapter of a frozen base: "
                             f"it needs trainable='adapter' and method='dms', got {self.trainable!r}, {self.method!r}")
        if self.method == "dms" and self.neuron_decay_steps:
            raise ValueError("neuron_decay_steps is DMC's first stage; method='dms' takes none")

    @property
    def compression_start(self) -> int:
        """The first step that trains with compression on (DMC: after the neuron-decay stage; DMS: 0)."""
        return self.neuron_decay_steps if self.method == "dmc" else 0

    @property
    def schedule_final_step(self) -> int:
        """Steps from compression_start until the target CR reaches cr_final (default: 80% of those steps)."""
        return self.cr_final_step or max(1, int(0.8 * (self.steps - self.compression_start)))

    def target_cr(self, step):
        since = jnp.maximum(jnp.asarray(step) - self.compression_start, 0)
        return dms.target_compression_ratio(since, self.cr_initial, self.cr_final, self.schedule_final_step)


def trainable_filter(spec: str) -> Callable:
    """nnx filter selecting trainable parameters: "all", "adapter" or a regex searched in the parameter path
    (dotted, e.g. "layers.3.self_attn.q_proj.kernel"). "adapter" also selects low-rank factors where a model has
    them (dms_jax.lowrank.attach): they exist only to be trained."""
    if spec == "all":
        return nnx.Param
    if spec == "adapter":
        pattern = re.compile(r"dms_proj_alpha|\.lora_[ab]$")
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"trainable must be 'all', 'adapter' or a valid regex, got {spec!r}: {e}") from e
    return nnx.All(nnx.Param, lambda path, _: bool(pattern.search(weights.dotted_path(path))))


def make_optimizer(cfg: DistillConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip)] if cfg.clip > 0 else []
    parts.append(optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay))
    return optax.chain(*parts)


def zero_decision_neurons(model: CausalLM) -> None:
    """Zeroes the q_proj outputs (and biases) that the neuron-reuse variant borrows as decision logits.

    The decision logit is scale * q[..., d-1] - offset with scale = 100: an untouched pretrained neuron of
    magnitude ~0.1 already gives logits of +-10, i.e. arbitrary evictions at step 0. Zeroing the borrowed
    output makes every logit start at -offset (nothing evicted), as the adapter's zero initialisation does; the
    lost query feature (one of d in the first head of each group) is what the distillation then repairs.
    """
    cfg = model.cfg
    cols = [(g * cfg.group_size) * cfg.head_dim + cfg.head_dim - 1 for g in range(cfg.num_kv_heads)]
    for layer in model.layers:
        proj = layer.self_attn.q_proj
        proj.kernel[...] = proj.kernel[...].at[:, cols].set(0)
        if proj.bias is not None:
            proj.bias[...] = proj.bias[...].at[cols].set(0)


def zero_dmc_neurons(model: CausalLM) -> None:
    """Zeroes the q_proj and k_proj outputs (and biases) at element d-1 of every head: the neurons DMC borrows.

    Done at the end of DMC's neuron-decay stage, as the reference does after its stage one: the decayed neurons
    no longer serve attention, and zero weights make every merge logit start at exactly -offset (no merging) and
    every importance at sigmoid(offset). Training then grows them into decisions. (With a q/k norm the zero
    survives the norm: RMSNorm scales each element.)
    """
    cfg = model.cfg
    d = cfg.head_dim
    for layer in model.layers:
        for proj, heads in ((layer.self_attn.q_proj, cfg.num_heads), (layer.self_attn.k_proj, cfg.num_kv_heads)):
            cols = [h * d + d - 1 for h in range(heads)]
            proj.kernel[...] = proj.kernel[...].at[:, cols].set(0)
            if proj.bias is not None:
                proj.bias[...] = proj.bias[...].at[cols].set(0)


def zero_dmc_neurons_in_states(graphdef, params, frozen, trainable: str):
    """(params, frozen) with zero_dmc_neurons applied; pure, so it can be jitted with the states' shardings."""
    model = nnx.merge(graphdef, params, frozen)
    zero_dmc_neurons(model)
    _, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
    return params, frozen


def split_model(model: CausalLM, cfg: DistillConfig):
    """(graphdef, trainable, frozen, teacher) states of a freshly loaded model."""
    graphdef, params, frozen = nnx.split(model, trainable_filter(cfg.trainable), ...)
    if not jax.tree.leaves(params):
        raise ValueError(f"trainable={cfg.trainable!r} selects no parameter of this model")
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    # The teacher only runs forward: keep it in the compute dtype (half the memory in bf16). Always a copy: with
    # compute_dtype float32, astype would return the very buffers of `params`, which the train step donates, so
    # the first step would delete (or fail on) the teacher.
    teacher = jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), nnx.state(model))
    return graphdef, params, frozen, teacher


def distill_loss(graphdef, params, frozen, teacher, tokens, valid, noise_key, target_fraction, remat,
                 neuron_scale=None, cr_loss_weight=1.0, loss_weight=None):
    """KL + cr_loss_weight * hinge (the logged loss_cr is the unweighted hinge). neuron_scale (DMC stage one): the
    student runs uncompressed with its borrowed neurons scaled, and the loss is the KL alone. loss_weight [B, T]
    (None: 1) weighs each position's KL; the compression hinge counts every valid decision alike."""
    _, frozen = lowrank_mod.fold_states(params, frozen)  # kernel + a @ b where the student has low-rank factors
    student = nnx.merge(graphdef, params, frozen)
    teacher_model = nnx.merge(graphdef, teacher)
    t_logits, _ = teacher_model(tokens, valid=valid, dms_mode="off")
    if neuron_scale is not None:
        s_logits, _ = student(tokens, valid=valid, dms_mode="off", remat=remat, borrowed_neuron_scale=neuron_scale)
        kl = kl_student_teacher(s_logits, jax.lax.stop_gradient(t_logits), valid, loss_weight)
        zero = jnp.float32(0)
        return kl, {"kl": kl, "loss_cr": zero, "eviction_fraction": zero}
    s_logits, aux = student(tokens, valid=valid, dms_mode="train", noise_key=noise_key, remat=remat)
    kl = kl_student_teacher(s_logits, jax.lax.stop_gradient(t_logits), valid, loss_weight)
    shifted = student.dmc_cfg is None  # DMS decisions are shifted to their owner tokens, DMC's are per token
    loss_cr = dms.compression_loss(aux["decisions"], valid, target_fraction, shifted)
    hard_frac = jnp.mean(dms.eviction_fraction(jax.lax.stop_gradient(aux["decisions"]), valid, shifted))
    return kl + cr_loss_weight * loss_cr, {"kl": kl, "loss_cr": loss_cr, "eviction_fraction": hard_frac}


def make_train_step(cfg: DistillConfig, tx: optax.GradientTransformation, graphdef, out_shardings=None):
    """The jitted step: (params, frozen, teacher, opt_state, tokens [A, b, T], valid [A, b, T], step,
    loss_weight [A, b, T] or None) -> (params, opt_state, metrics). A = grad_accum micro-batches, summed by a scan. Inputs keep the shardings
    they were placed with; out_shardings=(params, opt_state, metrics) pins the outputs' layout.

    method="dmc": two compiled steps (neuron decay, then compression), chosen by the step number, which must then
    be a Python int; its metrics add "neuron_scale"."""
    if cfg.method == "dmc":
        decay_step = _make_step(cfg, tx, graphdef, out_shardings, neuron_decay=True)
        compress_step = _make_step(cfg, tx, graphdef, out_shardings, neuron_decay=False)

        def dmc_step(params, frozen, teacher, opt_state, tokens, valid, step: int, loss_weight=None):
            fn = decay_step if step < cfg.neuron_decay_steps else compress_step
            return fn(params, frozen, teacher, opt_state, tokens, valid, step, loss_weight)

        return dmc_step
    return _make_step(cfg, tx, graphdef, out_shardings, neuron_decay=False)


def _make_step(cfg: DistillConfig, tx: optax.GradientTransformation, graphdef, out_shardings, neuron_decay: bool):
    base_key = jax.random.key(cfg.seed)

    def step_fn(params, frozen, teacher, opt_state, tokens, valid, step, loss_weight=None):
        # Noise depends only on (seed, step, micro-batch): a resumed run draws the same noise.
        key = jax.random.fold_in(base_key, step)
        target = dms.target_eviction_fraction(cfg.target_cr(step))
        neuron_scale = dmc.neuron_decay_scale(step, cfg.neuron_decay_steps) if neuron_decay else None
        grad_fn = jax.value_and_grad(distill_loss, argnums=1, has_aux=True)

        def micro(acc, xs):
            toks, val, weight, i = xs
            (loss, metrics), grads = grad_fn(graphdef, params, frozen, teacher, toks, val,
                                              jax.random.fold_in(key, i), target, cfg.remat, neuron_scale,
                                              cfg.cr_loss_weight, weight)
            acc_grads, acc_metrics = acc
            acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
            acc_metrics = jax.tree.map(jnp.add, acc_metrics, dict(metrics, loss=loss))
            return (acc_grads, acc_metrics), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        zero_metrics = {k: jnp.float32(0) for k in ("kl", "loss_cr", "eviction_fraction", "loss")}
        (grads, metrics), _ = jax.lax.scan(
            micro, (zeros, zero_metrics), (tokens, valid, loss_weight, jnp.arange(tokens.shape[0])))
        n = tokens.shape[0]
        grads = jax.tree.map(lambda g: g / n, grads)
        metrics = {k: v / n for k, v in metrics.items()}
        metrics["grad_norm"] = _tree_norm(grads)
        metrics["target_cr"] = cfg.target_cr(step)
        if cfg.method == "dmc":
            metrics["neuron_scale"] = jnp.float32(0) if neuron_scale is None else neuron_scale
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, metrics

    kw = {}
    if out_shardings is not None:
        kw["out_shardings"] = out_shardings
    return jax.jit(step_fn, donate_argnums=(0, 3), **kw)


def micro_batches(tokens: np.ndarray, valid: np.ndarray, grad_accum: int, loss_weight: np.ndarray | None = None):
    """[B, T] -> [A, B/A, T] (micro-batch major), for the scan inside the step: (tokens, valid), and loss_weight
    third when given."""
    b, t = tokens.shape
    split = [x.reshape(grad_accum, b // grad_accum, t) for x in (tokens, valid, loss_weight) if x is not None]
    return tuple(split)
