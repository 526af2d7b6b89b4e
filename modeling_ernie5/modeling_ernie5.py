"""PyTorch ERNIE 5.0: a decoder-only, ultra-sparse MoE transformer with Uni-RoPE (ERNIE 5.0 §2, DESIGN.md §3).

Read top to bottom in the order a token climbs the stack: attention, decoder layer, the pre-trained base class,
the backbone (`Ernie5Model`), the multi-token-prediction modules, the balancing losses and the causal LM head.
Router, experts and the MoE block live in `moe.py`; rotary embeddings in `rope.py`; mask rules in `masks.py`;
elastic sub-model specs in `elastic.py`.

References: ERNIE 5.0 Technical Report (arXiv 2602.04705); DeepSeek-V3 (auxiliary-loss-free balancing,
multi-token prediction); transformers' Qwen3-MoE and ERNIE 4.5 MoE modeling files (class layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_ernie5 import Ernie5Config
from .elastic import ElasticSpec
from .linear_cross_entropy import linear_cross_entropy
from .masks import mask_for_attention, packed_sequence_ids
from .multimodal_layout import image_positions_and_mask
from .moe import Ernie5Experts, Ernie5ExpertsSwitchMixin, Ernie5MLP, Ernie5SparseMoeBlock, Ernie5TopKRouter
from .rope import Ernie5UniRotaryEmbedding, apply_rotary_pos_emb
from .vision import Ernie5VisionModel, flip_bits

# transformers renamed the cache argument and output field from `past_key_values` to `cache` during 5.x; build
# outputs with whichever name the installed version declares.
CACHE_FIELD = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_field(cache: Cache | None) -> dict:
    """The cache as a constructor argument of an output, and nothing when there is none: set at construction it
    keeps its place in `to_tuple()` (loss, logits, cache, ...), and an absent cache lets generation's `"cache" in
    outputs` checks (beam search reorders whatever it finds) see that there is none."""
    return {} if cache is None else {CACHE_FIELD: cache}


class Ernie5RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()  # fp32 statistics: bf16 variance underflows for small activations
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, kv_heads, L, hd) -> (B, kv_heads * n_rep, L, hd)."""
    if n_rep == 1:
        return x
    b, h, l, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, l, d).reshape(b, h * n_rep, l, d)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    elif query.shape[2] > 1:
        q, k = query.shape[2], key.shape[2]
        causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


class Ernie5Attention(nn.Module):
    """Grouped-query attention; the kernel comes from transformers' attention registry (sdpa, eager, flex, ...)."""

    def __init__(self, config: Ernie5Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache: Cache | None = None, **kwargs):
        b, l, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, l, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attention_interface: Callable = eager_attention_forward
        if self.config._attn_implementation is not None:  # None: a standalone module, not built by a model
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        out, weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        return self.o_proj(out.reshape(b, l, -1)), weights


@dataclass
class Ernie5LayerRouting:
    """What the MoE block of one layer decided (None for dense layers)."""

    router_logits: torch.Tensor | None
    routing_indices: torch.Tensor | None


class Ernie5DecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Ernie5Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = Ernie5Attention(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = Ernie5SparseMoeBlock(config) if self.is_moe else Ernie5MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = Ernie5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = Ernie5RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: Cache | None = None,
        expert_mask: torch.Tensor | None = None,
        top_k: int | torch.Tensor | None = None,
        routing_indices: torch.Tensor | None = None,
        count_load: bool | torch.Tensor = False,
        **kwargs,
    ) -> tuple[torch.Tensor, Ernie5LayerRouting]:
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states), (cos, sin), attention_mask, cache=cache, **kwargs
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if self.is_moe:
            hidden_states, logits, idx = self.mlp(hidden_states, expert_mask, top_k, routing_indices, count_load)
            routing = Ernie5LayerRouting(logits, idx)
        else:
            hidden_states = self.mlp(hidden_states)
            routing = Ernie5LayerRouting(None, None)
        return residual + hidden_states, routing


class Ernie5PreTrainedModel(Ernie5ExpertsSwitchMixin, PreTrainedModel):
    config_class = Ernie5Config
    config: Ernie5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Ernie5DecoderLayer"]
    _skip_keys_device_placement = ["past_key_values", "cache"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False  # the router's per-expert dispatch is data dependent
    # Routing is precision-sensitive: the router weight and its balancing bias stay fp32 whatever the model dtype.
    _keep_in_fp32_modules_strict = ["mlp.gate.weight", "e_score_correction_bias"]
    _keys_to_ignore_on_load_unexpected = [r"mlp\.gate\.expert_load"]
    # `output_hidden_states` / `output_attentions` are collected by transformers' forward hooks on these modules.
    _can_record_outputs = {"hidden_states": Ernie5DecoderLayer, "attentions": OutputRecorder(Ernie5Attention, index=1)}
    # Every Auto class a saved folder maps to its own code (transformers writes only the saving class), so that
    # `trust_remote_code=True` loads it without this package through any of them, as the registered classes do.
    remote_code_auto_map = {
        "AutoModel": "modeling_ernie5.Ernie5Model",
        "AutoModelForCausalLM": "modeling_ernie5.Ernie5ForCausalLM",
        "AutoModelForSequenceClassification": "modeling_ernie5.Ernie5ForSequenceClassification",
    }

    @property
    def _ddp_params_and_buffers_to_ignore(self) -> list[str]:
        # DistributedDataParallel reads this: with its default `broadcast_buffers=True` it would copy rank 0's pending
        # expert loads over every rank's before the next forward, whose bias update then all-reduces rank 0's load
        # `world` times instead of the sum over ranks. The loads are per rank by design.
        return [name for name, _ in self.named_buffers() if name.endswith("expert_load")]

    def save_pretrained(self, save_directory, *args, **kwargs):
        if self._auto_class is not None:  # the code is saved with the weights: map every class it defines
            kept = {k: v for k, v in (self.config.auto_map or {}).items() if not k.startswith("AutoModel")}
            self.config.auto_map = {**kept, **self.remote_code_auto_map}
        return super().save_pretrained(save_directory, *args, **kwargs)

    def update_router_biases(self) -> None:
        """Apply the pending balancing step of every router (backbone and MTP). Training forwards do this on their
        own at their start; a trainer may call it after each backward instead, so checkpoints hold no pending
        load statistics. Collective under data parallelism: call it at the same point on every rank."""
        for module in self.modules():
            if isinstance(module, Ernie5TopKRouter):
                module.update_bias()

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, Ernie5Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Ernie5TopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.expert_load)
        elif isinstance(module, Ernie5UniRotaryEmbedding):
            fresh = Ernie5UniRotaryEmbedding(self.config)
            init.copy_(module.inv_freq, fresh.inv_freq)
            init.copy_(module.axes, fresh.axes)
        else:
            super()._init_weights(module)


@dataclass
class Ernie5ModelOutput(MoeModelOutputWithPast):
    """Backbone output; adds the experts chosen per layer (for routing replay and load statistics).

    Args:
        routing_indices (`tuple[torch.LongTensor]`, *optional*):
            Per MoE layer, the (B * L, K) expert indices chosen; returned when `output_routing_indices=True`.
        pre_norm_hidden_state (`torch.FloatTensor`, *optional*):
            Last layer's output before the final norm; feeds the multi-token-prediction modules.
    """

    routing_indices: tuple[torch.Tensor, ...] | None = None
    pre_norm_hidden_state: torch.Tensor | None = None


# Sequence boundaries of a padding-free (packed) batch that TRL's collator computes for varlen flash kernels.
FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def packed_text_sequences(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past_len: int):
    """Sequence index per token when the caller packed several text sequences into each row, else None.

    A padding-free batch (TRL's packing) has no attention mask and caller-given text positions (2D, or 3D with
    t = h = w) that restart at every sequence. Derived positions, masks, caches and image layouts are never packed.
    """
    if position_ids is None or attention_mask is not None or past_len > 0 or position_ids.shape[-1] < 2:
        return None
    if position_ids.dim() == 3:
        if position_ids.shape[0] != 3 or not bool((position_ids == position_ids[:1]).all()):
            return None  # a misshapen one is reported by the caller's shape check
        position_ids = position_ids[0]
    return packed_sequence_ids(position_ids) if position_ids.dim() == 2 else None


def text_positions(attention_mask: torch.Tensor | None, batch: int, q_len: int, past_len: int, device) -> torch.Tensor:
    """(B, Q) positions for text: count only real tokens so left padding does not shift a sequence."""
    if attention_mask is not None and attention_mask.dim() == 2:
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.clamp(min=0)[:, -q_len:].to(device)
    return torch.arange(past_len, past_len + q_len, device=device).unsqueeze(0).expand(batch, -1)


class Ernie5Model(Ernie5PreTrainedModel):
    """The ERNIE 5.0 backbone: embeddings, decoder layers and the final norm."""

    def __init__(self, config: Ernie5Config):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(Ernie5DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Ernie5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = Ernie5UniRotaryEmbedding(config)
        # Vision understanding and next-scale inputs (issue 5); text-only models have none.
        self.vision = Ernie5VisionModel(config.vision_config, config.hidden_size) if config.vision_config else None
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed_inputs(self, input_ids: torch.LongTensor, **multimodal_inputs) -> torch.Tensor:
        """Token embeddings, with non-text features placed at their placeholder tokens.

        Multimodal merging lives here, in the backbone, because TRL and `generate` call the backbone directly.
        Pixel inputs are absent on cached decode steps; then only text embeddings are returned.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, C, H, W)`, *optional*):
                Images to understand, in the order of their placeholder runs (row by row); their merged features
                replace the `image_token_id` embeddings.
            image_gen_bits (`list[torch.Tensor]`, *optional*):
                Per scale, `(num_images, s, s, bits)` tokens of the images being generated (teacher forcing); the
                next-scale inputs built from them replace the `image_gen_token_id` embeddings. In training the
                history is corrupted by bit flips (`vision_config.bit_flip_prob`).
        """
        embeds = self.embed_tokens(input_ids)
        pixel_values = multimodal_inputs.get("pixel_values")
        gen_bits = multimodal_inputs.get("image_gen_bits")
        if self.vision is None:
            if pixel_values is not None or gen_bits is not None:
                raise ValueError("image inputs were given to a text-only Ernie5 model (config.vision_config is None)")
            return embeds
        if pixel_values is not None:
            slots = input_ids == self.config.image_token_id
            per_image = self.config.vision_config.understanding_tokens_per_image
            if int(slots.sum()) != pixel_values.shape[0] * per_image:
                raise ValueError(
                    f"{int(slots.sum())} image placeholder tokens but {pixel_values.shape[0]} images x {per_image} "
                    "tokens each; build inputs with Ernie5Processor"
                )
            features = self.vision.understand(pixel_values).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), features)
        if gen_bits is not None:
            slots = input_ids == self.config.image_gen_token_id
            n_images = gen_bits[0].shape[0]
            per_image = self.config.vision_config.generation_tokens_per_image
            if int(slots.sum()) != n_images * per_image:
                raise ValueError(
                    f"{int(slots.sum())} generation placeholder tokens but {n_images} images x {per_image} tokens each"
                )
            history = flip_bits(gen_bits, self.config.vision_config.bit_flip_prob) if self.training else gen_bits
            scales = self.vision.scale_inputs(history, len(self.vision.scale_schedule))
            features = torch.cat(scales, dim=1).to(embeds.dtype)
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), features)
        return embeds

    def routers(self) -> list[Ernie5TopKRouter]:
        return [layer.mlp.gate for layer in self.layers if layer.is_moe]

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        past_key_values: Cache | None = None,
        elastic_spec: ElasticSpec | None = None,
        routing_indices: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        output_routing_indices: bool = False,
        **kwargs,
    ) -> Ernie5ModelOutput:
        r"""
        position_ids (`torch.LongTensor` of shape `(batch, seq)` or `(3, batch, seq)`, *optional*):
            Uni-RoPE positions; plain (batch, seq) ids mean text (t = h = w). Derived from the attention mask when
            not given, so left padding does not move a sequence's positions.
        elastic_spec (`ElasticSpec`, *optional*):
            Run a sub-model: skipped layers act as identity, routing restricted to an expert subset, smaller top-k.
        routing_indices (sequence of `torch.LongTensor`, *optional*):
            One (batch * seq, K) tensor per MoE layer: replay these expert choices instead of routing (RL routing
            replay). Combine weights are still computed from the current router probabilities.
        output_routing_indices (`bool`, *optional*):
            Return the expert indices each MoE layer chose.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Ernie5Model.forward needs exactly one of input_ids or inputs_embeds")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, **kwargs)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if not use_cache:
            cache = None
        spec = elastic_spec or ElasticSpec()
        if elastic_spec is not None:
            elastic_spec.validate(self.config)

        routers = self.routers()
        batch, q_len = inputs_embeds.shape[:2]
        count_load = self.training and spec.is_full and routing_indices is None
        count_load = tokens_to_count(attention_mask, batch, q_len) if count_load else False
        if self.training and torch.is_grad_enabled():
            # Apply the balancing step earned by the previous training forward. Doing it here, and not at the end of
            # that forward, keeps the routing identical when gradient checkpointing recomputes layers in backward.
            for router in routers:
                router.update_bias()

        past_len = cache.get_seq_length() if cache is not None else 0
        sequence_ids = packed_text_sequences(position_ids, attention_mask, past_len)
        if past_len == 0 and sequence_ids is None:
            # Image placeholders fix their own (t, h, w) positions and attention blocks; the backbone derives them
            # here too because TRL's loss and `generate` call it directly. The block-causal mask is needed even when
            # the caller gives positions; only a 4D mask of the caller's replaces it.
            found = image_positions_and_mask(input_ids, attention_mask, self.config, inputs_embeds.dtype, position_ids)
            if found is not None:
                position_ids, attention_mask, _ = found
        if position_ids is None:
            position_ids = text_positions(attention_mask, batch, q_len, past_len, inputs_embeds.device)
        if position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        if position_ids.shape[0] != 3 or position_ids.shape[1:] != (batch, q_len):
            raise ValueError(
                f"position_ids must have shape (batch, seq) or (3, batch, seq) = (3, {batch}, {q_len}), "
                f"got {tuple(position_ids.shape)}"
            )
        mask = mask_for_attention(
            self.config._attn_implementation, attention_mask, batch, q_len, past_len, inputs_embeds.dtype,
            inputs_embeds.device, sequence_ids,
        )  # fmt: skip
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        attn_kwargs = {}
        if sequence_ids is not None and "flash" in (self.config._attn_implementation or ""):
            # Flash kernels take no mask for packed rows: they cut them at these boundaries (varlen).
            attn_kwargs = {k: kwargs[k] for k in FLASH_VARLEN_KWARGS if k in kwargs}
            attn_kwargs["position_ids"] = position_ids[0]

        hidden = inputs_embeds
        all_logits, all_idx = [], []
        moe_i = 0
        for layer in self.layers:
            if not spec.runs_layer(layer.layer_idx):
                if layer.is_moe:
                    moe_i += 1
                continue
            replay = routing_indices[moe_i] if (routing_indices is not None and layer.is_moe) else None
            hidden, routing = layer(
                hidden,
                mask,
                cos,
                sin,
                cache=cache,
                expert_mask=spec.expert_mask,
                top_k=spec.top_k,
                routing_indices=replay,
                count_load=count_load,
                **attn_kwargs,
            )
            if layer.is_moe:
                moe_i += 1
                all_logits.append(routing.router_logits)
                all_idx.append(routing.routing_indices)
        return Ernie5ModelOutput(
            last_hidden_state=self.norm(hidden),
            router_logits=tuple(all_logits) if output_router_logits else None,
            routing_indices=tuple(all_idx) if output_routing_indices else None,
            pre_norm_hidden_state=hidden,
            **cache_field(cache),
        )


