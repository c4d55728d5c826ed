"""Speed of the MoA Triton kernels against dense SDPA and FlexAttention.

    python benchmarks/moa_kernels.py                      # CUDA: N = 4096 8192 16384, bf16
    python benchmarks/moa_kernels.py --device cpu --small  # CPU check: reference vs SDPA
    python benchmarks/moa_kernels.py --device cpu --small --interpret  # + Triton interpreter

Prefill: B=1, Hq=32, Hkv=8, D=128 by default; per-head windows are drawn log-uniformly over a
16x range, then scaled so the mean fraction of causal (query, key) pairs kept, sinks included,
is ``--density`` (0.25). Compared: the Triton sliding-window kernel, torch SDPA dense causal
(is_causal, KV heads repeated outside the timed region so a flash backend runs), and
FlexAttention compiled with a block mask built by create_block_mask from the same rule.
TFLOP/s counts 4*D FLOPs per attended (query, key) pair: only unmasked pairs for the sparse
kernels, all causal pairs for dense SDPA.

Decode: each KV head holds ``sinks + max(window of its query heads)`` entries (capped at N), packed
as MoA keeps them: one (B, T, D) buffer per K and V in which head g owns exactly its entries,
slots [offsets[g], offsets[g + 1]), T = sum of the lengths (a padded buffer would need Hkv * max).
Compared: the Triton variable-length kernel over the packed cache, SDPA over a dense cache of the
same average length (same bytes, so this isolates the kernel), and SDPA over a full-N cache. GB/s
counts the K and V bytes each reads; the device's copy bandwidth (one large copy_, bytes read plus
written) is measured first, and each decode figure is also given as a multiple of its floor, the
time those bytes take at that bandwidth (goal: the Triton kernel within 2x).

CUDA timings are triton.testing.do_bench medians (it warms up and synchronizes); CPU timings are
medians of ``--repeats`` perf_counter runs after one warm-up. The last stdout line is one JSON
record of everything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--small", action="store_true", help="CPU-sized shapes: N 256 512, Hq 8, Hkv 2, D 64, float32")
    p.add_argument("--lengths", type=int, nargs="+", help="sequence lengths N (default 4096 to 65536)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--head-dim", type=int)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--density", type=float, default=0.25, help="mean kept fraction of causal pairs")
    p.add_argument("--repeats", type=int, default=3, help="CPU timed runs (CUDA uses do_bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interpret", action="store_true",
                   help="on CPU, also time the Triton kernels under TRITON_INTERPRET=1 (slow)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention on CUDA")
    args = p.parse_args(argv)
    small = dict(lengths=[256, 512], q_heads=8, kv_heads=2, head_dim=64, dtype="float32")
    full = dict(lengths=[4096, 8192, 16384, 32768, 65536], q_heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
    for key, value in (small if args.small else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available (try --device cpu --small)")
    return args


# --- masks and counts ---------------------------------------------------------------------


def kept_pairs(n: int, window: int, sinks: int) -> int:
    """(query, key) pairs with j <= i and (j < sinks or i - j < window), summed over i < n."""
    i = torch.arange(n, dtype=torch.float64)
    band = torch.clamp(i + 1, max=window)
    extra_sinks = torch.clamp(i + 1 - window, min=0).clamp(max=sinks)
    return int((band + extra_sinks).sum())


def draw_windows(n: int, heads: int, sinks: int, density: float, seed: int) -> torch.Tensor:
    """Heterogeneous per-head spans whose mean kept fraction of causal pairs is ``density``."""
    gen = torch.Generator().manual_seed(seed)
    shape = torch.exp(torch.empty(heads, dtype=torch.float64).uniform_(math.log(0.25), math.log(4.0), generator=gen))
    causal = n * (n + 1) / 2

    def windows_for(base: float) -> torch.Tensor:
        return torch.clamp((base * shape).round(), 1, n).long()

    def mean_density(base: float) -> float:
        return sum(kept_pairs(n, int(w), sinks) for w in windows_for(base)) / (heads * causal)

    lo, hi = 0.0, float(n)
    for _ in range(40):  # mean density grows with the base span
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mean_density(mid) < density else (lo, mid)
    return windows_for(hi)


def kv_lengths(windows: torch.Tensor, kv_heads: int, sinks: int, n: int) -> torch.Tensor:
    """Entries each KV head keeps for decode: the sinks plus its widest query head's window."""
    widest = windows.view(kv_heads, -1).amax(dim=1)
    return torch.clamp(widest + sinks, max=n).to(torch.int32)


