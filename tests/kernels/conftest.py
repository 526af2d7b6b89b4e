"""Kernel tests run Triton through its CPU interpreter when no GPU is present.

`TRITON_INTERPRET` is read when a `@triton.jit` kernel is defined, i.e. when `modeling_ernie5.kernels.triton.ops`
is first imported. Nothing imports that module before a Triton test calls the back-end (the package imports it
lazily), and this conftest is loaded during collection, before any test runs, so setting it here is early enough
even inside the full suite. On a CUDA machine the real compiler is used instead.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
