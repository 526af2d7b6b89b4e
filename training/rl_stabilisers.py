"""The RL stabilisers of ERNIE 5.0 as small tensor-level units (ERNIE 5.0 §4.1-§4.3 and §5.4).

Each unit is independent of TRL and of the model, so its arithmetic can be pinned on hand-made tensors; the
trainer in `training/rl.py` wires them together.

- **MISC** (multi-granularity importance sampling clipping, §4.2 "MixedIcePop"): a sequence-level, length-normalised
  policy ratio `s_i = exp(mean_j log pi(y_ij)/pi_old(y_ij))` with the PPO clip, combined with a *per-token* two-sided
  IcePop mask on the train/rollout ratio `k_ij = pi_train(y_ij; theta_old) / pi_rollout(y_ij; theta_old)`:
  `M(k) = k if alpha <= k <= beta else 0`. Only mismatched tokens are dropped, never whole sequences.
- **WPSM** (well-learned positive sample mask, §4.2 Eq. 4): a per-prompt success-rate tracker; a correct response to
  a prompt whose success rate exceeds `tau`, and whose mean token entropy is below `eta`, has its weight scaled by
  `1 - alpha`.
- **AHRL** (adaptive hint-based RL, §4.3 Eq. 5): hard prompts get the first `p` fraction of a reference reasoning as
  a prompt prefix, `p = p_initial * exp(-gamma * t * pass@k)`, pass@k measured once for the starting model.
- **Routing replay** (R3, §5.4): assembling the experts recorded during token-by-token rollout into the (B, L, K)
  layout of the training forward.
- **U-RB** (unbiased replay buffer, §4.1): prompts are pre-assigned to iteration groups; rollouts of later groups may
  start early and are resumed across ticks, but a group is released to training only when all of its rollouts have
  finished, so the training data keeps the original order.

Values the report does not give (alpha, beta, tau, eta, p_initial, gamma, k) are parameters with the defaults set in
`training/rl.py`; the reconstructed formulas are in ../shared/research/ernie5.md §4.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# --- MISC ------------------------------------------------------------------------------------------------------------


def sequence_log_ratio(logps: torch.Tensor, old_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Length-normalised log policy ratio per sequence: `sum_j m_ij (logp_ij - old_ij) / max(sum_j m_ij, 1)`, (B, 1)."""
    mask = mask.to(logps.dtype)
    return ((logps - old_logps) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1.0)


