"""dms_jax.serve.tensor_parallel: an Engine whose KV heads are split over the "tensor" axis of a mesh of fake CPU
devices gives what one device gives -- the same greedy tokens for evicting, reducing and merging policies (DMS,
TOVA, DMC; Quest in the slow part), also through the Pallas decode kernel (Triton, interpret mode; slow part), the same logits step by step (atol 1e-5, float32), the same Scheduler outputs
with a shared prefix forked -- while each device holds only its share of the page pool, every head's pages stay in
its own share and no compiled program all-gathers a pool; data-parallel replicas of tensor-parallel engines (a
4 x 2 mesh of 8 devices, slow part) agree too, and meshes that do not fit the model are refused with a message
naming the problem. Fake devices need XLA_FLAGS before jax is imported, so each part runs this file as a script in
a subprocess (`python tests/test_serve_tensor_parallel.py OUT main|slow`), as test_serve_replicas.py does."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402

POLICIES = ("dms", "tova")  # the model-decision path, a prompt reduction and key passes (+ "dmc" below)
SLOW_POLICIES = ("quest",)  # page masks; with the 4 x 2 replicas in the slow part (each replica compiles its own)


def _logits_and_layout(model, prompts, mesh):
    """Prefill, then 4 greedy decode steps through the low-level API: (logits per step, layout facts)."""
    import jax.numpy as jnp
    import numpy as np

    from dms_jax.serve.engine import Engine
    from dms_jax.serve.spec import check_invariants
    from test_serve_engine import CHUNK, PAGE

    eng = Engine(model, "dms", page_size=PAGE, prefill_chunk=CHUNK, mesh=mesh)
    spec = eng.make_spec(len(prompts), 96)
    cache = eng.new_cache(spec)
    last, cache, failed, _ = eng.prefill(cache, spec, list(range(len(prompts))), prompts)
    steps = [np.asarray(last)]
    for _ in range(4):
        tok = jnp.argmax(last, axis=-1).astype(jnp.int32)
        last, cache = eng.step(cache, spec, tok)[:2]
        steps.append(np.asarray(last))
    spec_of = lambda a: str(getattr(a.sharding, "spec", None))  # noqa: E731
    layout = dict(invariants=check_invariants(cache, spec), pool_spec=spec_of(cache.k_pages),
                  table_spec=spec_of(cache.block_tables),
                  shards=sorted([list(s.data.shape) for s in cache.k_pages.addressable_shards]),
                  pool_pages=spec.pool_pages, failed=np.asarray(failed).tolist())
    return steps, layout


def _worker(out: str, part: str):
    import jax
    import numpy as np

    from dms_jax import sharding
    from dms_jax.serve.engine import Engine
    from dms_jax.serve.replicas import ReplicatedEngine
    from dms_jax.serve.scheduler import Scheduler
    from test_serve_engine import CHUNK, PAGE, _tiny_dms_model
    from test_serve_engine_dmc import _tiny_dmc_model  # merging instead of evicting: layer-by-layer allocation

    assert jax.device_count() == 8, jax.devices()
    model = _tiny_dms_model()  # 2 KV heads
    rng = np.random.default_rng(5)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 29, 6, 17, 40)]
    tp = sharding.make_mesh(data=1, tensor=2, devices=jax.devices()[:2])
    kw = dict(page_size=PAGE, prefill_chunk=CHUNK)
    res = {"generate": {}}
    for policy in POLICIES if part == "main" else SLOW_POLICIES + ("dms",):
        got = Engine(model, policy, mesh=tp, **kw).generate(prompts, max_new_tokens=8, stop_ids=[], chains=2)
        one = Engine(model, policy, **kw).generate(prompts, max_new_tokens=8, stop_ids=[], chains=2)
        res["generate"][policy] = dict(tp=got.tokens(), one=one.tokens(), leftover=got.pages_in_use_at_end)
    if part == "slow":
        # The kernel path (pallas_kernels.paged_decode_attention, per device on its own share): the Triton kernel in
        # interpret mode, for DMS and for DMC's page copies and merges, against the same kernel on one device.
        for policy in ("dms", "dmc"):
            m = model if policy == "dms" else _tiny_dmc_model()
            pk = dict(kw, attention_backend="pallas_gpu", interpret=True)
            got = Engine(m, policy, mesh=tp, **pk).generate(prompts[:3], max_new_tokens=6, stop_ids=[], chains=2)
            one = Engine(m, policy, **pk).generate(prompts[:3], max_new_tokens=6, stop_ids=[], chains=2)
            res["generate"][policy + "_pallas_gpu"] = dict(tp=got.tokens(), one=one.tokens(),
                                                           leftover=got.pages_in_use_at_end)
        grid = sharding.make_mesh(data=4, tensor=2)
        rep = ReplicatedEngine(model, "dms", mesh=grid, **kw)
        got = rep.generate(prompts, max_new_tokens=8, stop_ids=[], chains=2)
        res["replicas"] = dict(tokens=got.tokens(), one=res["generate"]["dms"]["one"],
                               devices=[sorted(str(d) for d in e.mesh.devices.flat) for e in rep.engines])
        Path(out).write_text(json.dumps(res))
        return

    dmc_model = _tiny_dmc_model()
    got = Engine(dmc_model, "dmc", mesh=tp, **kw).generate(prompts, max_new_tokens=8, stop_ids=[], chains=2)
    one = Engine(dmc_model, "dmc", **kw).generate(prompts, max_new_tokens=8, stop_ids=[], chains=2)
    res["generate"]["dmc"] = dict(tp=got.tokens(), one=one.tokens(), leftover=got.pages_in_use_at_end)

    steps_tp, layout = _logits_and_layout(model, prompts, tp)
    steps_one, _ = _logits_and_layout(model, prompts, None)
    res["logit_err"] = max(float(np.max(np.abs(a - b))) for a, b in zip(steps_tp, steps_one))
    res["layout"] = layout

    sched = {}
    system = prompts[4][:20]  # a shared prefix: later requests fork its pages copy-on-write (per head group)
    for name, mesh in (("tp", tp), ("one", None)):
        s = Scheduler(Engine(model, "dms", mesh=mesh, **kw), max_seqs=4, context=96, prefill_batch=2)
        s.add_prefix(system)
        shared = s.generate([system + p for p in prompts[:3]], max_new_tokens=6, stop_ids=[])
        sched[name + "_reused"] = s.counters["reused_tokens"]
        sched[name] = [c.tokens for c in shared + s.generate(prompts[:4], max_new_tokens=6, stop_ids=[])]
    res["scheduler"] = sched

    errors = {}
    for name, make in (
            ("tensor_too_wide", lambda: Engine(model, "dms", mesh=sharding.make_mesh(data=1, tensor=4,
                                                                                       devices=jax.devices()[:4]))),
            ("data_axis", lambda: Engine(model, "dms", mesh=sharding.make_mesh(data=2, tensor=2,
                                                                                 devices=jax.devices()[:4]))),
            ("odd_budget", lambda: Engine(model, "dms", mesh=tp, budget_pages=33).make_spec(2, 64))):
        try:
            make()
            errors[name] = None
        except ValueError as e:
            errors[name] = str(e)
    res["errors"] = errors
    Path(out).write_text(json.dumps(res))


def _run_worker(tmp_path_factory, part: str) -> dict:
    """The worker's results for ``part``, plus the pool all-gathers found in the programs it compiled."""
    out = tmp_path_factory.mktemp("tp") / "out.json"
    dump = tmp_path_factory.mktemp("hlo")
    env = th.cli_env({"cache": tmp_path_factory.mktemp("jaxcache")}, devices=8)
    env["XLA_FLAGS"] += (f" --xla_dump_to={dump} --xla_dump_hlo_as_text"
                         " --xla_dump_hlo_module_re=.*(prefill|decode|emit|segment|release|fork).*")
    proc = subprocess.run([sys.executable, __file__, str(out), part], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    res["pool_gathers"] = _pool_gathers(dump)
    return res


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run_worker(tmp_path_factory, "main")


@pytest.fixture(scope="module")
def slow_results(tmp_path_factory):
    return _run_worker(tmp_path_factory, "slow")


def _pool_gathers(dump: Path) -> dict:
    """Per compiled tensor-parallel program of the engine and scheduler (prefill chunks, prompt reductions, decode
    segments, first tokens, releases, forks): the all-gathers of a float array with as many rows as a whole page
    pool (the pool's pages as seen in the entry parameters named cache.k_pages, times the devices splitting them)."""
    found = {}
    for f in sorted(dump.glob("*after_optimizations.txt")):
        text = f.read_text()
        pool = re.search(r"= \w+\[(\d+),[^\]]*\][^\n]*sharding=\{devices=\[(\d+),[^\n]*"
                         r"op_name=\"cache\.k_pages\"", text)
        if pool is None or pool.group(2) == "1":
            continue  # a single-device module
        rows = int(pool.group(1)) * int(pool.group(2))
        found[f.name] = re.findall(rf"= (?:f32|bf16|f16|s8)\[{rows},[^\]]*\][^ ]* all-gather\(", text)
    return found


@pytest.mark.parametrize("policy", POLICIES + ("dmc",))
def test_greedy_tokens_equal_one_device(results, policy):
    r = results["generate"][policy]
    assert r["tp"] == r["one"] and all(len(t) == 8 for t in r["one"])
    assert r["leftover"] == 0


@pytest.mark.slow  # interpret-mode kernels: ~1 min quiet
@pytest.mark.parametrize("policy", ("dms", "dmc"))
def test_pallas_kernel_under_the_mesh_equals_one_device(slow_results, policy):
    """The Triton decode kernel (interpret mode) runs per device on its share; tokens equal one device's."""
    r = slow_results["generate"][policy + "_pallas_gpu"]
    assert r["tp"] == r["one"] and all(len(t) == 6 for t in r["one"])
    assert r["leftover"] == 0
    gathers = slow_results["pool_gathers"]
    assert any("decode" in name for name in gathers)  # the dump holds the partitioned programs
    assert {name: found for name, found in gathers.items() if found} == {}


def test_logits_equal_one_device_step_by_step(results):
    assert results["logit_err"] < 1e-5


def test_each_device_holds_its_share_and_heads_keep_their_group(results):
    lay = results["layout"]
    assert lay["pool_spec"] == "P('tensor',)"
    assert lay["table_spec"] == "P(None, None, 'tensor')"
    half = lay["pool_pages"] // 2
    assert [s[0] for s in lay["shards"]] == [half, half]
    # check_invariants asserts that a head's pages lie in its group's share; the cache holds real pages
    assert lay["invariants"]["used_pages"] > 0 and not any(lay["failed"])


def test_no_device_gathers_the_whole_pool(results):
    """The compiled tensor-parallel programs never all-gather a page pool: each device reads its own share
    (without tensor_parallel.over_kv_heads the prefill's attention loop and TOVA's key pass gathered whole pools)."""
    found = results["pool_gathers"]
    assert any("prefill_chunk" in n for n in found) and any("decode_segment" in n for n in found)
    assert {n: g for n, g in found.items() if g} == {}


def test_scheduler_equal_one_device(results):
    r = results["scheduler"]
    assert r["tp"] == r["one"]
    assert r["tp_reused"] == r["one_reused"] >= 3 * 20  # the prefix was forked, not prefilled again


@pytest.mark.slow  # four more tensor-parallel engines to compile
@pytest.mark.parametrize("policy", SLOW_POLICIES)
def test_greedy_tokens_equal_one_device_slow(slow_results, policy):
    r = slow_results["generate"][policy]
    assert r["tp"] == r["one"] and r["leftover"] == 0


@pytest.mark.slow
def test_replicas_of_tensor_parallel_engines(slow_results):
    r = slow_results["replicas"]
    assert r["tokens"] == r["one"]
    assert len(r["devices"]) == 4 and all(len(d) == 2 for d in r["devices"])
    assert len({d for ds in r["devices"] for d in ds}) == 8


def test_bad_meshes_are_refused(results):
    e = results["errors"]
    assert "'tensor' axis (4) must divide the model's 2 KV heads" in e["tensor_too_wide"]
    assert "ReplicatedEngine" in e["data_axis"]
    assert "kv_groups (2) must divide" in e["odd_budget"] and "num_pages (33)" in e["odd_budget"]


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
