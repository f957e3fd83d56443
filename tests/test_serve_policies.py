"""dms_jax.serve.policies and registry: the built-in eviction policies' decisions, make_policy by name (the
model's config held by the policy, keyword overrides), hashing (static jit arguments), clear errors."""

import jax.numpy as jnp
import numpy as np
import pytest

from dms_jax import dms
from dms_jax.config import DMCConfig, DMSConfig
from dms_jax.serve.policies import DMSPolicy, FixedRatePolicy, VanillaPolicy
from dms_jax.serve.registry import make_policy
from dms_jax.serve.spec import CacheSpec

D = 4


def test_policies():
    pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 6, 7, 8]])
    assert not np.asarray(VanillaPolicy().decisions(None, pos, 2)).any()
    fixed_rate = FixedRatePolicy(DMSConfig(window=2), cr=4)
    fixed = np.asarray(fixed_rate.decisions(None, pos, 2))
    # decision for token p - 1: kept iff (p - 1) % 4 == 0; position 0 decides nothing.
    assert fixed[0, 0].tolist() == [False, False, True, True, True, False, True, True, True]
    assert fixed.shape == (1, 2, 9) and fixed_rate.delay_window == 2
    logits = jnp.asarray([[[-1.0, 2.0, 0.0], [3.0, -2.0, 1.0]]])
    d = DMSPolicy(DMSConfig(window=4)).decisions(logits, pos[:, :3], 2)
    assert np.asarray(d).tolist() == [[[False, True, False], [True, False, True]]]
    d = DMSPolicy(DMSConfig(window=4, alpha_per="layer")).decisions(logits, pos[:, :3], 2)
    assert np.asarray(d).tolist() == [[[False, True, False], [False, True, False]]]
    assert make_policy("fixed", cr=8, window=16).describe() == {"policy": "fixed", "window": 16, "cr": 8}
    assert make_policy("vanilla").uses_model_decisions is False
    assert make_policy("vanilla").describe() == {"policy": "vanilla"}

    # The policy holds the model's config itself; keyword arguments override its fields (the config checks them).
    cfg = DMSConfig(window=7, alpha_per="layer", variant="adapter")
    p = make_policy("dms", cfg)
    assert p.dms_cfg is cfg and (p.delay_window, p.uses_model_decisions) == (7, True)
    assert p.describe() == {"policy": "dms", "window": 7, "alpha_per": "layer"}
    assert make_policy("dms", cfg, window=3).dms_cfg == DMSConfig(window=3, alpha_per="layer", variant="adapter")
    assert make_policy("fixed", cfg, cr=2).dms_cfg is cfg
    assert make_policy("dms", window=5).dms_cfg == DMSConfig(window=5)
    dmc_cfg = DMCConfig(accumulation_window=5)
    q = make_policy("dmc", dmc_cfg=dmc_cfg)
    assert q.dmc_cfg is dmc_cfg and q.accumulation_window == 5 and q.describe() == {"policy": "dmc",
                                                                                 "accumulation_window": 5}
    assert make_policy("dmc", accumulation_window=3).accumulation_window == 3
    # Policies are static jit arguments: equal settings, equal hashes.
    assert hash(DMSPolicy(DMSConfig(window=3))) == hash(DMSPolicy(DMSConfig(window=3)))
    # The cache's ring is sized by the policy's delay: a spec from it holds ring_size(window) entries.
    assert CacheSpec.create(num_layers=1, num_kv_heads=1, head_dim=D, max_seqs=1, max_context=8,
                            window=p.delay_window).ring == dms.ring_size(7)


@pytest.mark.parametrize("call, match", [
    (lambda: make_policy("nope"), "unknown eviction policy 'nope'"),
    (lambda: make_policy("dms"), "needs a model with a DMSConfig"),
    (lambda: make_policy("fixed", cr=4), "policy 'fixed' needs a model with a DMSConfig"),
    (lambda: make_policy("dmc"), "needs a model with a DMCConfig"),
    (lambda: make_policy("dms", window=0), "window must be an integer >= 1"),
    (lambda: make_policy("dms", DMSConfig(), window=2.5), "window must be an integer >= 1"),
    (lambda: make_policy("dms", window=2, alpha_per="token"), "alpha_per must be 'head' or 'layer'"),
    (lambda: make_policy("dmc", accumulation_window=0), "accumulation_window must be an integer >= 1"),
    (lambda: FixedRatePolicy(DMSConfig(), cr=0), "cr must be an integer >= 1"),
])
def test_policy_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
