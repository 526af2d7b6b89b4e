"""Elastic sub-models: their specification, their parameter counts and their extraction (ERNIE 5.0 §3.3, §6.4.2;
DESIGN.md §4).

An `ElasticSpec` names one member of the family that elastic training optimises: which layers run (skipped
interior layers act as identity), which experts the router may choose (a -inf mask on the router scores; the
balancing bias is not applied then), and how many experts each token uses. The model takes a spec as a plain
forward argument; how specs are sampled belongs to training (`training/elastic_sampler.py`).

`extract_submodel` cuts a trained model down to one member of that family "by selecting subsets of parameters
along the layer number, total expert number, and activated expert number" (§3.3): the kept layers are copied,
each MoE layer keeps the experts its router used most on calibration data (router rows and balancing bias cut to
match), and the default top-k is lowered. The result is an ordinary model of the same class whose config records
what it was cut from, so it saves, loads and runs with remote code like any other checkpoint.

This file travels with a saved model folder; it imports only torch, transformers and sibling modules.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Sequence
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


def evenly_spaced_layers(num_layers: int, keep: int) -> tuple[int, ...]:
    """`keep` layer indices out of `num_layers`, always the first and the last, the rest spread evenly between.

    Elastic depth training never skips the first or last layer (DESIGN.md §4), so a depth-reduced sub-model keeps
    them; spreading the kept interior layers evenly is our choice for a count given without indices.
    """
    if not 1 <= keep <= num_layers:
        raise ValueError(f"cannot keep {keep} of {num_layers} layers")
    if keep == 1:
        return (num_layers - 1,)
    step = (num_layers - 1) / (keep - 1)
    return tuple(sorted({round(i * step) for i in range(keep)}))


def _calibration_batches(calibration_data) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield (input_ids, attention_mask) from a tensor, a list of tensors / token lists, or dicts with input_ids."""
    if isinstance(calibration_data, torch.Tensor):
        calibration_data = [calibration_data]
    for i, item in enumerate(calibration_data):
        mask = None
        if isinstance(item, dict) or hasattr(item, "keys"):
            if "input_ids" not in item:
                raise ValueError(f"calibration batch {i} has no 'input_ids' (keys: {sorted(item.keys())})")
            ids, mask = item["input_ids"], item.get("attention_mask")
        else:
            ids = item
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"calibration batch {i} must hold (batch, seq) token ids, got shape {tuple(ids.shape)}")
        yield ids, (torch.as_tensor(mask) if mask is not None else None)


def _moe_routers(model) -> dict[str, torch.nn.Module]:
    """Every router of the model by the module path of its MoE block ("model.layers.3.mlp", "mtp.0.block.mlp")."""
    return {name[: -len(".gate")]: module for name, module in model.named_modules() if name.endswith("mlp.gate")}


