"""Single-token decode attention over a packed KV cache whose heads hold different numbers of entries.

Under MoA (Fu et al. 2024, "MoA: Mixture of Sparse Attention for Automatic Large Language Model
Compression", arXiv:2406.14909) each head keeps its own sink + window cache, so one layer's KV
heads have different lengths. They are packed along one slot axis with no padding between heads:
KV head ``g`` owns slots ``[offsets[g], offsets[g + 1])`` and its valid entries are the first
``lengths[b, g]`` slots of that region. A padded (B, Hkv, C, D) buffer would give every head the
largest head's capacity C; packed, the layer holds exactly what each head needs. Slot order inside
a region is irrelevant: keys are stored already rotary-embedded and softmax does not depend on the
order of its terms.

Shapes: ``q`` (B, Hq, D); ``k_cache``, ``v_cache`` (B, T, D); ``offsets`` (Hkv + 1,) integers,
``offsets[0] == 0``, nondecreasing, ``offsets[-1] <= T``; ``lengths`` (B, Hkv) integers with
``1 <= lengths[b, g] <= offsets[g + 1] - offsets[g]``. ``Hq % Hkv == 0``, and query head ``h``
reads KV head ``h // (Hq // Hkv)``. Output (B, Hq, D) in ``q``'s dtype, accumulated in float32.
Slots past a head's length (and past ``offsets[-1]``) never count, so they may hold anything.

The Triton kernel is flash-decoding: one program per (batch, KV head, split) serves every query
head of the group, so each KV entry is read once, and walks only that head's valid entries from
``offsets[g]``; a second small kernel merges the splits' partial softmaxes. It never reads a CUDA
tensor back on the host (no synchronisation), so device-resident ``offsets`` and ``lengths`` are
not value-checked; the kernel instead clamps regions to ``[0, T)`` and lengths to their region,
so bad values give wrong numbers, never out-of-bounds reads. Host (CPU) ``offsets`` are checked.
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


def _check_inputs(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, offsets: torch.Tensor, lengths: torch.Tensor
) -> None:
    """Shape and dtype checks (no tensor values read), plus offsets' values when they are on the host."""
    if q.dim() != 3 or k_cache.dim() != 3:
        raise ValueError("q must be (B, Hq, D) and the caches packed (B, T, D)")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    (b, hq, d), (bk, slots, dk) = q.shape, k_cache.shape
    if (b, d) != (bk, dk):
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head dim")
    if offsets.dim() != 1 or offsets.numel() < 2:
        raise ValueError(f"offsets must be (Hkv + 1,) with Hkv >= 1, got shape {tuple(offsets.shape)}")
    if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
        raise TypeError(f"offsets must be an integer tensor, got {offsets.dtype}")
    hkv = offsets.numel() - 1
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv} = len(offsets) - 1)")
    if tuple(lengths.shape) != (b, hkv):
        raise ValueError(f"lengths must be (B, Hkv) = ({b}, {hkv}), got {tuple(lengths.shape)}")
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if offsets.device.type == "cpu":  # free on the host; a device tensor would need a sync
        _check_offset_values(offsets.tolist(), slots)


def _check_offset_values(bounds: list[int], slots: int) -> None:
    if bounds[0] != 0 or any(hi < lo for lo, hi in zip(bounds, bounds[1:])) or bounds[-1] > slots:
        raise ValueError(f"offsets must start at 0, be nondecreasing and end <= T = {slots}, got {bounds}")


