"""What a scheduler request is (``scheduler.py``): its checks at submission, its streamed events and its
completion record."""

from __future__ import annotations

import dataclasses
import threading
from typing import Callable

import numpy as np

from dms_jax.config import ModelConfig
from dms_jax.serve.sampling import SamplingConfig

STATUSES = ("waiting", "prefill", "running", "finished", "cancelled", "error")


class RequestError(ValueError):
    """A request refused at submission: ``param`` names the offending field (the server's 400 says it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """What a request's ``on_event`` receives after an iteration: its new tokens, and at the end its status."""

    rid: int
    tokens: list[int]
    done: bool
    status: str


@dataclasses.dataclass
class Completion:
    """A request and, once done, its result (``Scheduler.result``)."""

    rid: int
    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: tuple[int, ...]
    seed: int
    arrival: int
    on_event: Callable[[TokenEvent], None] | None = None
    status: str = "waiting"
    tokens: list[int] = dataclasses.field(default_factory=list)
    stopped: bool = False  # ended with a stop id
    error: str | None = None
    preemptions: int = 0
    reused_tokens: int = 0  # context tokens taken from a cache entry (the last admission)
    live_entries: int = 0  # live (token, layer, KV head) entries when it finished
    dense_entries: int = 0  # what a dense cache would hold then: layers * KV heads * cached tokens
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    # scheduling state
    slot: int | None = None
    todo: list[int] = dataclasses.field(default_factory=list, repr=False)  # context tokens still to prefill

    @property
    def context(self) -> list[int]:
        return self.prompt + self.tokens

    @property
    def compression(self) -> float:
        return self.dense_entries / self.live_entries if self.live_entries else 1.0


def dense_pages(num_tokens: int, heads: int, page_size: int) -> int:
    """Pages ``num_tokens`` tokens take when every one of ``heads`` (layers x KV heads) keeps all of them."""
    return heads * -(-int(num_tokens) // page_size)


def check_request(prompt, max_new_tokens, sampling, stop_ids, seed, *, cfg: ModelConfig, max_tokens: int,
                  max_stop_ids: int, pool: tuple[int, int, int] | None = None) -> list[int]:
    """The prompt as a list of ints, after checking every field of a request; RequestError names the bad one.
    max_tokens: the context per head; pool: (pages, layers * KV heads, page size) when the request's dense length
    must fit the whole pool (a policy that evicts nothing)."""
    vocab = cfg.vocab_size
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise RequestError("max_tokens", f"max_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(sampling, SamplingConfig):
        raise RequestError("sampling", f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if sampling.top_k > vocab:
        raise RequestError("top_k", f"top_k must be in [0, {vocab}], got {sampling.top_k}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 31:
        raise RequestError("seed", f"seed must be an integer in [0, 2^31), got {seed!r}")
    prompt = list(prompt)
    if not prompt or any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) or not 0 <= t < vocab
                         for t in prompt):
        raise RequestError("prompt", f"prompt must be a non-empty list of token ids in [0, {vocab})")
    stops = list(cfg.eos_token_ids if stop_ids is None else stop_ids)
    if len(stops) > max_stop_ids or any(not isinstance(t, (int, np.integer)) or not 0 <= t < vocab for t in stops):
        raise RequestError("stop", f"stop ids must be at most {max_stop_ids} token ids in [0, {vocab})")
    if len(prompt) + max_new_tokens > max_tokens:
        raise RequestError("max_tokens" if len(prompt) < max_tokens else "prompt",
                           f"the prompt ({len(prompt)} tokens) + max_tokens ({max_new_tokens}) exceed the "
                           f"context of {max_tokens} tokens")
    if pool is not None:
        num_pages, heads, page_size = pool
        pages = dense_pages(len(prompt) + max_new_tokens, heads, page_size)
        if pages > num_pages:
            raise RequestError("max_tokens", f"the prompt ({len(prompt)} tokens) + max_tokens ({max_new_tokens}) "
                               f"need {pages} KV pages, more than the whole pool ({num_pages})")
    return [int(t) for t in prompt]