@torch.no_grad()
def measure_expert_usage(model, calibration_data, spec: ElasticSpec | None = None) -> dict[str, torch.Tensor]:
    """Routing usage of every MoE block on calibration data: for each block path, an (E,) float tensor.

    Usage of an expert = the number of (token, slot) assignments it received, plus its summed combine weight as a
    tie-breaker below one assignment (so that among equally often chosen experts the one trusted more wins).
    Padding tokens (attention_mask 0) are not counted. The MTP modules' routers are measured too (the model runs
    them only in training, so they are called here directly on the backbone's output), so they can be cut
    consistently.
    """
    routers = _moe_routers(model)
    # Assignments and combine weights are summed apart over all batches and joined at the end: joined per batch,
    # the tie-breaks of many batches could add up to more than an assignment.
    counts_sum = {path: torch.zeros(r.num_experts, dtype=torch.float64) for path, r in routers.items()}
    weights_sum = {path: torch.zeros(r.num_experts, dtype=torch.float64) for path, r in routers.items()}
    current_mask: list[torch.Tensor | None] = [None]

    def hook_for(path):
        def hook(router, args, output):
            _, idx_TK, w_TK = output
            valid_TK = idx_TK < router.num_experts
            if current_mask[0] is not None:
                valid_TK = valid_TK & current_mask[0].to(idx_TK.device).view(-1, 1)
            idx = idx_TK[valid_TK].cpu()
            counts_sum[path] += torch.bincount(idx, minlength=router.num_experts).double()
            weights_sum[path].index_add_(0, idx, w_TK[valid_TK].detach().double().cpu())

        return hook

    handles = [r.register_forward_hook(hook_for(path)) for path, r in routers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_batches = 0
    try:
        for ids, mask in _calibration_batches(calibration_data):
            current_mask[0] = mask.bool().reshape(-1) if mask is not None else None
            ids = ids.to(device)
            mask = mask.to(device) if mask is not None else None
            outputs = model.model(input_ids=ids, attention_mask=mask, elastic_spec=spec, use_cache=False)
            if len(getattr(model, "mtp", ())):
                model._mtp_loss(outputs, ids, mask, None, ids, spec)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration_data holds no batch")
    # Each weight is at most 1 per assignment, so weights / (assignments + 1) stays below one assignment in total.
    return {path: counts + weights_sum[path] / (counts.sum() + 1.0) for path, counts in counts_sum.items()}


def _layer_map(config, layers) -> tuple[int, ...]:
    n = config.num_hidden_layers
    if layers is None:
        return tuple(range(n))
    if isinstance(layers, int):
        return evenly_spaced_layers(n, layers)
    kept = tuple(int(i) for i in layers)
    if not kept:
        raise ValueError("extract_submodel needs at least one layer")
    if list(kept) != sorted(set(kept)):
        raise ValueError(f"layers {list(kept)} must be distinct and in increasing order")
    bad = [i for i in kept if not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad} outside [0, {n})")
    return kept


@torch.no_grad()
def extract_submodel(
    model,
    layers: int | Sequence[int] | None = None,
    num_experts: int | None = None,
    top_k: int | None = None,
    calibration_data=None,
    experts: Sequence[int] | None = None,
    keep_correction_bias: bool = False,
):
    """Cut a trained ERNIE 5.0 model into a standalone elastic sub-model.

    Args:
        model (`Ernie5ForCausalLM`):
            The trained parent. It is not modified.
        layers (`int` or `Sequence[int]`, *optional*):
            Decoder layers to keep: explicit increasing indices, or a count (the first and last layer plus evenly
            spaced interior ones, see `evenly_spaced_layers`). `None` keeps all.
        num_experts (`int`, *optional*):
            Routed experts to keep in every MoE layer (MTP modules included). Each layer keeps the experts its
            router used most on `calibration_data`, measured with the kept layers only. `None` keeps all.
        top_k (`int`, *optional*):
            Default experts per token of the sub-model. `None` keeps the parent's, capped at `num_experts`.
        calibration_data (`torch.LongTensor`, list of tensors, or iterable of dicts with `input_ids`, *optional*):
            Token batches on which expert usage is measured; required when experts are cut by `num_experts`.
        experts (`Sequence[int]`, *optional*):
            Keep exactly these experts in every MoE layer instead of measuring usage (e.g. to reproduce an
            `ElasticSpec.expert_mask`). Exclusive with `num_experts`.
        keep_correction_bias (`bool`, *optional*, defaults to `False`):
            When experts are cut, keep the kept experts' balancing-bias values. By default they are reset to 0:
            elastic training routes a restricted expert set without the bias (DESIGN.md §4), so a zero bias
            reproduces exactly the routing the sub-model was trained with, and the bias starts from neutral if
            the sub-model is trained further. With all experts kept the bias is always kept.

    Returns:
        A model of the parent's class whose `config.elastic_source` records the parent's sizes and name, the kept
        layers and per-layer experts, and `active_fraction` / `total_fraction`: the sub-model's active and total
        non-embedding parameters over the parent's (full configuration). Its outputs equal the parent's run with
        `ElasticSpec(layers=kept, expert_mask=kept experts, top_k=top_k)` whenever every layer keeps the same
        expert set (always true with `experts=` or with all experts kept); `submodel_spec` builds that spec.

    Example:

    ```python
    >>> import torch
    >>> from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
    >>> from modeling_ernie5.elastic import extract_submodel
    >>> parent = Ernie5ForCausalLM(Ernie5Config.from_preset("tiny"))
    >>> child = extract_submodel(parent, layers=3, num_experts=4, top_k=1, calibration_data=torch.randint(0, 512, (2, 16)))
    >>> child.config.num_hidden_layers, child.config.num_experts, child.config.num_experts_per_tok
    (3, 4, 1)
    ```
    """
    parent_cfg = model.config
    kept_layers = _layer_map(parent_cfg, layers)
    if experts is not None:
        if num_experts is not None:
            raise ValueError("pass either num_experts (chosen by usage) or experts (explicit indices), not both")
        chosen = sorted({int(e) for e in experts})
        if len(chosen) != len(list(experts)) or not chosen or not all(0 <= e < parent_cfg.num_experts for e in chosen):
            raise ValueError(f"experts {list(experts)} must be distinct indices in [0, {parent_cfg.num_experts})")
        num_experts = len(chosen)
    n_experts = parent_cfg.num_experts if num_experts is None else int(num_experts)
    if not 1 <= n_experts <= parent_cfg.num_experts:
        raise ValueError(f"num_experts must lie in [1, {parent_cfg.num_experts}], got {num_experts}")
    k = min(parent_cfg.num_experts_per_tok, n_experts) if top_k is None else int(top_k)
    if not 1 <= k <= n_experts:
        raise ValueError(f"top_k must lie in [1, num_experts={n_experts}], got {top_k}")
    cut_experts = n_experts < parent_cfg.num_experts
    if cut_experts and experts is None and calibration_data is None:
        raise ValueError(
            f"extract_submodel keeps {n_experts} of {parent_cfg.num_experts} experts by measured routing usage and "
            "needs calibration_data (token batches) to measure it"
        )

    # Which experts each MoE block keeps, by path in the parent.
    routers = _moe_routers(model)
    if cut_experts and experts is not None:
        kept_experts = {path: torch.tensor(chosen) for path in routers}
    elif cut_experts:
        usage = measure_expert_usage(model, calibration_data, ElasticSpec(layers=kept_layers))
        kept_experts = {
            path: torch.sort(torch.topk(u, n_experts, sorted=True).indices).values for path, u in usage.items()
        }
    else:
        kept_experts = {path: torch.arange(parent_cfg.num_experts) for path in routers}
    kept_paths = {f"model.layers.{i}.mlp" for i in kept_layers}
    kept_experts = {p: e for p, e in kept_experts.items() if not p.startswith("model.layers.") or p in kept_paths}

    sub_cfg = copy.deepcopy(parent_cfg)
    sub_cfg.num_hidden_layers = len(kept_layers)
    sub_cfg.first_k_dense_replace = sum(1 for i in kept_layers if not parent_cfg.is_moe_layer(i))
    sub_cfg.num_experts = n_experts
    sub_cfg.num_experts_per_tok = k
    sub_cfg.elastic_min_experts = max(k, n_experts // 2)
    sub_cfg.elastic_min_top_k = min(getattr(parent_cfg, "elastic_min_top_k", 1), k)
    dense_kept = [i for i in kept_layers if not parent_cfg.is_moe_layer(i)]
    if dense_kept != list(kept_layers[: len(dense_kept)]):
        raise ValueError(f"kept layers {list(kept_layers)} put a dense layer after an MoE layer")

    # Parameter fractions against the parent's full configuration, embeddings excluded (the paper's convention).
    parent_counts = parameter_counts(parent_cfg)
    sub_counts = parameter_counts(sub_cfg)
    source = dict(getattr(parent_cfg, "elastic_source", None) or {})
    sub_cfg.elastic_source = {
        "parent_name_or_path": getattr(parent_cfg, "_name_or_path", "") or "",
        "parent_num_hidden_layers": parent_cfg.num_hidden_layers,
        "parent_num_experts": parent_cfg.num_experts,
        "parent_num_experts_per_tok": parent_cfg.num_experts_per_tok,
        "layers": list(kept_layers),
        "experts": {path: kept_experts[path].tolist() for path in sorted(kept_experts)} if cut_experts else None,
        "experts_chosen_by": ("given" if experts is not None else "routing usage on calibration data") if cut_experts else None,
        "correction_bias": "kept" if (keep_correction_bias or not cut_experts) else "reset to 0",
        "active_params": sub_counts["active"],
        "total_params": sub_counts["total"],
        "parent_active_params": parent_counts["active"],
        "parent_total_params": parent_counts["total"],
        "active_fraction": round(sub_counts["active"] / parent_counts["active"], 6),
        "total_fraction": round(sub_counts["total"] / parent_counts["total"], 6),
    }
    if source:  # cutting a cut model: keep the chain
        sub_cfg.elastic_source["previous"] = source
    sub_cfg._name_or_path = ""
    sub_cfg.validate_ernie5()

    sub = type(model)(sub_cfg)
    new_state = {}
    layer_index = {old: new for new, old in enumerate(kept_layers)}
    expert_tensor = re.compile(r"(.*\.mlp)\.(experts\.gate_up_proj|experts\.down_proj|gate\.weight|gate\.e_score_correction_bias)$")
    for name, tensor in model.state_dict().items():
        m = re.match(r"^(.*?layers\.)(\d+)(\..*)$", name)
        new_name = name
        if m and name.startswith(("model.layers.", "layers.")):
            old = int(m.group(2))
            if old not in layer_index:
                continue
            new_name = f"{m.group(1)}{layer_index[old]}{m.group(3)}"
        hit = expert_tensor.match(name)
        if hit and cut_experts:
            keep = kept_experts[hit.group(1)].to(tensor.device)
            tensor = tensor.index_select(0, keep)
            if hit.group(2).endswith("e_score_correction_bias") and not keep_correction_bias:
                tensor = torch.zeros_like(tensor)
        new_state[new_name] = tensor.clone()
    # assign=True: the sub-model takes the parent's tensors as they are (device and per-tensor dtype, e.g. a bf16
    # model with its fp32 routers)
    missing, unexpected = sub.load_state_dict(new_state, strict=False, assign=True)
    # expert_load is a non-persistent buffer; nothing else may be missing or left over
    missing = [n for n in missing if not n.endswith("expert_load")]
    if missing or unexpected:
        raise RuntimeError(f"extract_submodel could not map weights: missing {missing}, unexpected {unexpected}")
    for router in _moe_routers(sub).values():
        router.expert_load = torch.zeros_like(router.e_score_correction_bias, dtype=torch.float32)
    sub.train(model.training)
    return sub


def submodel_spec(sub_config, parent_config=None) -> ElasticSpec:
    """The `ElasticSpec` that runs, on the parent, the sub-model described by `sub_config.elastic_source`.

    Defined only when every MoE layer kept the same experts (or all of them); raises otherwise.
    """
    source = getattr(sub_config, "elastic_source", None)
    if not source:
        raise ValueError("config has no elastic_source: it was not produced by extract_submodel")
    mask = None
    if source.get("experts"):
        sets = {tuple(v) for v in source["experts"].values()}
        if len(sets) != 1:
            raise ValueError("the layers kept different experts; no single ElasticSpec expresses this sub-model")
        mask = torch.zeros(source["parent_num_experts"], dtype=torch.bool)
        mask[list(next(iter(sets)))] = True
    return ElasticSpec(layers=tuple(source["layers"]), expert_mask=mask, top_k=sub_config.num_experts_per_tok)


__all__ = ["ElasticSpec", "evenly_spaced_layers", "extract_submodel", "measure_expert_usage", "parameter_counts", "submodel_spec"]
