"""The Triton experts kernels against the reference loop: outputs and all gradients.

Without a GPU they run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set by this directory's
conftest before the kernels are defined), so sizes are tiny: the interpreter executes one program instance at a
time. Shapes cover odd widths, empty experts, k = E, sentinel slots and an empty batch. With CUDA the same tests
run the compiled kernels (fp32 dots in IEEE precision, so the tolerances hold)."""

import pytest
import torch
from experts_cases import assert_matches, make_case, run_with_grads

from modeling_ernie5.moe import reference_experts_forward

triton = pytest.importorskip("triton", reason="the triton extra is not installed")

from modeling_ernie5.kernels.triton import triton_available, triton_experts_forward  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}

SHAPES = [
    # tokens, hidden, inter, experts, top_k, routing
    (19, 40, 20, 4, 2, "sentinel"),  # odd widths, per-token k including k = 0
    (24, 32, 16, 6, 2, "skewed"),  # most rows on two experts, three experts empty
    (7, 16, 16, 3, 3, "uniform"),  # k = E
    (0, 16, 16, 3, 2, "uniform"),  # empty batch
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
def test_triton_matches_reference(shape, dtype):
    if DEVICE == "cuda" and dtype == torch.float64:
        pytest.skip("fp64 is an interpreter-only check; the CUDA back-end takes fp32/bf16/fp16")
    *sizes, routing = shape
    case = make_case(*sizes, dtype=dtype, routing=routing, seed=sum(sizes), device=DEVICE)
    want = run_with_grads(reference_experts_forward, *case)
    got = run_with_grads(triton_experts_forward, *case)
    assert_matches(got, want, **TOL[dtype])


def test_triton_bfloat16_close_to_float32_reference():
    x, gate_up, down, idx, w, upstream = make_case(20, 32, 16, 4, 2, dtype=torch.float32, seed=11, device=DEVICE)
    want = run_with_grads(reference_experts_forward, x, gate_up, down, idx, w, upstream)
    got = run_with_grads(
        triton_experts_forward, x.bfloat16(), gate_up.bfloat16(), down.bfloat16(), idx, w.bfloat16(), upstream.bfloat16()
    )
    for name, g, r in zip(("out", "d_x", "d_gate_up", "d_down", "d_w"), got, want):
        assert g.dtype == torch.bfloat16
        rel = ((g.float() - r).abs().max() / r.abs().max()).item()
        # bf16 inputs plus bf16 intermediates (h, activations); the interpreter also truncates on stores.
        assert rel < 4e-2, f"{name}: relative max error {rel:.3g}"


def test_triton_inference_needs_no_saved_activations():
    x, gate_up, down, idx, w, _ = make_case(12, 16, 16, 3, 2, dtype=torch.float32, seed=2, device=DEVICE)
    with torch.no_grad():
        out = triton_experts_forward(x, gate_up, down, idx, w)
    torch.testing.assert_close(out, reference_experts_forward(x, gate_up, down, idx, w), rtol=2e-4, atol=2e-5)


def test_triton_availability_predicate():
    assert not triton_available(torch.zeros(2, 2))  # CPU: never chosen by "auto", even with the interpreter on
    if torch.cuda.is_available():
        assert triton_available(torch.zeros(2, 2, device="cuda", dtype=torch.bfloat16))
        assert not triton_available(torch.zeros(2, 2, device="cuda", dtype=torch.float64))


def test_triton_fixed_tiles_without_autotuning(monkeypatch):
    """`ERNIE5_TRITON_AUTOTUNE=0` launches the plain kernels with one fixed tile (a different tile from the tuned
    path's, so masks at other block edges are exercised): same results as the reference, gradients included."""
    from modeling_ernie5.kernels.triton import ops

    monkeypatch.setattr(ops, "AUTOTUNE", False)
    for name in ("_grouped_gemm_swiglu_tuned", "_grouped_gemm_tuned", "_grouped_gemm_tn_tuned"):
        monkeypatch.setattr(ops, name, None)  # a launch through the autotuner would now fail loudly
    case = make_case(19, 40, 20, 4, 2, dtype=torch.float32, routing="skewed", seed=5, device=DEVICE)
    assert_matches(run_with_grads(triton_experts_forward, *case), run_with_grads(reference_experts_forward, *case),
                   **TOL[torch.float32])  # fmt: skip


def test_triton_all_sentinel_slots_give_zeros_without_a_special_case():
    """Every slot empty (elastic top-k with k = 0 for the whole batch): the normal path, no host sync, yields zero
    output and zero gradients, like the reference."""
    x, gate_up, down, idx, w, upstream = make_case(9, 16, 16, 3, 2, dtype=torch.float32, seed=4, device=DEVICE)
    idx = torch.full_like(idx, 3)
    got = run_with_grads(triton_experts_forward, x, gate_up, down, idx, w, upstream)
    want = run_with_grads(reference_experts_forward, x, gate_up, down, idx, w, upstream)
    assert_matches(got, want, **TOL[torch.float32])
    assert all(bool((g == 0).all()) for g in got)
