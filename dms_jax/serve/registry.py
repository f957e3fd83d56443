"""Eviction policies by name: ``make_policy`` and ``POLICIES``, over the built-in policies (policies.py) and the
baselines (baselines.py). Its own module so that both are imported plainly: baselines builds on policies, and
neither needs this file."""

from __future__ import annotations

import dataclasses

from dms_jax.config import DMCConfig, DMSConfig
from dms_jax.serve.baselines import BASELINES
from dms_jax.serve.policies import DMCPolicy, DMSPolicy, EvictionPolicy, FixedRatePolicy, VanillaPolicy


POLICIES = ("vanilla", "dms", "fixed", "tova", "h2o", "streaming", "quest", "dmc")


def make_policy(name: str | EvictionPolicy, dms_cfg: DMSConfig | None = None, *, dmc_cfg: DMCConfig | None = None,
                **kw) -> EvictionPolicy:
    """A policy by name: "vanilla"; "dms" and "fixed" (the model's DMSConfig ``dms_cfg``, with ``window`` /
    ``alpha_per`` overriding its fields when given; "fixed" also takes ``cr``); "dmc" (the model's DMCConfig
    ``dmc_cfg``, ``accumulation_window`` overriding it); or a baseline of ``dms_jax.serve.baselines`` ("tova", "h2o",
    "streaming", "quest"; keyword ``budget`` = tokens per KV head)."""
    if isinstance(name, EvictionPolicy):
        return name
    if name == "vanilla":
        return VanillaPolicy()
    if name == "dmc":
        if dmc_cfg is None and "accumulation_window" not in kw:
            raise ValueError("policy 'dmc' needs a model with a DMCConfig (or an explicit accumulation_window)")
        return DMCPolicy(_with_fields(dmc_cfg or DMCConfig(), kw, ("accumulation_window",)), **kw)
    if name in ("dms", "fixed"):
        if dms_cfg is None and "window" not in kw:
            raise ValueError(f"policy {name!r} needs a model with a DMSConfig (or an explicit window)")
        cfg = _with_fields(dms_cfg or DMSConfig(), kw, ("window", "alpha_per"))
        return DMSPolicy(cfg, **kw) if name == "dms" else FixedRatePolicy(cfg, **kw)
    if name in BASELINES:
        return BASELINES[name](**kw)
    raise ValueError(f"unknown eviction policy {name!r}; known: {POLICIES}")


def _with_fields(cfg, kw: dict, fields: tuple[str, ...]):
    """``cfg`` with the given ``fields`` taken out of ``kw`` (popped) where present and not None; the config
    validates them."""
    given = {f: kw.pop(f) for f in fields if f in kw}
    given = {f: v for f, v in given.items() if v is not None}
    return dataclasses.replace(cfg, **given) if given else cfg
