"""dms_jax.serve.replicas: data-parallel replicas on 8 fake CPU devices give the same greedy outputs as one
Engine on one device (all prompts in one batch), for DMS; every replica's weights live on its own
device, its pages all return, and answers come back in prompt order with their global prompt index.
Fake devices need XLA_FLAGS before jax is imported, so the 8-device part runs this file as a script in a
subprocess (`python tests/test_serve_replicas.py OUT`), as test_sharding.py does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_helpers as th  # noqa: E402


def _worker(out: str):
    import jax
    import numpy as np

    from dms_jax.serve.engine import Engine
    from dms_jax.serve.replicas import ReplicatedEngine
    from test_serve_engine import CHUNK, PAGE, _tiny_dms_model

    assert jax.device_count() == 8, jax.devices()
    model = _tiny_dms_model()
    rng = np.random.default_rng(3)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (13, 29, 6, 17, 9, 21, 5, 30, 11)]
    res = {}
    for policy in ("dms",):  # each device compiles its own executables: one policy keeps this test short
        rep = ReplicatedEngine(model, policy, page_size=PAGE, prefill_chunk=CHUNK)
        devices = [sorted({str(x.device) for x in jax.tree.leaves(e._layer_params)}) for e in rep.engines]
        got = rep.generate(prompts, max_new_tokens=8, stop_ids=[], chains=2)
        with jax.default_device(jax.devices()[0]):
            one = Engine(model, policy, page_size=PAGE, prefill_chunk=CHUNK).generate(
                prompts, max_new_tokens=8, stop_ids=[], chains=2)
        res[policy] = dict(replicated=got.tokens(), one=one.tokens(), devices=devices,
                           prompt_index=[r.prompt_index for r in got.requests], owner=got.replica_of_prompt,
                           leftover=[g.pages_in_use_at_end for g in got.replicas if g is not None])
    Path(out).write_text(json.dumps(res))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("replicas") / "out.json"
    env = th.cli_env({"cache": tmp_path_factory.mktemp("jaxcache")}, devices=8)
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_replicas_equal_one_device(results):
    r = results["dms"]
    assert r["replicated"] == r["one"]
    assert all(len(t) == 8 for t in r["one"])
    assert all(len(d) == 1 for d in r["devices"]) and len({d[0] for d in r["devices"]}) == 8  # one device each
    assert r["prompt_index"] == [i for i in range(9) for _ in range(2)]
    assert r["owner"] == [i % 8 for i in range(9)] and r["leftover"] == [0] * 8


if __name__ == "__main__":
    _worker(sys.argv[1])
