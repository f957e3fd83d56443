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
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dms_jax.eval.serve_load import KINDS, MODEL, make_requests, plot, run_load, tally  # noqa: E402
from dms_jax.provenance import command_line, machine_description, utc_now  # noqa: E402


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


def main(argv=None):
    args = parse_args(argv)
    reqs = make_requests(args.requests, args.context, args.seed)
    port = _free_port()
    proc = start_server(args, port)
    try:
        run = run_load(f"http://127.0.0.1:{port}", reqs, args.clients, args.timeout)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    loaded = run["loaded"]
    print(f"{len(reqs)} requests from {args.clients} clients in {run['load_seconds']:.0f} s")
    counts = tally(reqs, loaded, run["alone"])
    load = dict(requests=len(reqs), clients=args.clients, by_kind={k: sum(r["kind"] == k for r in reqs) for k in KINDS},
                **counts, pages_leaked=run["pages_leaked"], load_seconds=run["load_seconds"], policy=args.policy,
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
