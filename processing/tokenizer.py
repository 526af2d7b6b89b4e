"""Text tokenizer for ernie5: byte-level BPE trained offline with the `tokenizers` library (DESIGN.md §3).

ERNIE 5.0 does not describe its text tokenizer beyond its vocabulary (§3.1); any byte-level BPE serves the small
models built here. The tokenizer is wrapped as a transformers fast tokenizer with the special tokens the rest of
the package relies on (padding, BOS/EOS, chat turns, modality placeholders) and a chat template that accepts
both plain-string and typed-list message content, which is what processors and TRL's trainers send.

Also here: `builtin_corpus()`, a text corpus assembled at run time from the docstrings of the Python standard
library, so the demo and tests train on real English prose without downloading anything.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import random
import re
import sys
import warnings
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
IMAGE_TOKEN, AUDIO_TOKEN = "<image>", "<audio>"
# Image generation: a placeholder per predicted visual token, between begin/end-of-image markers (ERNIE 5.0 §2.2.3).
IMAGE_GEN_TOKEN, BOI, EOI = "<|image_gen|>", "<|boi|>", "<|eoi|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END, IMAGE_TOKEN, AUDIO_TOKEN, IMAGE_GEN_TOKEN, BOI, EOI]

# ChatML-style turns. Typed content lists render images/audio as their placeholder token so a processor can
# expand them; `add_generation_prompt` opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}{{ '<image>' }}"
    "{% elif part['type'] == 'audio' %}{{ '<audio>' }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Modules whose import has side effects (opens a GUI, prints, starts threads) or is very slow.
_SKIP_MODULES = ("antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "ensurepip")


def builtin_corpus(max_docs: int | None = None, min_chars: int = 80, seed: int = 0) -> list[str]:
    """Docstrings of the standard library's public modules, classes and functions, deduplicated and shuffled.

    Deterministic for a given Python version and seed. About 2 MB of English technical prose on CPython 3.11.
    """
    names = sorted(
        m.name
        for m in pkgutil.iter_modules()
        if m.name in sys.stdlib_module_names and not m.name.startswith("_") and m.name not in _SKIP_MODULES
    )
    seen: set[str] = set()
    docs: list[str] = []

    def add(doc: str | None) -> None:
        if not doc:
            return
        text = inspect.cleandoc(doc).strip()
        if len(text) >= min_chars and text not in seen:
            seen.add(text)
            docs.append(text)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except Exception:  # platform-specific modules (e.g. msvcrt) simply do not import here
                continue
            add(module.__doc__)
            for attr in sorted(vars(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr, None)
                if getattr(obj, "__module__", None) != module.__name__:
                    continue
                if inspect.isclass(obj) or inspect.isfunction(obj):
                    add(obj.__doc__)
                    if inspect.isclass(obj):
                        for meth in sorted(vars(obj)):
                            if not meth.startswith("_"):
                                add(getattr(vars(obj)[meth], "__doc__", None) if callable(vars(obj)[meth]) else None)
    random.Random(seed).shuffle(docs)
    return docs[:max_docs] if max_docs else docs


def train_text_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 512,
    dropout: float | None = None,
    min_frequency: int = 2,
    model_max_length: int = 2048,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    Args:
        texts (`Iterable[str]`): training text.
        vocab_size (`int`, *optional*, defaults to 512): final vocabulary size, special tokens included.
        dropout (`float`, *optional*): BPE dropout probability for training-time segmentation noise (Provilkov et
            al., 2020). It is stored in the tokenizer; call `set_bpe_dropout(tok, None)` for deterministic inference.
        min_frequency (`int`, *optional*, defaults to 2): minimum pair count for a merge.
        model_max_length (`int`, *optional*, defaults to 2048): recorded maximum sequence length.

    Returns:
        `PreTrainedTokenizerFast` with `<|pad|>`, `<|bos|>`, `<|eos|>`, chat tokens, `<image>`, `<audio>` and a chat
        template; left padding (what generation and TRL expect).
    """
    if dropout is not None and not 0.0 < dropout < 1.0:
        raise ValueError(f"BPE dropout must lie in (0, 1), got {dropout}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
            f"{len(alphabet) + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tok = Tokenizer(models.BPE(unk_token=None, dropout=dropout))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return wrap_tokenizer(tok, model_max_length)


def wrap_tokenizer(tok: Tokenizer, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=model_max_length,
    )


def set_bpe_dropout(tokenizer: PreTrainedTokenizerFast, dropout: float | None) -> None:
    """Switch BPE dropout on (training) or off (`None`, inference) in place."""
    tokenizer.backend_tokenizer.model.dropout = dropout


def normalise_whitespace(text: str) -> str:
    return re.sub(r"[ \t]+", " ", text).strip()


__all__ = [
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "builtin_corpus",
    "set_bpe_dropout",
    "train_text_tokenizer",
]
