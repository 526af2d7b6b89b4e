"""ERNIE 5.0 with images: `Ernie5ForConditionalGeneration` (ERNIE 5.0 §2.2; DESIGN.md §3 vision bullets).

One backbone, two heads: the text LM head (plus MTP) and the vision head, which predicts the bits of every token
of the scale being generated (Infinity-style bitwise classification; next-scale prediction, NFSP). Training is
teacher-forced scale by scale: the generation placeholders of an image carry the next-scale inputs built from the
ground-truth bits (history corrupted by bit flips in the backbone), the scale-wise block-causal mask lets all
tokens of a scale see each other and every coarser scale, and the bit loss is a weighted mean over scales
(equal weight per scale by default, which favours the early scales over a per-token mean).

Per-modality losses (text, vision) are reported separately and each is divided by a running estimate of its own
scale before they are summed, so neither dominates because of its units (issue 5, item 6).

`generate_image` produces images scale by scale from a prompt ending in `<boi>`, with optional classifier-free
guidance; text answers about images come from the usual `generate`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig
from transformers.cache_utils import DynamicCache
from transformers.utils.generic import can_return_tuple

from .configuration_ernie5 import Ernie5Config
from .elastic import ElasticSpec
from .masks import build_block_causal_mask
from .modeling_ernie5 import (
    CACHE_FIELD,
    Ernie5CausalLMOutput,
    Ernie5ForCausalLM,
    Ernie5Model,
    Ernie5MultiTokenPredictor,
    Ernie5PreTrainedModel,
    cache_field,
    real_token_mask,
    router_z_loss,
    sequence_balance_loss,
    text_positions,
)
from .multimodal_layout import ImageLayout, image_positions_and_mask, layout_positions_and_blocks
from .rope import image_position_ids


def repeat_image_blocks(images: torch.Tensor, counts: list[int], expand_size: int) -> torch.Tensor:
    """(sum(counts), ...) images of consecutive rows -> each row's block of `counts[r]` images repeated `expand_size`
    times in place, matching rows repeated with `repeat_interleave`."""
    if sum(counts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images for {sum(counts)} images' worth of placeholders in the rows")
    blocks = images.split(counts)
    return torch.cat([block for block in blocks for _ in range(expand_size)])


class Ernie5VisionHead(nn.Module):
    """Per-token bit logits of the scale being generated: a small MLP on the final hidden state."""

    def __init__(self, hidden_size: int, codebook_bits: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, hidden_size)
        self.fc2 = nn.Linear(hidden_size, codebook_bits)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(hidden)))


@dataclass
class Ernie5ConditionalGenerationOutput(Ernie5CausalLMOutput):
    """Output of `Ernie5ForConditionalGeneration.forward`.

    Args:
        text_loss (`torch.FloatTensor`, *optional*): next-token loss plus weighted MTP loss, before rescaling.
        vision_loss (`torch.FloatTensor`, *optional*): scale-weighted bit loss, before rescaling.
        vision_logits (`torch.FloatTensor`, *optional*): (num_gen_tokens, bits) logits at generation placeholders.
        loss_scales (`torch.FloatTensor`, *optional*): running (text, vision) loss scales used for rescaling.
        rope_deltas (`torch.LongTensor`, *optional*): per-row offset of the text position counter after images.
    """

    text_loss: torch.Tensor | None = None
    vision_loss: torch.Tensor | None = None
    vision_logits: torch.Tensor | None = None
    loss_scales: torch.Tensor | None = None
    rope_deltas: torch.Tensor | None = None


class Ernie5ForConditionalGeneration(Ernie5ForCausalLM):
    """ERNIE 5.0 over text and images: understanding (`pixel_values`), next-scale image generation
    (`gen_pixel_values` / `image_gen_bits` in training, `generate_image` at inference) and text generation.

    Example:

    ```python
    >>> import torch
    >>> from modeling_ernie5 import Ernie5Config
    >>> from modeling_ernie5.configuration_ernie5_vision import Ernie5VisionConfig
    >>> from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration
    >>> config = Ernie5Config(vocab_size=516, vision_config=Ernie5VisionConfig(), image_token_id=512,
    ...                       image_gen_token_id=513, boi_token_id=514, eoi_token_id=515)
    >>> model = Ernie5ForConditionalGeneration(config)
    >>> images = model.generate_image(torch.tensor([[1, 514]]), temperature=0.0)
    >>> images[0].size
    (32, 32)
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    remote_code_auto_map = {
        **Ernie5ForCausalLM.remote_code_auto_map,
        "AutoModelForImageTextToText": "modeling_ernie5_vl.Ernie5ForConditionalGeneration",
    }

    def __init__(self, config: Ernie5Config):
        Ernie5PreTrainedModel.__init__(self, config)
        self.model = Ernie5Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(Ernie5MultiTokenPredictor(config, d) for d in range(config.num_nextn_predict_layers))
        vc = config.vision_config
        self.vision_head = Ernie5VisionHead(config.hidden_size, vc.tokenizer_config.codebook_bits) if vc else None
        # Running (text, vision) loss scales; 0 = not yet seen. Not saved: they only steer training.
        self.register_buffer("loss_scales", torch.zeros(2), persistent=False)
        self.rope_deltas: torch.Tensor | None = None
        self.post_init()

    @property
    def layout(self) -> ImageLayout:
        return ImageLayout.from_config(self.config)

    @property
    def visual_tokenizer(self):
        return self.model.vision.tokenizer if self.model.vision is not None else None

    def load_visual_tokenizer(self, tokenizer) -> None:
        """Copy the weights of a separately trained `Ernie5VisualTokenizer` (same config) into this model."""
        if self.model.vision is None:
            raise ValueError("this model has no vision_config")
        self.model.vision.tokenizer.load_state_dict(tokenizer.state_dict())

    # --- inputs --------------------------------------------------------------------------------------------------

    def _positions_and_mask(self, input_ids, attention_mask, position_ids, past_len, dtype):
        """Uni-RoPE positions and the block-causal mask for sequences holding image tokens; decode steps
        continue the text counter with the deltas kept from the prefill."""
        if input_ids is None or self.config.vision_config is None:
            return position_ids, attention_mask
        if past_len == 0:
            self.rope_deltas = None
            found = image_positions_and_mask(input_ids, attention_mask, self.config, dtype, position_ids)
            if found is None:
                return position_ids, attention_mask
            position_ids, attention_mask, self.rope_deltas = found
            return position_ids, attention_mask
        if position_ids is None and self.rope_deltas is not None:
            batch, q_len = input_ids.shape
            pos = text_positions(attention_mask, batch, q_len, past_len, input_ids.device)
            position_ids = pos + self.rope_deltas.to(pos.device).view(-1, 1)
        return position_ids, attention_mask

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        """Repeat every row `expand_size` times (`num_return_sequences`, beams). Image inputs hold one entry per image,
        not per row, and the model scatters them over the rows in order, so each row's block of images is repeated
        instead of each image; a row's image count comes from its placeholder runs."""
        if expand_size == 1 or input_ids is None or self.config.vision_config is None:
            return super()._expand_inputs_for_generation(expand_size, is_encoder_decoder, input_ids, **model_kwargs)
        layout = self.layout
        understanding = ((input_ids == layout.image_token_id).sum(1) // layout.understanding_tokens).tolist()
        generation = ((input_ids == layout.image_gen_token_id).sum(1) // layout.generation_tokens).tolist()
        images = {}
        per_key = {"pixel_values": understanding, "gen_pixel_values": generation, "image_gen_bits": generation}
        for key, counts in per_key.items():
            value = model_kwargs.pop(key, None)
            if value is not None:
                images[key] = (
                    repeat_image_blocks(value, counts, expand_size) if isinstance(value, torch.Tensor)
                    else [repeat_image_blocks(v, counts, expand_size) for v in value]
                )  # fmt: skip
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, {**model_kwargs, **images}

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        cache = model_inputs.get(CACHE_FIELD)
        if cache is not None and cache.get_seq_length() > 0:
            # Images already generated in the context were embedded at prefill, like `pixel_values` (which the
            # generic code drops): decode steps hold no placeholders to put them in.
            model_inputs.pop("gen_pixel_values", None)
            model_inputs.pop("image_gen_bits", None)
        if self.config.vision_config is not None:
            # Positions of image sequences come from the token layout and the kept rope deltas, not from
            # the attention mask's running count that the generic code builds.
            model_inputs["position_ids"] = None
        return model_inputs

    # --- forward -------------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        elastic_spec: ElasticSpec | None = None,
        routing_indices: list[torch.Tensor] | None = None,
        output_routing_indices: bool = False,
        pixel_values: torch.FloatTensor | None = None,
        gen_pixel_values: torch.FloatTensor | None = None,
        image_gen_bits: list[torch.Tensor] | None = None,
        **kwargs,
    ) -> Ernie5ConditionalGenerationOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*):
            Images to understand, in placeholder order; absent on cached decode steps.
        gen_pixel_values (`torch.FloatTensor` of shape `(num_gen_images, 3, H, W)`, *optional*):
            Target images of generation samples; tokenized here by the visual tokenizer for teacher forcing.
        image_gen_bits (`list[torch.Tensor]`, *optional*):
            The same targets already tokenized: per scale `(num_gen_images, s, s, bits)`.
        labels (`torch.LongTensor`, *optional*):
            Text targets; positions holding image placeholders are ignored whatever their label.
        Other arguments: see `Ernie5ForCausalLM.forward`.
        """
        cache = cache if cache is not None else past_key_values
        self._update_mtp_router_biases()
        if gen_pixel_values is not None and image_gen_bits is None:
            if self.model.vision is None:
                raise ValueError("gen_pixel_values given to a text-only model (config.vision_config is None)")
            with torch.no_grad():
                image_gen_bits = self.model.vision.tokenizer.encode(gen_pixel_values)
        past_len = cache.get_seq_length() if cache is not None else 0
        embed_dtype = self.model.embed_tokens.weight.dtype
        position_ids, attention_mask = self._positions_and_mask(
            input_ids, attention_mask, position_ids, past_len, embed_dtype
        )
        mm_inputs = {}
        if pixel_values is not None:
            mm_inputs["pixel_values"] = pixel_values
        if image_gen_bits is not None:
            mm_inputs["image_gen_bits"] = image_gen_bits
        if labels is not None and self.config.vision_config is not None and input_ids is not None:
            image_slots = (input_ids == self.config.image_token_id) | (input_ids == self.config.image_gen_token_id)
            labels = labels.masked_fill(image_slots, -100)
        want_vision = image_gen_bits is not None and input_ids is not None
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        want_aux = labels is not None and (self.config.router_aux_loss_coef > 0 or self.config.router_z_loss_coef > 0)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits or want_aux,
            elastic_spec=elastic_spec,
            routing_indices=routing_indices,
            output_routing_indices=output_routing_indices or output_router_logits or want_aux,
            **mm_inputs,
            **{k: kwargs.pop(k) for k in ("output_hidden_states", "output_attentions") if k in kwargs},
        )
        hidden = outputs.last_hidden_state
        logits, lm_loss = self._logits_and_loss(hidden, labels, logits_to_keep, **kwargs)

        result = Ernie5ConditionalGenerationOutput(
            logits=logits, rope_deltas=self.rope_deltas, hidden_states=outputs.hidden_states,
            attentions=outputs.attentions, **cache_field(getattr(outputs, CACHE_FIELD)),
        )  # fmt: skip
        if labels is not None:
            result.lm_loss = lm_loss
            # MTP is a training objective only, as in the causal LM: evaluation losses stay comparable.
            if len(self.mtp) and input_ids is not None and self.training:
                if position_ids is None:
                    position_ids = text_positions(attention_mask, *input_ids.shape, 0, input_ids.device)
                result.mtp_loss = self._mtp_loss(
                    outputs, input_ids, attention_mask, position_ids, labels, elastic_spec, **kwargs
                )
        if outputs.router_logits and outputs.routing_indices:
            real = real_token_mask(attention_mask, *hidden.shape[:2])
            result.aux_loss = sequence_balance_loss(
                outputs.router_logits,
                outputs.routing_indices,
                self.config.num_experts,
                self.config.num_experts_per_tok,
                hidden.shape[0],
                real,
            )
            if self.config.router_z_loss_coef > 0:
                result.z_loss = router_z_loss(outputs.router_logits, real)
        if output_router_logits:
            result.router_logits = outputs.router_logits
        if output_routing_indices:
            result.routing_indices = outputs.routing_indices
        if want_vision:
            result.vision_logits = self.vision_head(hidden[input_ids == self.config.image_gen_token_id])
            result.vision_loss = self.bit_loss(result.vision_logits, image_gen_bits)
        return self._combine_losses(result)

    def bit_loss(self, logits: torch.Tensor, bits: list[torch.Tensor]) -> torch.Tensor:
        """Scale-weighted binary cross-entropy of the bit logits (num_images * tokens_per_image, bits)."""
        n = bits[0].shape[0]
        sizes = [b.shape[1] * b.shape[2] for b in bits]
        target = torch.cat([b.flatten(1, 2) for b in bits], dim=1).float()  # (n, tokens, bits)
        per_token = F.binary_cross_entropy_with_logits(
            logits.view(n, sum(sizes), -1).float(), target.to(logits.device), reduction="none"
        ).mean(-1)
        per_scale = torch.stack([chunk.mean() for chunk in per_token.split(sizes, dim=1)])
        weights = self.config.vision_config.scale_loss_weights
        w = torch.tensor(weights, device=per_scale.device) if weights is not None else torch.ones_like(per_scale)
        return (per_scale * w).sum() / w.sum()

    def _combine_losses(self, result: Ernie5ConditionalGenerationOutput) -> Ernie5ConditionalGenerationOutput:
        """Total loss. In training: text and vision losses each divided by its running scale (an EMA of its own
        value), weighted, summed, plus the router balancing / z-loss terms. In evaluation the same sum without the
        scales: a scaled loss is ~1 by construction (exactly 1 before any training step), which would make
        `eval_loss` say nothing about the model; unscaled, the text part is the next-token loss itself."""
        if result.lm_loss is not None:
            result.text_loss = result.lm_loss
            if result.mtp_loss is not None:
                result.text_loss = result.text_loss + self.config.mtp_loss_weight * result.mtp_loss
        vc = self.config.vision_config
        parts = [(0, result.text_loss, 1.0), (1, result.vision_loss, vc.vision_loss_weight if vc else 1.0)]
        terms = []
        for i, value, weight in parts:
            if value is None:
                continue
            if not self.training:
                terms.append(weight * value)
                continue
            with torch.no_grad():
                current = value.detach().float()
                old = self.loss_scales[i]
                momentum = vc.loss_scale_momentum if vc else 0.99
                self.loss_scales[i] = torch.where(old > 0, momentum * old + (1 - momentum) * current, current)
            terms.append(weight * value / self.loss_scales[i].clamp(min=1e-3))
        if not terms:
            return result
        loss = torch.stack(terms).sum()
        if result.aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * result.aux_loss.to(loss.device)
        if result.z_loss is not None:
            loss = loss + self.config.router_z_loss_coef * result.z_loss.to(loss.device)
        result.loss = loss
        result.loss_scales = self.loss_scales.clone()
        return result

    # --- image generation ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_image(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        uncond_input_ids: torch.LongTensor | None = None,
        uncond_attention_mask: torch.Tensor | None = None,
        temperature: float | Sequence[float] = 1.0,
        generator: torch.Generator | None = None,
        return_bits: bool = False,
        pixel_values: torch.FloatTensor | None = None,
        gen_pixel_values: torch.FloatTensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        """Generate one image per prompt by next-scale prediction, decoded to PIL images.

        The processor's output can be passed as is: `model.generate_image(**processor(text=[...], images=[...]))`.

        Args:
            input_ids (`torch.LongTensor` of shape `(B, L)`): left-padded prompts, each ending with `<boi>`.
            attention_mask (`torch.Tensor` of shape `(B, L)`, *optional*): 1 for real tokens.
            guidance_scale (`float`, *optional*, defaults to 1.0): classifier-free guidance weight; values other than
                1 also run the unconditional prompts and use `uncond + scale * (cond - uncond)` bit logits.
            uncond_input_ids (`torch.LongTensor`, *optional*): unconditional prompts (same length as `input_ids`);
                defaults to `<boi>` alone.
            uncond_attention_mask (`torch.Tensor`, *optional*): their mask.
            temperature (`float` or `list[float]`, *optional*, defaults to 1.0): bit sampling temperature, one for
                all scales or one per scale (coarse to fine); 0 takes the likelier bit.
            generator (`torch.Generator`, *optional*): for reproducible sampling.
            return_bits (`bool`, *optional*): also return the per-scale bits.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`, *optional*): the images of the
                prompts' `<image>` placeholders (those of `input_ids`, then of `uncond_input_ids`), in order.
            gen_pixel_values (`torch.FloatTensor`, *optional*): images generated earlier in the prompts (complete
                runs of generation placeholders), in order.
            position_ids (`torch.Tensor`, *optional*): ignored; the positions follow from the ids (accepted so that
                batches carrying them can be passed as they are).

        Returns:
            `list[PIL.Image.Image]` (and the bits when `return_bits`).
        """
        if self.model.vision is None:
            raise ValueError("generate_image needs a model with vision_config")
        from PIL import Image

        was_training = self.training
        self.eval()
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (input_ids[:, -1] != self.config.boi_token_id).any():
            raise ValueError("every prompt must end with the <boi> token (left-pad prompts of different lengths)")
        if attention_mask.dim() != 2:
            raise ValueError(
                f"generate_image takes the (B, L) padding mask, not a mask of shape {tuple(attention_mask.shape)}"
            )
        for token, images, name in (
            (self.config.image_token_id, pixel_values, "pixel_values"),
            (self.config.image_gen_token_id, gen_pixel_values, "gen_pixel_values"),
        ):
            if images is None and bool((input_ids == token).any()):
                raise ValueError(f"the prompts hold image placeholders (id {token}) but no {name} were given")
        schedule = self.model.vision.scale_schedule
        temperatures = [float(temperature)] * len(schedule) if isinstance(temperature, (int, float)) else list(temperature)
        if len(temperatures) != len(schedule) or min(temperatures) < 0:
            raise ValueError(
                f"temperature must be >= 0, one value or one per scale ({len(schedule)}), got {temperature!r}"
            )
        use_cfg = guidance_scale != 1.0
        if use_cfg:
            if uncond_input_ids is None:
                uncond_input_ids = torch.full_like(input_ids, self.config.pad_token_id or 0)
                uncond_input_ids[:, -1] = self.config.boi_token_id
                uncond_attention_mask = torch.zeros_like(attention_mask)
                uncond_attention_mask[:, -1] = 1
            elif uncond_attention_mask is None:
                uncond_attention_mask = torch.ones_like(uncond_input_ids)
            width = max(input_ids.shape[1], uncond_input_ids.shape[1])
            pad = lambda t, v: F.pad(t, (width - t.shape[1], 0), value=v)  # noqa: E731
            input_ids = torch.cat([pad(input_ids, 0), pad(uncond_input_ids, 0)])
            attention_mask = torch.cat([pad(attention_mask, 0), pad(uncond_attention_mask, 0)])
        rows = input_ids.shape[0]
        device = input_ids.device
        dtype = self.model.embed_tokens.weight.dtype
        cache = DynamicCache(config=self.config)
        positions, blocks, _ = layout_positions_and_blocks(input_ids, attention_mask, self.layout)
        mask = build_block_causal_mask(blocks, attention_mask, dtype)
        images = {}
        if pixel_values is not None:
            images["pixel_values"] = pixel_values
        if gen_pixel_values is not None:
            images["image_gen_bits"] = self.model.vision.tokenizer.encode(gen_pixel_values)
        self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, **images
        )
        start = positions.amax(dim=(0, 2)) + 1  # (rows,) image frame index = next text counter
        full = schedule[-1]
        key_mask = attention_mask.bool()
        bits: list[torch.Tensor] = []
        bit_count = self.config.vision_config.tokenizer_config.codebook_bits
        for k, s in enumerate(schedule):
            inputs = self.model.vision.scale_inputs(bits, k + 1, batch=rows)[k].to(dtype)
            n = s * s
            pos = torch.stack([image_position_ids(s, full, 0.0)] * rows, dim=1).to(device) + start.view(1, -1, 1)
            key_mask = torch.cat([key_mask, torch.ones(rows, n, dtype=torch.bool, device=device)], dim=1)
            step_mask = key_mask[:, None, None, :].expand(rows, 1, n, key_mask.shape[1])
            out = self.model(inputs_embeds=inputs, attention_mask=step_mask, position_ids=pos, cache=cache, use_cache=True)
            logits = self.vision_head(out.last_hidden_state).float()  # (rows, n, bits)
            if use_cfg:
                cond, uncond = logits[:batch], logits[batch:]
                logits = uncond + guidance_scale * (cond - uncond)
            if temperatures[k] == 0:
                sampled = (logits > 0).to(torch.uint8)
            else:
                probs = torch.sigmoid(logits / temperatures[k])
                sampled = (torch.rand(probs.shape, generator=generator, device=probs.device) < probs).to(torch.uint8)
            sampled = sampled.view(batch, s, s, bit_count)
            bits.append(torch.cat([sampled, sampled]) if use_cfg else sampled)
        final_bits = [b[:batch] for b in bits]
        pixels = self.model.vision.tokenizer.decode(final_bits)
        images = [
            Image.fromarray(((p.permute(1, 2, 0).float().cpu().numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8"))
            for p in pixels
        ]
        self.train(was_training)
        return (images, final_bits) if return_bits else images


__all__ = [
    "Ernie5ConditionalGenerationOutput",
    "Ernie5ForConditionalGeneration",
    "Ernie5VisionHead",
    "repeat_image_blocks",
]


def _register() -> None:
    from transformers import AutoModel, AutoModelForImageTextToText

    from .configuration_ernie5_vision import Ernie5VisualTokenizerConfig
    from .visual_tokenizer import Ernie5VisualTokenizer

    AutoModelForImageTextToText.register(Ernie5Config, Ernie5ForConditionalGeneration, exist_ok=True)
    Ernie5ForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    AutoConfig.register("ernie5_visual_tokenizer", Ernie5VisualTokenizerConfig, exist_ok=True)
    AutoModel.register(Ernie5VisualTokenizerConfig, Ernie5VisualTokenizer, exist_ok=True)
    Ernie5VisualTokenizerConfig.register_for_auto_class()
    Ernie5VisualTokenizer.register_for_auto_class("AutoModel")


_register()