def icepop_token_mask(
    train_logps: torch.Tensor,
    rollout_logps: torch.Tensor,
    mask: torch.Tensor,
    alpha: float,
    beta: float,
    weight_by_ratio: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IcePop's two-sided mask on the train/rollout probability ratio, per token.

    Args:
        train_logps (`torch.Tensor` of shape `(B, T)`): log-probs of the sampled tokens under the training engine at
            the rollout weights (theta_old).
        rollout_logps (`torch.Tensor` of shape `(B, T)`): log-probs the rollout engine sampled them with.
        mask (`torch.Tensor` of shape `(B, T)`): 1 for completion tokens that count.
        alpha, beta (`float`): the kept band `[alpha, beta]` of `k = pi_train / pi_rollout`.
        weight_by_ratio (`bool`, *optional*, defaults to `True`): IcePop's `M(k) = k` inside the band (truncated
            importance weight); `False` keeps a plain 0/1 mask.

    A NaN rollout log-prob (TRL 1.16 writes one for a token vLLM could not score) gets ratio 1, as in TRL's own
    importance-sampling correction: the token is kept, with weight 1, rather than dropped for a value nobody measured.

    Returns:
        `(weights, kept)`: float weights (B, T), zero outside the band and on padding, and the bool kept mask.
    """
    if not 0.0 <= alpha <= 1.0 <= beta:
        raise ValueError(f"IcePop band must satisfy 0 <= alpha <= 1 <= beta, got alpha={alpha}, beta={beta}")
    log_ratio = (train_logps - rollout_logps).float()
    ratio = torch.exp(torch.where(torch.isnan(log_ratio), torch.zeros_like(log_ratio), log_ratio))
    kept = (ratio >= alpha) & (ratio <= beta) & mask.bool()
    # `where`, not a product with `kept`: a dropped token's ratio may be inf (or NaN in padding), and inf * 0 is NaN.
    weights = torch.where(kept, ratio if weight_by_ratio else torch.ones_like(ratio), torch.zeros_like(ratio))
    return weights.detach(), kept


@dataclass
class MiscOutput:
    """Per-token loss of MISC and what it decided (all (B, T) unless noted)."""

    per_token_loss: torch.Tensor
    seq_ratio: torch.Tensor  # (B, 1) value of s_i
    token_kept: torch.Tensor  # bool, IcePop band
    seq_clipped: torch.Tensor  # (B, 1) bool, s_i outside the trust region in the direction that stops the gradient


def misc_per_token_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    rollout_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    alpha: float,
    beta: float,
    weight_by_ratio: bool = True,
) -> MiscOutput:
    """MISC ("MixedIcePop"): GSPO's sequence ratio and clip, IcePop's per-token train/rollout mask.

    The loss of token j in sequence i is `-M(k_ij) * min(s_ij A_i, clip(s_ij, 1-eps_low, 1+eps_high) A_i)` with
    `s_ij = sg(s_i) * pi(y_ij) / sg(pi(y_ij))` (GSPO-token): its value is the sequence ratio `s_i`, so the clip acts on
    whole sequences as in GSPO, but its gradient flows through token j alone, so a masked token contributes nothing.
    Aggregate the result over tokens with the caller's normaliser (1/|y_i| per sequence reproduces ERNIE 5.0's
    objective).

    Args:
        logps (`torch.Tensor` of shape `(B, T)`): current policy log-probs (with grad).
        old_logps (`torch.Tensor` of shape `(B, T)`): training-engine log-probs at the rollout weights.
        rollout_logps (`torch.Tensor` of shape `(B, T)`, *optional*): rollout-engine log-probs; `None` disables the
            IcePop mask (every valid token kept with weight 1).
        advantages (`torch.Tensor` of shape `(B,)` or `(B, 1)`): group-normalised advantages.
        mask (`torch.Tensor` of shape `(B, T)`): 1 for tokens that count.
    """
    mask_f = mask.to(logps.dtype)
    adv = advantages.reshape(-1, 1).to(logps.dtype)
    log_s = sequence_log_ratio(logps.detach(), old_logps, mask)
    seq_ratio = torch.exp(log_s)
    s_tok = torch.exp(log_s + logps - logps.detach())  # value s_i, gradient d logp_ij only
    s_clip = torch.clamp(s_tok, 1.0 - epsilon_low, 1.0 + epsilon_high)
    surrogate = torch.min(s_tok * adv, s_clip * adv)
    if rollout_logps is None:
        weights, kept = mask_f, mask.bool()
    else:
        weights, kept = icepop_token_mask(old_logps, rollout_logps, mask, alpha, beta, weight_by_ratio)
    seq_clipped = ((seq_ratio < 1.0 - epsilon_low) & (adv < 0)) | ((seq_ratio > 1.0 + epsilon_high) & (adv > 0))
    return MiscOutput(-surrogate * weights.to(logps.dtype), seq_ratio, kept, seq_clipped)


# --- WPSM ------------------------------------------------------------------------------------------------------------


class SuccessRateTracker:
    """Per-prompt success rate across RL iterations: an exponential moving average of each group's accuracy.

    Args:
        decay (`float`, *optional*, defaults to 0.5): weight of the previous estimate; 0 keeps only the latest group.
    """

    def __init__(self, decay: float = 0.5):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.rates: dict[Hashable, float] = {}
        self.visits: dict[Hashable, int] = {}

    def update(self, keys: Sequence[Hashable], successes: Sequence[bool] | torch.Tensor) -> dict[Hashable, float]:
        """Fold one iteration's outcomes in (responses of one prompt share a key); returns the updated rates."""
        successes = [bool(s) for s in (successes.tolist() if isinstance(successes, torch.Tensor) else successes)]
        if len(keys) != len(successes):
            raise ValueError(f"{len(keys)} prompt keys but {len(successes)} success flags")
        groups: dict[Hashable, list[bool]] = {}
        for key, ok in zip(keys, successes):
            groups.setdefault(key, []).append(ok)
        for key, oks in groups.items():
            acc = sum(oks) / len(oks)
            prev = self.rates.get(key)
            self.rates[key] = acc if prev is None else self.decay * prev + (1.0 - self.decay) * acc
            self.visits[key] = self.visits.get(key, 0) + 1
        return {key: self.rates[key] for key in groups}

    def rate(self, key: Hashable) -> float:
        return self.rates.get(key, 0.0)