def flex_mask_mod(windows: torch.Tensor, sinks: int):
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & ((kv_idx < sinks) | (q_idx - kv_idx < windows[h]))

    return mask_mod


# --- timing -------------------------------------------------------------------------------


def time_ms(fn, device: str, repeats: int) -> float:
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up: allocator, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(fn, args, work: float, unit: str) -> dict:
    """Median milliseconds of ``fn`` and its rate: TFLOP/s for unit 'tflops', GB/s for 'gbps'."""
    ms = time_ms(fn, args.device, args.repeats)
    rate = work / (ms * 1e-3) / (1e12 if unit == "tflops" else 1e9)
    return {"ms": float(f"{ms:.4g}"), unit: float(f"{rate:.4g}")}


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def bench_prefill(args, n: int, kernels, dtype: torch.dtype, run_triton: bool) -> dict:
    b, hq, hkv, d, sinks = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.sinks
    gen = torch.Generator().manual_seed(args.seed + n)
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(args.device, dtype) for h in (hq, hkv, hkv))
    windows = draw_windows(n, hq, sinks, args.density, args.seed + n)
    windows_dev = windows.to(args.device)
    pairs = b * sum(kept_pairs(n, int(w), sinks) for w in windows)
    causal_pairs = b * hq * n * (n + 1) // 2
    sparse_flops, dense_flops = 4 * d * pairs, 4 * d * causal_pairs
    record = {
        "n": n,
        "density": round(pairs / causal_pairs, 4),
        "sinks": sinks,
        "windows": {"min": int(windows.min()), "mean": round(float(windows.float().mean()), 1),
                    "max": int(windows.max())},
    }
    results = {}

    def sparse(fn):
        return lambda: fn(q, k, v, windows_dev, sinks)

    # KV heads repeated once, outside the timed region, so SDPA can pick a flash backend.
    k_rep, v_rep = (t.repeat_interleave(hq // hkv, dim=1) for t in (k, v))

    def dense():
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True)

    results["sdpa_causal"] = measure(dense, args, dense_flops, "tflops")
    del k_rep, v_rep

    reference = None
    if args.device == "cpu":
        results["reference"] = measure(sparse(kernels.sliding_window_prefill_reference), args, sparse_flops, "tflops")
    if args.device == "cpu" or n == min(args.lengths):  # a GPU checks once, at the shortest N
        reference = sparse(kernels.sliding_window_prefill_reference)()
    if run_triton:
        out = sparse(kernels.sliding_window_prefill)()
        results["triton"] = measure(sparse(kernels.sliding_window_prefill), args, sparse_flops, "tflops")
        if reference is not None:
            record["triton_max_abs_err_vs_reference"] = max_abs_err(out, reference)
    if args.device == "cuda" and not args.no_flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(
            flex_mask_mod(windows_dev, sinks), B=None, H=hq, Q_LEN=n, KV_LEN=n, device=args.device
        )
        flex = torch.compile(flex_attention, dynamic=False)

        def run_flex():
            return flex(q, k, v, block_mask=block_mask, enable_gqa=True)

        flex_out = run_flex()
        results["flex"] = measure(run_flex, args, sparse_flops, "tflops")
        if run_triton:
            record["triton_max_abs_err_vs_flex"] = max_abs_err(out, flex_out)
    record["results"] = results
    return record


def copy_bandwidth_gbps(args, megabytes: int) -> float:
    """The device's achieved copy bandwidth: bytes read plus bytes written by one large copy_.

    Decode attention reads each kept K and V entry once and does little arithmetic on it, so this
    is its floor: kept-KV bytes / bandwidth is the least time any kernel can take.
    """
    src = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=args.device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), args.device, args.repeats)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def bench_decode(args, n: int, kernels, dtype: torch.dtype, run_triton: bool, bandwidth_gbps: float) -> dict:
    b, hq, hkv, d, sinks = args.batch, args.q_heads, args.kv_heads, args.head_dim, args.sinks
    gen = torch.Generator().manual_seed(args.seed + n + 1)
    windows = draw_windows(n, hq, sinks, args.density, args.seed + n)
    head_lengths = kv_lengths(windows, hkv, sinks, n)
    lengths = head_lengths.expand(b, hkv).contiguous()
    offsets = torch.cat([head_lengths.new_zeros(1), head_lengths.cumsum(0)]).to(torch.int32)  # regions = lengths
    lengths_dev, offsets_dev = lengths.to(args.device), offsets.to(args.device)
    q = torch.randn(b, hq, d, generator=gen).to(args.device, dtype)
    slots = int(offsets[-1])
    k_cache, v_cache = (torch.randn(b, slots, d, generator=gen).to(args.device, dtype) for _ in range(2))
    mean_len = max(1, round(float(lengths.float().mean())))
    entry_bytes = 2 * d * (torch.finfo(dtype).bits // 8)  # one K row and one V row
    valid_bytes = int(lengths.sum()) * entry_bytes
    record = {"n": n, "mean_length": mean_len, "lengths": lengths[0].tolist(),
              "packed_slots": slots, "padded_slots": hkv * int(head_lengths.max())}
    results = {}

    def variable(fn):
        return lambda: fn(q, k_cache, v_cache, offsets_dev, lengths_dev)

    # GQA decode as G queries per KV head: no KV repetition, so SDPA reads each entry once.
    q_grouped = q.view(b, hkv, hq // hkv, d)
    k_full, v_full = (torch.randn(b, hkv, n, d, generator=gen).to(args.device, dtype) for _ in range(2))
    k_mean, v_mean = k_full[:, :, :mean_len].contiguous(), v_full[:, :, :mean_len].contiguous()
    results["sdpa_same_mean_length"] = measure(
        lambda: F.scaled_dot_product_attention(q_grouped, k_mean, v_mean), args, b * hkv * mean_len * entry_bytes, "gbps"
    )
    results["sdpa_full_n"] = measure(
        lambda: F.scaled_dot_product_attention(q_grouped, k_full, v_full), args, b * hkv * n * entry_bytes, "gbps"
    )
    del k_full, v_full, k_mean, v_mean
    if args.device == "cpu":
        results["reference"] = measure(variable(kernels.variable_length_decode_reference), args, valid_bytes, "gbps")
    if run_triton:
        out = variable(kernels.variable_length_decode)()
        results["triton"] = measure(variable(kernels.variable_length_decode), args, valid_bytes, "gbps")
        reference = variable(kernels.variable_length_decode_reference)()
        record["triton_max_abs_err_vs_reference"] = max_abs_err(out, reference)
    floor_ms = valid_bytes / (bandwidth_gbps * 1e9) * 1e3
    record["bandwidth_floor_ms"] = float(f"{floor_ms:.4g}")
    for result in results.values():  # time over the floor for the bytes that variant reads: bandwidth / achieved
        result["x_floor"] = float(f"{bandwidth_gbps / result['gbps']:.4g}")
    record["results"] = results
    return record


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_triton = args.device == "cuda" or args.interpret
    if args.device == "cpu" and args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before paretoray.kernels imports triton
    import paretoray.kernels as kernels

    if run_triton and not kernels.triton_available(torch.device(args.device)):
        sys.exit("Triton is not usable here: pip install triton (and on CPU pass --interpret)")
    if args.device == "cuda":
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    record = {
        "benchmark": "moa_kernels",
        "device": device_name,
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__ if run_triton else None,
        "interpret": args.device == "cpu" and args.interpret,
        "shape": {"batch": args.batch, "q_heads": args.q_heads, "kv_heads": args.kv_heads,
                  "head_dim": args.head_dim, "dtype": args.dtype},
        "density_target": args.density,
        "prefill": [],
        "decode": [],
    }
    dtype = getattr(torch, args.dtype)
    bandwidth = copy_bandwidth_gbps(args, megabytes=64 if args.device == "cpu" else 1024)
    record["copy_bandwidth_gbps"] = float(f"{bandwidth:.4g}")
    print(f"device copy bandwidth (read + write): {bandwidth:.4g} GB/s", flush=True)
    for n in args.lengths:
        prefill = bench_prefill(args, n, kernels, dtype, run_triton)
        record["prefill"].append(prefill)
        print(f"prefill N={n} density={prefill['density']}: " + ", ".join(
            f"{name} {r['ms']:.4g} ms {r['tflops']:.4g} TFLOP/s" for name, r in prefill["results"].items()), flush=True)
        decode = bench_decode(args, n, kernels, dtype, run_triton, bandwidth)
        record["decode"].append(decode)
        print(f"decode N={n} mean length={decode['mean_length']}: " + ", ".join(
            f"{name} {r['ms']:.4g} ms {r['gbps']:.4g} GB/s ({r['x_floor']:.3g}x floor)" for name, r in decode["results"].items()), flush=True)
        if args.device == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps(record))


if __name__ == "__main__":
    main()
