"""The reference experts back-end: a re-export of the readable per-expert loop in `modeling_ernie5.moe`.

It stays defined in `moe.py` (so a saved model folder runs with `trust_remote_code=True` alone) and is the
numerical truth every other back-end in this package is tested against (STYLE.md §5).
"""

from ..moe import reference_experts_forward

__all__ = ["reference_experts_forward"]