class Ernie5MultiTokenPredictor(nn.Module):
    """One DeepSeek-V3-style MTP module: predicts token t+d+1 from the depth-(d-1) state at t and the embedding
    of token t+d. Shares the embedding and LM head with the main model; unused at inference."""

    def __init__(self, config: Ernie5Config, depth: int):
        super().__init__()
        self.hidden_norm = Ernie5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_norm = Ernie5RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Ernie5DecoderLayer(config, layer_idx=config.num_hidden_layers + depth)
        self.norm = Ernie5RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, next_embeds, mask, cos, sin, count_load: bool | torch.Tensor = False):
        x = self.eh_proj(torch.cat([self.hidden_norm(hidden), self.embed_norm(next_embeds)], dim=-1))
        x, routing = self.block(x, mask, cos, sin, count_load=count_load)
        return x, self.norm(x), routing


def real_token_mask(attention_mask: torch.Tensor | None, batch: int, q_len: int) -> torch.Tensor | None:
    """(batch, q_len) boolean mask of the real (non-padding) tokens of this forward; None without a mask. A mask
    is returned even when every token is real: checking that would stall a GPU on every training forward.

    From a 2D padding mask, or from a 4D (batch, 1, Q, K) boolean or additive mask (the multimodal block-causal
    one), where a key no query may attend to is padding: every real token at least attends to itself."""
    if attention_mask is None or attention_mask.shape[0] != batch or attention_mask.dim() not in (2, 4):
        return None
    if attention_mask.dim() == 4:
        allowed = attention_mask[:, 0]
        if allowed.dtype != torch.bool:
            allowed = allowed > torch.finfo(allowed.dtype).min / 2
        return allowed.any(1)[:, -q_len:]
    return attention_mask[:, -q_len:].bool()


