"""What the paged engine (engine.py) returns: per-request metrics and results, the result of a generation call,
the output of a decode call, and the error of an exhausted page pool (``on_exhaustion="error"``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


class PoolExhaustedError(RuntimeError):
    """The page pool cannot hold what a step needs (``on_exhaustion="error"``)."""


@dataclasses.dataclass
class RequestMetrics:
    """Per-request (one chain of one prompt) cache metrics. Token counts are summed over layers and KV heads."""

    prompt_tokens: int
    new_tokens: int
    kv_token_reads: int  # sum over decode steps of the live tokens the step's attention read
    kv_token_reads_dense: int  # the same for a dense cache (every token of every head)
    kv_token_reads_prefill: int  # keys visible to the prompt's queries during prefill
    peak_live_tokens: int  # most live (token, layer, head) entries at once
    final_live_tokens: int
    dense_tokens: int  # what a dense cache holds at the end: layers * kv_heads * tokens in the cache
    peak_pages: int  # most pages this request's tables referenced at once (shared prefix pages included)
    peak_bytes: int
    compression_ratio: float  # dense_tokens / final_live_tokens
    read_ratio: float  # kv_token_reads_dense / kv_token_reads


@dataclasses.dataclass
class RequestResult:
    prompt_index: int
    chain: int
    tokens: list[int]
    status: str  # "finished" (stop token or length limit) | "preempted"
    stopped: bool  # ended with a stop token
    metrics: RequestMetrics


@dataclasses.dataclass
class GenerationResult:
    requests: list[RequestResult]  # prompt-major: prompt 0 chain 0, prompt 0 chain 1, ...
    policy: dict
    page_size: int
    budget_pages: int
    bytes_per_page: int
    pool_high_water_pages: int
    pool_high_water_bytes: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    preempted: list[int]  # indices into requests
    pages_in_use_at_end: int = 0  # 0: every page went back to the pool
    segments: list = dataclasses.field(default_factory=list)  # per compiled decode call: width, forwards, seconds

    def tokens(self) -> list[list[int]]:
        return [r.tokens for r in self.requests]


@dataclasses.dataclass
class DecodeOutput:
    """What ``Engine.decode`` returns, per sequence slot."""

    tokens: list[list[int]]
    preempted: np.ndarray  # [S] bool
    stopped: np.ndarray  # [S] bool: ended with a stop id
    reads: np.ndarray  # [S] KV-cache token reads over the decode forwards
    peak_live: np.ndarray  # [S]
    peak_pages: np.ndarray  # [S]
    forwards: int  # decode forwards run (one token for every running slot each)
    seconds: float
    segments: list  # per compiled call: {"width_pages", "forwards", "seconds"} (the first includes compilation)
    cache: Any  # the cache afterwards
