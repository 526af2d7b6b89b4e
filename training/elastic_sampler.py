"""Sampling of elastic sub-models for Once-For-All pretraining (ERNIE 5.0 §3.3, §6.4.2; DESIGN.md §4).

Every training sample draws, independently on three axes, whether it trains the full model or a sub-model:

- depth: full with probability `elastic_depth_full_prob` (0.75); otherwise each interior layer is kept with
  probability `elastic_layer_retain_prob` (0.75) and the first and last layers are always kept;
- width: all experts with probability `elastic_width_full_prob` (0.8); otherwise the router may choose only among
  a random subset of `U[elastic_min_experts, num_experts - 1]` experts (a -inf mask; no balancing bias);
- sparsity: the default top-k with probability `elastic_topk_full_prob` (0.8); otherwise k ~ `U[elastic_min_top_k,
  k - 1]`.

Granularity: per sample, executed per group. The paper samples "for each training instance" and optimises the
sub-models and the full model "in one backpropagation process". The model applies a layer set and an expert mask
to a whole forward (top-k may differ per sample), so one micro-batch is run as a few forwards, one per group of
samples that share a layer set and an expert mask, and their losses are summed (weighted by tokens) into one
loss and one backward; full and sub-model work therefore always share one optimiser step, whatever the gradient
accumulation. To keep that to at most five small forwards, the samples of one micro-batch that reduce depth share
one random layer set, and those that reduce width share one random expert subset (the layer set and subset are
redrawn every micro-batch, so over training every pattern is visited). Samples with a full layer set and all
experts but a smaller k form their own group, so the group of full-configuration samples runs with no spec at
all: only its routing counts toward the balancing bias.

The first sample of every micro-batch is always a full-configuration sample (the "anchor"). This is our choice:
it guarantees that every optimiser step contains full-model work and balancing statistics on every rank, and that
every parameter takes part in every backward, which DDP (without `find_unused_parameters`) requires. With batch B
the full-configuration share is therefore 1/B above the product of the three probabilities.

A reduced-depth draw that happens to keep every layer drops one interior layer chosen at random, so "reduced"
always means reduced (the paper's 25% are reduced-depth sub-networks).

Draws are a pure function of (seed, optimiser step, micro-step, rank), so a resumed run samples exactly what an
uninterrupted one would, and no sampler state needs checkpointing. The pretraining Trainer passes rank 0 on every
data-parallel rank: each rank then draws the same pattern for its own (different) samples, so all replicas run the
same sequence of group forwards. DDP breaks when ranks make different numbers of forward calls between two
backwards (a collective mismatch, observed with gloo), and FSDP would all-gather different layers on different
ranks; sharing the draw across ranks avoids both at the cost of some sampling diversity within one step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from modeling_ernie5.elastic import ElasticSpec

KINDS = ("full", "depth", "width", "sparsity")


@dataclass
class SampleDraw:
    """What one sample trains: reduced depth / width flags and its top-k (None = default)."""

    depth_reduced: bool = False
    width_reduced: bool = False
    top_k: int | None = None

    @property
    def is_full(self) -> bool:
        return not self.depth_reduced and not self.width_reduced and self.top_k is None

    @property
    def kinds(self) -> tuple[str, ...]:
        """Loss-logging categories of this sample: "full", or any of "depth", "width", "sparsity"."""
        if self.is_full:
            return ("full",)
        return tuple(
            k for k, on in (("depth", self.depth_reduced), ("width", self.width_reduced), ("sparsity", self.top_k is not None)) if on
        )


@dataclass
class ElasticGroup:
    """Samples of a micro-batch run in one forward.

    Args:
        rows (`list[int]`): positions of the samples in the micro-batch.
        spec (`ElasticSpec`, *optional*): the sub-model they run; `None` for the full-configuration group.
        draws (`list[SampleDraw]`): each row's draw (for per-configuration loss logging).
    """

    rows: list[int]
    spec: ElasticSpec | None
    draws: list[SampleDraw] = field(default_factory=list)

    @property
    def is_full(self) -> bool:
        return self.spec is None


def step_generator(seed: int, step: int, micro_step: int = 0, rank: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, micro-step, rank) alone (hash-mixed, so nearby keys decorrelate)."""
    digest = hashlib.sha256(f"ernie5-elastic:{seed}:{step}:{micro_step}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class ElasticSampler:
    """Draws elastic sub-model groups for micro-batches from the probabilities in an `Ernie5Config`.

    Args:
        config (`Ernie5Config`): reads `num_hidden_layers`, `num_experts`, `num_experts_per_tok` and the `elastic_*`
            fields.
        seed (`int`, *optional*, defaults to 0): base seed of the draws.
        enabled (`bool`, *optional*, defaults to `True`): `False` makes every sample full (the non-elastic baseline
            runs the same code path).
        anchor_full (`bool`, *optional*, defaults to `True`): force the first sample of a micro-batch to be full.

    Example:

    ```python
    >>> from modeling_ernie5 import Ernie5Config
    >>> from training.elastic_sampler import ElasticSampler
    >>> sampler = ElasticSampler(Ernie5Config.from_preset("tiny"), seed=0)
    >>> groups = sampler.plan(batch_size=8, step=0)
    >>> sorted(r for g in groups for r in g.rows)
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> groups[-1].is_full  # the full-configuration group runs last
    True
    ```
    """

    def __init__(self, config, seed: int = 0, enabled: bool = True, anchor_full: bool = True):
        self.num_layers = config.num_hidden_layers
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.depth_full_prob = config.elastic_depth_full_prob
        self.layer_retain_prob = config.elastic_layer_retain_prob
        self.width_full_prob = config.elastic_width_full_prob
        self.topk_full_prob = config.elastic_topk_full_prob
        self.min_experts = getattr(config, "elastic_min_experts", None) or max(self.top_k, self.num_experts // 2)
        self.min_top_k = getattr(config, "elastic_min_top_k", 1)
        self.seed = seed
        self.enabled = enabled
        self.anchor_full = anchor_full

    # Which axes can be reduced at all for this model shape.
    @property
    def can_reduce_depth(self) -> bool:
        return self.num_layers > 2

    @property
    def can_reduce_width(self) -> bool:
        return self.min_experts < self.num_experts

    @property
    def can_reduce_top_k(self) -> bool:
        return self.min_top_k < self.top_k

    def draw_layers(self, gen: torch.Generator) -> tuple[int, ...]:
        """A reduced layer set: first and last kept, interior layers kept with `layer_retain_prob`, at least one dropped."""
        interior = list(range(1, self.num_layers - 1))
        keep = (torch.rand(len(interior), generator=gen) < self.layer_retain_prob).tolist()
        if all(keep):
            keep[int(torch.randint(len(interior), (1,), generator=gen))] = False
        return (0, *[i for i, k in zip(interior, keep) if k], self.num_layers - 1)

    def draw_expert_mask(self, gen: torch.Generator) -> torch.Tensor:
        """A random expert subset of size U[min_experts, num_experts - 1] as a (E,) bool mask."""
        size = int(torch.randint(self.min_experts, self.num_experts, (1,), generator=gen))
        mask = torch.zeros(self.num_experts, dtype=torch.bool)
        mask[torch.randperm(self.num_experts, generator=gen)[:size]] = True
        return mask

    def draw_sample(self, gen: torch.Generator) -> SampleDraw:
        u = torch.rand(3, generator=gen).tolist()  # always three draws, so later samples do not shift with the axes
        k = int(torch.randint(self.min_top_k, max(self.top_k, self.min_top_k + 1), (1,), generator=gen))
        return SampleDraw(
            depth_reduced=self.can_reduce_depth and u[0] >= self.depth_full_prob,
            width_reduced=self.can_reduce_width and u[1] >= self.width_full_prob,
            top_k=k if (self.can_reduce_top_k and u[2] >= self.topk_full_prob) else None,
        )

    def plan(self, batch_size: int, step: int, micro_step: int = 0, rank: int = 0) -> list[ElasticGroup]:
        """Groups covering rows 0..batch_size-1; elastic groups first, the full-configuration group (if any) last.

        The full group runs last because the model applies the pending balancing update at the start of a training
        forward: with the full forward last, no other forward of the step finds pending statistics, so the
        cross-rank reduction of expert loads happens at the same point on every rank (after backward).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not self.enabled:
            return [ElasticGroup(rows=list(range(batch_size)), spec=None, draws=[SampleDraw()] * batch_size)]
        gen = step_generator(self.seed, step, micro_step, rank)
        layers = self.draw_layers(gen) if self.can_reduce_depth else None
        mask = self.draw_expert_mask(gen) if self.can_reduce_width else None
        draws = [self.draw_sample(gen) for _ in range(batch_size)]
        if self.anchor_full:
            draws[0] = SampleDraw()

        buckets: dict[tuple[bool, bool, bool], list[int]] = {}
        for row, d in enumerate(draws):
            buckets.setdefault((d.depth_reduced, d.width_reduced, d.is_full), []).append(row)
        groups = []
        for (depth_reduced, width_reduced, is_full), rows in sorted(buckets.items(), key=lambda kv: kv[0][2]):
            if is_full:
                spec = None
            else:
                ks = [draws[r].top_k if draws[r].top_k is not None else self.top_k for r in rows]
                spec = ElasticSpec(
                    layers=layers if depth_reduced else None,
                    expert_mask=mask if width_reduced else None,
                    top_k=torch.tensor(ks, dtype=torch.long) if any(draws[r].top_k is not None for r in rows) else None,
                )
            groups.append(ElasticGroup(rows=rows, spec=spec, draws=[draws[r] for r in rows]))
        return groups


__all__ = ["KINDS", "ElasticGroup", "ElasticSampler", "SampleDraw", "step_generator"]
