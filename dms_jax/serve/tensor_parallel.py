"""Tensor parallelism of the paged engine over KV heads: one sequence's cache split across the devices of a mesh's
"tensor" axis, each device holding the pages of its own group of KV heads.

Layout under a mesh with a tensor axis of size T (``sharding.make_mesh(tensor=T)``; ``Engine(..., mesh=mesh)``):

* weights: as in training (``sharding.LOGICAL_RULES``): query / KV heads, MLP columns and vocabulary split over
  "tensor", the rest replicated;
* the cache (``CacheSpec.kv_groups = T``): the page pool split in T equal shares, one per group of Hkv / T heads,
  each with its own sink; heads take pages only from their group's share (``pages.allocate``) and share g lives on
  device g. Block tables, lengths and the ring are split along their KV-head axis the same way, so a head's table
  and its pages sit on one device. Refcounts, token counts and policy state are small and replicated.

XLA's sharding propagation places the activations. Every pool array keeps its split from step to step
(``cache_shardings`` pins them on entry, and the tests check them on exit), so the KV memory of a sequence is
spread over the T devices: the budget of each device is ``num_pages / T`` pages. The prefill's attention, the
decode attention of the kernel backends (the Pallas kernels, which XLA cannot split, and the "xla" reference) and
the baselines' key passes run per device on its own share (``over_kv_heads``: left to itself, XLA all-gathered whole
pools there); XLA's own partitioning of the blocked decode attention needs no all-gather of a pool (the tests check
every compiled program of the engine and scheduler for one). A data-parallel mesh axis is served by one such engine per
replica (``replicas.ReplicatedEngine(mesh=...)``).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dms_jax import sharding
from dms_jax.model import CausalLM
from dms_jax.serve.spec import PagedCache

TENSOR = sharding.MESH_AXES[-1]  # "tensor"


def tensor_degree(mesh: Mesh | None) -> int:
    return 1 if mesh is None else int(dict(mesh.shape).get(TENSOR, 1))


def check_mesh(mesh: Mesh, num_kv_heads: int) -> int:
    """The tensor-parallel degree of ``mesh`` for a model with ``num_kv_heads``; raises on a mesh that does not fit
    one engine (a data axis over several devices: that is ``ReplicatedEngine``'s)."""
    t = tensor_degree(mesh)
    if mesh.devices.size != t:
        raise ValueError(f"an Engine's mesh must have all its {mesh.devices.size} devices on the '{TENSOR}' axis "
                         f"(mesh shape {dict(mesh.shape)}); serve a data axis with replicas.ReplicatedEngine(mesh=)")
    if num_kv_heads % t:
        raise ValueError(f"the mesh's '{TENSOR}' axis ({t}) must divide the model's {num_kv_heads} KV heads")
    return t


def place_model(model: CausalLM, mesh: Mesh) -> CausalLM:
    """A copy of ``model`` whose weights are laid out on ``mesh`` by the logical-axis rules (the input is left
    as it is)."""
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    return nnx.merge(graphdef, state)


def cache_shardings(cache: PagedCache, mesh: Mesh) -> PagedCache:
    """NamedShardings in the structure of ``cache``: pools split along their pages, per-head fields along their
    KV-head axis (axis 2 of [L, S, Hkv, ...]), the rest replicated."""
    pages = NamedSharding(mesh, P(TENSOR))
    heads = NamedSharding(mesh, P(None, None, TENSOR))
    rep = NamedSharding(mesh, P())
    return cache.replace(
        k_pages=pages, v_pages=pages, refcount=rep, block_tables=heads, lengths=heads, ring_slot=heads,
        ring_dec=heads, num_tokens=rep, high_water=rep,
        policy_state=None if cache.policy_state is None else jax.tree.map(lambda _: rep, cache.policy_state))


def place_cache(cache: PagedCache, mesh: Mesh) -> PagedCache:
    return jax.device_put(cache, cache_shardings(cache, mesh))


def _tensor_mesh():
    """The mesh in context (``jax.set_mesh``: the engine enters its own) if it splits over "tensor", else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TENSOR not in mesh.axis_names or mesh.shape[TENSOR] == 1:
        return None
    return mesh


def _split(axis: int | None) -> P:
    """Split along ``axis`` over the tensor axis (None: replicated); the dimensions after it are not split."""
    return P() if axis is None else P(*[None] * axis, TENSOR)


def over_kv_heads(fn, pools: tuple, tables, args: tuple, out_axis: int):
    """``fn(*pools, tables, *arrays)`` -> one array split along ``out_axis``, where ``pools`` are page pools
    ``[P, ...]``, ``tables`` page ids ``[..., Hkv, M]`` and ``args`` (array or None, KV-head axis or None) pairs.
    Under a tensor-parallel mesh in context it runs on each device with that device's share of the pools, its heads'
    tables in page ids local to that share, and its heads' slice of every argument, so no device reads another's
    pages (left to itself, XLA all-gathers whole pools in the prefill's attention loop and the baselines' key
    gathers). Without such a mesh it is a plain call."""
    arrays = [a for a, _ in args]
    mesh = _tensor_mesh()
    if mesh is None:
        return fn(*pools, tables, *arrays)
    present = [i for i, a in enumerate(arrays) if a is not None]
    n_pools = len(pools)

    def local(*given):
        share = given[0].shape[0]
        ids = given[n_pools] - jax.lax.axis_index(TENSOR) * share
        ids = jnp.where((ids >= 0) & (ids < share), ids, 0)  # another group's sink -> this share's sink
        full = list(arrays)
        for i, a in zip(present, given[n_pools + 1:]):
            full[i] = a
        return fn(*given[:n_pools], ids, *full)

    in_specs = (P(TENSOR),) * n_pools + (_split(tables.ndim - 2),) + tuple(_split(args[i][1]) for i in present)
    # check_vma off: a Pallas kernel's output shapes carry no varying-axes annotation, which the check requires;
    # the output is split by out_specs either way.
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=_split(out_axis), check_vma=False)(
        *pools, tables, *(arrays[i] for i in present))


def under_mesh(method):
    """Runs an Engine or Scheduler method inside its ``mesh`` (``jax.set_mesh``), so that ``over_kv_heads`` sees
    it."""

    @functools.wraps(method)
    def run(self, *args, **kw):
        with contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh):
            return method(self, *args, **kw)

    return run
