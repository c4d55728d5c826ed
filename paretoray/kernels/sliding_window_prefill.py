"""Prefill attention with a per-head sliding window plus shared sink tokens.

MoA (Fu et al. 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", arXiv:2406.14909) gives every attention head its own span: query ``i`` of head
``h`` sees key ``j`` iff ``j <= i`` and (``j < sinks`` or ``i - j < windows[h]``).

Shapes: ``q`` (B, Hq, N, D); ``k``, ``v`` (B, Hkv, N, D) with ``Hq % Hkv == 0`` (query head ``h``
reads KV head ``h // (Hq // Hkv)``); ``windows`` (Hq,) integers >= 1; output (B, Hq, N, D) in
``q``'s dtype. Softmax runs in float32.

The Triton kernel is a flash-attention forward that only visits the key blocks a query block can
see: the sink blocks, then the band of blocks ``[start - window + 1, start + BLOCK_M)``. Key
blocks wholly inside the band skip mask arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package stays importable; the wrapper says how to get triton
    triton = None
    tl = None

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634


def _allowed(n_ctx: int, window: int, sinks: int, device: torch.device) -> torch.Tensor:
    i = torch.arange(n_ctx, device=device)[:, None]
    j = torch.arange(n_ctx, device=device)[None, :]
    return (j <= i) & ((j < sinks) | (i - j < window))


def _as_windows(windows: torch.Tensor | Sequence[int], n_heads: int) -> torch.Tensor:
    windows = torch.as_tensor(windows)
    if windows.shape != (n_heads,):
        raise ValueError(f"windows must have shape ({n_heads},) (one span per query head), got {tuple(windows.shape)}")
    if windows.is_floating_point() or windows.is_complex():
        raise TypeError(f"windows must be an integer tensor, got {windows.dtype}")
    # Values are checked only off the GPU: reading a CUDA tensor back would stall the launch queue.
    if windows.device.type == "cpu" and bool((windows < 1).any()):
        raise ValueError(f"every window must be >= 1, got {windows.tolist()}")
    return windows


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: int) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k and v must be (B, H, N, D)")
    if k.shape != v.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    (b, hq, n, d), (bk, hkv, nk, dk) = q.shape, k.shape
    if (b, n, d) != (bk, nk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, length or head dim")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if sinks < 0:
        raise ValueError(f"sinks must be >= 0, got {sinks}")


def sliding_window_prefill_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: torch.Tensor | Sequence[int],
    sinks: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch MoA prefill attention, one head at a time.

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D); windows: (Hq,) ints >= 1. Returns (B, Hq, N, D) in
    q's dtype. Heads go one by one so peak memory is one (N, N) mask plus SDPA's own workspace,
    which keeps N ~ 8K workable on a CPU.
    """
    _check_inputs(q, k, v, sinks)
    b, hq, n, d = q.shape
    group = hq // k.shape[1]
    windows = _as_windows(windows, hq).tolist()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    mask, mask_window = None, None
    for h in range(hq):
        w = min(int(windows[h]), n)  # any span >= N is the plain causal mask
        if w != mask_window:  # reuse only the last mask: one (N, N) mask alive at a time
            mask, mask_window = _allowed(n, w, sinks, q.device), w
        kv = h // group
        out[:, h] = torch.nn.functional.scaled_dot_product_attention(
            q[:, h].float(), k[:, kv].float(), v[:, kv].float(), attn_mask=mask, scale=scale
        ).to(q.dtype)
    return out


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE_FP32: tl.constexpr):
        # float32 inputs get true fp32 products, matching the reference, not TF32; other dtypes
        # keep the backend's default so nothing assumes which precisions a target allows.
        if IEEE_FP32:
            c = tl.dot(a, b, input_precision="ieee")
        else:
            c = tl.dot(a, b)
        return c

    @triton.jit
    def _prefill_block(
        acc, m_i, l_i, q, k_base, v_base,
        stride_kn, stride_kd, stride_vn, stride_vd,
        start_n, offs_m, n_ctx, window, sinks, sink_hi, qk_scale,
        MODE: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE_FP32: tl.constexpr,
    ):
        # MODE 0: block wholly inside the band, no masking at all.
        # MODE 1: sink block; only keys below sink_hi count (the band loop owns the rest).
        # MODE 2: band edge block; the full sink/window/causal rule, as index arithmetic.
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        kt_ptrs = k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
        v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
        if MODE == 0:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
            s = _dot(q, kt, IEEE_FP32) * qk_scale
        else:
            if MODE == 1:
                in_range = offs_n < sink_hi
            else:
                in_range = offs_n < n_ctx
            kt = tl.load(kt_ptrs, mask=in_range[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
            s = _dot(q, kt, IEEE_FP32) * qk_scale
            if MODE == 1:
                keep = in_range[None, :]
            else:
                i = offs_m[:, None]
                j = offs_n[None, :]
                keep = in_range[None, :] & (j <= i) & ((j < sinks) | (i - j < window))
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE_FP32)
        return acc, m_new, l_i

    @triton.jit
    def _sliding_window_prefill_kernel(
        Q, K, V, Out, Windows,
        stride_qb, stride_qh, stride_qn, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_on, stride_od,
        n_heads, group_size, n_ctx, sinks, qk_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE_FP32: tl.constexpr,
    ):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        batch = (bh // n_heads).to(tl.int64)  # int64 so huge caches cannot overflow the offsets
        head = bh % n_heads
        kv_head = (head // group_size).to(tl.int64)
        window = tl.load(Windows + head)
        head = head.to(tl.int64)

        q_base = Q + batch * stride_qb + head * stride_qh
        k_base = K + batch * stride_kb + kv_head * stride_kh
        v_base = V + batch * stride_vb + kv_head * stride_vh
        o_base = Out + batch * stride_ob + head * stride_oh

        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < n_ctx
        q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

        # Finite start so a row that sees no key in a block gets alpha = 1, not exp(-inf + inf) = NaN.
        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        # Key-block ranges, all aligned to BLOCK_N from 0 and ordered
        # 0 <= sink_hi <= band_lo <= full_lo <= full_hi <= band_hi:
        #   [band_lo, band_hi)  every block some row of this query block can see through its window;
        #   [full_lo, full_hi)  blocks every row sees whole (causal and inside the window);
        #   [0, sink_hi)        sinks the band does not already cover, so no key counts twice.
        band_lo = (tl.maximum(start_m - window + 1, 0) // BLOCK_N) * BLOCK_N
        band_hi = tl.minimum(start_m + BLOCK_M, n_ctx)
        full_hi = ((start_m + 1) // BLOCK_N) * BLOCK_N
        full_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - window, 0), BLOCK_N) * BLOCK_N
        full_lo = tl.minimum(tl.maximum(full_lo, band_lo), full_hi)
        sink_hi = tl.minimum(band_lo, sinks)

        for start_n in range(0, sink_hi, BLOCK_N):
            acc, m_i, l_i = _prefill_block(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                start_n, offs_m, n_ctx, window, sinks, sink_hi, qk_scale,
                1, BLOCK_N, HEAD_DIM, IEEE_FP32,
            )
        for start_n in range(band_lo, full_lo, BLOCK_N):
            acc, m_i, l_i = _prefill_block(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                start_n, offs_m, n_ctx, window, sinks, sink_hi, qk_scale,
                2, BLOCK_N, HEAD_DIM, IEEE_FP32,
            )
        for start_n in range(full_lo, full_hi, BLOCK_N):
            acc, m_i, l_i = _prefill_block(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                start_n, offs_m, n_ctx, window, sinks, sink_hi, qk_scale,
                0, BLOCK_N, HEAD_DIM, IEEE_FP32,
            )
        for start_n in range(full_hi, band_hi, BLOCK_N):
            acc, m_i, l_i = _prefill_block(
                acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                start_n, offs_m, n_ctx, window, sinks, sink_hi, qk_scale,
                2, BLOCK_N, HEAD_DIM, IEEE_FP32,
            )

        # Rows past n_ctx saw nothing; keep them finite even though they are never stored.
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_i[:, None]
        tl.store(
            o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None],
        )


def _require_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("sliding_window_prefill needs Triton, which is not installed: pip install triton")
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("sliding_window_prefill: q, k and v must be on one device")
    # Interpretation is fixed when @triton.jit runs (module import), not at launch.
    interpreted = type(_sliding_window_prefill_kernel).__name__ == "InterpretedFunction"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"sliding_window_prefill got {device.type} tensors: run on CUDA, or set TRITON_INTERPRET=1 before "
            "triton is first imported to use the (slow) interpreter"
        )


def _launch_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: torch.Tensor | Sequence[int],
    sinks: int,
    scale: float | None,
    block_m: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    _check_inputs(q, k, v, sinks)
    b, hq, n, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"sliding_window_prefill supports head dims {SUPPORTED_HEAD_DIMS}, got D={d}")
    _require_triton(q, k, v)
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        # The interpreter's tl.dot multiplies bfloat16 bit patterns as integers (triton 3.9).
        return _launch_prefill(q.float(), k.float(), v.float(), windows, sinks, scale, block_m, block_n).to(q.dtype)
    # Spans past N are all the same causal mask; clamping keeps start - window in int32.
    windows = _as_windows(windows, hq).clamp(max=max(n, 1)).to(device=q.device, dtype=torch.int32).contiguous()
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty((b, hq, n, d), device=q.device, dtype=q.dtype)
    if n == 0 or b == 0:
        return out
    grid = (triton.cdiv(n, block_m), b * hq)
    _sliding_window_prefill_kernel[grid](
        q, k, v, out, windows,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hq // k.shape[1], n, int(sinks), scale * _LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        IEEE_FP32=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def sliding_window_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    windows: torch.Tensor | Sequence[int],
    sinks: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton MoA prefill attention: per-head sliding window plus ``sinks`` leading tokens.

    q: (B, Hq, N, D); k, v: (B, Hkv, N, D), Hq % Hkv == 0; windows: (Hq,) ints >= 1; D in
    {16, 32, 64, 128}. Returns (B, Hq, N, D) in q's dtype. Runs on CUDA, or on CPU tensors when
    TRITON_INTERPRET=1 was set before triton was imported.
    """
    if q.device.type == "cuda":
        if q.dtype == torch.float32:
            # 128x64 fp32 tiles with D=128 need ~225 KB of shared memory, more than an A100 has.
            return _launch_prefill(q, k, v, windows, sinks, scale, 64, 32, num_warps=4, num_stages=2)
        # Untuned defaults for Hopper/Ampere; 64-wide key blocks waste little on narrow windows.
        num_warps = 8 if q.shape[-1] >= 128 else 4
        return _launch_prefill(q, k, v, windows, sinks, scale, 128, 64, num_warps=num_warps, num_stages=3)
    # Interpreter: each program costs Python overhead, so fewer, larger blocks run faster.
    return _launch_prefill(q, k, v, windows, sinks, scale, 32, 32)
