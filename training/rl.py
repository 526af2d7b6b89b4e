"""RL post-training with TRL's GRPO/GSPO and ERNIE 5.0's stabilisers (ERNIE 5.0 §4, §5.4; DESIGN.md §1).

`RLConfig` extends TRL's `GRPOConfig` with one switch (and its parameters) per stabiliser; `RLTrainer` extends
`GRPOTrainer` and works with ERNIE 5.0 models and with any causal LM (the MoE-only parts, routing replay and
per-expert load, switch themselves off, or refuse, for dense models). The arithmetic lives in
`training/rl_stabilisers.py`; this file wires it into TRL's rollout and loss:

- **Rollout engine.** Without vLLM, completions come from `generate` on the policy itself or, when `rollout_dtype` /
  `rollout_experts_backend` differ from training, on a separate copy of the policy held in that precision / expert
  back-end and re-synced after every optimiser step (what a bf16/FP8 inference engine is to an fp32 trainer). While
  generating, forward hooks on the MoE blocks record the experts each call chose, and the sampled tokens' log-probs
  are kept, so the train/rollout mismatch is measured on every batch.
- **Routing replay (R3).** Choice made here: routing is captured *per generation step* (prefill, then one call per
  sampled token), which is the routing the rollout really used, instead of re-running the rollout policy over the
  finished sequence. It is laid out as (B, n_moe_layers, L, K) and handed to the backbone in every training-side
  forward through a forward pre-hook on `model.base_model`, because TRL's fused LM head calls the backbone directly.
- **MISC** replaces TRL's loss: GSPO sequence ratio + clip, IcePop token mask on pi_train(theta_old)/pi_rollout.
- **WPSM** scales the advantages of well-learned correct responses (equivalent to Eq. 4's `(1 - M_i)` factor because
  the clipped surrogate is positively homogeneous in the advantage).
- **AHRL** adds reference-reasoning prefixes to hard prompts before generation (so they are prompt tokens, never
  trained on); pass@k of the starting model comes from a dataset column or is measured when training starts, from
  `ahrl_pass_samples` (n >= k, default 4k) samples per prompt with the unbiased estimator. WPSM keys prompts by
  their unhinted form, so a shrinking hint does not make a new prompt.
- **U-RB** (`use_urb`): `rl_stabilisers.UnbiasedReplayBuffer` schedules the training rollouts. Every TRL generation
  batch is one iteration group, pre-assigned in dataset order (`shuffle_dataset=False`); the pool holds
  `urb_buffer_size` groups, every tick advances all unfinished pooled rollouts by at most `urb_chunk_tokens` tokens
  (HF `generate` resumed from prompt + partial completion), and TRL receives a group only when all of its rollouts have
  finished. Tokens of a rollout resumed after an optimiser step were sampled by an older policy; their sampling
  log-probs are kept per token, so the mismatch metrics and MISC's IcePop mask see the real behaviour policy.
  `hf_chunked_advance` is the same resume step as a free function for driving the buffer outside the trainer.

Old log-probs (pi_train at the rollout weights) are recomputed after every rollout with a no-grad, eval-mode forward
(with the replayed routing when replay is on), not left to TRL's "ratio is 1 on the first pass" shortcut: the first
update then sees the real rollout-to-training gap, e.g. the balancing-bias step an ERNIE 5.0 training forward applies.
TRL's own no-grad forwards run in eval mode as well, so only the forward that makes the gradient counts expert load.
Every forward added here passes the batch's multimodal inputs (`MULTIMODAL_KEYS`) exactly as TRL's loss forward does.

Logged besides TRL's own metrics: `mismatch/*` (per rollout: |log p_train - log p_rollout| with and without replay and
the share of (token, layer) pairs routed differently; per update: the same gap and routing disagreement of the forward
that makes the gradient, which replay pins to 0), `misc/*`, `wpsm/*`, `ahrl/*`, `urb/*` (pool occupancy, rollouts
started early / resumed after an optimiser step, share of stale tokens), `moe/*` (per-expert load balance);
`RLCurvesCallback` writes `rl_metrics.json` and `rl_curves.png` (reward, entropy, mismatch, clipped/masked fractions
over steps) into `output_dir`.

Usage:

```
python training/rl.py --config rl.yaml
accelerate launch training/rl.py --config rl.yaml            # several processes / GPUs
python training/rl.py --model_name_or_path ./sft_model --dataset_name toy_world --reward_funcs toy_world \\
    --output_dir runs/rl --use_cpu --bf16 false --gradient_checkpointing false --max_steps 20 --misc --routing_replay
```
A YAML or JSON config holds the same keys as the flags (`--config` accepts either).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python training/rl.py` / accelerate launch: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from training.rl_stabilisers import (
    HintScheduler,
    Rollout,
    SuccessRateTracker,
    UnbiasedReplayBuffer,
    assemble_rollout_routing,
    misc_per_token_loss,
    pass_at_k,
    routing_disagreement,
    routing_for_forward,
    wpsm_weights,
)
from training.trainer import end_distributed_training, precision_defaults_for_this_machine

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# TRL's token-level clip (0.2); `RLConfig` warns when MISC would apply it to sequence ratios.
_GRPO_DEFAULT_EPSILON = GRPOConfig.__dataclass_fields__["epsilon"].default

# The multimodal inputs TRL 1.16's `_compute_loss` hands to `_get_per_token_logps_and_entropies`: every forward that
# scores a completion here passes the same ones, or an image prompt would be scored as text.
MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
)  # fmt: skip


def multimodal_inputs(batch: dict) -> dict[str, Any]:
    """The multimodal entries of a TRL batch (those present and not None), as keyword arguments of
    `_get_per_token_logps_and_entropies`."""
    return {key: batch[key] for key in MULTIMODAL_KEYS if batch.get(key) is not None}


@dataclass
class RLConfig(GRPOConfig):
    r"""
    `GRPOConfig` plus ERNIE 5.0's RL stabilisers. Defaults that differ from TRL: `router_aux_loss_coef=0.0` (ERNIE 5.0
    balances experts with its correction bias, and TRL would add Mixtral's loss instead of the model's own).

    > Rollout engine

    rollout_dtype (`str`, *optional*):
        Precision of the generating copy (`"bfloat16"`, `"float16"`, `"float32"`); `None` generates with the policy.
    rollout_experts_backend (`str`, *optional*):
        Expert back-end of the generating copy (ERNIE 5.0 models only), e.g. `"reference"` vs the training `"cpu"`.
    measure_mismatch (`bool`, *optional*, defaults to `True`):
        Log train/rollout log-prob gaps with and without routing replay (one or two extra no-grad forwards per batch).

    > Routing replay

    routing_replay (`bool`, *optional*, defaults to `False`):
        Reuse the experts chosen during rollout in every training forward (MoE models only).

    > MISC

    misc (`bool`, *optional*, defaults to `False`):
        Sequence-level clipped ratio (GSPO) with a per-token IcePop mask on pi_train(theta_old)/pi_rollout.
    misc_alpha, misc_beta (`float`, *optional*, defaults to 0.5 and 2.0):
        The kept band of the train/rollout ratio (not given in the report).
    misc_weight_by_ratio (`bool`, *optional*, defaults to `True`):
        IcePop's `M(k) = k` inside the band; `False` uses a 0/1 mask.

    > WPSM

    wpsm (`bool`, *optional*, defaults to `False`):
        Down-weight well-learned correct responses.
    wpsm_tau, wpsm_eta, wpsm_alpha (`float`, *optional*, defaults to 0.8, 0.3, 1.0):
        Success-rate threshold, mean-entropy threshold (nats) and the removed weight share.
    wpsm_decay (`float`, *optional*, defaults to 0.5):
        EMA decay of the per-prompt success-rate tracker.
    success_threshold (`float`, *optional*, defaults to 1.0):
        A response counts as correct when its summed (weighted) reward reaches this.

    > AHRL

    ahrl (`bool`, *optional*, defaults to `False`):
        Prefix hard prompts with part of a reference reasoning.
    ahrl_p_initial, ahrl_gamma (`float`, *optional*, defaults to 0.5 and 0.05):
        Eq. 5's initial fraction and decay rate.
    ahrl_k (`int`, *optional*, defaults to 4):
        k of the starting model's pass@k.
    ahrl_pass_samples (`int`, *optional*):
        n, the samples per prompt from which pass@k is estimated (unbiased estimator); defaults to `4 * ahrl_k`. With
        n = k the estimate is 0 or 1, and a prompt solved once would never count as hard while one never solved keeps
        its full hint (Eq. 5 decays only for 0 < pass@k).
    ahrl_max_pass (`float`, *optional*, defaults to 1.0):
        Prompts with a starting pass@k below this are hard.
    ahrl_reference_column, ahrl_pass_column (`str`, *optional*):
        Dataset columns with the reference reasoning and (optionally) the precomputed pass@k.

    > U-RB (unbiased replay buffer)

    use_urb (`bool`, *optional*, defaults to `False`):
        Generate through `UnbiasedReplayBuffer`: prompts are pre-assigned to iteration groups in dataset order (one
        group per TRL generation batch), rollouts of later groups start early in spare pool capacity and resume in
        chunks, and a group reaches training only when all of its rollouts have finished. Needs
        `shuffle_dataset=False` (shuffle the dataset beforehand if wanted); not combinable with routing replay,
        AHRL, vLLM, continuous batching, tools or several processes.
    urb_buffer_size (`int`, *optional*, defaults to 2):
        N: at most N generation batches' worth of rollouts generate at once; groups up to N ahead of the one due for
        training may be in flight.
    urb_chunk_tokens (`int`, *optional*, defaults to 16):
        New tokens a rollout advances per scheduler tick; `generate` resumes from prompt + partial completion.
    urb_free_finished_slots (`bool`, *optional*, defaults to `True`):
        A finished rollout frees its pool slot at once (it waits for its group in the buffer), so later groups fill
        the pool during a group's long tail; `False` holds the slot until the group is released.

    > Logging

    plot (`bool`, *optional*, defaults to `True`):
        Write `rl_metrics.json` and `rl_curves.png` into `output_dir` at the end of training.
    """

    router_aux_loss_coef: float | None = field(
        default=0.0, metadata={"help": "Mixtral-style aux loss weight in TRL's loss; 0 for ERNIE 5.0 (bias balancing)."}
    )
    rollout_dtype: str | None = field(
        default=None,
        metadata={"help": "Precision of the generating copy: bfloat16, float16, float32 or None (the policy)."},
    )
    rollout_experts_backend: str | None = field(
        default=None, metadata={"help": "Expert back-end of the generating copy (ERNIE 5.0 models)."}
    )
    measure_mismatch: bool = field(default=True, metadata={"help": "Log train/rollout log-prob mismatch statistics."})
    routing_replay: bool = field(default=False, metadata={"help": "Replay rollout expert routing in training."})
    misc: bool = field(default=False, metadata={"help": "MISC: GSPO sequence ratio + per-token IcePop mask."})
    misc_alpha: float = field(default=0.5, metadata={"help": "Lower bound of the kept train/rollout ratio band."})
    misc_beta: float = field(default=2.0, metadata={"help": "Upper bound of the kept train/rollout ratio band."})
    misc_weight_by_ratio: bool = field(default=True, metadata={"help": "IcePop M(k)=k inside the band (else 1)."})
    wpsm: bool = field(default=False, metadata={"help": "WPSM: down-weight well-learned correct responses."})
    wpsm_tau: float = field(default=0.8, metadata={"help": "Per-prompt success-rate threshold."})
    wpsm_eta: float = field(default=0.3, metadata={"help": "Mean token entropy threshold (nats)."})
    wpsm_alpha: float = field(default=1.0, metadata={"help": "Weight share removed from flagged responses."})
    wpsm_decay: float = field(default=0.5, metadata={"help": "EMA decay of the success-rate tracker."})
    wpsm_positive_only: bool = field(default=True, metadata={"help": "Flag only correct responses."})
    success_threshold: float = field(default=1.0, metadata={"help": "Summed reward at which a response is correct."})
    ahrl: bool = field(default=False, metadata={"help": "AHRL: reference-reasoning hints for hard prompts."})
    ahrl_p_initial: float = field(default=0.5, metadata={"help": "Initial hint fraction p_initial."})
    ahrl_gamma: float = field(default=0.05, metadata={"help": "Hint decay rate gamma."})
    ahrl_k: int = field(default=4, metadata={"help": "k of the starting model's pass@k."})
    ahrl_pass_samples: int | None = field(
        default=None, metadata={"help": "Samples per prompt for estimating pass@k (n >= k); defaults to 4 * ahrl_k."}
    )
    ahrl_max_pass: float = field(default=1.0, metadata={"help": "Prompts with pass@k below this get hints."})
    ahrl_reference_column: str = field(default="reference_reasoning", metadata={"help": "Reference reasoning column."})
    ahrl_pass_column: str = field(default="pass_at_k", metadata={"help": "Precomputed pass@k column (optional)."})
    prompt_id_column: str = field(default="prompt_id", metadata={"help": "Column identifying a prompt (optional)."})
    use_urb: bool = field(default=False, metadata={"help": "U-RB: order-preserving chunked rollout scheduler."})
    urb_buffer_size: int = field(default=2, metadata={"help": "Inference pool size in generation batches (N)."})
    urb_chunk_tokens: int = field(default=16, metadata={"help": "New tokens per rollout per U-RB tick."})
    urb_free_finished_slots: bool = field(
        default=True, metadata={"help": "Finished rollouts free their U-RB pool slot before their group is released."}
    )
    plot: bool = field(default=True, metadata={"help": "Write rl_metrics.json and rl_curves.png at the end."})

    def __post_init__(self):
        epsilon_unset = self.epsilon == _GRPO_DEFAULT_EPSILON and self.epsilon_high is None
        super().__post_init__()
        if self.rollout_dtype is not None and self.rollout_dtype not in _DTYPES:
            raise ValueError(f"rollout_dtype must be one of {sorted(_DTYPES)} or None, got {self.rollout_dtype!r}")
        if self.routing_replay and self.use_vllm:
            raise ValueError(
                "routing_replay needs the expert choices of the rollout engine, which vLLM does not expose; "
                "set use_vllm=False (generation then runs in transformers with routing capture)"
            )
        if self.misc:
            if not 0.0 <= self.misc_alpha <= 1.0 <= self.misc_beta:
                raise ValueError(
                    f"MISC needs 0 <= misc_alpha <= 1 <= misc_beta, got {self.misc_alpha}, {self.misc_beta}"
                )
            if self.loss_type not in ("grpo", "dapo", "bnpo", "dr_grpo"):
                raise ValueError(
                    f"MISC replaces the clipped-ratio loss; loss_type {self.loss_type!r} is not one of grpo, dapo, "
                    "bnpo, dr_grpo"
                )
            if epsilon_unset:
                # The report gives no epsilon, so TRL's stays the default; but the sequence ratio averages the token
                # log-ratios and moves far less than any one of them, so a token-level band almost never clips it.
                logger.warning(
                    "misc=True clips a length-normalised sequence ratio (GSPO), which TRL's token-level epsilon=0.2 "
                    "almost never clips; GSPO's scale is epsilon=3e-4, epsilon_high=4e-4 (TRL's GSPO recipe). Set "
                    "epsilon (and epsilon_high) explicitly to choose, and to silence this warning."
                )
        for name in ("wpsm_tau", "wpsm_alpha"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.ahrl and not 0.0 <= self.ahrl_p_initial <= 1.0:
            raise ValueError(f"ahrl_p_initial must lie in [0, 1], got {self.ahrl_p_initial}")
        if self.ahrl and self.ahrl_k < 1:
            raise ValueError(f"ahrl_k must be >= 1, got {self.ahrl_k}")
        if self.ahrl_pass_samples is None:
            self.ahrl_pass_samples = 4 * self.ahrl_k
        if self.ahrl and self.ahrl_pass_samples < self.ahrl_k:
            raise ValueError(
                f"ahrl_pass_samples (n={self.ahrl_pass_samples}) must be >= ahrl_k (k={self.ahrl_k}) to estimate pass@k"
            )
        if self.use_urb:
            self._check_urb()

    def _check_urb(self):
        if self.urb_buffer_size < 1:
            raise ValueError(f"urb_buffer_size must be >= 1, got {self.urb_buffer_size}")
        if self.urb_chunk_tokens < 1:
            raise ValueError(f"urb_chunk_tokens must be >= 1, got {self.urb_chunk_tokens}")
        if self.shuffle_dataset:
            raise ValueError(
                "use_urb pre-assigns prompts to iteration groups in dataset order; set shuffle_dataset=False "
                "(shuffle the dataset itself beforehand, e.g. dataset.shuffle(seed), if a random order is wanted)"
            )
        if self.routing_replay:
            # A rollout resumed across ticks re-runs its prefix in a fresh prefill, possibly after an optimiser step,
            # so no single per-position routing is "the rollout's"; replaying one of them would be a silent guess.
            raise ValueError(
                "use_urb cannot be combined with routing_replay: chunked, resumed rollouts have no single recorded "
                "routing per position; turn one of them off"
            )
        if self.ahrl:
            raise ValueError(
                "use_urb cannot be combined with ahrl: the hint length depends on the step at which a prompt is "
                "trained, but U-RB starts later groups' rollouts before that step"
            )
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise ValueError(
                "use_urb drives transformers `generate` in chunks; set use_vllm=False and "
                "use_transformers_continuous_batching=False"
            )


def rl_switch_defaults():
    """The fields `RLConfig` adds to `GRPOConfig`, at their defaults, as a plain namespace."""
    import dataclasses
    from types import SimpleNamespace

    base = {f.name for f in dataclasses.fields(GRPOConfig)}
    return SimpleNamespace(
        **{
            f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
            for f in dataclasses.fields(RLConfig)
            if f.name not in base
        }
    )


# --- MoE plumbing ----------------------------------------------------------------------------------------------------


def backbone_of(model) -> torch.nn.Module:
    """The module TRL's fused LM head calls: `base_model` of the causal LM (under a peft wrapper, of its base)."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "base_model", model)


