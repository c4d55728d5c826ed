"""Triton attention kernels for MoA-style per-head sparse attention, with PyTorch references.

The package imports without Triton; the Triton wrappers then raise a RuntimeError naming
``pip install triton``. On CPU they need ``TRITON_INTERPRET=1`` set before Triton is imported.
"""

from __future__ import annotations

import os

import torch

from paretoray.kernels.sliding_window_prefill import sliding_window_prefill, sliding_window_prefill_reference
from paretoray.kernels.variable_length_decode import variable_length_decode, variable_length_decode_reference

__all__ = [
    "sliding_window_prefill",
    "sliding_window_prefill_reference",
    "triton_available",
    "variable_length_decode",
    "variable_length_decode_reference",
]


def triton_available(device: torch.device | str) -> bool:
    """True when Triton imports and can run on ``device``: CUDA, or anything under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
