"""A low-rank retrofit: the base model's projections change only by trained rank-r products, small enough to ship.

A DMS retrofit that trains every weight repairs what eviction costs better than one that trains the decision
adapter alone, but it ships as a whole model: on SmolLM2 its change to the weights is neither sparse nor low-rank
after the fact. Training the change as a product of two thin factors from the start (LoRA, Hu et al. 2021,
arXiv:2106.09685) keeps it a few MB: the retrofit is then the base model + the adapter + these factors.

In the model the factors are two extra parameters beside a targeted Linear's kernel: ``lora_a`` [in, r] and
``lora_b`` [r, out], so that the kernel in use is ``kernel + lora_a @ lora_b``. ``lora_b`` starts at zero, so a
retrofit starts exactly at the base model. The forward pass never reads the factors; instead:

* ``fold_states`` adds them into the kernels of the frozen state before the model is merged (the train step, inside
  jit: the gradient reaches the factors through the sum, and the frozen kernels take none);
* ``fold`` does the same to a model (evaluation, export) and removes the factors, leaving a plain model.

Outside the model the factors take PEFT's names and layout: ``<module>.lora_A.weight`` [r, in] and
``<module>.lora_B.weight`` [out, r], so that the HF weight [out, in] changes by ``lora_B @ lora_A``
(``add_hf_deltas``).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dms_jax import weights

# Every projection of attention and MLP. Not the DMS decision adapter (dms_proj_alpha), which trains in full.
DEFAULT_TARGETS = r"(q|k|v|o|gate|up|down)_proj$"
FACTORS = ("lora_a", "lora_b")
_HF_FACTOR = re.compile(r"^(.*)\.lora_([AB])\.weight$")


def attach(model, rank: int, targets: str = DEFAULT_TARGETS, seed: int = 0, init_scale: float = 1.0) -> list[str]:
    """Adds rank-``rank`` factors to every nnx.Linear whose dotted path (e.g. "layers.3.self_attn.q_proj") matches
    the regex ``targets``; returns those paths. ``lora_a`` is uniform in +-init_scale/sqrt(in) (1: PEFT's default),
    ``lora_b`` zero. Under Adam each step moves ``lora_b`` by about the learning rate whatever its gradient's size,
    so the product grows init_scale times faster: the role LoRA's alpha / r plays, without a factor to carry into
    the file. ValueError for a rank < 1, a scale <= 0, a bad or matchless pattern, or a model that already has
    factors."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lowrank rank must be an integer >= 1, got {rank!r}")
    if not init_scale > 0:
        raise ValueError(f"lowrank init_scale must be > 0, got {init_scale!r}")
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise ValueError(f"lowrank targets must be a valid regex, got {targets!r}: {e}") from e
    linears = [(weights.dotted_path(path), node) for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Linear)]
    if any(hasattr(node, FACTORS[0]) for _, node in linears):
        raise ValueError("model: it already has low-rank factors")
    chosen = [(name, node) for name, node in linears if pattern.search(name)]
    if not chosen:
        raise ValueError(f"lowrank targets {targets!r} match no Linear of the model (e.g. {linears[0][0]!r})")
    smallest, name = min((min(node.kernel[...].shape), name) for name, node in chosen)
    if rank > smallest:  # checked before any factor is added: a refused model stays as it was
        raise ValueError(f"lowrank rank must be <= {smallest} (the smaller side of {name}), got {rank}")
    key = jax.random.key(seed)
    for i, (name, node) in enumerate(chosen):
        d_in, d_out = node.kernel[...].shape
        bound = init_scale / np.sqrt(d_in)
        node.lora_a = nnx.Param(jax.random.uniform(jax.random.fold_in(key, i), (d_in, rank), jnp.float32,
                                                   -bound, bound))
        node.lora_b = nnx.Param(jnp.zeros((rank, d_out), jnp.float32))
    return [name for name, _ in chosen]


