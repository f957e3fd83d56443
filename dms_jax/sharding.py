"""Device mesh and logical-axis rules -> NamedSharding (jax.jit + NamedSharding is the modern form of pjit).

The model tags every parameter with logical axis names ("vocab", "embed", "q_heads", "kv_heads", "mlp", "norm");
these rules place them on a mesh with axes ("data", "fsdp", "tensor"):
  data   pure data parallelism (parameters replicated),
  fsdp   data parallelism with parameters (and optimizer state) sharded along their "embed" axis,
  tensor Megatron-style tensor parallelism over heads / MLP columns / vocabulary.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
LOGICAL_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("norm", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; data=-1 takes what the other two leave."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    for name, size in (("fsdp", fsdp), ("tensor", tensor)):
        if size < 1:
            raise ValueError(f"mesh axis {name} must be >= 1, got {size}")
    if data == -1:
        if n % (fsdp * tensor):
            raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n} devices")
        data = n // (fsdp * tensor)
    if data < 1 or data * fsdp * tensor != n:
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} does not match the "
            f"{n} available devices")
    # Auto axes: XLA's sharding propagation places the activations; we only pin parameters and batches.
    return Mesh(np.array(devices).reshape(data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def _spec_for(names, shape, mesh: Mesh) -> P:
    """Mesh PartitionSpec for a parameter; an axis that does not divide its dimension stays replicated."""
    rules = dict(LOGICAL_RULES)
    spec = []
    for name, dim in zip(names, shape):
        axis = rules.get(name) if name is not None else None
        if axis is not None and dim % mesh.shape[axis]:
            axis = None
        spec.append(axis)
    return P(*spec)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings in the tree structure of an nnx.State (or of any tree of arrays: replicated)."""

    def one(x):
        if isinstance(x, nnx.Variable):
            # Keep the Variable node so the result has the state's tree structure (leaves: shardings).
            names = x.get_metadata().get("out_sharding")
            spec = _spec_for(names, x.get_value().shape, mesh) if names else P()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def optimizer_shardings(tx, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """NamedShardings for tx.init(params): every params-shaped subtree (Adam's mu and nu, a momentum trace) is
    laid out like the parameters, everything else (step counts, empty states) is replicated.

    Why not let jit propagate them: the moments are zeros_like(params), which do not depend on the parameters'
    values, so XLA's propagation leaves them replicated: FSDP would shard the weights but keep full copies of the
    optimizer state (twice the weights) on every device.
    """
    import optax

    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated)


def batch_sharding(mesh: Mesh, ndim: int = 2, batch_dim: int = 0) -> NamedSharding:
    """The batch dimension is split over the data and fsdp axes, the others are replicated."""
    spec = [None] * ndim
    spec[batch_dim] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def batch_divisor(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full (works single- and multi-process)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_batch(local: np.ndarray, mesh: Mesh, batch_dim: int = 0) -> jax.Array:
    """A global batch from this process's rows (each process feeds its own slice of the global batch)."""
    sharding = batch_sharding(mesh, np.ndim(local), batch_dim)
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local))
