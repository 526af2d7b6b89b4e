"""The modality-agnostic MoE block of ERNIE 5.0: router, experts and their assembly (ERNIE 5.0 §2.1, DESIGN.md §3).

One router and one expert pool per layer, blind to modality: the router sees only hidden states. Balancing is
auxiliary-loss-free (a per-expert correction bias that affects which experts are chosen but not how their
outputs are weighted), the MoE is dropless (every token reaches all of its k experts, whatever the load), and
one shared SwiGLU expert is applied to every token.

Dimension legend used in names: B batch, L sequence, T tokens (B*L), D hidden, F expert hidden, E experts,
K experts per token.

Expert compute goes through one registry, `EXPERTS_BACKENDS`: every back-end takes
`(x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK)` (weights laid out (out, in) per expert, like `nn.Linear` and
transformers' MoE models) and returns `out_TD = sum_k w_TK * expert(x_TD)`. An index
`>= E` in `idx_TK` means "no expert in this slot" (its weight is 0); elastic training with a per-token top-k
uses it. This file holds only the readable reference back-end so that a saved model folder runs on its own
with `trust_remote_code=True`; the package registers its fast kernels from `modeling_ernie5/kernels/` on import.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import use_experts_implementation

logger = logging.getLogger(__name__)

ExpertsBackend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulations of the fast paths (sums over k and over experts in the experts back-ends, the fused loss's
    softmax and weight gradient) run in fp32 for half types, like transformers' reshape+sum."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def refuse_second_order(what: str, instead: str) -> None:
    """Called first in a hand-written backward whose gradients carry no graph: under `create_graph=True` (grad mode
    on inside backward) say so, instead of returning gradients whose second-order terms silently vanish (a
    gradient penalty added to a loss would then contribute nothing)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{what} has no second-order gradients (create_graph=True); {instead}")


def reference_experts_forward(x_TD, gate_up_EF2D, down_EDF, idx_TK, w_TK):
    """Plain per-expert loop; the numerical truth every other back-end is tested against."""
    num_experts = gate_up_EF2D.shape[0]
    out_TD = torch.zeros_like(x_TD)
    for e in torch.unique(idx_TK).tolist():  # sync point: the loop needs the set of used experts on the host
        if e >= num_experts:
            continue
        tok, slot = torch.nonzero(idx_TK == e, as_tuple=True)
        gate_TF, up_TF = F.linear(x_TD[tok], gate_up_EF2D[e]).chunk(2, dim=-1)
        y_TD = F.linear(F.silu(gate_TF) * up_TF, down_EDF[e])
        out_TD = out_TD.index_add(0, tok, y_TD * w_TK[tok, slot, None].to(y_TD.dtype))
    return out_TD


EXPERTS_BACKENDS: dict[str, ExpertsBackend] = {"reference": reference_experts_forward}
# Predicates deciding whether a back-end can serve a given input; back-ends without one always can.
_BACKEND_AVAILABLE: dict[str, Callable[[torch.Tensor], bool]] = {}
# Candidates for experts_backend="auto", tried in ascending priority.
_AUTO_PRIORITY: dict[str, int] = {}
_warned_fallback: set[str] = set()


def register_experts_backend(
    name: str, fn: ExpertsBackend, available: Callable[[torch.Tensor], bool] | None = None, auto_priority: int | None = None
) -> None:
    """Add an expert-compute back-end. `available(x)` says whether it can run on `x`'s device/dtype;
    `auto_priority` (lower first) makes it a candidate for `experts_backend="auto"`."""
    EXPERTS_BACKENDS[name] = fn
    if available is not None:
        _BACKEND_AVAILABLE[name] = available
    if auto_priority is not None:
        _AUTO_PRIORITY[name] = auto_priority


def resolve_experts_backend(name: str, x: torch.Tensor) -> ExpertsBackend:
    """An explicit request that cannot run raises; "auto" takes the first available back-end, else the reference."""
    if name == "auto":
        for candidate in sorted(_AUTO_PRIORITY, key=_AUTO_PRIORITY.get):
            if _BACKEND_AVAILABLE.get(candidate, lambda _x: True)(x):
                return EXPERTS_BACKENDS[candidate]
        if "auto" not in _warned_fallback:
            _warned_fallback.add("auto")
            logger.warning("no fast experts back-end is registered or available; using the reference loop")
        return reference_experts_forward
    if name not in EXPERTS_BACKENDS:
        raise ValueError(f"unknown experts_backend {name!r}; registered: {sorted(EXPERTS_BACKENDS)} (or 'auto')")
    if not _BACKEND_AVAILABLE.get(name, lambda _x: True)(x):
        raise ValueError(
            f"experts_backend {name!r} cannot run on a {x.dtype} tensor on {x.device}; use 'auto' to fall back"
        )
    return EXPERTS_BACKENDS[name]


