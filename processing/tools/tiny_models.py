"""Tiny random-weight checkpoints for offline smoke tests and demos (DESIGN.md §1: nothing downloads).

They exercise the real loading and inference code of the detection and caption operators and of SFT;
their outputs are noise. Tokenizers are built locally: a byte-level CLIP vocabulary for OWL-ViT and a
small BPE trained with `tokenizers` for the Llava-style VLM, with a chat template.
"""

from __future__ import annotations

import os

VLM_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Assistant turns are wrapped in {% generation %} so `return_assistant_tokens_mask=True` works.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|>"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_DEFAULT_TEXTS = [
    "<THOUGHT>The image shows a red circle and a blue square.</THOUGHT><OPERATOR>ocr</OPERATOR><SIGNAL>continue</SIGNAL>",
    "Here are ocr results from the previous step:-ocr information: 42 Please continue your reasoning.",
    "<THOUGHT>reasoning</THOUGHT><ANSWER>The answer is: green triangle</ANSWER> label_bbox image_caption face_detection",
    "How many shapes are there? Answer the question using a single word or phrase. yellow purple orange",
]


def build_tiny_owlvit(path: str | os.PathLike, image_size: int = 64, seed: int = 0) -> str:
    """Save a random OWL-ViT detector with its processor to `path`; return the path (same seed, same weights)."""
    import torch
    from transformers import (
        CLIPTokenizer,
        OwlViTConfig,
        OwlViTForObjectDetection,
        OwlViTImageProcessorPil,
        OwlViTProcessor,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # A byte-level vocabulary with no merges: every word is split into bytes, which is all a random
    # model needs and avoids shipping CLIP's 49k-entry vocabulary.
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = OwlViTConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=32,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=16,
        ),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = OwlViTForObjectDetection(config).eval()
    # Random heads emit degenerate boxes and ~1e-20 scores. Zeroing the last box layer and the logit
    # scale/shift puts them at their neutral point: each patch predicts its own grid-cell box, and scores
    # are sigmoid(cosine similarity) of random embeddings, so the pipeline returns well-formed detections.
    with torch.no_grad():
        for layer in (model.box_head.dense2, model.class_head.logit_shift, model.class_head.logit_scale):
            layer.weight.zero_()
            layer.bias.zero_()
    size = {"height": image_size, "width": image_size}
    processor = OwlViTProcessor(image_processor=OwlViTImageProcessorPil(size=size, crop_size=size), tokenizer=tokenizer)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def train_tiny_tokenizer(texts: list[str] | None = None, vocab_size: int = 512):
    """Train a byte-level BPE on `texts` and wrap it as a fast tokenizer with the VLM special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=VLM_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((texts or []) + _DEFAULT_TEXTS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=VLM_CHAT_TEMPLATE,
    )


def build_tiny_vlm(path: str | os.PathLike, texts: list[str] | None = None, image_size: int = 32, seed: int = 0) -> str:
    """Save a random Llava-style VLM (CLIP vision tower + Llama decoder) with its processor; return the path.

    Loads with `AutoModelForImageTextToText` / `AutoProcessor` and the `image-text-to-text` pipeline.
    """
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = train_tiny_tokenizer(texts)
    pad, bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>"))
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=pad,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    import torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = pad
    model.generation_config.eos_token_id = eos
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=VLM_CHAT_TEMPLATE,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