def moe_blocks(model) -> list[torch.nn.Module]:
    """The routed MoE blocks of the backbone, in layer order (multi-token-prediction blocks excluded).

    Matched by class name so that a model loaded with `trust_remote_code` (another class object) is found too.
    """
    layers = getattr(backbone_of(model), "layers", None)
    if layers is None:
        return []
    return [layer.mlp for layer in layers if type(getattr(layer, "mlp", None)).__name__ == "Ernie5SparseMoeBlock"]


class RoutingRecorder:
    """Records, per forward call, the (B, L, K) expert indices of every MoE block (forward hooks)."""

    def __init__(self, model):
        self.blocks = moe_blocks(model)
        self.calls: list[list[torch.Tensor]] = []
        self._current: list[torch.Tensor] = []
        self._handles = []

    def _hook(self, layer_pos: int):
        def hook(module, args, output):
            hidden_BLD = args[0]
            idx_TK = output[2]
            idx_BLK = idx_TK.detach().view(hidden_BLD.shape[0], hidden_BLD.shape[1], -1)
            if layer_pos == 0:
                self._current = []
                self.calls.append(self._current)
            self._current.append(idx_BLK)

        return hook

    def __enter__(self):
        self._handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(self.blocks)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


@contextlib.contextmanager
def replay_routing(model, routing_BNLK: torch.Tensor | None):
    """Feed recorded routing to the backbone of `model` in every forward of the block, row-chunk by row-chunk.

    TRL computes log-probs in row chunks and calls `model.base_model` directly (fused LM head), so the routing goes in
    through a forward pre-hook on the backbone that hands each call the rows it is about to process.
    """
    if routing_BNLK is None:
        yield
        return
    backbone = backbone_of(model)
    cursor = [0]

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        rows, length = ids.shape[0], ids.shape[1]
        chunk = routing_BNLK[cursor[0] : cursor[0] + rows]
        if chunk.shape[0] != rows or chunk.shape[2] != length:
            raise ValueError(
                f"routing replay: recorded routing covers {tuple(chunk.shape[:3:2])} (rows, length) but the forward "
                f"got {(rows, length)}"
            )
        cursor[0] = (cursor[0] + rows) % routing_BNLK.shape[0]
        kwargs["routing_indices"] = [r.to(ids.device) for r in routing_for_forward(chunk)]
        return args, kwargs

    handle = backbone.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def eval_mode(model):
    """No-grad side forwards run in eval mode: an ERNIE 5.0 training-mode forward counts expert load, which would move
    the balancing bias at the next real training step."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class RolloutEngine:
    """Generates completions for the trainer, optionally from a copy of the policy in another precision / back-end."""

    def __init__(self, policy, dtype: str | None = None, experts_backend: str | None = None):
        self.dtype = _DTYPES[dtype] if dtype else None
        self.experts_backend = experts_backend
        self.copy = None
        self.synced_step = -1
        if self.dtype is not None or experts_backend is not None:
            if hasattr(policy, "get_base_model"):
                raise ValueError(
                    "a separate rollout copy (rollout_dtype / rollout_experts_backend) is not supported for peft "
                    "models; merge the adapter first or generate with the policy (leave both unset)"
                )

            config = copy.deepcopy(policy.config)
            if experts_backend is not None:
                if not hasattr(config, "experts_backend"):
                    raise ValueError("rollout_experts_backend applies to ERNIE 5.0 models only")
                config.experts_backend = experts_backend
            # A fresh instance, not deepcopy: TRL patched the policy's forward with a closure over the original model.
            self.copy = type(policy)(config)
            self.copy.load_state_dict(policy.state_dict())
            self.copy.to(device=next(policy.parameters()).device, dtype=self.dtype or next(policy.parameters()).dtype)
            self.copy.generation_config = copy.deepcopy(policy.generation_config)
            self.copy.eval()
            self.copy.requires_grad_(False)

    def model(self, policy, step: int):
        """The model to generate with; the copy is re-synced from the policy once per optimiser step."""
        if self.copy is None:
            return policy
        if step != self.synced_step:
            with torch.no_grad():
                self.copy.load_state_dict(policy.state_dict())  # casts to the copy's dtype on assignment
            self.synced_step = step
        return self.copy


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def _kept_tokens(new: list[int], room: int, eos_ids: set[int]) -> tuple[int, bool]:
    """How many freshly generated tokens a resumed rollout keeps: at most `room`, and up to and including its first
    EOS (a batch member that stopped early is padded after it). Returns `(count, whether an EOS ended it)`."""
    for i, token in enumerate(new[:room]):
        if token in eos_ids:
            return i + 1, True
    return min(room, len(new)), False


def hf_chunked_advance(model, tokenizer, chunk_tokens: int, max_new_tokens: int, **generate_kwargs):
    """An `advance` function for `UnbiasedReplayBuffer` that resumes rollouts with HF `generate`.

    `Rollout.state` is `{"prompt_ids": [...], "completion_ids": [...]}` (give the prompt ids as the initial state);
    each call generates up to `chunk_tokens` more tokens for all active rollouts in one left-padded batch. A rollout
    finishes at EOS or after `max_new_tokens` tokens.
    """
    eos = tokenizer.eos_token_id

    def advance(rollouts: list[Rollout]) -> list[tuple[Any, bool]]:
        states = [
            r.state if isinstance(r.state, dict) else {"prompt_ids": list(r.state), "completion_ids": []}
            for r in rollouts
        ]
        rows = [s["prompt_ids"] + s["completion_ids"] for s in states]
        ids, mask = _left_pad(rows, tokenizer.pad_token_id)
        budget = min(chunk_tokens, max(max_new_tokens - min(len(s["completion_ids"]) for s in states), 1))
        with torch.no_grad(), eval_mode(model):
            out = model.generate(
                input_ids=ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=budget,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **generate_kwargs,
            )  # fmt: skip
        results = []
        for state, new in zip(states, out[:, ids.shape[1] :].tolist()):
            n, hit_eos = _kept_tokens(new, max_new_tokens - len(state["completion_ids"]), {eos})
            completion = state["completion_ids"] + new[:n]
            finished = hit_eos or len(completion) >= max_new_tokens
            results.append(({"prompt_ids": state["prompt_ids"], "completion_ids": completion}, finished))
        return results

    return advance


# --- Trainer ---------------------------------------------------------------------------------------------------------


def prompt_key(example: dict, column: str = "prompt_id") -> str:
    if example.get(column) is not None:
        return str(example[column])
    return json.dumps(example.get("prompt"), sort_keys=True, default=str)


class RLTrainer(GRPOTrainer):
    """`GRPOTrainer` with routing replay, MISC, WPSM, AHRL, mismatch and expert-load logging (see the module doc).

    Takes the same arguments as `trl.GRPOTrainer`; `args` should be an `RLConfig` (a plain `GRPOConfig` gives TRL's
    behaviour plus the extra logging).

    Example:

    ```python
    >>> from training.rl import RLConfig, RLTrainer
    >>> args = RLConfig(output_dir="out", use_cpu=True, bf16=False, gradient_checkpointing=False, misc=True,
    ...                 routing_replay=True, rollout_dtype="bfloat16", num_generations=4, max_completion_length=8)
    >>> trainer = RLTrainer(model=model, reward_funcs=[toy_world_reward], args=args, train_dataset=ds,
    ...                     processing_class=tokenizer)  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    ```
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A plain GRPOConfig gets the switches' defaults (all stabilisers off, logging on).
        a = self.args if isinstance(self.args, RLConfig) else rl_switch_defaults()
        self.rl_args = a
        policy = self.accelerator.unwrap_model(self.model)
        self._blocks = moe_blocks(policy)
        if a.routing_replay and not self._blocks:
            raise ValueError("routing_replay needs an MoE model with routing replay support (an ERNIE 5.0 model)")
        self.rollout_engine = RolloutEngine(policy, a.rollout_dtype, a.rollout_experts_backend)
        self.success_tracker = SuccessRateTracker(a.wpsm_decay)
        self.hint_scheduler = HintScheduler(a.ahrl_p_initial, a.ahrl_gamma, a.ahrl_max_pass)
        self.ahrl_pass_at_k: dict[str, float] = {}
        self.expert_load_history: list[dict[str, Any]] = []
        self._pending_rollout: dict[str, Any] | None = None
        self._last_rewards: torch.Tensor | None = None
        self._replay: torch.Tensor | None = None
        self._load_counts: torch.Tensor | None = None
        self._loss_routing: dict[int, list[torch.Tensor]] = {}
        self._loss_logps: torch.Tensor | None = None
        self._urb: UnbiasedReplayBuffer | None = None
        self.urb_log: list[dict[str, Any]] = []  # one record per group released to training
        if a.use_urb:
            self._check_urb_setup()
        if a.plot:
            self.add_callback(RLCurvesCallback(self))

    # -- generation -----------------------------------------------------------------------------------------------

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        # U-RB hooks in here rather than in `_generate` or through `rollout_func`: this is the one call that turns the
        # tokenised prompts of exactly one generation batch into completions + sampling log-probs, so TRL keeps doing
        # the prompt tokenisation, decoding, rewards, advantages and its own metrics unchanged, and the buffer can
        # check the batch it releases against the prompts the dataloader handed over. `rollout_func` would replace
        # the tokenisation too and is marked experimental in TRL 1.16.
        if self.rl_args.use_urb and self.model.training:
            self._pending_rollout = None
            return self._urb_generate(prompt_ids, num_generations)
        if self.use_vllm or self.use_transformers_continuous_batching or images or multimodal_fields:
            self._pending_rollout = None
            return super()._generate_single_turn(
                prompt_ids, images, multimodal_fields, num_generations, has_tool_images
            )
        device = self.accelerator.device
        ids, mask = _left_pad([list(p) for p in prompt_ids], self._tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        policy = self.accelerator.unwrap_model(self.model)
        model = self.rollout_engine.model(policy, self.state.global_step)
        recorder = RoutingRecorder(model)
        if getattr(self, "_rollout_generation_config", None) is None:
            self._rollout_generation_config = self._generation_config_with_logits()
        with torch.no_grad(), eval_mode(model), recorder:
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=self._rollout_generation_config)
        completion = out.sequences[:, ids.shape[1] :]
        logits = torch.stack(out.logits, dim=1).float() / self.temperature
        logps = torch.log_softmax(logits, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)

        is_eos = torch.isin(completion, torch.tensor(self.eos_token_ids, device=completion.device))
        full = torch.full_like(is_eos[:, 0], completion.shape[1], dtype=torch.long)
        lengths = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, full)  # up to and including the first EOS
        completion_ids = [c[:n].tolist() for c, n in zip(completion.cpu(), lengths.tolist())]
        sampling_logps = [lp[:n].tolist() for lp, n in zip(logps.cpu(), lengths.tolist())]
        self._pending_rollout = {
            "prompt_mask": mask.cpu(),
            "prefill": recorder.calls[0] if recorder.calls else [],
            "steps": recorder.calls[1:],
        }
        return completion_ids, sampling_logps

    def _generation_config_with_logits(self):
        """TRL's generation config, returning the per-step logits (for the sampling log-probs) and decoding with the
        KV cache, which TRL turns off in the model config."""
        config = copy.deepcopy(self.generation_config)
        config.output_logits = True
        config.return_dict_in_generate = True
        config.use_cache = True
        return config

    # -- U-RB -------------------------------------------------------------------------------------------------------

    def _check_urb_setup(self):
        from torch.utils.data import IterableDataset

        if self.accelerator.num_processes > 1:
            raise ValueError("use_urb supports a single training process for now (the buffer is not sharded)")
        if isinstance(self.train_dataset, IterableDataset) or not hasattr(self.train_dataset, "__len__"):
            raise ValueError("use_urb needs a map-style dataset: groups are pre-assigned by row index")
        if self.tools or self.environment_factories is not None or self.rollout_func is not None:
            raise ValueError("use_urb supports plain single-turn generation, not tools, environments or rollout_func")
        if len(self.train_dataset) < self.args.generation_batch_size // self.num_generations:
            raise ValueError(
                f"use_urb: the dataset has {len(self.train_dataset)} prompts, fewer than one generation batch "
                f"({self.args.generation_batch_size // self.num_generations} prompts)"
            )

    def _urb_start(self):
        """Pre-assign the prompts of the whole run to iteration groups, the way TRL's unshuffled `RepeatSampler`
        serves them: group g is the g-th generation batch (epochs wrap around the dataset in order, the incomplete
        tail batch of an epoch is dropped), each prompt repeated `num_generations` times."""
        a = self.rl_args
        unique = self.args.generation_batch_size // self.num_generations
        per_epoch = len(self.train_dataset) // unique
        generate_every = self.args.steps_per_generation * self.num_iterations
        micro_steps = self.state.max_steps * self.args.gradient_accumulation_steps
        n_groups = max(1, -(-micro_steps // generate_every))
        # A resumed run: the Trainer skips the batches already trained on, so the buffer starts at the group due next.
        done = self.state.global_step * self.args.gradient_accumulation_steps
        self._urb_first = min(done // generate_every, n_groups - 1)
        self._urb_rows: dict[Any, int] = {}
        groups = []
        for g in range(self._urb_first, n_groups):
            first = (g % per_epoch) * unique
            group = []
            for i, row in enumerate(range(first, first + unique)):
                for j in range(self.num_generations):
                    rid = (g, i * self.num_generations + j)
                    self._urb_rows[rid] = row
                    group.append(rid)
            groups.append(group)
        self._urb = UnbiasedReplayBuffer(
            groups, len(groups[0]), a.urb_buffer_size, free_finished_slots=a.urb_free_finished_slots
        )
        self._urb_early: set[Any] = set()  # generated tokens while an earlier group was still pending
        self._urb_resumed: set[Any] = set()  # partially generated when an earlier group went to training, then resumed
        self._urb_ticks_since_release: list[tuple[int, int]] = []  # (generating, finished and waiting) per tick
        self._urb_prompt_cache: dict[int, list[int]] = {}
        self._urb_generation_config = None

    def _urb_generate(self, prompt_ids, num_generations):
        if num_generations != self.num_generations:
            raise ValueError(f"U-RB expects num_generations={self.num_generations}, got {num_generations}")
        if self._urb is None:
            self._urb_start()
        buf = self._urb
        if buf.done:
            raise RuntimeError(f"U-RB: all {len(buf.groups)} pre-assigned groups were already released")
        released = buf.release()
        while released is None:
            if buf.tick_count >= 1_000_000:
                raise RuntimeError(f"U-RB: group {buf.next_group} did not finish")
            buf.tick(self._urb_advance)
            released = buf.release()
        group = self._urb_first + buf.next_group - 1
        # Rollouts of later groups that are still mid-generation now wait through a training step and resume after it.
        for r in buf.pool():
            if r.ticks > 0:
                self._urb_early.add(r.request_id)
                if not r.finished:
                    self._urb_resumed.add(r.request_id)

        expected = [r.state["prompt_ids"] for r in released]
        if [list(p) for p in prompt_ids] != expected:
            raise RuntimeError(
                f"U-RB: the dataloader's batch differs from pre-assigned group {group} (rows "
                f"{sorted({self._urb_rows[r.request_id] for r in released})}); the data order was changed after the "
                "buffer was built (sampler shuffling or a modified dataset)"
            )
        self._urb_record(group, released)
        for r in released:  # a row needed again (next epoch) is simply tokenised again
            self._urb_prompt_cache.pop(self._urb_rows.pop(r.request_id), None)
        return [r.state["completion_ids"] for r in released], [r.state["logps"] for r in released]

    def _urb_record(self, group: int, released: list[Rollout]):
        buf, step = self._urb, self.state.global_step
        ticks, self._urb_ticks_since_release = self._urb_ticks_since_release, []
        early = sum(r.request_id in self._urb_early for r in released)
        resumed = sum(r.request_id in self._urb_resumed for r in released)
        n_tokens = sum(len(r.state["completion_ids"]) for r in released)
        stale = sum(s < step for r in released for s in r.state["steps"])
        record = {
            "group": group,
            "step": step,
            "rows": [self._urb_rows[r.request_id] for r in released],
            "completion_ids": [list(r.state["completion_ids"]) for r in released],
            "ticks": len(ticks),
            "rollout_ticks": [r.ticks for r in released],
            "started_early": early,
            "resumed": resumed,
            "stale_tokens": stale,
        }
        self.urb_log.append(record)
        metrics = self._metrics["train"]
        if ticks:  # generating rollouts over the pool capacity, averaged over the ticks this batch waited for
            metrics["urb/pool_occupancy"].append(sum(g for g, _ in ticks) / len(ticks) / buf.capacity)
        # finished rollouts of later groups already waiting in the buffer when this batch goes to training
        metrics["urb/waiting_rollouts"].append(float(sum(r.finished for r in buf.pool())))
        metrics["urb/ticks"].append(float(record["ticks"]))
        metrics["urb/started_early_rollouts"].append(float(early))
        metrics["urb/resumed_rollouts"].append(float(resumed))
        metrics["urb/groups_started_early"].append(float(sum(rec["started_early"] > 0 for rec in self.urb_log)))
        metrics["urb/stale_token_frac"].append(stale / max(n_tokens, 1))
        self._urb_early.difference_update(r.request_id for r in released)
        self._urb_resumed.difference_update(r.request_id for r in released)

    def _urb_advance(self, rollouts: list[Rollout]) -> list[tuple[Any, bool]]:
        """One U-RB tick: every given rollout generates at most `urb_chunk_tokens` more tokens, in one left-padded
        `generate` call over prompt + partial completion. State per rollout: prompt ids, completion ids, per-token
        sampling log-probs and the optimiser step each token was sampled at."""
        a, buf = self.rl_args, self._urb
        self._urb_ticks_since_release.append((len(rollouts), len(buf.pool()) - len(rollouts)))
        new_rows = sorted({self._urb_rows[r.request_id] for r in rollouts if r.state is None})
        new_rows = [row for row in new_rows if row not in self._urb_prompt_cache]
        if new_rows:
            ids_list, _, _ = self._tokenize_prompts([self.train_dataset[row]["prompt"] for row in new_rows])
            self._urb_prompt_cache.update({row: list(ids) for row, ids in zip(new_rows, ids_list)})
        states = [
            r.state
            if r.state is not None
            else {
                "prompt_ids": self._urb_prompt_cache[self._urb_rows[r.request_id]],
                "completion_ids": [],
                "logps": [],
                "steps": [],
            }
            for r in rollouts
        ]
        limit = self.max_completion_length
        room = [limit - len(s["completion_ids"]) for s in states]
        budget = min(a.urb_chunk_tokens, max(room))
        device = self.accelerator.device
        ids, mask = _left_pad([s["prompt_ids"] + s["completion_ids"] for s in states], self._tokenizer.pad_token_id)
        policy = self.accelerator.unwrap_model(self.model)
        model = self.rollout_engine.model(policy, self.state.global_step)
        if self._urb_generation_config is None:  # its own copy: max_new_tokens changes every tick
            self._urb_generation_config = self._generation_config_with_logits()
        config = self._urb_generation_config
        config.max_new_tokens = budget
        with torch.no_grad(), eval_mode(model):
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        new_BT = out.sequences[:, ids.shape[1] :].cpu()
        logits = torch.stack(out.logits, dim=1).float() / self.temperature
        logps_BT = torch.log_softmax(logits, dim=-1).gather(-1, new_BT.to(logits.device).unsqueeze(-1)).squeeze(-1)
        eos = set(self.eos_token_ids)
        step = self.state.global_step
        results = []
        for state, space, new, lps in zip(states, room, new_BT.tolist(), logps_BT.cpu().tolist()):
            n, hit_eos = _kept_tokens(new, space, eos)
            completion = state["completion_ids"] + new[:n]
            results.append(
                (
                    {
                        "prompt_ids": state["prompt_ids"],
                        "completion_ids": completion,
                        "logps": state["logps"] + lps[:n],
                        "steps": state["steps"] + [step] * n,
                    },
                    hit_eos or len(completion) >= limit,
                )
            )
        return results

    def train(self, *args, **kwargs):
        a = self.rl_args
        if a.use_urb:
            self._urb = None  # groups are laid out for this run's max_steps when the first batch is generated
        columns = getattr(self.train_dataset, "column_names", None) or []
        if a.ahrl and a.ahrl_pass_column not in columns and not self.ahrl_pass_at_k:
            self.measure_pass_at_k()
        return super().train(*args, **kwargs)

    def measure_pass_at_k(self, k: int | None = None, dataset=None, n: int | None = None) -> dict[str, float]:
        """pass@k of the current (starting) model on every prompt that has a reference reasoning (AHRL's
        `pass_initial`): n samples per prompt (`ahrl_pass_samples`, default 4k), a sample passes when its summed reward
        reaches `success_threshold`, and pass@k is the unbiased estimate from the c passes among the n."""
        a = self.rl_args
        k = k or a.ahrl_k
        n = n or a.ahrl_pass_samples or 4 * k
        if n < k:
            raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got n={n}")
        dataset = dataset if dataset is not None else self.train_dataset
        rows, seen = [], set()
        for x in dataset:
            key = prompt_key(x, a.prompt_id_column)
            if x.get(a.ahrl_reference_column) and key not in seen:
                seen.add(key)
                rows.append(x)
        chunk = max(1, self.args.per_device_train_batch_size // n)
        for start in range(0, len(rows), chunk):
            inputs = [x for x in rows[start : start + chunk] for _ in range(n)]
            prompts = [x["prompt"] for x in inputs]
            prompt_ids, _, _ = self._tokenize_prompts(prompts)
            completion_ids, _ = self._generate_single_turn(prompt_ids, None, {}, n)
            texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
            if not isinstance(prompts[0], str):
                texts = [[{"role": "assistant", "content": t}] for t in texts]
            completions = texts
            rewards = self._calculate_rewards(inputs, prompts, completions, completion_ids)[: len(inputs)]
            total = (rewards * self.reward_weights.to(rewards.device)).nansum(dim=1)
            passed = (total >= a.success_threshold).view(-1, n).sum(1).tolist()
            for x, c in zip(rows[start : start + chunk], passed):
                self.ahrl_pass_at_k[prompt_key(x, a.prompt_id_column)] = pass_at_k(n, int(c), k)
        self._pending_rollout = None
        return dict(self.ahrl_pass_at_k)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards = rewards
        return rewards

    def _apply_hints(self, inputs: list[dict]) -> list[dict]:
        """AHRL: append the first `p_hint` of the reference reasoning to hard prompts (copies; `inputs` is kept).

        Choice: for chat prompts the hint goes at the end of the last (user) message. The report only says the partial
        think skeleton is part of the prompt (Fig. 7), not in which turn; the user turn leaves TRL's chat template and
        generation prompt untouched, and the hint is never trained on either way."""
        a = self.rl_args
        out, hinted, fractions = [], 0, []
        for x in inputs:
            reference = x.get(a.ahrl_reference_column)
            pak = x.get(a.ahrl_pass_column)
            if pak is None:
                pak = self.ahrl_pass_at_k.get(prompt_key(x, a.prompt_id_column))
            frac = self.hint_scheduler.fraction(self.state.global_step, pak) if reference else 0.0
            fractions.append(frac)
            if frac <= 0:
                out.append(x)
                continue
            tokens = self._tokenizer(reference, add_special_tokens=False)["input_ids"]
            hint = self._tokenizer.decode(HintScheduler.prefix(tokens, frac))
            x = dict(x)
            if isinstance(x["prompt"], str):
                x["prompt"] = x["prompt"] + hint
            else:
                messages = [dict(m) for m in x["prompt"]]
                messages[-1]["content"] = f"{messages[-1]['content']}\n{hint}"
                x["prompt"] = messages
            hinted += 1
            out.append(x)
        self._metrics["train"]["ahrl/hinted_frac"].append(hinted / max(len(inputs), 1))
        self._metrics["train"]["ahrl/hint_fraction_mean"].append(sum(fractions) / max(len(fractions), 1))
        return out

    def _side_logps(self, ids, attn, logits_to_keep, routing=None, record=False, **multimodal):
        """No-grad per-token log-probs (and entropies, and the routing chosen) of the current policy, in eval mode.
        `multimodal` holds the batch's image inputs (`multimodal_inputs`), passed on as TRL's loss forward does."""
        recorder = RoutingRecorder(self.accelerator.unwrap_model(self.model)) if record else contextlib.nullcontext()
        with torch.no_grad(), eval_mode(self.model), replay_routing(self.accelerator.unwrap_model(self.model), routing):
            with recorder:
                logps, entropies, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    self, self.model, ids, attn, logits_to_keep,
                    batch_size=self.args.per_device_train_batch_size, compute_entropy=True, **multimodal,
                )  # fmt: skip
        routed = None
        if record and recorder.calls:
            routed = torch.cat([torch.stack(call, dim=1) for call in recorder.calls], dim=0).cpu()  # (B, N, L, K)
        return logps, entropies, routed

    def _generate_and_score_completions(self, inputs):
        mode = "train" if self.model.training else "eval"
        a = self.rl_args
        unhinted = inputs  # WPSM tracks a prompt under one key, however long its hint is at this step
        if a.ahrl and mode == "train":
            inputs = self._apply_hints(inputs)
        output = super()._generate_and_score_completions(inputs)
        rollout, self._pending_rollout = self._pending_rollout, None
        if mode != "train":
            return output

        prompt_ids, prompt_mask = output["prompt_ids"], output["prompt_mask"]
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attn = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.shape[1]
        mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        sampling = output.get("sampling_per_token_logps")
        multimodal = multimodal_inputs(output)

        routing = None
        if rollout is not None and rollout["prefill"] and "tool_mask" not in output:
            routing = assemble_rollout_routing(
                rollout["prefill"], rollout["steps"], rollout["prompt_mask"], prompt_mask,
                logits_to_keep, self.accelerator.unwrap_model(self.model).config.num_experts,
            )  # fmt: skip
        if a.routing_replay and routing is None:
            raise RuntimeError(
                "routing replay is on but no rollout routing was recorded: replay supports text prompts generated by "
                "the transformers rollout engine, not vLLM, TRL tool-call loops or multimodal prompts yet"
            )

        need_side = a.misc or a.wpsm or a.routing_replay or (a.measure_mismatch and sampling is not None)
        if need_side:
            plain_logps, entropies, train_routing = self._side_logps(
                ids, attn, logits_to_keep, record=routing is not None, **multimodal
            )
            old = plain_logps
            if routing is not None and (a.routing_replay or a.measure_mismatch):
                replay_logps, replay_entropies, _ = self._side_logps(
                    ids, attn, logits_to_keep, routing=routing, **multimodal
                )
                if a.routing_replay:
                    old, entropies = replay_logps, replay_entropies
            output["old_per_token_logps"] = old
            if routing is not None:  # kept also without replay, to measure the training forward's routing drift
                output["rollout_routing"] = routing.to(ids.device)
            if a.measure_mismatch and sampling is not None:
                self._log_mismatch(plain_logps, sampling, mask, "")
                if routing is not None:
                    self._log_mismatch(replay_logps, sampling, mask, "replay_")
                    valid = attn.clone()
                    valid[:, -1] = 0  # the last token is never processed by the rollout
                    num_experts = self.accelerator.unwrap_model(self.model).config.num_experts
                    self._metrics["train"]["mismatch/routing_disagreement"].append(
                        routing_disagreement(routing, train_routing, valid.cpu(), num_experts)
                    )
            if a.wpsm:
                self._apply_wpsm(unhinted, output, entropies, mask)
        return output

    def _log_mismatch(self, train_logps, sampling_logps, mask, prefix: str):
        m = mask.bool() & ~torch.isnan(sampling_logps)
        diff = (train_logps - sampling_logps)[m]
        if diff.numel() == 0:
            return
        metrics = self._metrics["train"]
        metrics[f"mismatch/{prefix}logp_absdiff_mean"].append(diff.abs().mean().item())
        metrics[f"mismatch/{prefix}logp_absdiff_max"].append(diff.abs().max().item())
        ratio = diff.exp()
        metrics[f"mismatch/{prefix}ratio_outside_band"].append(
            ((ratio < self.rl_args.misc_alpha) | (ratio > self.rl_args.misc_beta)).float().mean().item()
        )

    def _apply_wpsm(self, inputs, output, entropies, mask):
        a = self.rl_args
        rewards = self._last_rewards  # gathered: every process's rows, in process order
        n = len(inputs)
        start = self.accelerator.process_index * n
        correct_all = (rewards * self.reward_weights.to(rewards.device)).nansum(dim=1) >= a.success_threshold
        correct = correct_all[start : start + n]
        keys = [prompt_key(x, a.prompt_id_column) for x in inputs]
        rate = torch.tensor(track_group_success(self.success_tracker, keys, correct_all), device=entropies.device)
        mean_entropy = (entropies * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        weights, flagged = wpsm_weights(
            mean_entropy, rate, correct.to(entropies.device), a.wpsm_tau, a.wpsm_eta, a.wpsm_alpha, a.wpsm_positive_only
        )
        output["advantages"] = output["advantages"] * weights.to(output["advantages"].dtype)
        self._metrics["train"]["wpsm/flagged_frac"].append(flagged.float().mean().item())
        self._metrics["train"]["wpsm/success_rate_mean"].append(rate.mean().item())

    # -- loss -----------------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        unwrapped = self.accelerator.unwrap_model(model)
        # Only the forward that makes the gradient may count expert load. TRL's own no-grad forwards (old log-probs
        # when generation and optimiser steps are misaligned, e.g. num_iterations > 1; the reference through a
        # disabled adapter) run with the policy in train mode, so without this their tokens would move the balancing
        # bias at the next training forward.
        mode = contextlib.nullcontext() if torch.is_grad_enabled() else eval_mode(model)
        with mode, replay_routing(unwrapped, self._replay), self._count_load(unwrapped):
            result = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        if self._load_counts is not None:  # inside the loss: keep the training log-probs for the mismatch metric
            self._loss_logps = result[0].detach()
        return result

    @contextlib.contextmanager
    def _count_load(self, model):
        if self._load_counts is None or not self._blocks:
            yield
            return
        num_experts = model.config.num_experts

        def hook_for(layer_pos):
            def hook(module, args, output):
                hidden_BLD, idx = args[0], output[2]
                self._load_counts += torch.bincount(
                    idx[idx < num_experts].flatten().cpu(), minlength=num_experts
                )[:num_experts]
                self._loss_routing.setdefault(layer_pos, []).append(idx.detach().view(*hidden_BLD.shape[:2], -1).cpu())

            return hook

        handles = [b.register_forward_hook(hook_for(i)) for i, b in enumerate(moe_blocks(model))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _compute_loss(self, model, inputs):
        a = self.rl_args
        self._replay = inputs.get("rollout_routing") if a.routing_replay else None
        track = bool(self._blocks) and self.model.training
        if track:
            self._load_counts = torch.zeros(self.accelerator.unwrap_model(model).config.num_experts)
            self._loss_routing, self._loss_logps = {}, None
        try:
            loss = self._misc_loss(model, inputs) if a.misc else super()._compute_loss(model, inputs)
        finally:
            self._replay = None
        if track:
            self._log_load(self._load_counts)
            self._log_update_mismatch(inputs)
            self._load_counts = None
        return loss

    def _log_update_mismatch(self, inputs):
        """In the forward that produces the gradient: how far its routing and log-probs are from the rollout's (the
        policy may have moved since the rollout, num_iterations > 1, besides any precision gap). Zero routing
        disagreement is what routing replay guarantees."""
        metrics = self._metrics["train"]
        mask = inputs["completion_mask"]
        sampling = inputs.get("sampling_per_token_logps")
        if self._loss_logps is not None and sampling is not None:
            m = mask.bool() & ~torch.isnan(sampling)
            if m.any():
                gap = (self._loss_logps - sampling)[m].abs().mean()
                metrics["mismatch/update_logp_absdiff_mean"].append(gap.item())
        rollout = inputs.get("rollout_routing")
        if rollout is None or not self._loss_routing:
            return
        n_layers = len(self._loss_routing)
        train = torch.stack([torch.cat(self._loss_routing[i], dim=0) for i in range(n_layers)], dim=1)
        if train.shape != rollout.shape:
            return
        valid = torch.cat([inputs["prompt_mask"], mask], dim=1).cpu().clone()
        valid[:, -1] = 0  # the last sampled token never went through the rollout model
        num_experts = self.accelerator.unwrap_model(self.model).config.num_experts
        metrics["mismatch/update_routing_disagreement"].append(
            routing_disagreement(rollout.cpu(), train, valid, num_experts)
        )

    def _log_load(self, counts: torch.Tensor):
        if counts.sum() == 0:
            return
        share = counts / counts.sum()
        uniform = 1.0 / counts.numel()
        metrics = self._metrics["train"]
        metrics["moe/load_max_over_uniform"].append((share.max() / uniform).item())
        metrics["moe/load_min_over_uniform"].append((share.min() / uniform).item())
        metrics["moe/load_cv"].append((share.std() / share.mean()).item())
        self.expert_load_history.append(
            {"step": self.state.global_step, "share": [round(x, 5) for x in share.tolist()]}
        )

    def _misc_loss(self, model, inputs):
        a = self.rl_args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attn = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model, ids, attn, completion_ids.shape[1], compute_entropy=True, **multimodal_inputs(inputs)
        )
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        rollout = inputs.get("sampling_per_token_logps")
        result = misc_per_token_loss(
            logps, old, rollout, inputs["advantages"], mask, self.epsilon_low, self.epsilon_high,
            a.misc_alpha, a.misc_beta, a.misc_weight_by_ratio,
        )  # fmt: skip
        per_token_loss = result.per_token_loss
        if self.beta != 0.0:
            ref = inputs["ref_per_token_logps"]
            per_token_loss = per_token_loss + self.beta * (torch.exp(ref - logps) - (ref - logps) - 1)
        mode = "train" if self.model.training else "eval"
        mask_f = mask.to(per_token_loss.dtype)
        loss = aggregate_token_loss(
            per_token_loss, mask_f, self.loss_type,
            accumulation=self.current_gradient_accumulation_steps if mode == "train" else 1,
            max_completion_length=self.max_completion_length,
            num_items_in_batch=inputs.get("num_items_in_batch"),
            num_processes=self.accelerator.num_processes,
            steps_per_generation=self.args.steps_per_generation if mode == "train" else None,
        )  # fmt: skip
        metrics = self._metrics[mode]
        valid = mask.bool()
        n_valid = valid.sum().clamp(min=1)
        metrics["entropy"].append(((entropies * mask_f).sum() / n_valid).item())
        metrics["misc/token_masked_frac"].append(((valid & ~result.token_kept).sum() / n_valid).item())
        metrics["misc/seq_ratio_mean"].append(result.seq_ratio.mean().item())
        metrics["clip_ratio/region_mean"].append(result.seq_clipped.float().mean().item())
        return loss


def gather_keys(keys: list) -> list:
    """Every process's keys in process order (the order of TRL's gathered rewards); the local keys alone when the
    run is not distributed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return list(keys)
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, list(keys))
    return [key for part in parts for key in part]


def track_group_success(tracker: SuccessRateTracker, local_keys: list, correct_all: torch.Tensor) -> list[float]:
    """Fold one step's outcomes into WPSM's success-rate `tracker` and return the rates of the local rows' prompts.

    TRL spreads a prompt's G completions over the processes, so each process updates its tracker with every
    process's rows (keys gathered, `correct_all` from the gathered rewards): the rates are those of whole groups,
    and every process holds the same tracker. Updating with the local rows alone rated each prompt on the part of
    its group a process happened to get, differently on every process."""
    all_keys = gather_keys(local_keys)
    if len(all_keys) != len(correct_all):
        raise ValueError(f"{len(all_keys)} gathered prompt keys but {len(correct_all)} gathered rewards")
    tracker.update(all_keys, correct_all.cpu())
    return [tracker.rate(key) for key in local_keys]


def aggregate_token_loss(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    accumulation: int,
    max_completion_length: int,
    num_items_in_batch: torch.Tensor | None = None,
    num_processes: int = 1,
    steps_per_generation: int | None = None,
) -> torch.Tensor:
    """One micro-batch's (B, L) token losses -> the scalar to backpropagate, normalised as TRL's `GRPOTrainer`
    does for each `loss_type`, so that MISC changes the per-token objective and nothing else.

    - `grpo`: mean over sequences of each sequence's token mean (ERNIE 5.0's 1/G sum_i 1/|y_i| sum_j), / accumulation;
    - `bnpo`: token mean over this micro-batch, / accumulation;
    - `dr_grpo`: token sum over B * max_completion_length, / accumulation;
    - `dapo`: token sum over the tokens of the whole accumulation window on every process (`num_items_in_batch`
      spans the generation batch, so it is rescaled to one window; `steps_per_generation=None` in evaluation).
    """
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / accumulation
    if loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0) / num_processes
        if steps_per_generation is not None:
            normalizer = normalizer * accumulation / steps_per_generation
        return (per_token_loss * mask).sum() / normalizer
    raise ValueError(f"no token-loss normalisation for loss_type {loss_type!r}; use grpo, bnpo, dr_grpo or dapo")


# --- Logging ---------------------------------------------------------------------------------------------------------


class RLCurvesCallback(TrainerCallback):
    """Collects the logged metrics; at the end writes `rl_metrics.json` and `rl_curves.png` (reward, entropy,
    mismatch, masked fractions over steps) into the output directory."""

    PANELS = (
        ("reward", "reward (mean)"),
        ("entropy", "policy entropy (nats/token)"),
        ("mismatch", "train vs rollout |delta log p|"),
        ("masked", "clipped / masked / re-routed fractions"),
    )

    def __init__(self, trainer: RLTrainer | None = None):
        self.trainer = trainer
        self.history: list[dict[str, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Training-step logs only (not the end-of-run summary); steps without a rollout carry no reward key.
        if logs and "loss" in logs and "train_runtime" not in logs:
            numbers = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            self.history.append({"step": state.global_step, **numbers})

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.history:
            return
        os.makedirs(args.output_dir, exist_ok=True)
        payload = {"history": self.history}
        if self.trainer is not None:
            payload["expert_load"] = self.trainer.expert_load_history
        with open(os.path.join(args.output_dir, "rl_metrics.json"), "w") as f:
            json.dump(payload, f, indent=1)
        plot_rl_curves({"run": self.history}, os.path.join(args.output_dir, "rl_curves.png"))


def plot_rl_curves(runs: dict[str, list[dict[str, float]]], path: str) -> None:
    """Plot reward, entropy, mismatch and masked fractions over steps for one or more runs (one line each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for name, history in runs.items():

        def series(key):
            points = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float)) and h[key] == h[key]]
            return [p[0] for p in points], [p[1] for p in points]

        def draw(ax, key, label, style="-", smooth=0):
            x, y = series(key)
            if not x:
                return
            line = ax.plot(x, y, style, label=label, alpha=0.45 if smooth else 1.0, linewidth=1)[0]
            if smooth and len(y) >= smooth:
                windows = [y[max(0, i - smooth + 1) : i + 1] for i in range(len(y))]
                avg = [sum(w) / len(w) for w in windows]
                ax.plot(x, avg, style, color=line.get_color(), linewidth=2.2, label=f"{label} (mean of {smooth})")

        draw(axes[0, 0], "reward", name, smooth=5)
        draw(axes[0, 1], "entropy", name)
        draw(axes[1, 0], "mismatch/logp_absdiff_mean", f"{name}: no replay")
        draw(axes[1, 0], "mismatch/replay_logp_absdiff_mean", f"{name}: replay", "--")
        draw(axes[1, 1], "clip_ratio/region_mean", f"{name}: clipped")
        draw(axes[1, 1], "misc/token_masked_frac", f"{name}: IcePop masked", "--")
        draw(axes[1, 1], "mismatch/update_routing_disagreement", f"{name}: routing != rollout", ":")
    for ax, (_, title) in zip(axes.flat, RLCurvesCallback.PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Data and entry point --------------------------------------------------------------------------------------------


def toy_world_prompt(description: str, question: str) -> str:
    """The text-only toy-world prompt shared by SFT and RL: scene description, question, answer cue."""
    return f"{description}\nQ: {question}\nA:"


def toy_world_dataset(num_scenes: int, seed: int = 0, kinds: tuple[str, ...] | None = None):
    """A `datasets.Dataset` of toy-world questions (`prompt`, `question`, `answer`, `kind`, `prompt_id`), one row per
    generated question of `num_scenes` scenes drawn from seeds `seed, seed+1, ...`."""
    from datasets import Dataset

    from processing.toy_world import describe_scene, make_questions, sample_scene

    rows = []
    for s in range(seed, seed + num_scenes):
        scene = sample_scene(s)
        description = describe_scene(scene)
        for j, qa in enumerate(make_questions(scene, random.Random(s))):
            if kinds and qa.kind not in kinds:
                continue
            rows.append(
                {
                    "prompt": toy_world_prompt(description, qa.question),
                    "question": qa.question,
                    "answer": qa.answer,
                    "kind": qa.kind,
                    "prompt_id": f"scene{s}-q{j}",
                }
            )
    return Dataset.from_list(rows)


def load_rl_dataset(name: str, split: str = "train", toy_world_scenes: int = 64, seed: int = 0):
    """`toy_world` (built in), a local json/jsonl/csv/parquet file, or a folder saved with `save_to_disk`."""
    import datasets

    if name == "toy_world":
        return toy_world_dataset(toy_world_scenes, seed)
    if os.path.isdir(name):
        ds = datasets.load_from_disk(name)
        ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    else:
        ext = os.path.splitext(name)[1].lstrip(".")
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None or not os.path.exists(name):
            raise ValueError(
                f"dataset {name!r}: expected 'toy_world', a saved dataset folder or a json/jsonl/csv/parquet file"
            )
        ds = datasets.load_dataset(builder, data_files=name, split="train")
    if "prompt" not in ds.column_names:  # what TRL's GRPO trainer reads; it would fail later with a bare KeyError
        raise ValueError(f"dataset {name!r} has no 'prompt' column (columns: {ds.column_names})")
    return ds


@dataclass
class RLScriptArguments:
    """What to train and on what.

    Args:
        model_name_or_path (`str`): local model folder (ERNIE 5.0 or any causal LM).
        tokenizer_name_or_path (`str`, *optional*): defaults to the model folder.
        dataset_name (`str`, *optional*, defaults to `"toy_world"`): see `load_rl_dataset`.
        dataset_split (`str`, *optional*, defaults to `"train"`).
        toy_world_scenes (`int`, *optional*, defaults to 64): scenes for the built-in toy world.
        reward_funcs (`list[str]`, *optional*, defaults to `["toy_world"]`): registry names or dotted paths.
    """

    model_name_or_path: str = field(metadata={"help": "Local model folder."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to the model folder."})
    dataset_name: str = field(default="toy_world", metadata={"help": "toy_world, a data file or a saved dataset."})
    dataset_split: str = field(default="train", metadata={"help": "Split of a saved DatasetDict."})
    toy_world_scenes: int = field(default=64, metadata={"help": "Scenes for the built-in toy world."})
    reward_funcs: list[str] = field(default_factory=lambda: ["toy_world"], metadata={"help": "Reward names or paths."})


def make_parser(subparsers=None, prog: str | None = None):
    """`TrlParser` over (`RLScriptArguments`, `RLConfig`): flags, or `--config` with a YAML or JSON file."""
    from trl import TrlParser

    dataclass_types = (RLScriptArguments, RLConfig)
    if subparsers is not None:
        parser = subparsers.add_parser(
            "rl", help="RL post-training (GRPO/GSPO + ERNIE 5.0 stabilisers)", dataclass_types=dataclass_types
        )
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    parser.set_defaults(**precision_defaults_for_this_machine())
    return parser


def main(script_args: RLScriptArguments, training_args: RLConfig) -> RLTrainer:
    """Load the model, tokenizer, data and rewards, train, save the final model as a normal model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_ernie5  # noqa: F401  (registers the ERNIE 5.0 Auto classes)
    from training.rewards import get_reward_func

    model = AutoModelForCausalLM.from_pretrained(
        script_args.model_name_or_path, trust_remote_code=training_args.trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(script_args.tokenizer_name_or_path or script_args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = load_rl_dataset(
        script_args.dataset_name, script_args.dataset_split, script_args.toy_world_scenes, training_args.seed
    )
    rewards = [get_reward_func(name) for name in script_args.reward_funcs]
    trainer = RLTrainer(
        model=model, reward_funcs=rewards, args=training_args, train_dataset=dataset, processing_class=tokenizer
    )
    # `Trainer` does not read this argument itself: the script passes it on.
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    end_distributed_training(trainer)
    return trainer


if __name__ == "__main__":
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