class Ernie5MLP(nn.Module):
    """SwiGLU MLP, used for dense layers and for the shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@use_experts_implementation()
class Ernie5Experts(nn.Module):
    """Routed SwiGLU experts stored as 3D parameters so peft `target_parameters`, expert-parallel plans and
    kernels address them: `gate_up_proj` (E, 2F, D) holding [gate | up] rows, `down_proj` (E, D, F). Each expert
    is laid out (out, in) like an `nn.Linear` weight, as in transformers' own MoE models: their weights and
    tensor-parallel plans carry over, and a CPU without native bf16 matmul reads half-precision weights for small
    batches through PyTorch's fast dot-product path (this layout), not a slow emulated GEMM.

    Two switches reach the expert compute. transformers' `config._experts_implementation` (set by
    `from_pretrained(..., experts_implementation=...)` or `model.set_experts_implementation(...)`) picks a
    function from its `ExpertsInterface`: its own `"grouped_mm"` / `"batched_mm"` or the `"ernie5_*"` names the
    kernels package registers. `"eager"` (and `None`) runs `forward` below, which asks this file's registry for
    `config.experts_backend` (`"auto"`: our fastest).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        d, f = config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(config.num_experts, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(config.num_experts, d, f))
        self.act_fn = F.silu  # read by transformers' back-ends

    # Elastic top-k marks empty slots with transformers' expert-parallel sentinel (index >= E, weight 0) even on
    # one device, so its back-ends must always run their sentinel masking. The experts decorator assigns False
    # after __init__; the setter ignores that (expert-parallel sharding assigns True, which changes nothing).
    @property
    def _is_expert_parallel(self) -> bool:
        return True

    @_is_expert_parallel.setter
    def _is_expert_parallel(self, value: bool) -> None:
        pass

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        run = resolve_experts_backend(getattr(self.config, "experts_backend", "auto"), x_TD)
        return run(x_TD, self.gate_up_proj, self.down_proj, idx_TK, w_TK)


class Ernie5ExpertsSwitchMixin:
    """Mixin for `Ernie5PreTrainedModel` (list it before `PreTrainedModel`) wiring transformers' experts switch.

    transformers decides whether `set_experts_implementation` may act by searching the *model* file's source for
    its decorator, which lives here in `moe.py`; and it turns an unset choice into its own `"grouped_mm"`. We
    answer the first directly and map "unset" to `"eager"`, i.e. `Ernie5Experts.forward` and our registry
    (`config.experts_backend`, `"auto"` = fastest available), so the default stays our fastest back-end.
    """

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        return super().get_correct_experts_implementation("eager" if requested_experts is None else requested_experts)


