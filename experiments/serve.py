"""Serve a model over HTTP with an OpenAI-compatible API (dms_jax.serve.api), continuous batching over one KV pool.

    python -m experiments.serve                                  # the shipped DMS retrofit of SmolLM2-135M
    python -m experiments.serve --policy vanilla --port 8000     # the original model
    python -m experiments.serve --model DIR --adapter A.safetensors --budget-mb 512

Then, e.g. with the official client:
    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="dms-jax", messages=[{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="safetensors dir or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", help="DMS adapter file (default with --policy dms and the default model: the "
                                     "shipped one); a model that stores its DMS config needs none")
    p.add_argument("--policy", default="dms", help="vanilla | dms | dmc | tova | h2o | streaming | quest")
    p.add_argument("--budget", type=_positive_int, help="tokens per KV head kept by a baseline policy")
    p.add_argument("--name", default="dms-jax", help="the model id clients ask for")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-seqs", type=_positive_int, default=8, help="sequences held at once")
    p.add_argument("--context", type=_positive_int, default=4096, help="tokens per sequence (prompt + answer)")
    pool = p.add_mutually_exclusive_group()
    pool.add_argument("--budget-pages", type=_positive_int, help="KV pool size in pages")
    pool.add_argument("--budget-mb", type=float, help="KV pool size in MiB")
    p.add_argument("--page-size", type=_positive_int, default=16)
    p.add_argument("--cache-dtype", help="K/V storage: float32, bfloat16, float16 or int8 (a scale per token per "
                                         "head; about 4x less memory per entry than float32); default the model's")
    p.add_argument("--prefill-chunk", type=_positive_int, default=256)
    p.add_argument("--prefill-batch", type=_positive_int, default=2)
    p.add_argument("--segment-steps", type=_positive_int, default=8, help="decode steps between token deliveries")
    p.add_argument("--no-prefix-cache", action="store_true", help="free finished sequences instead of keeping them")
    p.add_argument("--tensor-parallel", type=_positive_int, default=1,
                   help="devices to split the KV heads and weights over (a divisor of the model's KV heads; the "
                        "page budget is split evenly between them)")
    return p.parse_args(argv), p


def build(args):
    """(worker, tokenizer) for the parsed flags: the model, its engine and its scheduler."""
    from dms_jax import weights
    from dms_jax.adapter import SHIPPED_ADAPTER
    from dms_jax.serve.api import Worker
    from dms_jax.serve.engine import Engine
    from dms_jax.serve.scheduler import Scheduler

    adapter = args.adapter or (SHIPPED_ADAPTER if args.policy == "dms" and args.model is None else None)
    model = weights.load_model(args.model, dms=adapter)
    policy_kw = {} if args.budget is None else {"budget": args.budget}
    engine = Engine(model, args.policy, page_size=args.page_size, prefill_chunk=args.prefill_chunk,
                    cache_dtype=args.cache_dtype, mesh=_tensor_mesh(args.tensor_parallel), **policy_kw)
    budget, t = args.budget_pages, args.tensor_parallel
    if args.budget_mb is not None:  # whole pages, split evenly between the tensor-parallel devices
        probe = engine.make_spec(1, args.page_size, t)
        budget = max(t, int(args.budget_mb * 2 ** 20 // probe.bytes_per_page) // t * t)
    scheduler = Scheduler(engine, max_seqs=args.max_seqs, context=args.context, budget_pages=budget,
                          prefill_batch=args.prefill_batch, segment_steps=args.segment_steps,
                          prefix_cache=not args.no_prefix_cache)
    return Worker(scheduler), weights.load_tokenizer(args.model)


def _tensor_mesh(devices: int):
    if devices == 1:
        return None
    import jax

    from dms_jax import sharding

    if devices > jax.device_count():
        raise ValueError(f"--tensor-parallel {devices} exceeds the {jax.device_count()} devices available")
    return sharding.make_mesh(data=1, tensor=devices, devices=jax.devices()[:devices])


def main(argv=None):
    args, parser = parse_args(argv)
    import uvicorn

    from dms_jax.serve.api import create_app

    try:
        worker, tokenizer = build(args)
    except ValueError as e:
        parser.error(str(e))
    s = worker.scheduler.spec
    print(f"serving {args.name!r} ({args.policy}) on http://{args.host}:{args.port}/v1 -- {s.num_pages} KV pages "
          f"of {s.bytes_per_page} bytes, {args.max_seqs} sequences of up to {s.max_tokens_per_head} tokens"
          + (f", KV heads over {args.tensor_parallel} devices" if args.tensor_parallel > 1 else ""), flush=True)
    uvicorn.run(create_app(worker, tokenizer, args.name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