def wpsm_weights(
    entropy: torch.Tensor,
    success_rate: torch.Tensor,
    correct: torch.Tensor,
    tau: float,
    eta: float,
    alpha: float,
    positive_only: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response weights `1 - M_i` of Eq. 4: `M_i = alpha` for well-learned responses, else 0.

    Args:
        entropy (`torch.Tensor` of shape `(B,)`): mean token entropy of each response under the policy.
        success_rate (`torch.Tensor` of shape `(B,)`): tracked success rate of each response's prompt.
        correct (`torch.Tensor` of shape `(B,)`): whether the response was judged correct.
        tau, eta (`float`): success-rate and entropy thresholds (strict: rate > tau and entropy < eta).
        alpha (`float`): how much of a well-learned response's weight is removed (1 drops it).
        positive_only (`bool`, *optional*, defaults to `True`): flag only correct responses (the "positive" of the
            name; the report does not restrict it explicitly).

    Returns:
        `(weights, flagged)`, both (B,).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"WPSM alpha must lie in [0, 1], got {alpha}")
    flagged = (success_rate > tau) & (entropy < eta)
    if positive_only:
        flagged = flagged & correct.bool()
    weights = 1.0 - alpha * flagged.to(entropy.dtype)
    return weights, flagged


# --- AHRL ------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples with `c` correct (Chen et al., 2021): `1 - C(n-c, k) / C(n, k)`."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def hint_fraction(step: int, pass_at_k_value: float, p_initial: float, gamma: float) -> float:
    """Eq. 5: `p_hint = p_initial * exp(-gamma * t * pass@k)`; easy prompts lose their hint faster."""
    if not 0.0 <= p_initial <= 1.0:
        raise ValueError(f"p_initial must lie in [0, 1], got {p_initial}")
    return p_initial * math.exp(-gamma * step * pass_at_k_value)


@dataclass
class HintScheduler:
    """Decides which prompts get a hint and how long it is.

    Args:
        p_initial (`float`): hint fraction at step 0.
        gamma (`float`): decay rate.
        max_pass (`float`, *optional*, defaults to 1.0): prompts whose starting pass@k is below this are "hard";
            the rest never get hints.
        min_fraction (`float`, *optional*, defaults to 0.0): fractions below this become 0 (no hint).
    """

    p_initial: float
    gamma: float
    max_pass: float = 1.0
    min_fraction: float = 0.0

    def fraction(self, step: int, pass_at_k_value: float | None) -> float:
        if pass_at_k_value is None or pass_at_k_value >= self.max_pass:
            return 0.0
        p = hint_fraction(step, pass_at_k_value, self.p_initial, self.gamma)
        return p if p >= self.min_fraction and p > 0 else 0.0

    @staticmethod
    def prefix(reference_tokens: Sequence[Any], fraction: float) -> list[Any]:
        """The first `ceil(fraction * n)` reference tokens (none for a zero fraction)."""
        if fraction <= 0 or not reference_tokens:
            return []
        return list(reference_tokens[: math.ceil(fraction * len(reference_tokens))])


# --- Routing replay --------------------------------------------------------------------------------------------------