def _plus_product(kernel, a, b):
    """kernel + a @ b, summed in float32 and kept in the kernel's dtype."""
    return (kernel.astype(jnp.float32) + a.astype(jnp.float32) @ b.astype(jnp.float32)).astype(kernel.dtype)


def has_factors(state) -> bool:
    return any(path[-1] in FACTORS for path, _ in nnx.to_flat_state(state))


def fold_states(trainable, frozen):
    """(trainable without the factors, frozen with every factored kernel replaced by kernel + a @ b). Pure: it runs
    inside jit, and the factors' gradient flows through the sum. Without factors both come back as they were."""
    flat = nnx.to_flat_state(trainable)
    factors = {path: var for path, var in flat if path[-1] in FACTORS}
    if not factors:
        return trainable, frozen
    folded = []
    for path, var in nnx.to_flat_state(frozen):
        a = factors.get(path[:-1] + ("lora_a",))
        if path[-1] == "kernel" and a is not None:
            b = factors[path[:-1] + ("lora_b",)]
            var = var.replace(_plus_product(var.get_value(), a.get_value(), b.get_value()))
        folded.append((path, var))
    rest = [(path, var) for path, var in flat if path[-1] not in FACTORS]
    return nnx.from_flat_state(rest), nnx.from_flat_state(folded)


def fold(model) -> None:
    """Adds every Linear's a @ b into its kernel and removes the factors: the model becomes a plain one."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Linear) and hasattr(node, "lora_a"):
            node.kernel[...] = _plus_product(node.kernel[...], node.lora_a[...], node.lora_b[...])
            del node.lora_a, node.lora_b


def hf_factor(path) -> str | None:
    """A factor's nnx state path -> its PEFT-style HF name (e.g. "model.layers.3.self_attn.q_proj.lora_A.weight",
    stored transposed: [r, in] and [out, r]); None for any other parameter."""
    parts = list(path[:-1] if path and str(path[-1]) == "value" else path)
    if not parts or parts[-1] not in FACTORS:
        return None
    weight, _ = weights.hf_name(tuple(parts[:-1]) + ("kernel",))
    return weight[: -len("weight")] + ("lora_A.weight" if parts[-1] == "lora_a" else "lora_B.weight")


def hf_factors(model) -> dict[str, np.ndarray]:
    """The model's factors as HF-named float32 arrays (empty for a model without factors)."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = hf_factor(path)
        if name is not None:
            out[name] = np.asarray(jax.device_get(var.get_value()), np.float32).T
    return out


def is_hf_factor(name: str) -> bool:
    return _HF_FACTOR.match(name) is not None


def add_hf_deltas(tensors: dict[str, np.ndarray], factors: dict[str, np.ndarray]) -> None:
    """Adds lora_B @ lora_A into each HF weight [out, in] of ``tensors`` (in place). ValueError naming the first
    module whose factors are unpaired, have no weight, or do not fit its shape; ``tensors`` is then unchanged."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in factors.items():
        m = _HF_FACTOR.match(name)
        if m is None:
            raise ValueError(f"adapter: {name} is not a low-rank factor name (<module>.lora_A/B.weight)")
        pairs.setdefault(m.group(1), {})[m.group(2)] = np.asarray(arr, np.float32)
    updates = {}
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ValueError(f"adapter: {module} has only lora_{''.join(pair)}; the factors come in pairs")
        if module + ".weight" not in tensors:
            raise ValueError(f"adapter: {module} has low-rank factors but the model has no {module}.weight")
        a, b, weight = pair["A"], pair["B"], np.asarray(tensors[module + ".weight"], np.float32)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != weight.shape:
            raise ValueError(f"adapter: low-rank factors of {module} have shapes lora_A {a.shape}, lora_B "
                             f"{b.shape}; its weight is {weight.shape} [out, in], so they must be [r, "
                             f"{weight.shape[1]}] and [{weight.shape[0]}, r]")
        updates[module + ".weight"] = weight + b @ a
    tensors.update(updates)
