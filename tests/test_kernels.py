"""Triton MoA kernels against their PyTorch references, and the references against plain masking.

On a machine without CUDA the kernels run in Triton's interpreter (float32, small shapes); on a
GPU the same tests run compiled, in float32 and bfloat16.
"""

from __future__ import annotations

import importlib
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


DECODE_SHAPES = [  # (B, Hq, Hkv, C, D)
    (2, 9, 3, 100, 32),
    (1, 4, 4, 7, 16),
    (3, 8, 2, 130, 16),
    (2, 2, 1, 1, 32),
]


def _decode_inputs(b, hq, hkv, cap, d, dtype, seed):
    q = _randn(b, hq, d, dtype=dtype, seed=seed)
    k = _randn(b, hkv, cap, d, dtype=dtype, seed=seed + 1)
    v = _randn(b, hkv, cap, d, dtype=dtype, seed=seed + 2)
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, cap + 1, (b, hkv), generator=gen, dtype=torch.int32)
    lengths.view(-1)[0] = 1
    lengths.view(-1)[-1] = cap
    return q, k, v, lengths.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_matches_reference(shape, dtype):
    q, k, v, lengths = _decode_inputs(*shape, dtype=dtype, seed=shape[3])
    got = vld.variable_length_decode(q, k, v, lengths)
    want = vld.variable_length_decode_reference(q, k, v, lengths)
    assert got.shape == q.shape and got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("num_splits,block_n", [(1, 16), (3, 16), (8, 32), (5, 64)])
def test_decode_splits(num_splits, block_n):
    """Split-K merging, including splits left empty because a head is shorter than the split count."""
    q, k, v, lengths = _decode_inputs(2, 9, 3, 100, 32, torch.float32, seed=num_splits)
    got = vld._launch_decode(q, k, v, lengths, 0.2, num_splits, block_n)
    want = vld.variable_length_decode_reference(q, k, v, lengths, scale=0.2)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


def test_decode_ignores_padding_and_strided_cache():
    """Garbage past each length must not leak in; the cache may be a strided view."""
    q, k, v, lengths = _decode_inputs(2, 4, 2, 40, 16, torch.float32, seed=9)
    k_pad, v_pad = k.clone(), v.clone()
    for b in range(2):
        for g in range(2):
            k_pad[b, g, lengths[b, g]:] = 1e4
            v_pad[b, g, lengths[b, g]:] = float("nan")
    k_strided = k_pad.transpose(1, 2).contiguous().transpose(1, 2)  # (B, C, Hkv, D) storage
    want = vld.variable_length_decode_reference(q, k, v, lengths)
    torch.testing.assert_close(vld._launch_decode(q, k_strided, v_pad, lengths, None, 2, 16), want, **TOL[torch.float32])
    torch.testing.assert_close(vld.variable_length_decode_reference(q, k_strided, v_pad, lengths), want)


def test_decode_reference_is_sdpa_over_each_prefix():
    q, k, v, lengths = _decode_inputs(2, 6, 2, 30, 16, torch.float32, seed=4)
    got = vld.variable_length_decode_reference(q, k, v, lengths)
    for b in range(2):
        for h in range(6):
            g, n = h // 3, int(lengths[b, h // 3])
            want = torch.nn.functional.scaled_dot_product_attention(
                q[b, h, None, None], k[b, g, None, :n], v[b, g, None, :n]
            )[0, 0]
            torch.testing.assert_close(got[b, h], want, atol=1e-5, rtol=1e-5)


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
        vld.variable_length_decode(q[:, :, 0], k, v, torch.ones(1, 1, dtype=torch.int32, device=DEVICE))


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
