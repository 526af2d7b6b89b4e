"""Triton experts back-end (CUDA, or CPU under `TRITON_INTERPRET=1`), imported lazily.

`ops.py` holds the kernels and their launchers, `functions.py` the autograd wrapper. Nothing here imports Triton:
a machine without it still imports the package, and `triton_available` answers the registry's question
("can this back-end run on x?") without importing anything heavy.
"""

from __future__ import annotations

import importlib.util
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available(x: torch.Tensor) -> bool:
    """True for CUDA tensors of a supported dtype when Triton is installed.

    The CPU interpreter is for tests only, so "auto" never picks it; call `triton_experts_forward` directly."""
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES and importlib.util.find_spec("triton") is not None


def triton_experts_forward(x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK):
    """Experts back-end `"triton"`: same contract as `modeling_ernie5.moe.reference_experts_forward`."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError("the 'triton' experts back-end needs the `triton` package (pip install 'ernie5[triton]')")
    if not x_TD.is_cuda:
        if not _interpreter_requested():
            raise ValueError("the 'triton' experts back-end needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")
        from . import ops

        if not ops.INTERPRETED:
            raise ValueError("TRITON_INTERPRET=1 was set after the Triton kernels were compiled; set it before first use")
    allowed = SUPPORTED_DTYPES + ((torch.float64,) if not x_TD.is_cuda else ())
    if x_TD.dtype not in allowed:
        raise ValueError(f"the 'triton' experts back-end does not support {x_TD.dtype}")
    from .functions import triton_experts_forward as run

    return run(x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK)
