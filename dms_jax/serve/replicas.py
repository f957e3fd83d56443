"""Data-parallel serving: one ``Engine`` per device, each with its own copy of the weights and its own page pool,
and a batch of prompts split across them.

A replica's computations follow its committed weights and its default device (``jax.default_device``), so the
replicas never exchange data; they run in one thread each, so that one replica's host work (planning a segment,
reading back tokens) overlaps the others' device work. Prompt ``i`` goes to replica ``i % n`` with all its chains,
and the answers come back in prompt order: a request's output does not depend on which replica served it (the
test runs the same prompts on 8 fake CPU devices and on one).

With ``mesh`` (``sharding.make_mesh(data=R, tensor=T)``) each replica is itself tensor parallel: R engines, each
over its own T devices with its KV heads split across them (``tensor_parallel.py``).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh

from dms_jax.model import CausalLM
from dms_jax.serve.engine import Engine
from dms_jax.serve.results import GenerationResult, RequestResult


@dataclasses.dataclass
class ReplicatedGeneration:
    requests: list[RequestResult]  # prompt-major, as GenerationResult.requests; prompt_index is global
    replicas: list[GenerationResult | None]  # per replica (None: it got no prompt)
    replica_of_prompt: list[int]

    def tokens(self) -> list[list[int]]:
        return [r.tokens for r in self.requests]


class ReplicatedEngine:
    """``Engine(model, policy, **engine_kw)`` on every device of ``devices`` (default: all), or, with ``mesh``, one
    tensor-parallel Engine per index of the mesh's data and fsdp axes, over that index's tensor devices."""

    def __init__(self, model: CausalLM, policy="vanilla", *, devices: Sequence | None = None, mesh: Mesh | None = None,
                 **engine_kw):
        if mesh is not None and devices is not None:
            raise ValueError("give devices or mesh, not both")
        if mesh is not None:
            groups = mesh.devices.reshape(-1, mesh.shape["tensor"])  # axes (data, fsdp, tensor): rows are replicas
            meshes = [Mesh(row.reshape(1, 1, -1), mesh.axis_names, axis_types=mesh.axis_types) for row in groups]
            self.devices = [row[0] for row in groups]
            self.engines = [Engine(model, policy, mesh=m, **engine_kw) for m in meshes]
            return
        self.devices = list(jax.devices() if devices is None else devices)
        if not self.devices:
            raise ValueError("devices must name at least one device")
        graphdef, state = nnx.split(model)
        self.engines = []
        for d in self.devices:
            with jax.default_device(d):
                self.engines.append(Engine(nnx.merge(graphdef, jax.device_put(state, d)), policy, **engine_kw))

    def generate(self, prompts: Sequence[Sequence[int]], *, chains: int = 1, **kw) -> ReplicatedGeneration:
        """``Engine.generate`` over the replicas (same arguments); prompt i runs on replica i % n."""
        if not prompts:
            raise ValueError("prompts must be a non-empty list of non-empty token lists")
        n = len(self.engines)
        mine = [list(range(r, len(prompts), n)) for r in range(n)]  # replica r: prompts r, r + n, ...

        def run(r):
            if not mine[r]:
                return None
            with jax.default_device(self.devices[r]):
                return self.engines[r].generate([prompts[i] for i in mine[r]], chains=chains, **kw)

        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(run, range(n)))
        requests = []
        for i in range(len(prompts)):
            local = i // n  # prompt i is the (i // n)-th of replica i % n
            for req in results[i % n].requests[local * chains:(local + 1) * chains]:
                requests.append(dataclasses.replace(req, prompt_index=i))
        return ReplicatedGeneration(requests=requests, replicas=results,
                                    replica_of_prompt=[i % n for i in range(len(prompts))])
