"""Every PyTorch experts back-end against the reference loop: outputs and all four gradients (x, gate_up, down,
combine weights) in float64 and float32, over uniform, skewed (empty experts) and sentinel (per-token k) routing,
k from 1 to E, odd widths, an empty batch and a call where no slot has an expert. Runs on CPU."""

import pytest
import torch
from experts_cases import assert_matches, make_case, run_with_grads

from modeling_ernie5.kernels.cpu import grouped_matmul, grouped_matmul_tn, sorted_experts_forward, use_grouped_mm
from modeling_ernie5.kernels.routing import group_by_expert
from modeling_ernie5.moe import EXPERTS_BACKENDS, reference_experts_forward, resolve_experts_backend


def _cpu(driver):
    return lambda *args: sorted_experts_forward(*args, driver=driver)


BACKENDS = {"cpu-auto": _cpu("auto"), "cpu-loop": _cpu("loop"), "cpu-grouped_mm": _cpu("grouped_mm")}
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-5)}

SHAPES = [
    # tokens, hidden, inter, experts, top_k, routing
    (33, 100, 60, 8, 2, "uniform"),
    (40, 64, 32, 8, 3, "skewed"),
    (29, 48, 24, 6, 1, "uniform"),
    (17, 48, 24, 6, 6, "uniform"),  # k = E
    (31, 50, 30, 5, 3, "sentinel"),  # odd, unaligned widths: the loop driver takes over from grouped_mm
    (9, 32, 16, 4, 2, "none"),
    (0, 32, 16, 4, 2, "uniform"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_backend_matches_reference(name, shape, dtype):
    *sizes, routing = shape
    if name == "cpu-grouped_mm" and (dtype == torch.float64 or sizes[1] % 4 or sizes[2] % 4):
        pytest.skip("torch's grouped_mm takes fp32/bf16 with 16-byte aligned rows only (auto falls back)")
    case = make_case(*sizes, dtype=dtype, routing=routing, seed=sum(sizes))
    want = run_with_grads(reference_experts_forward, *case)
    got = run_with_grads(BACKENDS[name], *case)
    assert_matches(got, want, **TOL[dtype])


def test_sentinel_slots_get_zero_weight_gradient_and_no_output():
    x, gate_up, down, idx, w, upstream = make_case(24, 32, 16, 4, 3, routing="sentinel", seed=3)
    _, _, _, _, d_w = run_with_grads(sorted_experts_forward, x, gate_up, down, idx, w, upstream)
    assert (idx == 4).any()
    assert torch.all(d_w[idx == 4] == 0)
    # A token whose slots are all empty gets exactly zero output.
    idx[0] = 4
    w[0] = 0
    out = sorted_experts_forward(x, gate_up, down, idx, w)
    assert torch.all(out[0] == 0)


def test_empty_experts_get_exactly_zero_weight_gradient():
    case = make_case(40, 64, 32, 8, 2, routing="skewed", seed=5)
    _, _, d_gate_up, d_down, _ = run_with_grads(sorted_experts_forward, *case)
    unused = torch.ones(8, dtype=torch.bool)
    unused[case[3].unique()] = False
    assert unused.sum() >= 4
    assert torch.all(d_gate_up[unused] == 0) and torch.all(d_down[unused] == 0)
    assert torch.all(d_gate_up[~unused].abs().sum((1, 2)) > 0)


def test_bfloat16_close_to_float32_reference():
    x, gate_up, down, idx, w, upstream = make_case(64, 64, 32, 8, 2, dtype=torch.float32, seed=7)
    want = run_with_grads(reference_experts_forward, x, gate_up, down, idx, w, upstream)
    low = [t.bfloat16() for t in (x, gate_up, down)]
    got = run_with_grads(sorted_experts_forward, *low, idx, w.bfloat16(), upstream.bfloat16())
    for name, g, r in zip(("out", "d_x", "d_gate_up", "d_down", "d_w"), got, want):
        assert g.dtype == torch.bfloat16
        rel = ((g.float() - r).abs().max() / r.abs().max()).item()
        assert rel < 3e-2, f"{name}: relative max error {rel:.3g}"


def test_broadcast_upstream_gradient_is_accepted():
    """`.sum().backward()` hands a 0-stride gradient, which torch's grouped_mm backward rejects on its own."""
    x, gate_up, down, idx, w, _ = make_case(16, 32, 16, 4, 2, dtype=torch.float32, seed=9)
    x.requires_grad_()
    sorted_experts_forward(x, gate_up, down, idx, w).sum().backward()
    reference = x.detach().clone().requires_grad_()
    reference_experts_forward(reference, gate_up, down, idx, w).sum().backward()
    torch.testing.assert_close(x.grad, reference.grad, rtol=2e-4, atol=2e-5)


def test_grouped_matmul_drivers_agree_with_a_per_expert_loop():
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 5, (23, 2), generator=gen)
    groups = group_by_expert(idx, 6)  # expert 5 never chosen
    a = torch.randn(groups.num_valid, 16, generator=gen)
    b = torch.randn(6, 16, 8, generator=gen)
    c = torch.randn(groups.num_valid, 8, generator=gen)
    bounds = list(zip((groups.offsets_E - groups.counts_E).tolist(), groups.offsets_E.tolist()))
    want = torch.cat([a[s:e] @ b[i] for i, (s, e) in enumerate(bounds)])
    want_tn = torch.stack([a[s:e].t() @ c[s:e] for s, e in bounds])
    for grouped in (True, False):
        torch.testing.assert_close(grouped_matmul(a, b, groups, grouped), want)
        torch.testing.assert_close(grouped_matmul_tn(a, c, groups, grouped), want_tn)
    assert torch.all(want_tn[5] == 0)


def test_matmul_driver_choice():
    x, gate_up, down = torch.zeros(8, 32), torch.zeros(8, 32, 32), torch.zeros(8, 16, 32)
    busy = group_by_expert(torch.arange(16).view(8, 2) % 8, 8)  # every expert has rows
    sparse = group_by_expert(torch.zeros(8, 1, dtype=torch.long), 8)  # one expert of eight (decode-like)
    assert use_grouped_mm("auto", busy, x, gate_up, down)
    assert not use_grouped_mm("auto", sparse, x, gate_up, down)  # grouped_mm would visit all eight on CPU
    assert use_grouped_mm("grouped_mm", sparse, x, gate_up, down)
    assert not use_grouped_mm("loop", busy, x, gate_up, down)
    assert not use_grouped_mm("auto", busy, x.double(), gate_up.double(), down.double())
    with pytest.raises(ValueError, match="16-byte"):
        use_grouped_mm("grouped_mm", busy, torch.zeros(8, 30), gate_up, down)


def test_routing_groups_put_sentinels_last_and_keep_token_order():
    idx = torch.tensor([[2, 0], [0, 3], [2, 2]])  # 3 = E: a sentinel; repeated expert within a token is allowed
    groups = group_by_expert(idx, 3)
    assert groups.num_valid == 5
    assert groups.counts_E.tolist() == [2, 0, 3]
    assert groups.valid_token.tolist() == [0, 1, 0, 2, 2]
    assert groups.order_S[-1].item() == 3


def test_registry_auto_picks_the_fast_cpu_backend_and_rejects_unknown_names():
    x = torch.randn(4, 8)
    assert resolve_experts_backend("auto", x) is sorted_experts_forward
    assert EXPERTS_BACKENDS["cpu"] is sorted_experts_forward
    with pytest.raises(ValueError, match="unknown experts_backend"):
        resolve_experts_backend("nope", x)
    with pytest.raises(ValueError, match="cannot run"):
        resolve_experts_backend("triton", x)  # CPU tensor: only the interpreter could run it, and auto never does
    with pytest.raises(ValueError, match="unknown matmul driver"):
        sorted_experts_forward(x, torch.zeros(2, 8, 4), torch.zeros(2, 2, 8), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), driver="x")
