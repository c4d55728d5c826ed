"""Triton MoA kernels against their PyTorch references, and the references against plain masking.

On a machine without CUDA the kernels run in Triton's interpreter (float32, small shapes); on a
GPU the same tests run compiled, in float32 and bfloat16.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type != "cuda":
    # Must precede the first `import triton` and the @triton.jit decorators it drives.
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

# import_module, not `import ... as`: the package rebinds these names to the functions.
swp = importlib.import_module("paretoray.kernels.sliding_window_prefill")
vld = importlib.import_module("paretoray.kernels.variable_length_decode")

if DEVICE.type != "cuda" and type(swp._sliding_window_prefill_kernel).__name__ != "InterpretedFunction":
    # Triton fixes interpret mode for its own library functions when it is first imported, so
    # reloading the kernels cannot help once something imported triton without the variable.
    pytest.skip(
        "triton was imported before TRITON_INTERPRET=1 was set; export it (or set it in conftest) on CPU",
        allow_module_level=True,
    )

from paretoray.kernels import triton_available  # noqa: E402

DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def _windows(n_heads: int, n_ctx: int, seed: int) -> torch.Tensor:
    """Heterogeneous spans that always include 1 and one past N."""
    gen = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, n_ctx + 8, (n_heads,), generator=gen)
    windows[0] = 1
    if n_heads > 1:
        windows[-1] = n_ctx + 5
    return windows


def _qkv(b: int, hq: int, hkv: int, n: int, d: int, dtype: torch.dtype, seed: int = 0):
    return (
        _randn(b, hq, n, d, dtype=dtype, seed=seed),
        _randn(b, hkv, n, d, dtype=dtype, seed=seed + 1),
        _randn(b, hkv, n, d, dtype=dtype, seed=seed + 2),
    )


def _explicit_attention(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Float64 softmax over an (N, N) boolean mask, KV heads repeated for GQA."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


# --- prefill ------------------------------------------------------------------------------


PREFILL_SHAPES = [  # (B, Hq, Hkv, N, D)
    (1, 9, 3, 100, 32),  # SmolLM2's GQA ratio
    (2, 4, 4, 33, 16),  # MHA
    (1, 2, 1, 1, 16),
    (1, 3, 3, 7, 32),
    (1, 4, 2, 130, 16),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prefill_matches_reference(shape, sinks, dtype):
    b, hq, hkv, n, d = shape
    q, k, v = _qkv(b, hq, hkv, n, d, dtype, seed=n)
    windows = _windows(hq, n, seed=n + sinks)
    got = swp.sliding_window_prefill(q, k, v, windows, sinks)
    want = swp.sliding_window_prefill_reference(q, k, v, windows, sinks)
    assert got.shape == (b, hq, n, d) and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize(
    "block_m,block_n,sinks",
    [(16, 16, 4), (16, 32, 20), (32, 16, 20), (16, 16, 40)],
)
def test_prefill_block_shapes_and_sink_band_overlap(block_m, block_n, sinks):
    """Small blocks put sinks across several blocks, partly inside the band of later query blocks."""
    q, k, v = _qkv(1, 4, 2, 97, 16, torch.float32, seed=3)
    windows = torch.tensor([1, 10, 17, 200])
    got = swp._launch_prefill(q, k, v, windows, sinks, None, block_m, block_n)
    want = swp.sliding_window_prefill_reference(q, k, v, windows, sinks)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_prefill_strided_inputs_and_scale():
    """(B, N, H, D) activations transposed to (B, H, N, D) without a copy, custom scale."""
    q = _randn(1, 50, 6, 32, dtype=torch.float32, seed=5).transpose(1, 2)
    k = _randn(1, 50, 2, 32, dtype=torch.float32, seed=6).transpose(1, 2)
    v = _randn(1, 50, 2, 32, dtype=torch.float32, seed=7).transpose(1, 2)
    windows = [3, 64, 1, 20, 50, 9]
    got = swp.sliding_window_prefill(q, k, v, windows, 4, scale=0.3)
    want = swp.sliding_window_prefill_reference(q, k, v, windows, 4, scale=0.3)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_prefill_reference_is_dense_causal_when_windows_cover_n():
    q, k, v = _qkv(2, 6, 2, 45, 16, torch.float32, seed=11)
    windows = torch.tensor([45, 46, 100, 45, 1000, 64])
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), is_causal=True
    )
    for sinks in (0, 4):
        got = swp.sliding_window_prefill_reference(q, k, v, windows, sinks)
        torch.testing.assert_close(got, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 16])
def test_prefill_reference_is_explicit_band_mask(window):
    n = 40
    q, k, v = _qkv(1, 2, 1, n, 16, torch.float32, seed=window)
    ones = torch.ones(n, n, dtype=torch.bool, device=DEVICE)
    band = ones.tril() & ~ones.tril(diagonal=-window)  # keys i - window < j <= i
    want = _explicit_attention(q, k, v, band)
    got = swp.sliding_window_prefill_reference(q, k, v, [window, window], 0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    # Sinks add the first columns back under the causal bound.
    sinks = 3
    with_sinks = band | (ones.tril() & (torch.arange(n, device=DEVICE) < sinks)[None, :])
    got = swp.sliding_window_prefill_reference(q, k, v, [window, window], sinks)
    torch.testing.assert_close(got.double(), _explicit_attention(q, k, v, with_sinks), atol=1e-5, rtol=1e-5)


def test_prefill_rejects_bad_inputs():
    q, k, v = _qkv(1, 2, 1, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="head dims"):
        swp.sliding_window_prefill(q[..., :12], k[..., :12], v[..., :12], [1, 2], 0)
    with pytest.raises(ValueError, match=">= 1"):
        swp.sliding_window_prefill(q, k, v, [0, 2], 0)
    with pytest.raises(ValueError, match="shape"):
        swp.sliding_window_prefill(q, k, v, [1, 2, 3], 0)
    q3 = _randn(1, 3, 8, 16, dtype=torch.float32, seed=1)
    with pytest.raises(ValueError, match="multiple"):
        swp.sliding_window_prefill(q3, torch.cat([k, k], 1), torch.cat([v, v], 1), [1, 2, 3], 0)


# --- decode -------------------------------------------------------------------------------


def _packed_decode_inputs(b, hq, sizes, d, dtype, seed, slack=0):
    """Packed (B, T, D) caches in which KV head g owns ``sizes[g]`` slots, then ``slack`` unused
    slots. Lengths differ per batch row: row 0 fills every region, the last row (B > 1) gives head
    0 a single entry, the rest are random. Every slot past a length is NaN, so reading one fails."""
    hkv = len(sizes)
    offsets = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32)
    slots = int(offsets[-1]) + slack
    q = _randn(b, hq, d, dtype=dtype, seed=seed)
    k = _randn(b, slots, d, dtype=dtype, seed=seed + 1)
    v = _randn(b, slots, d, dtype=dtype, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.stack([torch.randint(1, size + 1, (b,), generator=gen) for size in sizes], dim=1)
    lengths[0] = torch.tensor(sizes)
    if b > 1:
        lengths[-1, 0] = 1
    for row in range(b):
        for g in range(hkv):
            spare = slice(int(offsets[g] + lengths[row, g]), int(offsets[g + 1]))
            k[row, spare] = v[row, spare] = float("nan")
    k[:, int(offsets[-1]) :] = v[:, int(offsets[-1]) :] = float("nan")
    return q, k, v, offsets.to(DEVICE), lengths.to(device=DEVICE, dtype=torch.int32)


DECODE_CASES = [  # (B, Hq, slots of each KV head's region, D, unused slots at the end)
    (2, 9, (100, 1, 37), 32, 3),  # SmolLM2's GQA ratio 9/3, a one-slot region
    (1, 4, (7, 3, 1, 5), 16, 0),  # MHA
    (3, 4, (4, 1, 9, 2), 16, 0),  # MHA, B > 1
    (3, 8, (130, 64), 16, 5),  # regions longer than one block
    (2, 2, (1,), 32, 0),  # one KV head of one slot
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{c[0]}x{c[1]}x{'-'.join(map(str, c[2]))}x{c[3]}")
def test_decode_matches_reference(case, dtype):
    b, hq, sizes, d, slack = case
    q, k, v, offsets, lengths = _packed_decode_inputs(b, hq, sizes, d, dtype, seed=sum(sizes), slack=slack)
    got = vld.variable_length_decode(q, k, v, offsets, lengths)
    want = vld.variable_length_decode_reference(q, k, v, offsets, lengths)
    assert got.shape == q.shape and got.dtype == dtype
    assert not want.isnan().any()
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("seed", range(4))
def test_decode_random_shapes(seed):
    """Random batch, group size, KV heads, region sizes (one of them 1), head dim and spare slots."""
    gen = torch.Generator().manual_seed(100 + seed)
    b, hkv, group, slack = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 4), (1, 5), (1, 5), (0, 6)))
    sizes = torch.randint(1, 90, (hkv,), generator=gen).tolist()
    sizes[int(torch.randint(0, hkv, (), generator=gen))] = 1
    d = (16, 32, 64)[seed % 3]
    q, k, v, offsets, lengths = _packed_decode_inputs(b, hkv * group, sizes, d, torch.float32, seed, slack)
    want = vld.variable_length_decode_reference(q, k, v, offsets, lengths)
    torch.testing.assert_close(vld.variable_length_decode(q, k, v, offsets, lengths), want, **TOL[torch.float32])
    splits = 1 + seed % 3
    got = vld._launch_decode(q, k, v, offsets, lengths, None, splits, 16)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (3, 16), (8, 32), (5, 64)])
def test_decode_splits(num_splits, block_n):
    """Split-K merging, including splits left empty because a head is shorter than the split count."""
    q, k, v, offsets, lengths = _packed_decode_inputs(2, 9, (100, 1, 37), 32, torch.float32, seed=num_splits, slack=2)
    got = vld._launch_decode(q, k, v, offsets, lengths, 0.2, num_splits, block_n)
    want = vld.variable_length_decode_reference(q, k, v, offsets, lengths, scale=0.2)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_decode_strided_cache_broadcast_lengths_and_int64_offsets():
    """The cache may be a strided view, lengths a stride-0 expand (as the elastic cache passes
    them), offsets int64; lengths past a region are clamped to it."""
    q, k, v, offsets, lengths = _packed_decode_inputs(1, 6, (20, 1, 33), 16, torch.float32, seed=9, slack=4)
    k, v = k.expand(3, -1, -1), v.expand(3, -1, -1)  # rows share lengths: lengths[0] fills every region
    q = _randn(3, 6, 16, dtype=torch.float32, seed=10)
    k_strided = k.transpose(0, 1).contiguous().transpose(0, 1)  # (T, B, D) storage
    shared = lengths[0].expand(3, -1)
    want = vld.variable_length_decode_reference(q, k.contiguous(), v.contiguous(), offsets, shared.contiguous())
    got = vld._launch_decode(q, k_strided, v, offsets.long(), shared, None, 2, 16)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    torch.testing.assert_close(vld.variable_length_decode_reference(q, k_strided, v, offsets.long(), shared), want)
    too_long = shared + 7
    torch.testing.assert_close(vld.variable_length_decode(q, k, v, offsets, too_long), want, **TOL[torch.float32])
    torch.testing.assert_close(vld.variable_length_decode_reference(q, k, v, offsets, too_long), want)


def test_decode_reference_is_sdpa_over_each_slice():
    q, k, v, offsets, lengths = _packed_decode_inputs(2, 6, (30, 1, 12), 16, torch.float32, seed=4, slack=2)
    got = vld.variable_length_decode_reference(q, k, v, offsets, lengths)
    for b in range(2):
        for h in range(6):
            g = h // 2
            lo = int(offsets[g])
            hi = lo + int(lengths[b, g])
            want = torch.nn.functional.scaled_dot_product_attention(
                q[b, h, None, None], k[b, None, lo:hi], v[b, None, lo:hi]
            )[0, 0]
            torch.testing.assert_close(got[b, h], want, atol=1e-5, rtol=1e-5)


def test_decode_rejects_bad_inputs():
    q, k, v, offsets, lengths = _packed_decode_inputs(1, 4, (5, 3), 16, torch.float32, seed=1)
    for fn in (vld.variable_length_decode, vld.variable_length_decode_reference):
        with pytest.raises(ValueError, match="packed"):  # the old padded (B, Hkv, C, D) layout
            fn(q, k.view(1, 1, 8, 16), v.view(1, 1, 8, 16), offsets, lengths)
        with pytest.raises(ValueError, match="shapes differ"):
            fn(q, k, v[:, :7], offsets, lengths)
        with pytest.raises(ValueError, match="disagree"):
            fn(q[..., :8], k, v, offsets, lengths)
        for bad in ([1, 5, 8], [0, 6, 5], [0, 5, 9]):  # nonzero start, decreasing, past T
            with pytest.raises(ValueError, match="offsets must start at 0"):
                fn(q, k, v, torch.tensor(bad, dtype=torch.int32), lengths)
        with pytest.raises(ValueError, match=r"\(Hkv \+ 1,\)"):
            fn(q, k, v, offsets[:1], lengths[:, :0])
        with pytest.raises(TypeError, match="offsets must be an integer"):
            fn(q, k, v, offsets.float(), lengths)
        with pytest.raises(ValueError, match="multiple"):
            fn(q[:, :3], k, v, offsets, lengths)
        with pytest.raises(ValueError, match="lengths must be"):
            fn(q, k, v, offsets, lengths[:, :1])
        with pytest.raises(TypeError, match="lengths must be an integer"):
            fn(q, k, v, offsets, lengths.float())
    with pytest.raises(ValueError, match="head dims"):
        vld.variable_length_decode(q[..., :12], k[..., :12], v[..., :12], offsets, lengths)


# --- packaging ----------------------------------------------------------------------------


def test_triton_available():
    assert triton_available(DEVICE)
    assert triton_available("cuda")


def test_wrappers_name_pip_install_without_triton(monkeypatch):
    q, k, v = _qkv(1, 2, 1, 8, 16, torch.float32)
    monkeypatch.setattr(swp, "triton", None)
    with pytest.raises(RuntimeError, match="pip install triton"):
        swp.sliding_window_prefill(q, k, v, [1, 2], 0)
    monkeypatch.setattr(vld, "triton", None)
    with pytest.raises(RuntimeError, match="pip install triton"):
        offsets = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
        lengths = torch.ones(1, 1, dtype=torch.int32, device=DEVICE)
        vld.variable_length_decode(q[:, :, 0], k[:, 0], v[:, 0], offsets, lengths)


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, paretoray.kernels as pk\n"
        "assert not pk.triton_available(torch.device('cuda'))\n"
        "q = torch.randn(1, 2, 5, 16)\n"
        "pk.sliding_window_prefill_reference(q, q[:, :1], q[:, :1], [2, 9], 1)\n"
        "try:\n"
        "    pk.sliding_window_prefill(q, q[:, :1], q[:, :1], [2, 9], 1)\n"
        "except RuntimeError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no RuntimeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
