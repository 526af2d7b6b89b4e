"""Shared inputs for the experts back-end tests: routing patterns, odd sizes, sentinel slots."""

from __future__ import annotations

import torch


def make_case(tokens, hidden, inter, experts, top_k, dtype=torch.float64, routing="uniform", seed=0, device="cpu"):
    """Random inputs for `backend(x, gate_up, down, idx, w)`.

    routing: "uniform" (distinct experts per token), "skewed" (most pairs on two experts, several experts empty),
    "sentinel" (per-token k from 0 to top_k; empty slots carry index E and weight 0), "none" (every slot empty).
    """
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=gen, dtype=torch.float64) / hidden**0.5
    down = torch.randn(experts, hidden, inter, generator=gen, dtype=torch.float64) / inter**0.5
    scores = torch.rand(tokens, experts, generator=gen, dtype=torch.float64)
    if routing == "skewed":
        scores[:, :2] += 10.0 * (torch.rand(tokens, 1, generator=gen, dtype=torch.float64) < 0.9)
        scores[:, experts // 2 :] -= 100.0  # the upper half of the experts never gets a token
    idx = scores.topk(top_k, dim=-1).indices
    w = torch.rand(tokens, top_k, generator=gen, dtype=torch.float64) + 0.1
    if routing == "sentinel":
        k_per_token = torch.randint(0, top_k + 1, (tokens,), generator=gen)
        empty = torch.arange(top_k)[None, :] >= k_per_token[:, None]
        idx = idx.masked_fill(empty, experts)
        w = w.masked_fill(empty, 0.0)
    elif routing == "none":
        idx = torch.full_like(idx, experts)
        w = torch.zeros_like(w)
    w = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
    upstream = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    tensors = [t.to(device=device, dtype=dtype) for t in (x, gate_up, down, w, upstream)]
    x, gate_up, down, w, upstream = tensors
    return x, gate_up, down, idx.to(device), w, upstream


def run_with_grads(backend, x, gate_up, down, idx, w, upstream):
    """Output and the gradients w.r.t. x, gate_up, down and w under a dense upstream gradient."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, gate_up, down, w)]
    out = backend(leaves[0], leaves[1], leaves[2], idx, leaves[3])
    if not out.requires_grad:
        # The reference loop returns a constant when no slot has an expert; its gradients are zero.
        return [out.detach(), *(torch.zeros_like(t) for t in leaves)]
    grads = torch.autograd.grad(out, leaves, upstream, allow_unused=False)
    return [out.detach(), *grads]


NAMES = ("out", "d_x", "d_gate_up", "d_down", "d_w")


def assert_matches(got, want, rtol, atol):
    for name, g, r in zip(NAMES, got, want):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        err = (g.double() - r.double()).abs().max().item() if g.numel() else 0.0
        torch.testing.assert_close(g.double(), r.double(), rtol=rtol, atol=atol, msg=f"{name}: max abs err {err:.3g}")
