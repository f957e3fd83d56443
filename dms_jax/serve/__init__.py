"""Serving: the paged per-head KV cache, its eviction policies and the inference engine.

Layout (each module imports only modules listed before it; none imports dms_jax.eval, dms_jax.train or
experiments):

* ``spec.py`` -- ``CacheSpec``, ``PagedCache``, ``init_cache``, the sink page, host-side invariant checks;
* ``tensor_parallel.py`` -- KV heads across the devices of a mesh's "tensor" axis: weight and cache layout, each
  device's reads of its own share of the pool;
* ``pages.py`` -- page accounting: allocation, release, copy-on-write forks, preemption choices, page copies;
* ``policies.py`` -- ``EvictionPolicy`` and the built-in policies (vanilla, dms, fixed, dmc);
* ``plans.py`` -- where tokens go: decode and chunk plans, cached-slot visibility, DMC merge-or-append slots;
* ``baselines.py`` -- TOVA, H2O, StreamingLLM and Quest as policies with a token budget;
* ``registry.py`` -- ``make_policy`` / ``POLICIES`` (policies by name);
* ``sampling.py`` -- ``SamplingConfig``, ``sample_next``, ``sample_rows`` (a setting per row);
* ``layers.py``, ``prefill.py``, ``decode.py`` -- the jitted engine internals;
* ``results.py`` -- ``GenerationResult``, ``RequestResult``, ``RequestMetrics``, ``DecodeOutput``,
  ``PoolExhaustedError``;
* ``engine.py`` -- ``Engine``;
* ``requests.py``, ``scheduler_steps.py`` (its jitted device steps), ``scheduler.py`` -- ``Scheduler``:
  continuous batching of requests over one pool (arrivals at any time, admission by real pages, preemption and
  recompute, multi-turn and prefix reuse), ``RequestError``, ``TokenEvent``, ``Completion``;
* ``replicas.py`` -- ``ReplicatedEngine``: data-parallel replicas, one engine (weights and pool) per device, or
  one tensor-parallel engine per row of a (data, tensor) mesh;
* ``reference.py`` -- the dense-cache reference generator (``generate``, ``generate_dmc``, ``left_pad``).

The blocked XLA attention the engine uses on CPU lives with the kernels: ``pallas_kernels/xla_blocked.py``.
This file only re-exports the public names for users; the package's own modules import from the defining module.
"""

from dms_jax.serve.engine import Engine
from dms_jax.serve.policies import EvictionPolicy
from dms_jax.serve.registry import POLICIES, make_policy
from dms_jax.serve.replicas import ReplicatedEngine, ReplicatedGeneration
from dms_jax.serve.requests import Completion, RequestError, TokenEvent
from dms_jax.serve.results import DecodeOutput, GenerationResult, PoolExhaustedError, RequestMetrics, RequestResult
from dms_jax.serve.sampling import SamplingConfig, sample_next
from dms_jax.serve.scheduler import Scheduler
from dms_jax.serve.spec import CacheSpec, PagedCache, init_cache

__all__ = [
    "POLICIES",
    "CacheSpec",
    "Completion",
    "DecodeOutput",
    "Engine",
    "EvictionPolicy",
    "GenerationResult",
    "PagedCache",
    "ReplicatedEngine",
    "ReplicatedGeneration",
    "PoolExhaustedError",
    "RequestError",
    "RequestMetrics",
    "RequestResult",
    "SamplingConfig",
    "Scheduler",
    "TokenEvent",
    "init_cache",
    "make_policy",
    "sample_next",
]
