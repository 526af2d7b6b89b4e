"""Fast expert-compute back-ends for the ERNIE 5.0 MoE layer (DESIGN.md §3; research note moe_kernels.md).

Importing this package registers, in `modeling_ernie5.moe`'s registry (selected by `config.experts_backend`):

- `"cpu"`: sorted grouped matmuls in plain PyTorch with a hand-written backward (`cpu.py`); runs anywhere.
- `"triton"`: Triton grouped GEMMs with gather/scatter and SwiGLU fused (`triton/`); CUDA tensors, or any
  tensor when the Triton interpreter (`TRITON_INTERPRET=1`) is on. Triton is imported only when first used.

`"auto"` (the default) takes Triton where it can run, else `"cpu"`. The same back-ends are also registered with
transformers' experts switch as `"ernie5_cpu"`, `"ernie5_triton"` and `"ernie5_reference"`, so
`model.set_experts_implementation(...)` and `from_pretrained(..., experts_implementation=...)` reach them
alongside transformers' own `"grouped_mm"` / `"batched_mm"`.
"""

from __future__ import annotations

from transformers.integrations.moe import ExpertsInterface

from ..moe import reference_experts_forward, register_experts_backend
from .cpu import cpu_backend_available, sorted_experts_forward
from .triton import triton_available, triton_experts_forward

register_experts_backend("cpu", sorted_experts_forward, available=cpu_backend_available, auto_priority=10)
register_experts_backend("triton", triton_experts_forward, available=triton_available, auto_priority=0)


def _as_hf_experts_fn(backend):
    """Adapt a registry back-end to transformers' `fn(self, hidden_states, top_k_index, top_k_weights)`."""

    def experts_forward(self, hidden_states, top_k_index, top_k_weights):
        return backend(hidden_states, self.gate_up_proj, self.down_proj, top_k_index, top_k_weights)

    experts_forward.__name__ = f"ernie5_{backend.__name__}"
    return experts_forward


# These read `gate_up_proj` (E, 2F, D) as [gate | up] rows and `down_proj` (E, D, F), as `Ernie5Experts` stores them.
HF_EXPERTS_IMPLEMENTATIONS = {
    "ernie5_cpu": _as_hf_experts_fn(sorted_experts_forward),
    "ernie5_triton": _as_hf_experts_fn(triton_experts_forward),
    "ernie5_reference": _as_hf_experts_fn(reference_experts_forward),
}
for _name, _fn in HF_EXPERTS_IMPLEMENTATIONS.items():
    ExpertsInterface.register(_name, _fn)

__all__ = [
    "HF_EXPERTS_IMPLEMENTATIONS",
    "cpu_backend_available",
    "reference_experts_forward",
    "sorted_experts_forward",
    "triton_available",
    "triton_experts_forward",
]
