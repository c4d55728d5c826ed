"""Single-token decode attention over KV caches whose heads hold different numbers of entries.

Under MoA (Fu et al. 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", arXiv:2406.14909) each head keeps its own sink + window cache, so one layer's KV
heads have different lengths. They share one padded buffer; each head's valid entries are the
first ``lengths[b, g]`` slots. Slot order is irrelevant: keys are stored already rotary-embedded
and softmax does not depend on the order of its terms.

Shapes: ``q`` (B, Hq, D); ``k_cache``, ``v_cache`` (B, Hkv, C, D), ``Hq % Hkv == 0`` (query head
``h`` reads KV head ``h // (Hq // Hkv)``); ``lengths`` (B, Hkv) integers in [1, C]; output
(B, Hq, D) in ``q``'s dtype, accumulated in float32.

The Triton kernel is flash-decoding: one program per (batch, KV head, split) serves every query
head of the group, so each KV entry is read once, and walks only that head's valid entries; a
second small kernel merges the splits' partial softmaxes.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the package stays importable; the wrapper says how to get triton
    triton = None
    tl = None

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4:
        raise ValueError("q must be (B, Hq, D) and the caches (B, Hkv, C, D)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    (b, hq, d), (bk, hkv, _, dk) = q.shape, k_cache.shape
    if (b, d) != (bk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head dim")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    if tuple(lengths.shape) != (b, hkv):
        raise ValueError(f"lengths must be (B, Hkv) = ({b}, {hkv}), got {tuple(lengths.shape)}")
    if lengths.is_floating_point():
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")


def variable_length_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch decode attention over the first ``lengths[b, g]`` slots of each KV head.

    q: (B, Hq, D); k_cache, v_cache: (B, Hkv, C, D); lengths: (B, Hkv). Returns (B, Hq, D) in
    q's dtype. A head with length 0 yields zeros.
    """
    _check_inputs(q, k_cache, v_cache, lengths)
    b, hq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    scores = torch.einsum("bgqd,bgcd->bgqc", qg, k_cache.float()) * scale
    valid = torch.arange(cap, device=q.device) < lengths.to(q.device)[..., None].long()  # (B, Hkv, C)
    scores = scores.masked_fill(~valid[:, :, None, :], float("-inf"))
    # Clamped max so an empty head gives exp(-inf) = 0 and a zero output instead of NaN.
    peak = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    weights = torch.exp(scores - peak)
    # Padding may be uninitialised memory; 0 * NaN would still poison the sum.
    values = v_cache.float().masked_fill(~valid[..., None], 0.0)
    out = torch.einsum("bgqc,bgcd->bgqd", weights, values)
    out = out / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return out.reshape(b, hq, d).to(q.dtype)


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
    def _decode_split_kernel(
        Q, K, V, Lengths, Out, PartAcc, PartMax, PartSum,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kc, stride_kd,
        stride_vb, stride_vh, stride_vc, stride_vd,
        stride_lb, stride_lh,
        stride_ob, stride_oh, stride_od,
        n_kv_heads, group_size, capacity, qk_scale,
        NUM_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, IEEE_FP32: tl.constexpr,
    ):
        bg = tl.program_id(0)
        split = tl.program_id(1)
        batch = bg // n_kv_heads
        kv_head = bg % n_kv_heads
        length = tl.minimum(tl.load(Lengths + batch * stride_lb + kv_head * stride_lh), capacity)
        # Split this head's own length, not the capacity, so work follows each head's length;
        # chunks are whole blocks so only the last block of a chunk needs a bound check.
        chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, length)

        batch = batch.to(tl.int64)  # int64 so huge caches cannot overflow the offsets
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        head_ok = offs_g < group_size
        heads = (kv_head * group_size + offs_g).to(tl.int64)
        # The group's query heads are the rows of one matrix: tl.dot needs >= 16 rows, hence GROUP_PAD.
        q = tl.load(
            Q + batch * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
            mask=head_ok[:, None], other=0.0,
        )
        k_base = K + batch * stride_kb + kv_head.to(tl.int64) * stride_kh
        v_base = V + batch * stride_vb + kv_head.to(tl.int64) * stride_vh

        # Finite start: an empty split then merges with weight exp2(-1e30 - max) = 0, never NaN.
        m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid = offs_n < hi
            kt_ptrs = k_base + offs_n[None, :] * stride_kc + offs_d[:, None] * stride_kd
            v_ptrs = v_base + offs_n[:, None] * stride_vc + offs_d[None, :] * stride_vd
            kt = tl.load(kt_ptrs, mask=valid[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
            s = _dot(q, kt, IEEE_FP32) * qk_scale
            s = tl.where(valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE_FP32)
            m_i = m_new

        if NUM_SPLITS == 1:
            out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(
                Out + batch * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                out.to(Out.dtype.element_ty),
                mask=head_ok[:, None],
            )
        else:
            # Partials are contiguous (B, Hq, NUM_SPLITS[, D]) float32.
            rows = (batch * n_kv_heads * group_size + heads) * NUM_SPLITS + split
            tl.store(PartAcc + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=head_ok[:, None])
            tl.store(PartMax + rows, m_i, mask=head_ok)
            tl.store(PartSum + rows, l_i, mask=head_ok)

    @triton.jit
    def _decode_combine_kernel(
        PartAcc, PartMax, PartSum, Out,
        stride_ob, stride_oh, stride_od,
        n_heads,
        NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM)
        split_ok = offs_s < NUM_SPLITS
        rows = bh * NUM_SPLITS + offs_s
        m = tl.load(PartMax + rows, mask=split_ok, other=float("-inf"))
        l = tl.load(PartSum + rows, mask=split_ok, other=0.0)
        acc = tl.load(PartAcc + rows[:, None] * HEAD_DIM + offs_d[None, :], mask=split_ok[:, None], other=0.0)
        # Rescale every split's partial softmax to the common maximum (log2 domain, as stored).
        weight = tl.exp2(m - tl.max(m, 0))
        total = tl.sum(weight * l, 0)
        out = tl.sum(weight[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
        batch = bh // n_heads
        head = bh % n_heads
        tl.store(Out + batch * stride_ob + head * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty))


def _require_triton(*tensors: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("variable_length_decode needs Triton, which is not installed: pip install triton")
    device = tensors[0].device
    if any(t.device != device for t in tensors):
        raise ValueError("variable_length_decode: q, caches and lengths must be on one device")
    # Interpretation is fixed when @triton.jit runs (module import), not at launch.
    interpreted = type(_decode_split_kernel).__name__ == "InterpretedFunction"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            f"variable_length_decode got {device.type} tensors: run on CUDA, or set TRITON_INTERPRET=1 "
            "before triton is first imported to use the (slow) interpreter"
        )


def _launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None,
    num_splits: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    _check_inputs(q, k_cache, v_cache, lengths)
    b, hq, d = q.shape
    hkv, cap = k_cache.shape[1], k_cache.shape[2]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"variable_length_decode supports head dims {SUPPORTED_HEAD_DIMS}, got D={d}")
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    _require_triton(q, k_cache, v_cache, lengths)
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        # The interpreter's tl.dot multiplies bfloat16 bit patterns as integers (triton 3.9).
        out = _launch_decode(q.float(), k_cache.float(), v_cache.float(), lengths, scale, num_splits, block_n)
        return out.to(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty((b, hq, d), device=q.device, dtype=q.dtype)
    if b == 0 or hq == 0:
        return out
    group = hq // hkv
    if num_splits > 1:
        part_acc = torch.empty((b, hq, num_splits, d), device=q.device, dtype=torch.float32)
        part_max = torch.empty((b, hq, num_splits), device=q.device, dtype=torch.float32)
        part_sum = torch.empty((b, hq, num_splits), device=q.device, dtype=torch.float32)
    else:
        part_acc = part_max = part_sum = out  # never touched when there is one split
    _decode_split_kernel[(b * hkv, num_splits)](
        q, k_cache, v_cache, lengths, out, part_acc, part_max, part_sum,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *lengths.stride(), *out.stride(),
        hkv, group, cap, scale * _LOG2E,
        NUM_SPLITS=num_splits, GROUP_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        HEAD_DIM=d,
        IEEE_FP32=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_combine_kernel[(b * hq,)](
            part_acc, part_max, part_sum, out, *out.stride(), hq,
            NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits), HEAD_DIM=d,
        )
    return out


def variable_length_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton flash-decoding over the first ``lengths[b, g]`` slots of each KV head's buffer.

    q: (B, Hq, D); k_cache, v_cache: (B, Hkv, C, D), Hq % Hkv == 0; lengths: (B, Hkv) ints in
    [1, C] (larger values are clamped to C); D in {16, 32, 64, 128}. Returns (B, Hq, D) in q's
    dtype. Runs on CUDA, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was
    imported.
    """
    b, hkv, cap = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    block_n = 64
    if q.device.type == "cuda":
        # Enough programs for about two waves; sized from the capacity so choosing never reads
        # lengths back to the host (which would synchronize).
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        splits = min(-(-2 * sms // max(b * hkv, 1)), -(-cap // (4 * block_n)), _MAX_SPLITS)
        return _launch_decode(q, k_cache, v_cache, lengths, scale, max(splits, 1), block_n)
    # Interpreter: one split per head keeps the program count, hence Python overhead, lowest.
    return _launch_decode(q, k_cache, v_cache, lengths, scale, 1, block_n)