def assemble_rollout_routing(
    prefill: Sequence[torch.Tensor],
    steps: Sequence[Sequence[torch.Tensor]],
    rollout_prompt_mask: torch.Tensor,
    train_prompt_mask: torch.Tensor,
    completion_length: int,
    num_experts: int,
) -> torch.Tensor:
    """Lay the experts recorded during generation out as the training forward sees the sequence.

    Generation runs one prefill call over the (left-padded) prompt, then one call per new token: call m >= 1 processes
    completion token m-1. The training forward runs over `[prompt (left-padded, possibly differently) | completion]`.
    Positions the rollout never processed (padding, the last sampled token) get the empty index `num_experts`; no
    scored log-prob depends on them (causal attention, masked padding).

    Args:
        prefill (sequence of `torch.Tensor`): per MoE layer, (B, P_rollout, K) indices of the prefill call.
        steps (sequence of sequences of `torch.Tensor`): per decode call, per MoE layer, (B, K) or (B, L, K) indices
            (the last of the L positions is the newly processed token).
        rollout_prompt_mask (`torch.Tensor` of shape `(B, P_rollout)`): attention mask used in generation.
        train_prompt_mask (`torch.Tensor` of shape `(B, P_train)`): prompt mask of the training layout.
        completion_length (`int`): completion positions T of the training layout.
        num_experts (`int`): E, the "empty slot" index.

    Returns:
        `torch.LongTensor` of shape `(B, n_layers, P_train + T, K)`.
    """
    n_layers = len(prefill)
    if n_layers == 0:
        raise ValueError("no MoE layer recorded any routing; routing replay needs an MoE model")
    batch, _, top_k = prefill[0].shape
    p_train = train_prompt_mask.shape[1]
    out = torch.full((batch, n_layers, p_train + completion_length, top_k), num_experts, dtype=torch.long)
    src_real = rollout_prompt_mask.bool().cpu()
    dst_real = train_prompt_mask.bool().cpu()
    if not torch.equal(src_real.sum(1), dst_real.sum(1)):
        raise ValueError(
            f"prompt lengths differ between rollout {src_real.sum(1).tolist()} and training {dst_real.sum(1).tolist()}"
        )
    for layer, idx_BPK in enumerate(prefill):
        idx_BPK = idx_BPK.cpu()
        for b in range(batch):
            out[b, layer, :p_train][dst_real[b]] = idx_BPK[b][src_real[b]]
    n_steps = min(len(steps), completion_length)
    for m in range(n_steps):
        for layer in range(n_layers):
            step = steps[m][layer]
            # (B, K), or (B, L, K) from a forward over L positions (no KV cache): the new token is the last one.
            out[:, layer, p_train + m] = (step[:, -1] if step.dim() == 3 else step).cpu()
    return out


def routing_for_forward(routing_BNLK: torch.Tensor) -> list[torch.Tensor]:
    """(B, n_layers, L, K) -> the model's replay argument: one (B * L, K) tensor per MoE layer."""
    batch, n_layers, length, top_k = routing_BNLK.shape
    return [routing_BNLK[:, layer].reshape(batch * length, top_k) for layer in range(n_layers)]


def routing_disagreement(a_BNLK: torch.Tensor, b_BNLK: torch.Tensor, valid_BL: torch.Tensor, num_experts: int) -> float:
    """Fraction of (token, layer) pairs whose chosen expert *sets* differ, over valid tokens that both routed."""
    a_sorted = a_BNLK.sort(-1).values
    b_sorted = b_BNLK.sort(-1).values
    routed = (a_BNLK < num_experts).all(-1) & (b_BNLK < num_experts).all(-1)  # (B, N, L)
    valid = valid_BL.bool().unsqueeze(1) & routed
    if valid.sum() == 0:
        return 0.0
    differ = (a_sorted != b_sorted).any(-1)
    return float((differ & valid).sum() / valid.sum())


# --- U-RB ------------------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One request in the unbiased replay buffer; `state` is whatever the generator needs to resume it."""

    request_id: Hashable
    group: int
    state: Any = None
    finished: bool = False
    ticks: int = 0  # generation ticks this rollout took part in
    started_at: int | None = None  # tick at which it entered the inference pool


