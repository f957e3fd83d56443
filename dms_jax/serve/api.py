"""An OpenAI-compatible HTTP API over a ``Scheduler`` (``python -m experiments.serve``), on FastAPI + uvicorn.

    POST /v1/completions        prompt (text or token ids) -> text; "stream": true sends server-sent events
    POST /v1/chat/completions   messages -> the assistant's answer (the model's chat template), streaming too
    GET  /v1/models             the one model served
    GET  /health                200 while the scheduler's worker runs, 503 after it failed
    GET  /metrics               Prometheus text: pages used / free, live entries, compression, queue depth,
                                tokens/s, preemptions, ...

One worker thread drives the scheduler (``Worker``); request handlers only submit, cancel and wait for their
tokens, which the worker hands over through the event loop. A client that disconnects cancels its request, which
frees its pages at the next iteration. Bad input gets a 400 in OpenAI's shape (``{"error": {"message", "type",
"param", "code"}}``) naming the parameter. Sampling fields: ``temperature`` [0, 2] (default 1, as OpenAI; 0 is
greedy), ``top_p`` (0, 1], ``top_k`` (an extension, 0 = off), ``seed``, ``stop`` (up to 4 strings). Each
response carries, besides ``usage``, a ``kv`` object: the request's live and dense KV entries when it ended, its
compression, preemptions and the context tokens it reused from the cache.
"""


import asyncio
import contextlib
import json
import threading
import time
from typing import Any

from dms_jax.chat import chat_text, encode
from dms_jax.serve.requests import RequestError, TokenEvent
from dms_jax.serve.sampling import SamplingConfig
from dms_jax.serve.scheduler import Scheduler

MAX_STOP_STRINGS = 4
ROLES = ("system", "user", "assistant")


