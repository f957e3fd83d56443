"""Bounded load test of the OpenAI-compatible server: a real `python -m experiments.serve` process on loopback,
hit by many concurrent clients with a mix of valid, invalid and abandoned requests.

Valid requests are greedy (temperature 0) completions and chat completions, some streamed, on real text (the
built-in corpus); invalid ones carry one bad field each (max_tokens 0, temperature 5, top_p 0, an unknown model,
malformed JSON, a prompt longer than the context); abandoned ones are streams the client leaves after the first
delta. Afterwards every valid request is sent again alone (one at a time) and its text compared.

Counts (docs/results/serve.json, key "load_test"):
    lost       a valid request that got no 200 answer (an error status, a dropped connection)
    hung       a request that got no answer within --timeout seconds
    corrupted  a valid greedy answer that differs from the same request run alone
    bad_errors an invalid request that did not get a 4xx in OpenAI's shape naming the parameter
    pages_leaked  pages in use once every request is over (the server runs without its prefix cache)

    python benchmarks/load_test_serve.py                         # 200 requests, 32 clients, the shipped DMS model
    python benchmarks/load_test_serve.py --requests 50 --clients 8 --policy vanilla
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dms_jax.provenance import command_line, machine_description, utc_now  # noqa: E402

MODEL = "dms-jax"
KINDS = ("completion", "chat_stream", "abandon", "invalid")
INVALID = [("max_tokens", {"max_tokens": 0}), ("temperature", {"temperature": 5}), ("top_p", {"top_p": 0}),
           ("model", {"model": "nope"}), (None, "malformed"), ("prompt", "too_long")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--policy", default="dms", help="the server's --policy")
    p.add_argument("--max-seqs", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before a request counts as hung")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/results/serve.json", help="JSON to write the load_test key into")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "experiments.serve", "--policy", args.policy, "--port", str(port), "--name", MODEL,
           "--max-seqs", str(args.max_seqs), "--context", str(args.context), "--no-prefix-cache"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("the server did not come up within 600 s")


def make_requests(n: int, context: int, seed: int) -> list[dict]:
    """The request mix: 55% completions, 20% streamed chats, 10% abandoned streams, 15% invalid."""
    from dms_jax.data.corpus import builtin_documents

    docs = [d for d in builtin_documents() if len(d) > 2000]
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(KINDS), size=n, p=[0.55, 0.2, 0.1, 0.15])
    reqs = []
    for i, k in enumerate(kinds):
        doc = docs[rng.integers(len(docs))]
        start = int(rng.integers(0, len(doc) - 1500))
        text = doc[start:start + int(rng.integers(80, 1500))]
        body = {"model": MODEL, "max_tokens": int(rng.integers(4, 25)), "temperature": 0}
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
                req["raw"] = b'{"model": "dms-jax", "messages": [}'
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


def main(argv=None):
    args = parse_args(argv)
    reqs = make_requests(args.requests, args.context, args.seed)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(args, port)
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            loaded = list(pool.map(lambda r: send(base, r, args.timeout), reqs))
        load_seconds = time.perf_counter() - t0
        print(f"{len(reqs)} requests from {args.clients} clients in {load_seconds:.0f} s")
        deadline = time.time() + 120  # abandoned streams are cancelled at the worker's next iteration
        while time.time() < deadline and (metric(base, "running") or metric(base, "pages_used")):
            time.sleep(1)
        pages_leaked = int(metric(base, "pages_used"))
        valid = [r for r in reqs if r["kind"] in ("completion", "chat_stream")]
        alone = {r["id"]: send(base, dict(r, kind="alone"), args.timeout).get("text") for r in valid}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    counts = tally(reqs, loaded, alone)
    load = dict(requests=len(reqs), clients=args.clients, by_kind={k: sum(r["kind"] == k for r in reqs) for k in KINDS},
                **counts, pages_leaked=pages_leaked, load_seconds=load_seconds, policy=args.policy,
                max_seqs=args.max_seqs, context=args.context,
                latency_s={k: float(np.median([o["seconds"] for o in loaded if o["kind"] == k] or [np.nan]))
                           for k in KINDS},
                command=command_line("python benchmarks/load_test_serve.py", argv), date=utc_now(),
                machine=machine_description())
    print(json.dumps({k: load[k] for k in ("requests", "lost", "hung", "corrupted", "bad_errors", "pages_leaked")}))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["load_test"] = load
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(loaded, str(out.with_name(out.stem + "_load_test.png")))
    print(f"saved {out}")
    return load


if __name__ == "__main__":
    main()
