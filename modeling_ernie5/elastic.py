"""Elastic sub-model specifications (ERNIE 5.0 §3.3, DESIGN.md §4).

An `ElasticSpec` names one member of the family that elastic training optimises: which layers run (skipped
interior layers act as identity), which experts the router may choose (a -inf mask on the router scores; the
balancing bias is not applied then), and how many experts each token uses. The model takes a spec as a plain
forward argument; how specs are sampled belongs to training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ElasticSpec:
    """One sub-model configuration.

    Args:
        layers (`tuple[int, ...]`, *optional*):
            Indices of the decoder layers to run, in order. `None` runs all of them.
        expert_mask (`torch.BoolTensor` of shape `(num_experts,)`, *optional*):
            Experts the router may select. `None` allows all.
        top_k (`int` or `torch.LongTensor` of shape `(batch,)`, *optional*):
            Experts per token (one value, or one per sample). `None` uses `config.num_experts_per_tok`.
    """

    layers: tuple[int, ...] | None = None
    expert_mask: torch.Tensor | None = None
    top_k: int | torch.Tensor | None = None

    @property
    def is_full(self) -> bool:
        """True when the spec is the full model (its routing statistics may move the balancing bias)."""
        return self.layers is None and self.expert_mask is None and self.top_k is None

    def runs_layer(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def validate(self, config) -> None:
        n = config.num_hidden_layers
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n]
            if bad:
                raise ValueError(f"ElasticSpec.layers {bad} outside [0, {n})")
        if self.expert_mask is not None:
            if self.expert_mask.shape != (config.num_experts,) or self.expert_mask.dtype != torch.bool:
                raise ValueError(
                    f"ElasticSpec.expert_mask must be a bool tensor of shape ({config.num_experts},), "
                    f"got {tuple(self.expert_mask.shape)} {self.expert_mask.dtype}"
                )
            if not self.expert_mask.any():
                raise ValueError("ElasticSpec.expert_mask allows no expert")
        if isinstance(self.top_k, int) and not 1 <= self.top_k <= config.num_experts:
            raise ValueError(f"ElasticSpec.top_k {self.top_k} outside [1, {config.num_experts}]")


__all__ = ["ElasticSpec"]


def parameter_counts(config, spec: ElasticSpec | None = None, include_mtp: bool = False) -> dict[str, int]:
    """Total and per-token active parameters of the backbone implied by `config` (and an optional sub-model spec).

    Embedding and LM-head parameters are reported apart (`embedding`) and excluded from `total` / `active`, the
    convention behind the paper's "454M active / 3.2B total" for its ablation model. MTP modules are excluded
    unless `include_mtp` (they are dropped at inference).
    """
    spec = spec or ElasticSpec()
    d, hd = config.hidden_size, config.head_dim
    attn = d * hd * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    norms = 2 * d
    expert = 3 * d * config.moe_intermediate_size
    shared = expert * config.num_shared_experts
    dense = 3 * d * config.intermediate_size
    n_experts = int(spec.expert_mask.sum()) if spec.expert_mask is not None else config.num_experts
    top_k = spec.top_k if spec.top_k is not None else config.num_experts_per_tok
    top_k = min(int(top_k if isinstance(top_k, int) else max(top_k.tolist())), n_experts)
    layers = [i for i in range(config.num_hidden_layers) if spec.runs_layer(i)]
    if include_mtp:
        layers += [config.num_hidden_layers + j for j in range(config.num_nextn_predict_layers)]
    total = active = 0
    for i in layers:
        is_moe = i >= config.num_hidden_layers or config.is_moe_layer(i)
        base = attn + norms + (shared + config.num_experts * d if is_moe else dense)
        total += base + (n_experts * expert if is_moe else 0)
        active += base + (top_k * expert if is_moe else 0)
    embedding = config.vocab_size * d * (1 if config.tie_word_embeddings else 2)
    return {"total": total + d, "active": active + d, "embedding": embedding}