class ApiError(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = "invalid_value", kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ----------------------------------------------------------------------------------------------- the worker


class Worker:
    """Runs ``scheduler.step`` on its own thread whenever there is work; keeps a metrics snapshot for /metrics
    (the cache is only touched from this thread)."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.error: BaseException | None = None
        self.snapshot: dict = scheduler.metrics()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dms-scheduler", daemon=True)
        self._rate = (time.time(), 0)  # (time, generated tokens) of the last rate sample

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)

    def submit(self, prompt, **kw) -> int:
        rid = self.scheduler.submit(prompt, **kw)
        self._wake.set()
        return rid

    def cancel(self, rid: int) -> None:
        self.scheduler.cancel(rid)
        self._wake.set()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                if self.scheduler.idle:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self.scheduler.step()
                self._take_snapshot()
        except BaseException as e:  # noqa: BLE001 -- reported by /health; the waiting requests are failed
            self.error = e
            self.scheduler.fail_all(f"the scheduler stopped: {e!r}")

    def _take_snapshot(self) -> None:
        m = self.scheduler.metrics()
        now, (then, before) = time.time(), self._rate
        if now - then >= 1.0:
            m["tokens_per_s"] = (m["generated_tokens"] - before) / (now - then)
            self._rate = (now, m["generated_tokens"])
        else:
            m["tokens_per_s"] = self.snapshot.get("tokens_per_s", 0.0)
        self.snapshot = m


# ----------------------------------------------------------------------------------------------- request fields


def _number(body: dict, name: str, default, lo: float, hi: float, *, integer: bool = False, open_lo: bool = False):
    v = body.get(name, default)
    if v is None:
        v = default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type or not (lo < v if open_lo else lo <= v) or not v <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(f"{name} must be {kind} in {'(' if open_lo else '['}{lo}, {hi}], got {v!r}", name)
    return v


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise ApiError(f"stop must be a non-empty string or a list of at most {MAX_STOP_STRINGS} of them", "stop")
    return stop


def _prompt_ids(body: dict, tokenizer, chat: bool) -> list[int]:
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in msgs):
            raise ApiError(f"messages must be a non-empty list of {{role: one of {list(ROLES)}, content: string}}",
                           "messages")
        return encode(tokenizer, chat_text(tokenizer, [{"role": m["role"], "content": m["content"]} for m in msgs]))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return encode(tokenizer, prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError("prompt must be a non-empty string or a list of token ids (one prompt per request)", "prompt")


def parse_request(body: Any, tokenizer, model_name: str, chat: bool, context: int) -> dict:
    """The scheduler's arguments for a request body, every field checked (ApiError names the bad one)."""
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", None, code="invalid_json")
    if body.get("model") != model_name:
        raise ApiError(f"model {body.get('model')!r} does not exist; this server serves {model_name!r}", "model",
                       code="model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError("n must be 1 (one choice per request)", "n")
    prompt = _prompt_ids(body, tokenizer, chat)
    max_name = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    default = max(1, min(1024, context - len(prompt))) if chat else 16
    sampling = SamplingConfig(temperature=float(_number(body, "temperature", 1.0, 0, 2)),
                              top_p=float(_number(body, "top_p", 1.0, 0, 1, open_lo=True)),
                              top_k=_number(body, "top_k", 0, 0, 2 ** 31 - 1, integer=True))
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be a boolean", "stream")
    return dict(prompt=prompt, max_new_tokens=_number(body, max_name, default, 1, 2 ** 31 - 1, integer=True),
                sampling=sampling, seed=_number(body, "seed", 0, 0, 2 ** 31 - 1, integer=True),
                stop=_stop_strings(body), stream=stream)


# ----------------------------------------------------------------------------------------------- text out


class TextStream:
    """Turns a request's tokens into text deltas: whole characters only (a token may end inside one), and never
    text that could be the start of a stop string; cut at the first stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.sent = ""
        self.stopped = False

    def feed(self, tokens: list[int], final: bool = False) -> str:
        self.tokens += tokens
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            text, self.stopped, final = text[:min(hits)], True, True
        if not final:
            text = text.rstrip("\ufffd")
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[:max(len(self.sent), len(text) - hold)]
        delta, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
        return delta


def _finish_reason(req, text: TextStream) -> str:
    return "stop" if text.stopped or req.stopped else "length"


def _kv_report(req) -> dict:
    return {"live_entries": req.live_entries, "dense_entries": req.dense_entries,
            "compression": round(req.compression, 4), "preemptions": req.preemptions,
            "reused_tokens": req.reused_tokens}


def _usage(req) -> dict:
    n = len(req.tokens)
    return {"prompt_tokens": len(req.prompt), "completion_tokens": n, "total_tokens": len(req.prompt) + n}


def _choice(chat: bool, text: str, finish: str | None, delta: bool) -> dict:
    if not chat:
        return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    key = "delta" if delta else "message"
    return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}


# ----------------------------------------------------------------------------------------------- the app


def prometheus_text(m: dict, model_name: str) -> str:
    """The worker's metrics snapshot in Prometheus' text format (gauges now, counters since the start)."""
    gauges = {"pages_total": "KV pages in the pool", "pages_used": "KV pages in use", "pages_free": "free KV pages",
              "live_entries": "live (token, layer, KV head) entries", "dense_entries": "entries a dense cache holds",
              "compression": "dense / live entries", "waiting": "requests waiting (queue depth)",
              "prefilling": "requests being prefilled", "running": "sequences decoding",
              "cache_entries": "finished sequences and prefixes kept for reuse", "tokens_per_s": "generated tokens/s"}
    counters = {"generated_tokens": "tokens generated", "prefill_tokens": "tokens prefilled",
                "reused_tokens": "context tokens reused from the cache", "preemptions": "requests preempted",
                "finished": "requests finished", "cancelled": "requests cancelled", "errors": "requests failed"}
    lines = []
    for kind, names in (("gauge", gauges), ("counter", counters)):
        for name, help_text in names.items():
            metric = f"dms_{name}" + ("_total" if kind == "counter" else "")
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} {kind}",
                      f'{metric}{{model="{model_name}"}} {float(m.get(name, 0.0)):g}']
    return "\n".join(lines) + "\n"


def create_app(worker: Worker, tokenizer, model_name: str):
    """The FastAPI app; its lifespan starts and stops ``worker``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse
    from sse_starlette.sse import EventSourceResponse

    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="dms-jax", lifespan=lifespan)
    context = worker.scheduler.spec.max_tokens_per_head

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        if worker.error is not None:
            return JSONResponse({"status": "failed", "error": repr(worker.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "dms-jax"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(worker.snapshot, model_name))

    async def complete(request: Request, chat: bool):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(f"the request body is not valid JSON: {e}", None, code="invalid_json") from None
        args = parse_request(body, tokenizer, model_name, chat, context)
        run = _Run(worker, tokenizer, args, chat, model_name)
        if args["stream"]:
            return EventSourceResponse(run.events(request), ping=15)
        return JSONResponse(await run.whole(request))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


class _Run:
    """One request's life on the event loop: submitted at construction, its tokens turned into text."""

    def __init__(self, worker: Worker, tokenizer, args: dict, chat: bool, model_name: str):
        self.worker, self.chat, self.model = worker, chat, model_name
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.text = TextStream(tokenizer, args["stop"])
        try:
            self.rid = worker.submit(args["prompt"], max_new_tokens=args["max_new_tokens"],
                                     sampling=args["sampling"], seed=args["seed"], on_event=self._on_event)
        except RequestError as e:
            raise ApiError(str(e), e.param) from None
        self.req = worker.scheduler.result(self.rid)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{self.rid}"
        self.created = int(time.time())

    def _on_event(self, event: TokenEvent) -> None:  # on the worker thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def _deltas(self, request):
        """Text deltas until the request is done, a stop string appears or the client goes away (then the
        request is cancelled)."""
        done = False
        try:
            while not done:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                done = event.done
                delta = self.text.feed(event.tokens, final=done)
                if delta:
                    yield delta
                if self.text.stopped:
                    return
        finally:
            if not done:
                self.worker.cancel(self.rid)

    def _check_failed(self):
        if self.req.status == "error":
            raise ApiError(self.req.error or "the request failed", None, status=500, code="server_error",
                           kind="server_error")

    def _frame(self, text: str, finish: str | None, delta: bool) -> dict:
        obj = "chat.completion" + (".chunk" if delta else "") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [_choice(self.chat, text, finish, delta)]}

    async def whole(self, request) -> dict:
        parts = [d async for d in self._deltas(request)]
        if self.text.stopped:
            await asyncio.to_thread(self.req.done.wait, 30)  # the cancellation lands at the next iteration
        self._check_failed()
        out = self._frame("".join(parts), _finish_reason(self.req, self.text), delta=False)
        return dict(out, usage=_usage(self.req), kv=_kv_report(self.req))

    async def events(self, request):
        async for delta in self._deltas(request):
            yield {"data": json.dumps(self._frame(delta, None, delta=True))}
        if self.text.stopped:
            await asyncio.to_thread(self.req.done.wait, 30)
        if self.req.status == "error":
            yield {"data": json.dumps(ApiError(self.req.error or "failed", code="server_error").body())}
            return
        last = dict(self._frame("", _finish_reason(self.req, self.text), delta=True), usage=_usage(self.req),
                    kv=_kv_report(self.req))
        yield {"data": json.dumps(last)}
        yield {"data": "[DONE]"}
