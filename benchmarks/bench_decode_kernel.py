"""Decode-attention kernel benchmark: time per call, K/V bytes read per call, fraction of peak HBM bandwidth.

One call = one layer's decode attention for a batch: q [B, Hkv, G, D] against each (sequence, KV head)'s own
pages. DMS compression ratio CR is expressed as shorter live lengths per head (mean context / CR, spread
0.5x-1.5x across heads, as DMS heads evict at different rates); the block tables keep room for the full
context, so a kernel that reads only live pages moves ~1/CR of the bytes.

On a TPU/GPU it times the Pallas kernel for the platform and the XLA reference (which gathers every page of
the table), and reports achieved bandwidth against the device's peak from a small table. On CPU it times the
XLA reference at a small size and marks every bandwidth figure `"needs_hardware": true`; CPU timings of the
reference are recorded for completeness only (Pallas interpret mode is not timed: it measures the
interpreter, not the kernel).

    python benchmarks/bench_decode_kernel.py                     # auto: full size on TPU/GPU, small on CPU
    python benchmarks/bench_decode_kernel.py --contexts 1024 4096 8192 --crs 1 8 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dms_jax.provenance import command_line, machine_description, utc_now  # noqa: E402
from pallas_kernels import live_kv_bytes, paged_decode_attention  # noqa: E402
from pallas_kernels._common import default_platform  # noqa: E402
from pallas_kernels.kv_codec import encode_rows, is_quantized, row_width  # noqa: E402

# Peak HBM bandwidth, GB/s (vendor spec sheets). Matched against jax's device_kind, most specific first.
PEAK_GBPS = [
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM5 80GB HBM3
    ("A100-SXM4-80GB", 2039.0),
    ("A100", 1555.0),  # 40GB
    ("TPU v6 lite", 1640.0),  # v6e (Trillium)
    ("TPU v6e", 1640.0),
    ("TPU v5 lite", 819.0),  # v5e
    ("TPU v5e", 819.0),
    ("TPU v5p", 2765.0),
    ("TPU v5", 2765.0),
    ("TPU v4", 1228.0),
]


def peak_bandwidth_gbps(device_kind: str):
    for key, gbps in PEAK_GBPS:
        if key.lower() in device_kind.lower():
            return gbps
    return None


def _lengths(rng, B, H, context, cr, page_size):
    if cr <= 1.0:  # uncompressed: every head holds the full context
        return np.full((B, H), context, np.int32)
    mean = context / cr
    spread = rng.uniform(0.5, 1.5, (B, H))
    spread = spread / spread.mean()
    lengths = np.clip(np.round(mean * spread), 1, context).astype(np.int32)
    return lengths


def _time_call(fn, args, iters, warmup=2):
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="full context lengths (tokens)")
    p.add_argument("--crs", type=float, nargs="+", default=[1.0, 8.0], help="compression ratios")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--page-size", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "int8"],
                   help="pool dtype (int8: rows of D values + a float32 scale, q in bfloat16)")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends to time (default: the Pallas kernel of the platform and xla; xla on CPU)")
    p.add_argument("--out", default="docs/results/decode_kernel.json")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _setup(args) -> dict:
    """The benchmark's sizes: full size on a TPU / GPU, small on the CPU, unless the flags say otherwise."""
    plat = default_platform()
    on_hw = plat in ("tpu", "gpu")
    kind = getattr(jax.devices()[0], "device_kind", plat)
    return dict(
        plat=plat, on_hw=on_hw, kind=kind, peak=peak_bandwidth_gbps(kind) if on_hw else None,
        B=args.batch or (8 if on_hw else 2), H=args.kv_heads or (8 if on_hw else 2), G=args.group, D=args.head_dim,
        contexts=args.contexts or ([1024, 4096, 8192] if on_hw else [256, 1024]),
        page_size=args.page_size or (64 if plat == "tpu" else 16), iters=args.iters or (50 if on_hw else 5),
        backends=args.backends or ({"tpu": ["pallas_tpu", "xla"], "gpu": ["pallas_gpu", "xla"]}.get(plat, ["xla"])),
        dtype=jnp.dtype(args.dtype))