class Ernie5TopKRouter(nn.Module):
    """fp32 softmax router with an auxiliary-loss-free correction bias.

    Selection: top-k of `probs + e_score_correction_bias` (only over allowed experts when an elastic expert mask
    is given, and then without the bias, DESIGN.md §4). Combine weights: the selected *unbiased* probabilities,
    renormalised to sum to 1. The bias is a buffer, moved outside autograd by `update_bias()`.
    """

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.use_correction_bias = config.moe_use_correction_bias
        self.bias_update_rate = config.router_bias_update_rate
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts, dtype=torch.float32))
        # Tokens routed to each expert by full-configuration training forwards since the last bias update.
        self.register_buffer("expert_load", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would cast the balancing state too; a 1e-4 bias step vanishes in bf16, so it stays fp32,
        # and with the values it had: cast to bf16 and back, 0.5001 would come back as 0.5.
        before = {name: getattr(self, name) for name in ("e_score_correction_bias", "expert_load")}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if new is not None and new.is_floating_point() and new.dtype != torch.float32:
                kept = old.to(new.device) if old is not None and old.dtype == torch.float32 and not old.is_meta else None
                setattr(self, name, kept if kept is not None and kept.shape == new.shape else new.float())
        return self

    def forward(
        self,
        x_TD: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        top_k: int | torch.Tensor | None = None,
        routing_indices: torch.Tensor | None = None,
        count_load: bool | torch.Tensor = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns raw fp32 router logits (T, E), expert indices (T, K) and combine weights (T, K).

        `top_k` may be an int or a (T,) tensor of per-token k (slots beyond a token's k get index E, weight 0).
        `routing_indices` (T, K) replays a recorded routing decision (RL routing replay) instead of choosing.
        `count_load` (training only) adds this call's assignments to the load that the next `update_bias` balances:
        True counts every token, a (T,) boolean tensor only the tokens it marks (padding left out: pads share one
        embedding, route alike and would push the same experts' bias down).
        """
        logits_TE = F.linear(x_TD.float(), self.weight.float())  # fp32 on purpose: routing is precision-sensitive
        probs_TE = logits_TE.softmax(dim=-1)
        if routing_indices is not None:
            idx_TK = routing_indices.to(x_TD.device, torch.long)
        else:
            if expert_mask is not None:
                scores_TE = probs_TE.masked_fill(~expert_mask.to(probs_TE.device), float("-inf"))
            elif self.use_correction_bias:
                scores_TE = probs_TE + self.e_score_correction_bias
            else:
                scores_TE = probs_TE
            k_max = self.top_k if top_k is None else int(top_k if isinstance(top_k, int) else top_k.max())
            if expert_mask is not None:
                k_max = min(k_max, int(expert_mask.sum()))
            idx_TK = scores_TE.topk(k_max, dim=-1).indices
            if isinstance(top_k, torch.Tensor):
                slot_K = torch.arange(k_max, device=idx_TK.device)
                idx_TK = idx_TK.masked_fill(slot_K >= top_k.to(idx_TK.device).view(-1, 1), self.num_experts)
        valid_TK = idx_TK < self.num_experts
        w_TK = probs_TE.gather(1, idx_TK.clamp(max=self.num_experts - 1)) * valid_TK
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True).clamp(min=1e-12)
        counting = count_load if isinstance(count_load, torch.Tensor) else None
        if (counting is not None or count_load) and self.training:
            with torch.no_grad():
                counted_TK = valid_TK if counting is None else valid_TK & counting.to(valid_TK.device).view(-1, 1)
                self.expert_load += torch.bincount(idx_TK[counted_TK], minlength=self.num_experts + 1)[
                    : self.num_experts
                ].float()
        return logits_TE, idx_TK, w_TK

    @torch.no_grad()
    def update_bias(self) -> None:
        """Move the correction bias toward balance: +rate for under-loaded experts, -rate for over-loaded ones.

        Loads are summed over data-parallel ranks first so that every replica keeps the same bias.
        """
        if not self.use_correction_bias:
            return
        load = self.expert_load
        # Every rank reduces, even one whose last forward counted nothing (an elastic sub-model): a rank that
        # skipped the collective would deadlock the others.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)  # sync point across ranks, once per training forward
        if load.sum() > 0:
            self.e_score_correction_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.expert_load.zero_()


class Ernie5SparseMoeBlock(nn.Module):
    """Router + routed experts + shared experts. Dropless: no capacity factor, no token is ever dropped."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.gate = Ernie5TopKRouter(config)
        self.experts = Ernie5Experts(config)
        self.shared_experts = (
            Ernie5MLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0
            else None
        )

    def forward(
        self,
        hidden_BLD: torch.Tensor,
        expert_mask: torch.Tensor | None = None,
        top_k: int | torch.Tensor | None = None,
        routing_indices: torch.Tensor | None = None,
        count_load: bool | torch.Tensor = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, l, d = hidden_BLD.shape
        x_TD = hidden_BLD.reshape(-1, d)
        if isinstance(top_k, torch.Tensor) and top_k.numel() == b and b * l != b:
            top_k = top_k.repeat_interleave(l)  # per-sample k -> per-token k
        logits_TE, idx_TK, w_TK = self.gate(x_TD, expert_mask, top_k, routing_indices, count_load)
        out_TD = self.experts(x_TD, idx_TK, w_TK.to(x_TD.dtype))
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD.view(b, l, d), logits_TE, idx_TK


__all__ = [
    "EXPERTS_BACKENDS",
    "Ernie5Experts",
    "Ernie5ExpertsSwitchMixin",
    "Ernie5MLP",
    "Ernie5SparseMoeBlock",
    "Ernie5TopKRouter",
    "accumulate_dtype",
    "reference_experts_forward",
    "register_experts_backend",
    "resolve_experts_backend",
]
