"""Text corpora to language-modelling datasets: tokenise, append EOS, pack into fixed-length blocks."""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset


def pack_texts(tokenizer, texts: Sequence[str], block_size: int, add_eos: bool = True) -> Dataset:
    """Concatenate the tokenised texts (each followed by EOS) and cut them into `block_size` blocks.

    Packing wastes no compute on padding; the tail shorter than one block is dropped. Returns a `datasets.Dataset`
    with `input_ids` and `labels` (equal; the model shifts internally).
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if add_eos:
            stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"corpus of {len(stream)} tokens is shorter than one block of {block_size}")
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return Dataset.from_dict({"input_ids": blocks, "labels": [list(b) for b in blocks]})


def split_corpus(texts: Sequence[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """Split documents (not tokens) so validation text never appears in training."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n_val = max(1, int(len(texts) * val_fraction))
    return list(texts[n_val:]), list(texts[:n_val])


__all__ = ["pack_texts", "split_corpus"]
