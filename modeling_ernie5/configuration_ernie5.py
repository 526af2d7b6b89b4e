"""Configuration of ERNIE 5.0 models.

Field names follow transformers' shared MoE vocabulary (`num_experts`, `num_experts_per_tok`,
`moe_intermediate_size`, `output_router_logits`, `router_aux_loss_coef`, ...) so that TRL, peft, the
Trainer's MoE handling and the expert-parallel plans find them. Where the ERNIE 5.0 report is silent the
choices of DESIGN.md §3 apply; each is marked where it is made.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import PretrainedConfig

from .configuration_ernie5_vision import Ernie5VisionConfig

# How `experts.gate_up_proj` / `experts.down_proj` are stored: (E, out, in), like `nn.Linear` and transformers' MoE
# models. Written to every config.json; checkpoints saved before the field existed hold (E, in, out) and are refused
# with instructions instead of loading transposed weights silently (their shapes coincide whenever D == 2F).
EXPERT_WEIGHT_LAYOUT = "out_in"

# Presets. `tiny` is the shape used by tests and the demo; `ablation-3b` is the paper's small ablation model
# (ERNIE 5.0 §6.4.2: 16 layers, 64 experts, top-8, about 454M active / 3.2B total). The report gives no
# hidden or expert sizes; the values below were chosen so the parameter counts (embeddings excluded, the
# usual convention) land on the reported ones: 3.26B total, 444M active (see `elastic.parameter_counts`).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "ablation-3b": dict(
        vocab_size=103424,
        hidden_size=1024,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=64,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=1024,
        # With a shared expert the active count overshoots the reported 454M; the report does not say it has one.
        num_shared_experts=0,
        intermediate_size=4096,
        max_position_embeddings=8192,
    ),
}


def default_rope_section(num_pairs: int) -> list[int]:
    """Split `num_pairs` rotary frequency pairs among (t, h, w) in ERNIE 4.5-VL's 20:22:22 proportion."""
    h = round(num_pairs * 22 / 64)
    w = h
    t = num_pairs - h - w
    if t < 1:  # very small heads: keep at least one temporal pair
        t, h = 1, h - 1
    return [t, h, w]