def variable_length_decode_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain-PyTorch decode attention: per KV head, softmax over the first ``lengths[b, g]`` slots
    of its region ``[offsets[g], offsets[g + 1])``.

    q: (B, Hq, D); k_cache, v_cache: (B, T, D); offsets: (Hkv + 1,); lengths: (B, Hkv). Returns
    (B, Hq, D) in q's dtype. Lengths above the region size are clamped to it; a head with length 0
    yields zeros. Reads ``offsets`` to the host (a sync when it is a CUDA tensor), not ``lengths``.
    """
    _check_inputs(q, k_cache, v_cache, offsets, lengths)
    b, hq, d = q.shape
    hkv = offsets.numel() - 1
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    bounds = offsets.tolist()
    _check_offset_values(bounds, k_cache.shape[1])  # already done above for host offsets
    lengths = lengths.to(q.device).long()
    outs = []
    for g in range(hkv):
        lo, hi = bounds[g], bounds[g + 1]
        qg = q[:, g * group : (g + 1) * group].float()  # (B, G, D)
        keys, values = k_cache[:, lo:hi].float(), v_cache[:, lo:hi].float()  # (B, R, D)
        valid = torch.arange(hi - lo, device=q.device) < lengths[:, g, None]  # (B, R): per batch row
        scores = torch.einsum("bqd,brd->bqr", qg, keys) * scale
        scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        # Clamped max so an empty head gives exp(-inf) = 0 and a zero output instead of NaN.
        peak = scores.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
        weights = torch.exp(scores - peak)
        # Unused slots may be uninitialised memory; 0 * NaN would still poison the sum.
        out = torch.einsum("bqr,brd->bqd", weights, values.masked_fill(~valid[..., None], 0.0))
        outs.append(out / weights.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny))
    return torch.cat(outs, dim=1).to(q.dtype)


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
        Q, K, V, Offsets, Lengths, Out, PartAcc, PartMax, PartSum,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kt, stride_kd,
        stride_vb, stride_vt, stride_vd,
        stride_lb, stride_lh,
        stride_ob, stride_oh, stride_od,
        n_kv_heads, group_size, n_slots, qk_scale,
        NUM_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, IEEE_FP32: tl.constexpr,
    ):
        bg = tl.program_id(0)
        split = tl.program_id(1)
        batch = bg // n_kv_heads
        kv_head = bg % n_kv_heads
        # This head's region [start, end) of the packed slots, clamped to the buffer so bad
        # offsets or lengths (not checked on the device: that would sync) never read out of bounds.
        start = tl.minimum(tl.maximum(tl.load(Offsets + kv_head), 0), n_slots)
        end = tl.minimum(tl.maximum(tl.load(Offsets + kv_head + 1), start), n_slots)
        length = tl.load(Lengths + batch * stride_lb + kv_head * stride_lh)
        length = tl.minimum(tl.maximum(length, 0), end - start)
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
        k_base = K + batch * stride_kb + start.to(tl.int64) * stride_kt
        v_base = V + batch * stride_vb + start.to(tl.int64) * stride_vt

        # Finite start: an empty split then merges with weight exp2(-1e30 - max) = 0, never NaN.
        m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            valid = offs_n < hi
            kt_ptrs = k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
            v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
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
        raise ValueError("variable_length_decode: q, caches, offsets and lengths must be on one device")
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
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None,
    num_splits: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    _check_inputs(q, k_cache, v_cache, offsets, lengths)
    b, hq, d = q.shape
    hkv, slots = offsets.numel() - 1, k_cache.shape[1]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"variable_length_decode supports head dims {SUPPORTED_HEAD_DIMS}, got D={d}")
    if not 1 <= num_splits <= _MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {_MAX_SPLITS}], got {num_splits}")
    # Asynchronous copies/casts only: nothing is read back to the host.
    offsets = offsets.to(device=q.device, dtype=torch.int32)
    lengths = lengths.to(device=q.device, dtype=torch.int32)
    _require_triton(q, k_cache, v_cache, offsets, lengths)
    if q.dtype == torch.bfloat16 and q.device.type != "cuda":
        # The interpreter's tl.dot multiplies bfloat16 bit patterns as integers (triton 3.9).
        out = _launch_decode(
            q.float(), k_cache.float(), v_cache.float(), offsets, lengths, scale, num_splits, block_n
        )
        return out.to(q.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty((b, hq, d), device=q.device, dtype=q.dtype)
    if b == 0 or hq == 0:
        return out
    offsets = offsets.contiguous()  # indexed by head, without a stride
    group = hq // hkv
    if num_splits > 1:
        part_acc = torch.empty((b, hq, num_splits, d), device=q.device, dtype=torch.float32)
        part_max = torch.empty((b, hq, num_splits), device=q.device, dtype=torch.float32)
        part_sum = torch.empty((b, hq, num_splits), device=q.device, dtype=torch.float32)
    else:
        part_acc = part_max = part_sum = out  # never touched when there is one split
    _decode_split_kernel[(b * hkv, num_splits)](
        q, k_cache, v_cache, offsets, lengths, out, part_acc, part_max, part_sum,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *lengths.stride(), *out.stride(),
        hkv, group, slots, scale * _LOG2E,
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
    offsets: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton flash-decoding over a packed cache: KV head g attends to the first ``lengths[b, g]``
    slots of its region ``[offsets[g], offsets[g + 1])``.

    q: (B, Hq, D); k_cache, v_cache: (B, T, D); offsets: (Hkv + 1,) ints, 0 first, nondecreasing,
    last <= T; lengths: (B, Hkv) ints in [1, offsets[g + 1] - offsets[g]] (larger values are
    clamped to the region); Hq % Hkv == 0; D in {16, 32, 64, 128}. Returns (B, Hq, D) in q's
    dtype. Runs on CUDA, or on CPU tensors when TRITON_INTERPRET=1 was set before triton was
    imported. Never reads a CUDA tensor back on the host.
    """
    b, slots = k_cache.shape[0], k_cache.shape[1]
    hkv = max(offsets.numel() - 1, 1)
    block_n = 64
    if q.device.type == "cuda":
        # Enough programs for about two waves, but splits of about four blocks or more for a head
        # of the mean region size T / Hkv; sized from shapes so choosing never reads offsets or
        # lengths back to the host (which would synchronize). Each head splits its own length.
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
        mean_region = -(-slots // hkv)
        splits = min(-(-2 * sms // max(b * hkv, 1)), -(-mean_region // (4 * block_n)), _MAX_SPLITS)
        return _launch_decode(q, k_cache, v_cache, offsets, lengths, scale, max(splits, 1), block_n)
    # Interpreter: one split per head keeps the program count, hence Python overhead, lowest.
    return _launch_decode(q, k_cache, v_cache, offsets, lengths, scale, 1, block_n)
