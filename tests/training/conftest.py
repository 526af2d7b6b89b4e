"""Fixtures shared by the RL test modules: a tokenizer trained on the module's `dataset` and a tiny ernie5 model
sized to it. Each module defines its own `dataset` fixture."""

import pytest
import torch

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from processing.tokenizer import train_text_tokenizer


@pytest.fixture(scope="module")
def tokenizer(dataset):
    texts = list(dataset["prompt"]) + [f" {a}" for a in dataset["answer"]]
    return train_text_tokenizer(texts, vocab_size=512)


def _tiny_ernie5(tokenizer, seed: int = 0) -> Ernie5ForCausalLM:
    torch.manual_seed(seed)
    config = Ernie5Config.from_preset(
        "tiny",
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Ernie5ForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_ernie5():
    """Builder of a tiny ernie5 causal LM whose vocabulary and special ids match a tokenizer."""
    return _tiny_ernie5
