"""An int8 K/V cache (Engine(cache_dtype="int8"), pallas_kernels.kv_codec) under every policy: teacher-forced
decode logits stay within a few percent of the exact references (the full-sequence hard forward for vanilla and
DMS, the float32-cache engine of the same policy for the baselines and DMC) and visibly differ from them (the
int8 path is taken), the bookkeeping holds (invariants, every page back), and a page costs 2 * (D + 4) bytes
per token. The Pallas kernel backends (interpret mode) read an int8 cache too, within the same tolerance."""

import numpy as np
import pytest

from dms_jax.serve.engine import Engine
from dms_jax.serve.spec import check_invariants
from test_serve_engine import CHUNK, PAGE, _hard_forward, _teacher_forced_errors, _tiny_dms_model
from test_serve_engine_dmc import _tiny_dmc_model

INT8_TOL = 0.05  # relative logit error of an int8 cache on these tiny models (float32 is exact to 1e-4)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_dms_model()


def _case(seed=5):
    rng = np.random.default_rng(seed)
    prompts = [list(map(int, rng.integers(3, 97, size=n))) for n in (21, 9)]
    conts = [list(map(int, rng.integers(3, 97, size=6))) for _ in prompts]
    return prompts, conts


@pytest.mark.parametrize("policy", ["vanilla", "dms"])
def test_int8_cache_close_to_the_exact_forward(tiny, policy):
    prompts, conts = _case()
    ref, _ = _hard_forward(tiny, [p + c for p, c in zip(prompts, conts)], "hard" if policy == "dms" else "off")
    eng = Engine(tiny, policy, page_size=PAGE, prefill_chunk=CHUNK, cache_dtype="int8")
    errs = _teacher_forced_errors(eng, prompts, conts, ref, 40)
    assert 1e-5 < max(errs) <= INT8_TOL, errs
    spec = eng.make_spec(2, 40)
    assert spec.bytes_per_entry == 2 * (tiny.cfg.head_dim + 4) and spec.bytes_per_page == PAGE * spec.bytes_per_entry


@pytest.mark.parametrize("policy,kw", [("tova", {"budget": 12}), ("h2o", {"budget": 12}),
                                       ("streaming", {"budget": 12}), ("quest", {"budget": 8}),
                                       ("fixed", {"cr": 4})])
def test_int8_cache_close_to_float_cache_for_baselines(tiny, policy, kw):
    prompts, conts = _case(6)
    logits = {}
    for dtype in ("float32", "int8"):
        eng = Engine(tiny, policy, page_size=PAGE, prefill_chunk=CHUNK, cache_dtype=dtype, **kw)
        spec = eng.make_spec(2, 40)
        cache = eng.new_cache(spec)
        _, cache, _, _ = eng.prefill(cache, spec, [0, 1], prompts)
        steps = []
        for k in range(len(conts[0])):
            out, cache, _ = eng.step(cache, spec, [c[k] for c in conts])
            steps.append(np.asarray(out))
        check_invariants(cache, spec)
        cache = eng.release(cache, spec, [0, 1])
        assert check_invariants(cache, spec)["used_pages"] == 0
        logits[dtype] = np.stack(steps)
    err = np.max(np.abs(logits["int8"] - logits["float32"])) / np.max(np.abs(logits["float32"]))
    assert 1e-5 < err <= INT8_TOL, err


def test_int8_cache_with_dmc():
    model = _tiny_dmc_model()
    prompts, conts = _case(7)
    out = {}
    for dtype in ("float32", "int8"):
        eng = Engine(model, "dmc", page_size=PAGE, prefill_chunk=CHUNK, cache_dtype=dtype)
        res = eng.generate(prompts, max_new_tokens=6, stop_ids=[])
        assert res.pages_in_use_at_end == 0
        ref, _ = _hard_forward(model, [p + c for p, c in zip(prompts, conts)])
        out[dtype] = max(_teacher_forced_errors(eng, prompts, conts, ref, 40))
    assert out["float32"] <= 1e-4 and 1e-5 < out["int8"] <= INT8_TOL, out


@pytest.mark.parametrize("backend", ["pallas_tpu", "pallas_gpu"])
def test_int8_cache_on_the_pallas_kernels(tiny, backend):
    """The kernels dequantise the int8 rows themselves: the DMS engine on them stays within the int8 tolerance of
    the exact forward, like the XLA path (whose stored rows are the same, so the two agree much more closely)."""
    prompts, conts = _case(8)
    ref, _ = _hard_forward(tiny, [p + c for p, c in zip(prompts, conts)], "hard")
    errs = {}
    for b in ("xla_blocked", backend):
        eng = Engine(tiny, "dms", page_size=PAGE, prefill_chunk=CHUNK, cache_dtype="int8", attention_backend=b,
                     interpret=True)
        errs[b] = np.asarray(_teacher_forced_errors(eng, prompts, conts, ref, 40))
    assert 1e-5 < errs[backend].max() <= INT8_TOL, errs
    assert np.max(np.abs(errs[backend] - errs["xla_blocked"])) <= 1e-4, errs


def test_unknown_cache_dtype_is_refused(tiny):
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        Engine(tiny, "dms", cache_dtype="int4")
