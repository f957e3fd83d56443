"""dms_jax.train.step: the distillation loss, the trainable-parameter filters, the jitted train step with gradient
accumulation, the frozen teacher, the compression hinge at work, and bf16 compute over fp32 master weights.

All on a tiny random Llama (2 layers, hidden 32, 4 query / 2 KV heads, head_dim 8, vocab 128) built in-process;
token ids are random: nothing here claims model quality, only arithmetic.

Tolerances: one batch of 2b against A=2
micro-batches of b: rtol 2e-5 / atol 1e-6 on the gradients (float32 sums in another order; atol is the
float32 spacing of the weights the gradient is read back from); everything that
should not move (frozen weights, teacher, step-0 logits) is compared bit for bit.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dms_jax import dms, weights
from dms_jax.config import DMSConfig, ModelConfig
from dms_jax.train import losses
from dms_jax.train import step as train

CFG = ModelConfig(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
T = 24


def hf_tensors(seed=0) -> dict:
    """HF-named float32 weights of the tiny Llama, large enough that the teacher's distribution is not uniform
    (numpy, so that building a model compiles nothing)."""
    rng = np.random.default_rng(seed)
    h, d, hq, hkv, f, v = (CFG.hidden_size, CFG.head_dim, CFG.num_heads, CFG.num_kv_heads, CFG.intermediate_size,
                           CFG.vocab_size)
    normal = lambda *shape, std=0.2: (std * rng.standard_normal(shape)).astype(np.float32)
    norm = lambda: (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    out = {"model.embed_tokens.weight": normal(v, h, std=1.0), "model.norm.weight": norm(),
           "lm_head.weight": normal(v, h)}
    for i in range(CFG.num_layers):
        pre = f"model.layers.{i}."
        out.update({pre + "input_layernorm.weight": norm(), pre + "post_attention_layernorm.weight": norm(),
                    pre + "self_attn.q_proj.weight": normal(hq * d, h), pre + "self_attn.k_proj.weight": normal(hkv * d, h),
                    pre + "self_attn.v_proj.weight": normal(hkv * d, h), pre + "self_attn.o_proj.weight": normal(h, hq * d),
                    pre + "mlp.gate_proj.weight": normal(f, h), pre + "mlp.up_proj.weight": normal(f, h),
                    pre + "mlp.down_proj.weight": normal(h, f)})
    return out


def tiny_model(variant="adapter", window=4, seed=0, dtype=jnp.float32, **dms_kw):
    """The tiny model with DMS; the adapter (when present) is zero-initialised, as a fresh retrofit starts."""
    return weights.from_hf_state_dict(CFG, hf_tensors(seed), DMSConfig(variant=variant, window=window, **dms_kw),
                                      dtype=dtype)


def batch(b=2, t=T, seed=0, pad_last=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, size=(b, t), dtype=np.int32)
    valid = np.ones((b, t), bool)
    if pad_last:
        valid[:, t - pad_last:] = False
    return jnp.asarray(tokens), jnp.asarray(valid)


def flat(state) -> dict:
    """{dotted path: numpy array} of an nnx.State."""
    return {".".join(map(str, p)): np.asarray(jax.device_get(v.get_value() if hasattr(v, "get_value") else v))
            for p, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------------------------- config


def test_distill_config_validation_names_the_parameter():
    for kw, name in [(dict(steps=0), "steps"), (dict(batch_size=3, grad_accum=2), "grad_accum"),
                     (dict(cr_final=0.5), "cr_final"), (dict(cr_initial=0.9), "cr_initial"), (dict(lr=0.0), "lr"),
                     (dict(seq_len=1), "seq_len"), (dict(compute_dtype="float16"), "compute_dtype"),
                     (dict(trainable="(unclosed"), "trainable"), (dict(b2=1.0), "b2"),
                     (dict(cr_final_step=0), "cr_final_step")]:
        with pytest.raises(ValueError, match=name):
            train.DistillConfig(**kw)
    cfg = train.DistillConfig(steps=100, cr_initial=1, cr_final=5)
    assert cfg.schedule_final_step == 80
    np.testing.assert_allclose([float(cfg.target_cr(s)) for s in (0, 40, 80, 100)], [1, 3, 5, 5])


def test_micro_batches_split_rows_in_order():
    tokens = np.arange(4 * 3).reshape(4, 3)
    t, v = train.micro_batches(tokens, tokens > 2, 2)
    assert t.shape == (2, 2, 3)
    np.testing.assert_array_equal(t.reshape(4, 3), tokens)
    np.testing.assert_array_equal(v.reshape(4, 3), tokens > 2)


# ----------------------------------------------------------------------------------------------- step 0


def test_adapter_variant_at_step_zero_is_the_teacher():
    """Zero-initialised adapter: every decision logit is exactly -offset = -5.

    What is exactly true at step 0 (and asserted):
      * hard (inference) mode evicts nothing and its logits are bit-identical to the teacher's: KL is exactly 0;
      * training mode draws logistic noise, and a token flips to "evict" exactly where noise > offset
        (P = sigmoid(-5) ~ 0.7%), whatever tau: tau rescales z but not its sign. Such a token, and one whose
        noise is just below 5 (soft alpha), is masked for queries beyond the window, so the training-mode KL
        is small but not 0 in general; it is exactly 0 when no key can leave the window (window >= T - 1).
    """
    tokens, valid = batch(b=4, t=T)
    tcfg = train.DistillConfig(trainable="all", compute_dtype="float32", remat=False)
    model = tiny_model("adapter", window=4)
    graphdef, params, frozen, teacher = train.split_model(model, tcfg)

    # Hard mode == teacher, bit for bit.
    forward = jax.jit(lambda state, mode: nnx.merge(graphdef, state)(tokens, valid=valid, dms_mode=mode),
                      static_argnums=1)
    s_logits, aux = forward(nnx.state(model), "hard")
    t_logits, _ = forward(teacher, "off")
    assert float(jnp.sum(aux["decisions"])) == 0.0
    np.testing.assert_array_equal(np.asarray(s_logits), np.asarray(t_logits))
    assert float(losses.kl_student_teacher(s_logits, t_logits, valid)) == 0.0

    # Training mode: decisions are exactly 1[noise > offset] (the last token, not decided yet, is kept).
    key = jax.random.key(7)
    loss_fn = jax.jit(train.distill_loss, static_argnums=(0, 8))
    target = dms.target_eviction_fraction(tcfg.target_cr(0))  # CR 1 -> target 0
    loss, m = loss_fn(graphdef, params, frozen, teacher, tokens, valid, key, target, False)
    _, aux = jax.jit(lambda state: nnx.merge(graphdef, state)(tokens, valid=valid, dms_mode="train",
                                                              noise_key=key))(nnx.state(model))
    layer_keys = jax.random.split(key, CFG.num_layers)
    noise = np.asarray(jax.jit(jax.vmap(lambda k: dms.logistic_noise(k, (4, CFG.num_kv_heads, T))))(layer_keys))
    # A token has a decision of its own when it is real and so is its producer (the next position): the last real
    # token's is pending, and a pad never lends its logit. Everything else is kept.
    v = np.asarray(valid)
    decided = v & np.concatenate([v[:, 1:], np.zeros_like(v[:, :1])], axis=1)
    want = (noise > model.dms_cfg.alpha_offset) & decided[None, :, None, :]
    np.testing.assert_array_equal(np.asarray(aux["decisions"]) > 0.5, want)
    assert want.sum() > 0, "pick a noise key that flips at least one token"
    want_frac = want.sum() / (decided.sum() * CFG.num_layers * CFG.num_kv_heads)
    np.testing.assert_allclose(float(m["eviction_fraction"]), want_frac, rtol=1e-6)
    assert float(m["loss_cr"]) == 0.0  # target 0 at CR 1
    assert 0.0 < float(m["kl"]) < 0.05 and float(loss) == float(m["kl"])

    # No key ever leaves the window: the noisy soft mask is never applied and the KL is exactly 0.
    model_w = tiny_model("adapter", window=T - 1)
    g2, p2, f2, t2 = train.split_model(model_w, tcfg)
    _, m0 = loss_fn(g2, p2, f2, t2, tokens, valid, key, target, False)
    assert float(m0["kl"]) == 0.0


def test_cr_loss_weight_scales_the_hinge_only():
    """loss = KL + w * hinge, with the logged KL and hinge unchanged by w; w <= 0 is refused."""
    tokens, valid = batch(b=2, t=T)
    tcfg = train.DistillConfig(trainable="all", compute_dtype="float32", remat=False, cr_final=4.0)
    graphdef, params, frozen, teacher = train.split_model(tiny_model("adapter", window=4), tcfg)
    loss_fn = jax.jit(train.distill_loss, static_argnums=(0, 8))
    target = dms.target_eviction_fraction(4.0)  # 0.75: far above what the untrained decisions evict
    key = jax.random.key(3)
    loss1, m1 = loss_fn(graphdef, params, frozen, teacher, tokens, valid, key, target, False, None, 1.0)
    loss3, m3 = loss_fn(graphdef, params, frozen, teacher, tokens, valid, key, target, False, None, 3.0)
    assert float(m1["loss_cr"]) > 0.5
    np.testing.assert_allclose([float(m3["kl"]), float(m3["loss_cr"])], [float(m1["kl"]), float(m1["loss_cr"])])
    np.testing.assert_allclose(float(loss1), float(m1["kl"]) + float(m1["loss_cr"]), rtol=1e-6)
    np.testing.assert_allclose(float(loss3), float(m1["kl"]) + 3.0 * float(m1["loss_cr"]), rtol=1e-6)
    with pytest.raises(ValueError, match="cr_loss_weight must be > 0"):
        train.DistillConfig(cr_loss_weight=0.0)


# ----------------------------------------------------------------------------------------------- trainable sets


def test_trainable_filters_select_what_they_say():
    model = tiny_model("adapter")
    every = set(flat(nnx.state(model, nnx.Param)))

    def selected(spec):
        return set(flat(nnx.state(model, train.trainable_filter(spec))))

    assert selected("all") == every
    adapter = selected("adapter")
    assert adapter == {f"layers.{i}.self_attn.{n}" for i in range(CFG.num_layers)
                       for n in ("dms_proj_alpha.kernel", "dms_proj_alpha_norm.weight")}
    assert selected(r"layers\.0\.self_attn\.q_proj") == {"layers.0.self_attn.q_proj.kernel"}
    assert selected(r"mlp\.(up|down)_proj") == {f"layers.{i}.mlp.{n}_proj.kernel" for i in range(2)
                                                 for n in ("up", "down")}
    with pytest.raises(ValueError, match="trainable"):
        train.trainable_filter("[")
    # A pattern that selects nothing is refused before any compute.
    with pytest.raises(ValueError, match="selects no parameter"):
        train.split_model(model, train.DistillConfig(trainable="no_such_weight"))
    # The neuron model has no adapter: "adapter" selects nothing there.
    with pytest.raises(ValueError, match="selects no parameter"):
        train.split_model(tiny_model("neuron"), train.DistillConfig(trainable="adapter"))


@pytest.fixture(scope="module")
def adapter_run():
    """Adapter-only training at a high target (CR 8: evict 87.5%) for a few steps; snapshots for the tests."""
    steps = 8
    tcfg = train.DistillConfig(steps=steps, batch_size=4, seq_len=T, lr=3e-2, cr_initial=8.0, cr_final=8.0,
                               trainable="adapter", compute_dtype="float32", remat=False, seed=3)
    model = tiny_model("adapter", window=2)
    before = flat(nnx.state(model, nnx.Param))
    graphdef, params, frozen, teacher = train.split_model(model, tcfg)
    teacher_before, frozen_before = flat(teacher), flat(frozen)
    tx = train.make_optimizer(tcfg)
    opt_state = tx.init(params)
    step_fn = train.make_train_step(tcfg, tx, graphdef)
    eval_tokens, eval_valid = batch(b=4, seed=99)

    @jax.jit
    def hard_fraction(params, frozen):
        _, aux = nnx.merge(graphdef, params, frozen)(eval_tokens, valid=eval_valid, dms_mode="hard")
        return jnp.mean(dms.eviction_fraction(aux["decisions"], eval_valid))

    out = {"metrics": [], "hard_fraction": [float(hard_fraction(params, frozen))], "before": before,
           "teacher_before": teacher_before, "frozen_before": frozen_before}
    for step in range(steps):
        tokens, valid = batch(b=4, seed=step)
        toks, val = train.micro_batches(tokens, valid, tcfg.grad_accum)
        params, opt_state, m = step_fn(params, frozen, teacher, opt_state, toks, val, step)
        out["metrics"].append({k: float(v) for k, v in m.items()})
        out["hard_fraction"].append(float(hard_fraction(params, frozen)))
        if step == 0:
            out["after_one"] = flat(nnx.state(nnx.merge(graphdef, params, frozen), nnx.Param))
    out["after"] = flat(nnx.state(nnx.merge(graphdef, params, frozen), nnx.Param))
    out["teacher_after"], out["frozen_after"] = flat(teacher), flat(frozen)
    return out


def test_adapter_only_training_leaves_every_other_weight_bit_identical(adapter_run):
    for snap in ("after_one", "after"):
        changed = {k for k, v in adapter_run[snap].items() if not np.array_equal(v, adapter_run["before"][k])}
        assert changed and all("dms_proj_alpha" in k for k in changed), sorted(changed)
        # the zero-initialised adapter kernels did learn
        assert {f"layers.{i}.self_attn.dms_proj_alpha.kernel" for i in range(CFG.num_layers)} <= changed


def test_teacher_and_frozen_never_change(adapter_run):
    chex.assert_trees_all_equal(adapter_run["teacher_after"], adapter_run["teacher_before"])
    chex.assert_trees_all_equal(adapter_run["frozen_after"], adapter_run["frozen_before"])


def test_compression_hinge_pushes_eviction_up(adapter_run):
    """At target CR 8 the hinge drives the decision logits up: held-out hard-mode eviction goes from 0 to
    a large fraction within 8 steps, and the training metric follows."""
    hard = adapter_run["hard_fraction"]
    train_frac = [m["eviction_fraction"] for m in adapter_run["metrics"]]
    hinge = [m["loss_cr"] for m in adapter_run["metrics"]]
    assert hard[0] == 0.0
    assert hard[-1] > 0.3, hard
    assert train_frac[-1] > train_frac[0] + 0.3, train_frac
    assert hinge[-1] < hinge[0] - 0.3, hinge
    assert all(np.isfinite(m["loss"]) for m in adapter_run["metrics"])
    assert all(m["target_cr"] == 8.0 for m in adapter_run["metrics"])


# ----------------------------------------------------------------------------------------------- accumulation


def test_grad_accumulation_equals_one_big_batch():
    """A=2 micro-batches of b=2 give the gradient of one batch of 4 (SGD with lr 1 exposes it: p1 = p0 - g).

    The two set-ups draw different Gumbel noise by design (noise = fold_in(step key, micro-batch)), so the check
    runs where the noise cannot enter: window >= T - 1 (the soft mask never applies) and target CR 1 (the hinge
    is 0 with zero gradient). The student is the teacher plus a small perturbation (and the neuron variant's
    zeroed neuron), so the KL and its gradients are not 0. All tokens are valid (the mean of the micro-batch
    means is then the batch mean).
    """
    model = tiny_model("neuron", window=T - 1)
    train.zero_decision_neurons(model)
    tokens, valid = batch(b=4, seed=5)
    results = {}
    for accum in (1, 2):
        tcfg = train.DistillConfig(batch_size=4, grad_accum=accum, seq_len=T, compute_dtype="float32", remat=False)
        graphdef, params, frozen, teacher = train.split_model(model, tcfg)
        # A student some distance from the teacher, so that the KL and its gradients are not tiny.
        rng = np.random.default_rng(11)
        params = jax.tree.map(lambda x: jnp.asarray(x + 0.05 * rng.standard_normal(x.shape, np.float32)), params)
        p0 = flat(params)
        tx = optax.sgd(1.0)
        step_fn = train.make_train_step(tcfg, tx, graphdef)
        toks, val = train.micro_batches(tokens, valid, accum)
        assert toks.shape == (accum, 4 // accum, T)
        p1, _, m = step_fn(params, frozen, teacher, tx.init(params), toks, val, 0)
        results[accum] = ({k: p0[k] - v for k, v in flat(p1).items()}, {k: float(v) for k, v in m.items()})
    (g1, m1), (g2, m2) = results[1], results[2]
    assert m1["kl"] > 1e-3 and m1["loss_cr"] == 0.0
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=2e-5)
    for k in g1:
        # atol: g is read back as p0 - (p0 - g), exact only to the float32 spacing of p0 (embeddings ~ 4: 5e-7).
        np.testing.assert_allclose(g2[k], g1[k], rtol=2e-5, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------------------------- precision


def test_bf16_compute_keeps_f32_master_params():
    tcfg = train.DistillConfig(batch_size=2, seq_len=T, compute_dtype="bfloat16", remat=True)
    model = tiny_model("neuron", window=4, dtype=jnp.bfloat16)
    graphdef, params, frozen, teacher = train.split_model(model, tcfg)
    chex.assert_type(jax.tree.leaves(params) + jax.tree.leaves(frozen), jnp.float32)  # master weights
    assert {x.dtype for x in jax.tree.leaves(teacher)} == {jnp.dtype(jnp.bfloat16)}
    tx = train.make_optimizer(tcfg)
    opt_state = tx.init(params)
    step_fn = train.make_train_step(tcfg, tx, graphdef)
    tokens, valid = batch(b=2)
    toks, val = train.micro_batches(tokens, valid, 1)
    # Shapes and dtypes of one step, traced but not compiled (seconds saved on CI).
    new_params, new_opt, metrics = jax.eval_shape(step_fn, params, frozen, teacher, opt_state, toks, val, 0)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
    assert {x.dtype for x in jax.tree.leaves(new_params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(new_opt) if x.ndim} == {jnp.dtype(jnp.float32)}  # Adam mu, nu
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(metrics))
    # ... while the matmuls of the forward passes run in bf16.
    jaxpr = jax.make_jaxpr(lambda p: train.distill_loss(graphdef, p, frozen, teacher, tokens, valid,
                                                        jax.random.key(0), 0.0, False))(params)
    text = str(jaxpr)
    bf16_dots = len(re.findall(r":bf16\[[^\]]*\] = dot_general", text))
    assert bf16_dots >= 2 * CFG.num_layers * 7, text  # q, k, v, o, gate, up, down; teacher and student
