"""Tiny random models for the eval tests, built from scratch (no download).

A byte-level BPE tokenizer is trained on a few sentences and a two-layer Llama causal LM is built on it; the
tiny Llava comes from the tool runtime's builder (`processing.tools.tiny_models`). Both are saved with their
processor / tokenizer, so the runner loads them through the Auto classes exactly as it loads a real checkpoint.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

# role: text, with "<image>" where an image part is; the newline is emitted as an expression because
# chat templates are rendered with trim_blocks.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: "
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_CORPUS = [
    "What is this person's current club? Al Nassr FC. Answer the question with a short phrase.",
    "Search results: 1. Paris: the capital of France. Query: capital of France",
    "他的第三个孩子叫什么名字？莱昂纳多·迪卡普里奥没有任何孩子。请用简短的词语回答。",
    "Write one web search query. Options: A. cat B. dog C. bird. The answer is B.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<pad>", "<s>", "</s>", "<image>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _text_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_tiny_llava(path) -> str:
    """A tiny LlavaForConditionalGeneration + LlavaProcessor saved under `path` (the tool runtime's builder,
    with this file's corpus so the eval prompts tokenise into few pieces)."""
    from processing.tools.tiny_models import build_tiny_vlm

    return build_tiny_vlm(path, texts=_CORPUS, image_size=16)


def save_tiny_causal_lm(path) -> str:
    """A tiny text-only LlamaForCausalLM + tokenizer saved under `path`."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(_text_config(tokenizer)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