def _time_backends(c: dict, context, cr, q, k_pages, v_pages, tables, rng) -> list[dict]:
    """One (context, CR) point: every backend timed and checked against the XLA reference; one row printed each."""
    page_size, D, dtype, on_hw, peak = c["page_size"], c["D"], c["dtype"], c["on_hw"], c["peak"]
    lengths_np = _lengths(rng, c["B"], c["H"], context, cr, page_size)
    lengths = jnp.asarray(lengths_np)
    kv_bytes = live_kv_bytes(lengths_np, page_size, row_width(D, dtype), dtype.itemsize)
    table_bytes = k_pages.size * dtype.itemsize * 2
    reference = np.asarray(paged_decode_attention(q, k_pages, v_pages, tables, lengths, backend="xla"), np.float32)
    runs = []
    for backend in c["backends"]:
        fn = jax.jit(lambda q, kp, vp, bt, ln, backend=backend: paged_decode_attention(
            q, kp, vp, bt, ln, backend=backend))
        t = _time_call(fn, (q, k_pages, v_pages, tables, lengths), c["iters"])
        out = np.asarray(fn(q, k_pages, v_pages, tables, lengths), np.float32)
        err = float(np.max(np.abs(out - reference)) / np.max(np.abs(reference)))
        # The XLA reference gathers every page of the table; the kernels read only live pages.
        read = table_bytes if backend == "xla" else kv_bytes
        gbps = read / t / 1e9
        frac = (gbps / peak) if (on_hw and peak) else None
        run = dict(context=context, cr=cr, backend=backend, mean_live_length=float(lengths_np.mean()),
                   time_us=t * 1e6, max_rel_err_vs_xla=err, kv_bytes_live=kv_bytes, kv_bytes_read_model=read,
                   achieved_gbps=gbps if on_hw else None, peak_gbps=peak,
                   bandwidth_fraction=frac, needs_hardware=not on_hw,
                   interpret_mode=(not on_hw) and backend != "xla")
        if on_hw and peak is None:
            run["note"] = f"peak bandwidth of device kind {c['kind']!r} unknown: add it to PEAK_GBPS"
        runs.append(run)
        pct = f"{100 * frac:6.1f}%" if frac is not None else ("  n/a " if on_hw else "needs HW")
        gb = f"{gbps:8.1f}" if on_hw else "     n/a"
        print(f"{context:>6} {cr:>4g} {lengths_np.mean():>9.0f} {backend:>11} {t * 1e6:>10.1f} "
              f"{kv_bytes / 1e6:>11.2f} {gb} {pct:>7}")
    return runs


def main(argv=None):
    args = _parse_args(argv)
    c = _setup(args)
    B, H, G, D, page_size, dtype, on_hw = c["B"], c["H"], c["G"], c["D"], c["page_size"], c["dtype"], c["on_hw"]
    rng = np.random.default_rng(args.seed)
    runs = []
    peak = c["peak"]
    print(f"device: {c['plat']} / {c['kind']}; peak HBM bandwidth: {f'{peak:.0f} GB/s' if peak else 'unknown'}")
    print(f"B={B} Hkv={H} G={G} D={D} page_size={page_size} dtype={dtype.name}")
    hdr = f"{'ctx':>6} {'CR':>4} {'mean_len':>9} {'backend':>11} {'time_us':>10} {'kv_MB_live':>11} " \
          f"{'GB/s':>8} {'%peak':>7}"
    print(hdr)
    print("-" * len(hdr))
    for context in c["contexts"]:
        max_pages = -(-context // page_size)
        num_pages = B * H * max_pages
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(args.seed), 3)
        k_pages, v_pages = (encode_rows(jax.random.normal(key, (num_pages, page_size, D)), dtype) for key in (kk, kv))
        q = jax.random.normal(kq, (B, H, G, D), jnp.bfloat16 if is_quantized(dtype) else dtype)
        tables = jnp.asarray(rng.permutation(num_pages).reshape(B, H, max_pages), jnp.int32)
        for cr in args.crs:
            runs += _time_backends(c, context, cr, q, k_pages, v_pages, tables, rng)

    result = dict(
        command=command_line("python benchmarks/bench_decode_kernel.py", argv or None),
        date=utc_now(),
        machine=machine_description(),
        config=dict(batch=B, kv_heads=H, group=G, head_dim=D, page_size=page_size, dtype=dtype.name,
                    iters=c["iters"], contexts=c["contexts"], crs=args.crs,
                    lengths="CR 1: every head = context; CR > 1: per head context/CR * U(0.5, 1.5) "
                            "normalised to mean 1, clipped to [1, context]"),
        needs_hardware=not on_hw,
        notes=(
            "kv_bytes_live counts live pages only (ceil(length/page_size) pages per head, K and V); "
            "kv_bytes_read_model is what each backend moves by construction: the Pallas kernels read live pages "
            "only, the XLA reference gathers the whole table. "
            + ("CPU run: timings are of the XLA reference on the host and say nothing about accelerator "
               "bandwidth; achieved_gbps and bandwidth_fraction need a TPU/GPU." if not on_hw else "")
        ),
        runs=runs,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out}")
    return result


if __name__ == "__main__":
    main()