@dataclass
class UnbiasedReplayBuffer:
    """U-RB's ordering constraint over an inference pool of capacity `batch_size * buffer_size`.

    Requests are pre-assigned to iteration groups (`groups[t]` is D_t). Each `tick` the pool is filled in group order
    (so later groups start early when there is room), then every unfinished rollout in the pool is advanced once by the
    caller's `advance` function (batched); rollouts keep their partial `state` between ticks, so a future group's
    rollout that is not finished when its predecessor is released simply resumes. A group is handed to training only
    when all of its rollouts have finished, and groups are handed out strictly in order.

    Args:
        groups (`Sequence[Sequence[Hashable]]`): request ids per iteration group, in training order.
        batch_size (`int`): Omega_BS, the training batch (and the largest group).
        buffer_size (`int`): N; the inference pool holds Omega_BS * N rollouts.
        free_finished_slots (`bool`, *optional*, defaults to `False`): `False` keeps a finished rollout in its pool
            slot until its group is released. `True` counts only generating rollouts against the capacity: a finished
            rollout stays listed in `pool()` until its group is released but holds no slot, which goes to the next
            request in group order; this keeps the engine busy through a group's long tail (the report's "no idle
            on long tails"). Requests of groups beyond `next_group + buffer_size` wait, which bounds how far
            generation runs ahead of training.
    """

    groups: Sequence[Sequence[Hashable]]
    batch_size: int
    buffer_size: int
    free_finished_slots: bool = False
    tick_count: int = 0
    next_group: int = 0
    _queue: list[Rollout] = field(default_factory=list)
    _pool: list[Rollout] = field(default_factory=list)

    def __post_init__(self):
        if self.batch_size < 1 or self.buffer_size < 1:
            raise ValueError(f"batch_size and buffer_size must be >= 1, got {self.batch_size}, {self.buffer_size}")
        for t, group in enumerate(self.groups):
            if len(group) > self.batch_size:
                raise ValueError(f"group {t} has {len(group)} requests, more than batch_size={self.batch_size}")
        self._queue = [Rollout(rid, t) for t, group in enumerate(self.groups) for rid in group]

    @property
    def capacity(self) -> int:
        return self.batch_size * self.buffer_size

    @property
    def done(self) -> bool:
        return self.next_group >= len(self.groups)

    def pool(self) -> list[Rollout]:
        return list(self._pool)

    def generating(self) -> int:
        """Rollouts in the pool that still generate."""
        return sum(not r.finished for r in self._pool)

    def _has_room(self) -> bool:
        if not self.free_finished_slots:
            return len(self._pool) < self.capacity
        ahead = self._queue[0].group - self.next_group
        return self.generating() < self.capacity and ahead <= self.buffer_size

    def _admit(self) -> None:
        while self._queue and self._has_room():
            rollout = self._queue.pop(0)
            rollout.started_at = self.tick_count
            self._pool.append(rollout)

    def group_finished(self, t: int) -> bool:
        members = [r for r in self._pool if r.group == t]
        return len(members) == len(self.groups[t]) and all(r.finished for r in members)

    def tick(self, advance: Callable[[list[Rollout]], list[tuple[Any, bool]]]) -> None:
        """Admit what fits, then advance every unfinished pooled rollout once via `advance(rollouts) -> [(state,
        finished)]`."""
        self._admit()
        active = [r for r in self._pool if not r.finished]
        if not active:
            return
        results = advance(active)
        if len(results) != len(active):
            raise ValueError(f"advance returned {len(results)} results for {len(active)} rollouts")
        for rollout, (state, finished) in zip(active, results):
            rollout.state, rollout.finished = state, bool(finished)
            rollout.ticks += 1
        self.tick_count += 1

    def release(self) -> list[Rollout] | None:
        """The next group, in its original request order, once all of its rollouts have finished; else `None`."""
        if self.done:
            return None
        self._admit()
        t = self.next_group
        if not self.group_finished(t):
            return None
        order = {rid: i for i, rid in enumerate(self.groups[t])}
        released = sorted((r for r in self._pool if r.group == t), key=lambda r: order[r.request_id])
        self._pool = [r for r in self._pool if r.group != t]
        self.next_group += 1
        return released

    def run(self, advance: Callable[[list[Rollout]], list[tuple[Any, bool]]], max_ticks: int = 1_000_000):
        """Yield the groups in order, ticking the generator as needed."""
        while not self.done:
            released = self.release()
            if released is not None:
                yield released
                continue
            if self.tick_count >= max_ticks:
                raise RuntimeError(f"U-RB: group {self.next_group} not finished after {max_ticks} ticks")
            self.tick(advance)


__all__ = [
    "HintScheduler",
    "MiscOutput",
    "Rollout",
    "SuccessRateTracker",
    "UnbiasedReplayBuffer",
    "assemble_rollout_routing",
    "hint_fraction",
    "icepop_token_mask",
    "misc_per_token_loss",
    "pass_at_k",
    "routing_disagreement",
    "routing_for_forward",
    "sequence_log_ratio",
    "wpsm_weights",
]