class Ernie5Config(PretrainedConfig):
    r"""
    Configuration of an ERNIE 5.0 model: a decoder-only, ultra-sparse MoE transformer with Uni-RoPE and a
    modality-blind router in every layer. Defaults give the `tiny` preset.

    Only the fields new to this model are described; the rest carry their usual transformers meaning.

    Args:
        head_dim (`int`, *optional*, defaults to 16):
            Size of one attention head. `num_attention_heads * head_dim` need not equal `hidden_size`.
        rope_section (`list[int]`, *optional*):
            Number of rotary frequency pairs given to the (t, h, w) position axes; must sum to
            `head_dim // 2`. Defaults to ERNIE 4.5-VL's 20:22:22 proportion.
        moe_intermediate_size (`int`, *optional*, defaults to 32):
            Hidden size of one routed SwiGLU expert.
        num_shared_experts (`int`, *optional*, defaults to 1):
            Shared experts applied to every token; they form one SwiGLU MLP of width
            `num_shared_experts * moe_intermediate_size`. 0 disables them.
        first_k_dense_replace (`int`, *optional*, defaults to 0):
            Number of leading layers with a dense SwiGLU MLP (of width `intermediate_size`) instead of MoE.
            ERNIE 5.0 routes from the first layer on (§6.4.1), hence 0.
        moe_use_correction_bias (`bool`, *optional*, defaults to `True`):
            Auxiliary-loss-free balancing: a per-expert bias added to the routing scores for the top-k choice
            only, moved by `router_bias_update_rate * sign(load error)` after every training forward.
        router_bias_update_rate (`float`, *optional*, defaults to 1e-4):
            Step of the correction-bias update (ERNIE 5.0 §3.2: 1e-4 in pre-training, 1e-5 in mid-training). The
            step is taken once per training forward (micro-batch), on the loads summed over data-parallel ranks:
            with N gradient-accumulation micro-steps per optimizer step, the bias moves up to N steps per optimizer
            step, so divide the rate by N to keep the paper's per-iteration speed.
        router_aux_loss_coef (`float`, *optional*, defaults to 0.0):
            Weight of the sequence-level balancing loss (DeepSeek-V3 style); 0 disables it.
        router_z_loss_coef (`float`, *optional*, defaults to 0.0):
            Weight of the router z-loss `mean(logsumexp(logits)^2)`; 0 disables it.
        num_nextn_predict_layers (`int`, *optional*, defaults to 1):
            Depth of multi-token prediction (DeepSeek-V3 style MTP modules); 0 disables MTP.
        mtp_loss_weight (`float`, *optional*, defaults to 0.3):
            Weight of the mean MTP loss added to the next-token loss (ERNIE 5.0 §3.2).
        fused_linear_cross_entropy (`bool`, *optional*, defaults to `False`):
            In training with labels, compute the language-model (and MTP) losses chunk by chunk from the hidden
            states without materialising the logits (`modeling_ernie5.linear_cross_entropy`): less memory and a
            faster step with large vocabularies, but the output's `logits` is then `None`, which trainers that read
            the logits (e.g. TRL's token-accuracy metrics) do not accept.
        experts_backend (`str`, *optional*, defaults to `"auto"`):
            Expert-compute back-end: `"auto"` (fastest available), `"reference"`, or any name registered with
            `modeling_ernie5.moe.register_experts_backend` (the package registers `"cpu"` and `"triton"`).
        elastic_* (`float`):
            Sampling probabilities of elastic training (DESIGN.md §4); see `training.elastic_sampler`.
        elastic_min_experts (`int`, *optional*):
            Smallest expert subset a width-reduced sample routes over; subset sizes are drawn uniformly from
            `[elastic_min_experts, num_experts - 1]`. Defaults to `max(num_experts_per_tok, num_experts // 2)`,
            the paper's 64 -> 32 ablation (§6.4.2).
        elastic_min_top_k (`int`, *optional*, defaults to 1):
            Smallest top-k of a sparsity-reduced sample; k is drawn uniformly from
            `[elastic_min_top_k, num_experts_per_tok - 1]` (the paper's [1, 8] range, §6.4.2).
        elastic_source (`dict`, *optional*):
            Set by `modeling_ernie5.elastic.extract_submodel`: what this model was cut from (parent sizes, kept
            layers and experts) and its active / total parameter fractions of the parent.
        vision_config (`dict` or `Ernie5VisionConfig`, *optional*):
            Visual tokenizer, ViT and patch-merger settings; `None` (the default) builds a text-only model.
        image_token_id, image_gen_token_id, boi_token_id, eoi_token_id (`int`, *optional*):
            Text-vocabulary ids of the understanding placeholder, the generation placeholder and the begin/end of
            image markers; required when `vision_config` is set.

    Example:

    ```python
    >>> from modeling_ernie5 import Ernie5Config
    >>> config = Ernie5Config.from_preset("ablation-3b", num_hidden_layers=4)
    >>> config.num_experts, config.num_experts_per_tok
    (64, 8)
    ```
    """

    model_type = "ernie5"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_local_experts": "num_experts", "n_routed_experts": "num_experts"}
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
    }
    base_model_ep_plan = {
        "layers.*.mlp.gate": "ep_router",
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 16,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        rope_theta: float = 1_000_000.0,
        rope_section: list[int] | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 32,
        num_shared_experts: int = 1,
        first_k_dense_replace: int = 0,
        moe_use_correction_bias: bool = True,
        router_bias_update_rate: float = 1e-4,
        output_router_logits: bool = False,
        router_aux_loss_coef: float = 0.0,
        router_z_loss_coef: float = 0.0,
        num_nextn_predict_layers: int = 1,
        mtp_loss_weight: float = 0.3,
        fused_linear_cross_entropy: bool = False,
        experts_backend: str = "auto",
        elastic_depth_full_prob: float = 0.75,
        elastic_layer_retain_prob: float = 0.75,
        elastic_width_full_prob: float = 0.8,
        elastic_topk_full_prob: float = 0.8,
        elastic_min_experts: int | None = None,
        elastic_min_top_k: int = 1,
        elastic_source: dict | None = None,
        vision_config: dict | Any | None = None,
        image_token_id: int | None = None,
        image_gen_token_id: int | None = None,
        boi_token_id: int | None = None,
        eoi_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_section = list(rope_section) if rope_section is not None else default_rope_section(head_dim // 2)
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.num_shared_experts = num_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_use_correction_bias = moe_use_correction_bias
        self.router_bias_update_rate = router_bias_update_rate
        self.output_router_logits = output_router_logits
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.mtp_loss_weight = mtp_loss_weight
        self.fused_linear_cross_entropy = fused_linear_cross_entropy
        self.experts_backend = experts_backend
        self.elastic_depth_full_prob = elastic_depth_full_prob
        self.elastic_layer_retain_prob = elastic_layer_retain_prob
        self.elastic_width_full_prob = elastic_width_full_prob
        self.elastic_topk_full_prob = elastic_topk_full_prob
        self.elastic_min_experts = (
            elastic_min_experts if elastic_min_experts is not None else max(num_experts_per_tok, num_experts // 2)
        )
        self.elastic_min_top_k = elastic_min_top_k
        self.elastic_source = elastic_source
        # Vision (issue 5): None keeps the model text-only. Placeholder ids index the text vocabulary.
        if isinstance(vision_config, dict):
            vision_config = Ernie5VisionConfig(**vision_config)
        self.vision_config = vision_config
        self.image_token_id = image_token_id
        self.image_gen_token_id = image_gen_token_id
        self.boi_token_id = boi_token_id
        self.eoi_token_id = eoi_token_id
        # TRL reads `config.auto_map` without a guard; it must be an instance attribute (a class-level dict
        # would be shared and mutated by `register_for_auto_class`).
        self.auto_map = kwargs.pop("auto_map", None) or {}
        self.expert_weight_layout = kwargs.pop("expert_weight_layout", EXPERT_WEIGHT_LAYOUT)
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        self.validate_ernie5()

    def validate_ernie5(self) -> None:
        """Reject impossible combinations with an error naming the field."""
        if self.expert_weight_layout != EXPERT_WEIGHT_LAYOUT:
            raise ValueError(f"expert_weight_layout must be {EXPERT_WEIGHT_LAYOUT!r}, got {self.expert_weight_layout!r}")
        positive = [
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Ernie5Config.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Ernie5Config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim % 2:
            raise ValueError(f"Ernie5Config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"Ernie5Config.num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed "
                f"num_experts ({self.num_experts})"
            )
        if len(self.rope_section) != 3 or sum(self.rope_section) != self.head_dim // 2 or min(self.rope_section) < 0:
            raise ValueError(
                f"Ernie5Config.rope_section {self.rope_section} must hold three non-negative (t, h, w) pair counts "
                f"summing to head_dim // 2 = {self.head_dim // 2}"
            )
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(
                f"Ernie5Config.first_k_dense_replace ({self.first_k_dense_replace}) must lie in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]"
            )
        for name in ("num_shared_experts", "num_nextn_predict_layers", "intermediate_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"Ernie5Config.{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "elastic_depth_full_prob", "elastic_layer_retain_prob", "elastic_width_full_prob",
            "elastic_topk_full_prob", "attention_dropout",
        ):  # fmt: skip
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"Ernie5Config.{name} is a probability and must lie in [0, 1], got {value}")
        for name in ("router_bias_update_rate", "router_aux_loss_coef", "router_z_loss_coef", "mtp_loss_weight"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"Ernie5Config.{name} must be a finite number >= 0, got {value}")
        if not (isinstance(self.elastic_min_experts, int) and 1 <= self.elastic_min_experts <= self.num_experts):
            raise ValueError(
                f"Ernie5Config.elastic_min_experts must be an integer in [1, num_experts={self.num_experts}], "
                f"got {self.elastic_min_experts!r}"
            )
        if not (isinstance(self.elastic_min_top_k, int) and 1 <= self.elastic_min_top_k <= self.num_experts_per_tok):
            raise ValueError(
                f"Ernie5Config.elastic_min_top_k must be an integer in [1, num_experts_per_tok="
                f"{self.num_experts_per_tok}], got {self.elastic_min_top_k!r}"
            )
        if self.elastic_source is not None and not isinstance(self.elastic_source, dict):
            raise ValueError(f"Ernie5Config.elastic_source must be a dict or None, got {type(self.elastic_source)}")
        if self.rope_theta <= 0:
            raise ValueError(f"Ernie5Config.rope_theta must be positive, got {self.rope_theta}")
        if self.vision_config is not None:
            if not isinstance(self.vision_config, Ernie5VisionConfig):
                raise ValueError(
                    f"Ernie5Config.vision_config must be an Ernie5VisionConfig or a dict, got {type(self.vision_config)}"
                )
            for name in ("image_token_id", "image_gen_token_id", "boi_token_id", "eoi_token_id"):
                value = getattr(self, name)
                if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                    raise ValueError(
                        f"Ernie5Config.{name} must be a token id in [0, vocab_size={self.vocab_size}) when "
                        f"vision_config is set, got {value!r}"
                    )
            ids = [self.image_token_id, self.image_gen_token_id, self.boi_token_id, self.eoi_token_id]
            if len(set(ids)) != 4:
                raise ValueError(f"Ernie5Config image/BOI/EOI token ids must be distinct, got {ids}")

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs) -> "Ernie5Config":
        if "expert_weight_layout" not in config_dict:
            raise ValueError(
                "this ernie5 config.json has no 'expert_weight_layout': it was saved before the expert weights moved "
                "to the (E, out, in) layout and its experts.gate_up_proj / experts.down_proj are (E, in, out). Convert "
                "it with `python -m modeling_ernie5.convert_expert_layout OLD_DIR NEW_DIR`, or load it with "
                "trust_remote_code=True (the code saved next to it)"
            )
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Ernie5Config":
        """Build a config from a named preset (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown Ernie5 preset {name!r}; choose one of {sorted(PRESETS)}")
        fields = copy.deepcopy(PRESETS[name])
        fields.update(overrides)
        if "head_dim" in overrides and "rope_section" not in overrides:
            fields.pop("rope_section", None)
        return cls(**fields)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace


__all__ = ["Ernie5Config", "PRESETS"]
