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


@pytest.mark.parametrize("tokens,experts,top_k,routing", [
    (37, 6, 3, "skewed"),  # empty experts, several M-blocks for the crowded ones
    (40, 5, 2, "sentinel"),  # sentinel slots sort last and get position -1
    (30, 40, 2, "uniform"),  # more experts than the 16-wide minimum expert block
    (3, 3, 1, "uniform"),
])  # fmt: skip
def test_sort_routing_matches_pytorch(tokens, experts, top_k, routing):
    """The two routing-prep kernels (rows: token, position, weight; layout: per-expert counts by binary search and
    the M-blocks, several programs of a few blocks each) give exactly what the plain PyTorch ops give, spare blocks
    included."""
    from modeling_ernie5.kernels.triton import ops

    _, _, _, idx, w, _ = make_case(tokens, 8, 8, experts, top_k, dtype=torch.float32, routing=routing,
                                   seed=tokens, device=DEVICE)  # fmt: skip
    # fp32 weights: in bf16 this would compare rounding modes (the interpreter truncates on stores).
    got = ops.sort_routing(idx, w, experts, torch.float32)
    block_m = got.layout[3]
    assert ops.routing_mismatches(got, ops.sort_routing_reference(idx, w, experts, torch.float32, block_m)) == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weight_grads_through_grouped_mm_match_reference(monkeypatch, dtype):
    """The backward's other weight-gradient GEMM (`F.grouped_mm` on the sorted rows, the gathered side copied first;
    "auto" takes it for bf16 on Hopper): same gradients as the reference, with sentinel slots (rows past the last
    offset, never written) and empty experts. On CPU, PyTorch's own grouped_mm runs it."""
    from modeling_ernie5.kernels.triton import functions

    monkeypatch.setattr(functions, "WEIGHT_GRAD_GEMM", "grouped_mm")
    calls = []
    original = functions._grouped_mm_weight_grad
    monkeypatch.setattr(functions, "_grouped_mm_weight_grad", lambda *a, **k: calls.append(1) or original(*a, **k))
    for routing in ("sentinel", "skewed"):
        case = make_case(19, 32, 16, 4, 2, dtype=torch.float32, routing=routing, seed=8, device=DEVICE)
        want = run_with_grads(reference_experts_forward, *case)
        if dtype == torch.float32:
            assert_matches(run_with_grads(triton_experts_forward, *case), want, **TOL[dtype])
            continue
        x, gate_up, down, idx, w, upstream = case
        got = run_with_grads(triton_experts_forward, x.bfloat16(), gate_up.bfloat16(), down.bfloat16(), idx,
                             w.bfloat16(), upstream.bfloat16())  # fmt: skip
        for name, g, r in zip(("out", "d_x", "d_gate_up", "d_down", "d_w"), got, want):
            rel = ((g.float() - r).abs().max() / r.abs().max()).item()
            assert rel < 4e-2, f"{routing} {name}: relative max error {rel:.3g}"
    assert len(calls) == 4  # two weight gradients per backward, two backwards


def test_weight_grad_gemm_choice(monkeypatch):
    """"auto" keeps the Triton kernel off Hopper and outside bf16 (always on CPU); a bad setting names the choices;
    asking for grouped_mm on inputs it cannot take (misaligned rows) is refused rather than silently changed."""
    from modeling_ernie5.kernels.triton import functions

    x, gate_up, down = torch.zeros(4, 16), torch.zeros(3, 32, 16), torch.zeros(3, 16, 16)
    assert not functions.weight_grads_by_grouped_mm(x.bfloat16(), gate_up.bfloat16(), down.bfloat16())
    monkeypatch.setattr(functions, "WEIGHT_GRAD_GEMM", "cutlass")
    with pytest.raises(ValueError, match="one of"):
        functions.weight_grads_by_grouped_mm(x, gate_up, down)
    monkeypatch.setattr(functions, "WEIGHT_GRAD_GEMM", "grouped_mm")
    assert functions.weight_grads_by_grouped_mm(x, gate_up, down)
    with pytest.raises(ValueError, match="aligned"):
        functions.weight_grads_by_grouped_mm(torch.zeros(4, 15), torch.zeros(3, 32, 15), torch.zeros(3, 15, 16))


def test_second_order_gradients_are_refused_not_silently_dropped():
    """The Triton backward returns kernel outputs without a graph; with `create_graph=True` it used to hand back a
    gradient that silently lacked its second-order terms. It must fail loudly instead."""
    x, gate_up, down, idx, w, upstream = make_case(13, 16, 16, 4, 2, dtype=torch.float32, routing="sentinel",
                                                   device=DEVICE)  # fmt: skip
    x = x.clone().requires_grad_()
    loss = (triton_experts_forward(x, gate_up.clone().requires_grad_(), down, idx, w) * upstream).sum()
    with pytest.raises(RuntimeError, match="no second-order gradients.*experts_backend='reference'"):
        torch.autograd.grad(loss, x, create_graph=True)