def tokens_to_count(attention_mask: torch.Tensor | None, batch: int, q_len: int) -> bool | torch.Tensor:
    """The routers' `count_load` for a full-model training forward: every token (True) without a mask, else a (T,)
    mask of the real ones."""
    real = real_token_mask(attention_mask, batch, q_len)
    return True if real is None else real.reshape(-1)


def sequence_balance_loss(
    router_logits, routing_indices, num_experts: int, top_k: int, batch: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3's sequence-wise balance loss: sum_e f_e * P_e per sequence, averaged over sequences and layers,
    with f_e = E / (K * L) * (tokens of the sequence routed to e) and P_e the mean router probability.

    `token_mask` (batch, L), from `real_token_mask`, restricts both to real tokens (L = the sequence's real
    length), so padding neither counts nor changes the loss; sequences without a real token are left out."""
    losses = []
    for logits_TE, idx_TK in zip(router_logits, routing_indices):
        probs_BLE = logits_TE.softmax(-1).view(batch, -1, num_experts)
        seq_len = probs_BLE.shape[1]
        valid_BLK = (idx_TK < num_experts).view(batch, seq_len, -1)
        if token_mask is None:
            real_BL = torch.ones(batch, seq_len, dtype=torch.bool, device=idx_TK.device)
        else:
            real_BL = token_mask.to(idx_TK.device).view(batch, seq_len)
        valid_BLK = valid_BLK & real_BL[..., None]
        counts_BE = torch.zeros(batch, num_experts + 1, device=idx_TK.device).scatter_add_(
            1, idx_TK.view(batch, -1), valid_BLK.reshape(batch, -1).float()
        )[:, :num_experts]
        length_B = real_BL.sum(1)
        kept_B = (length_B > 0).to(probs_BLE.dtype)
        length_B1 = length_B.clamp(min=1)[:, None].to(probs_BLE.dtype)
        f_BE = counts_BE * num_experts / (top_k * length_B1)
        p_BE = (probs_BLE * real_BL[..., None]).sum(1) / length_B1
        # Mean over sequences with a real token, as masked sums (a boolean index would stall a GPU per layer).
        losses.append(((f_BE * p_BE).sum(-1) * kept_B).sum() / kept_B.sum().clamp(min=1))
    return torch.stack(losses).mean()


def router_z_loss(router_logits, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE's router z-loss: mean squared log-sum-exp of the router logits over tokens (real tokens only with a
    `token_mask`), averaged over layers."""
    real_T = None if token_mask is None else token_mask.reshape(-1)
    per_layer = []
    for logits_TE in router_logits:
        z_T = torch.logsumexp(logits_TE, dim=-1).pow(2)
        if real_T is None:
            per_layer.append(z_T.mean())
        else:
            real = real_T.to(z_T.device, z_T.dtype)
            per_layer.append((z_T * real).sum() / real.sum().clamp(min=1))
    return torch.stack(per_layer).mean()


@dataclass
class Ernie5CausalLMOutput(MoeCausalLMOutputWithPast):
    """Causal-LM output with the loss terms reported separately.

    Args:
        lm_loss (`torch.FloatTensor`, *optional*): next-token loss alone.
        mtp_loss (`torch.FloatTensor`, *optional*): mean multi-token-prediction loss over depths (unweighted).
        z_loss (`torch.FloatTensor`, *optional*): router z-loss (unweighted), when requested.
        routing_indices (`tuple[torch.LongTensor]`, *optional*): experts chosen per MoE layer.
    """

    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing_indices: tuple[torch.Tensor, ...] | None = None


class Ernie5ForCausalLM(Ernie5PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_rep"}

    def __init__(self, config: Ernie5Config):
        super().__init__(config)
        self.model = Ernie5Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(Ernie5MultiTokenPredictor(config, d) for d in range(config.num_nextn_predict_layers))
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        elastic_spec: ElasticSpec | None = None,
        routing_indices: list[torch.Tensor] | None = None,
        output_routing_indices: bool = False,
        **kwargs,
    ) -> Ernie5CausalLMOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch, seq)`, *optional*):
            Token ids to predict (shifted inside); -100 is ignored. With labels, the MTP modules add
            `mtp_loss_weight * mtp_loss`, and `router_aux_loss_coef` / `router_z_loss_coef` add their terms.
        elastic_spec, routing_indices, output_routing_indices: see `Ernie5Model.forward`.

        Example:

        ```python
        >>> import torch
        >>> from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
        >>> model = Ernie5ForCausalLM(Ernie5Config.from_preset("tiny"))
        >>> ids = torch.randint(0, 512, (2, 12))
        >>> out = model(ids, labels=ids)
        >>> out.logits.shape
        torch.Size([2, 12, 512])
        ```
        """
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        want_aux = labels is not None and (self.config.router_aux_loss_coef > 0 or self.config.router_z_loss_coef > 0)
        self._update_mtp_router_biases()
        outputs: Ernie5ModelOutput = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits or want_aux,
            elastic_spec=elastic_spec,
            routing_indices=routing_indices,
            output_routing_indices=output_routing_indices or output_router_logits or want_aux,
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        logits, lm_loss = self._logits_and_loss(hidden, labels, logits_to_keep, **kwargs)

        loss = mtp_loss = aux_loss = z_loss = None
        if labels is not None:
            loss = lm_loss
            # MTP is a training objective only: evaluation losses stay comparable to models without it.
            if len(self.mtp) and input_ids is not None and self.training:
                mtp_loss = self._mtp_loss(outputs, input_ids, attention_mask, position_ids, labels, elastic_spec, **kwargs)
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        if outputs.router_logits and outputs.routing_indices:
            batch, seq = hidden.shape[:2]
            real = real_token_mask(attention_mask, batch, seq)
            aux_loss = sequence_balance_loss(
                outputs.router_logits,
                outputs.routing_indices,
                self.config.num_experts,
                self.config.num_experts_per_tok,
                batch,
                real,
            )
            if self.config.router_z_loss_coef > 0:
                z_loss = router_z_loss(outputs.router_logits, real)
            if loss is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                if z_loss is not None:
                    loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)
        return Ernie5CausalLMOutput(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            router_logits=outputs.router_logits if output_router_logits else None,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            z_loss=z_loss,
            routing_indices=outputs.routing_indices if output_routing_indices else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **cache_field(getattr(outputs, CACHE_FIELD)),
        )

    def _update_mtp_router_biases(self) -> None:
        """Apply the balancing update of the MTP blocks' routers for the loads of the previous training forward (the
        backbone updates its own routers the same way at the start of its forward)."""
        if self.training and torch.is_grad_enabled():
            for module in self.mtp:
                if module.block.is_moe:
                    module.block.mlp.gate.update_bias()

    def _logits_and_loss(self, hidden, labels=None, logits_to_keep: int | torch.Tensor = 0, **kwargs):
        """`(logits, loss)` of the output head on `hidden`; the loss is None without labels, and the logits are
        None when the fused loss (`config.fused_linear_cross_entropy`, training only) skipped them."""
        fused = (
            labels is not None and self.config.fused_linear_cross_entropy and self.training
            and torch.is_grad_enabled() and isinstance(logits_to_keep, int) and logits_to_keep == 0
        )  # fmt: skip
        if fused:
            loss_kwargs = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index", "shift_labels") if k in kwargs}
            return None, linear_cross_entropy(hidden, self.lm_head.weight, labels, **loss_kwargs)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])
        loss = self.loss_function(logits, labels, self.vocab_size, **kwargs) if labels is not None else None
        return logits, loss

    def _mtp_loss(self, outputs, input_ids, attention_mask, position_ids, labels, elastic_spec, **kwargs):
        """Mean over depths of the loss of predicting token t+d+1 (d = 1..D) at position t."""
        batch, seq = input_ids.shape
        sequence_ids = packed_text_sequences(position_ids, attention_mask, 0)
        if sequence_ids is None:
            # The same rule as the backbone: image placeholders fix their own attention blocks, and their positions
            # unless the caller gave them.
            dtype = outputs.pre_norm_hidden_state.dtype
            found = image_positions_and_mask(input_ids, attention_mask, self.config, dtype, position_ids)
            if found is not None:
                position_ids, attention_mask, _ = found
        pos = position_ids if position_ids is not None else text_positions(attention_mask, batch, seq, 0, input_ids.device)
        if pos.dim() == 2:
            pos = pos.unsqueeze(0).expand(3, -1, -1)
        cos, sin = self.model.rotary_emb(outputs.pre_norm_hidden_state, pos)
        mask = mask_for_attention(
            self.config._attn_implementation, attention_mask, batch, seq, 0, cos.dtype, input_ids.device, sequence_ids
        )
        hidden = outputs.pre_norm_hidden_state
        count_load = tokens_to_count(attention_mask, batch, seq) if elastic_spec is None or elastic_spec.is_full else False
        # A caller that shifted the labels itself (context parallelism) passes `shift_labels`, where position t holds
        # token t+1's label; depth d needs token t+d+1's, so that tensor is shifted d further for each depth.
        shift_labels = kwargs.pop("shift_labels", None)
        losses = []
        for depth, module in enumerate(self.mtp, start=1):
            if seq <= depth + 1:
                break
            # Position t sees token t+depth; the last `depth` positions have no such token and are ignored.
            shifted_ids = F.pad(input_ids[:, depth:], (0, depth), value=0)
            hidden, normed, _ = module(hidden, self.model.embed_tokens(shifted_ids), mask, cos, sin, count_load)
            target = F.pad(labels[:, depth:], (0, depth), value=-100)
            if sequence_ids is not None:  # packed rows: a target in the next sequence is not this one's to predict
                # target[j] is token j+depth's label, predicted at position j-1 (the loss shifts by one).
                later = F.pad(sequence_ids[:, depth:], (0, depth), value=-1)
                target = target.masked_fill(later != F.pad(sequence_ids[:, :-1], (1, 0), value=-1), -100)
            if shift_labels is not None:
                shifted = F.pad(shift_labels[:, depth:], (0, depth), value=-100)  # token t+depth+1's label at t
                if sequence_ids is not None:
                    later = F.pad(sequence_ids[:, depth + 1 :], (0, depth + 1), value=-1)
                    shifted = shifted.masked_fill(later != sequence_ids, -100)
                kwargs["shift_labels"] = shifted
            losses.append(self._logits_and_loss(normed, target, **kwargs)[1])
        if not losses:
            return torch.zeros((), device=input_ids.device)
        return torch.stack(losses).mean()


class Ernie5ForSequenceClassification(GenericForSequenceClassification, Ernie5PreTrainedModel):
    """The backbone with a linear `score` head read at each sequence's last non-pad token: classifiers and the
    reward models of RL post-training (TRL's `RewardTrainer` loads one through `AutoModelForSequenceClassification`).
    Loss and pooling are transformers' generic ones; the MoE routers balance themselves as in the causal LM."""

    def __init__(self, config: Ernie5Config):
        # Not GenericForSequenceClassification.__init__: it builds the backbone through `AutoModel`, which a folder
        # loaded with `trust_remote_code=True` (no ernie5 package installed) cannot resolve.
        Ernie5PreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = Ernie5Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


__all__ = [
    "Ernie5Attention",
    "Ernie5CausalLMOutput",
    "Ernie5DecoderLayer",
    "Ernie5ForCausalLM",
    "Ernie5ForSequenceClassification",
    "Ernie5Model",
    "Ernie5ModelOutput",
    "Ernie5MultiTokenPredictor",
    "Ernie5PreTrainedModel",
    "Ernie5RMSNorm",
]
