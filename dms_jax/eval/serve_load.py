"""The server load test's workload, client and counts (the CLI: benchmarks/load_test_serve.py).

A mix of valid, invalid and abandoned requests on real text (the built-in corpus), sent by many concurrent
clients to a running OpenAI-compatible server; afterwards every valid request is sent again alone and its text
compared. ``tally`` gives the counts: lost, hung, corrupted (a greedy answer that differs from the same request
alone) and bad_errors (an invalid request without a 4xx in OpenAI's shape naming the parameter).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

MODEL = "dms-jax"
KINDS = ("completion", "chat_stream", "abandon", "invalid")
INVALID = [("max_tokens", {"max_tokens": 0}), ("temperature", {"temperature": 5}), ("top_p", {"top_p": 0}),
           ("model", {"model": "nope"}), (None, "malformed"), ("prompt", "too_long")]


def make_requests(n: int, context: int, seed: int, *, model: str = MODEL, max_chars: int = 1500) -> list[dict]:
    """The request mix: 55% completions, 20% streamed chats, 10% abandoned streams, 15% invalid; texts of 80 to
    ``max_chars`` characters for the server's ``model`` of ``context`` tokens."""
    from dms_jax.data.corpus import builtin_documents

    docs = [d for d in builtin_documents() if len(d) > 2000]
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=n, p=[0.55, 0.2, 0.1, 0.15])
    reqs = []
    for i, k in enumerate(kinds):
        doc = docs[rng.integers(len(docs))]
        start = int(rng.integers(0, len(doc) - 1500))
        text = doc[start:start + int(rng.integers(80, max_chars))]
        body = {"model": model, "max_tokens": int(rng.integers(4, 25)), "temperature": 0}
        kind = KINDS[k]
        if kind == "completion":
            body["prompt"] = text
        else:
            body["messages"] = [{"role": "user", "content": f"Summarise this in one sentence:\n\n{text}"}]
            body["stream"] = kind != "invalid"
        req = {"id": i, "kind": kind, "body": body, "chat": "messages" in body}
        if kind == "invalid":
            param, change = INVALID[i % len(INVALID)]
            req["param"] = param
            if change == "malformed":
                req["raw"] = b'{"model": "' + model.encode() + b'", "messages": [}'
            elif change == "too_long":
                body["messages"][0]["content"] = "word " * (2 * context)
            else:
                body.update(change)
        reqs.append(req)
    return reqs


def send(base: str, req: dict, timeout: float) -> dict:
    """One request; returns its outcome: status, text (valid answers), error param, seconds, hung / dropped."""
    url = base + ("/v1/chat/completions" if req["chat"] else "/v1/completions")
    t0 = time.perf_counter()
    out = {"id": req["id"], "kind": req["kind"]}
    try:
        if "raw" in req:
            r = httpx.post(url, content=req["raw"], headers={"content-type": "application/json"}, timeout=timeout)
            out.update(status=r.status_code, error=r.json().get("error"))
        elif req["body"].get("stream"):
            out.update(_stream(url, req, timeout))
        else:
            r = httpx.post(url, json=req["body"], timeout=timeout)
            body = r.json()
            out.update(status=r.status_code, error=body.get("error"),
                       text=body["choices"][0]["text"] if r.status_code == 200 else None)
    except httpx.TimeoutException:
        out["hung"] = True
    except (httpx.HTTPError, ValueError, KeyError) as e:
        out["dropped"] = repr(e)
    out["seconds"] = time.perf_counter() - t0
    return out


def _stream(url: str, req: dict, timeout: float) -> dict:
    parts, status = [], None
    with httpx.stream("POST", url, json=req["body"], timeout=timeout) as r:
        status = r.status_code
        if status != 200:
            return {"status": status, "error": json.loads(r.read()).get("error")}
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            parts.append(json.loads(line[len("data: "):])["choices"][0]["delta"].get("content") or "")
            if req["kind"] == "abandon":
                return {"status": status, "abandoned": True}
    return {"status": status, "text": "".join(parts)}


def metric(base: str, name: str) -> float:
    text = httpx.get(base + "/metrics", timeout=30).text
    return float(next(li for li in text.splitlines() if li.startswith(f"dms_{name}{{")).split()[-1])


def tally(reqs: list[dict], loaded: list[dict], alone: dict) -> dict:
    """The load test's counts from the outcomes under load and the answers run alone."""
    by_id = {o["id"]: o for o in loaded}
    counts = {"lost": 0, "hung": 0, "corrupted": 0, "bad_errors": 0}
    for req in reqs:
        o = by_id[req["id"]]
        if o.get("hung"):
            counts["hung"] += 1
        elif req["kind"] == "invalid":
            err = o.get("error") or {}
            ok = 400 <= o.get("status", 0) < 500 and "message" in err and err.get("param") == req["param"]
            counts["bad_errors"] += not ok
        elif req["kind"] == "abandon":
            counts["lost"] += o.get("status") != 200
        elif o.get("status") != 200 or "text" not in o:
            counts["lost"] += 1
        elif o["text"] != alone[req["id"]]:
            counts["corrupted"] += 1
    return counts


def plot(loaded: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for kind in KINDS:
        secs = sorted(o["seconds"] for o in loaded if o["kind"] == kind and not o.get("hung"))
        if secs:
            ax.plot(secs, np.arange(1, len(secs) + 1) / len(secs), label=f"{kind} ({len(secs)})")
    ax.set_xlabel("seconds until the answer (or the error) under load")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Load test: latency per request kind")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run_load(base: str, reqs: list[dict], clients: int, timeout: float) -> dict:
    """Sends ``reqs`` from ``clients`` threads, waits for the server to drain, then sends every valid request
    again alone. Returns the outcomes under load, the texts alone, the pages still in use and the load's seconds."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        loaded = list(pool.map(lambda r: send(base, r, timeout), reqs))
    load_seconds = time.perf_counter() - t0
    deadline = time.time() + 120  # abandoned streams are cancelled at the worker's next iteration
    while time.time() < deadline and (metric(base, "running") or metric(base, "pages_used")):
        time.sleep(1)
    pages_leaked = int(metric(base, "pages_used"))
    valid = [r for r in reqs if r["kind"] in ("completion", "chat_stream")]
    alone = {r["id"]: send(base, dict(r, kind="alone"), timeout).get("text") for r in valid}
    return dict(loaded=loaded, alone=alone, pages_leaked=pages_leaked, load_seconds=load_seconds)
