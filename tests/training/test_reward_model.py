"""A reward model for RL post-training: `Ernie5ForSequenceClassification` trained with TRL's `RewardTrainer` on
preference pairs learns to rank held-out pairs."""

import random

import pytest
import torch
from datasets import Dataset

from modeling_ernie5 import Ernie5Config, Ernie5ForSequenceClassification
from processing.tokenizer import train_text_tokenizer


WORDS = ["red", "green", "blue", "cat", "dog", "sun", "moon", "tree"]


def preference_pairs(n: int, seed: int) -> Dataset:
    """The chosen answer repeats the word the prompt asks for, the rejected one says another word: the reward model
    has to read the prompt to rank a pair."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        asked, other = rng.sample(WORDS, 2)
        rows.append({"prompt": f"say {asked}:", "chosen": f" {asked}", "rejected": f" {other}"})
    return Dataset.from_list(rows)


@pytest.fixture(scope="module")
def dataset():
    return preference_pairs(192, seed=0)


def test_reward_trainer_learns_to_rank_held_out_pairs(dataset, tmp_path):
    from trl import RewardConfig, RewardTrainer

    tok = train_text_tokenizer([r["prompt"] + r["chosen"] + r["rejected"] for r in dataset], vocab_size=300)
    torch.manual_seed(0)
    config = Ernie5Config.from_preset(
        "tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, num_labels=1,
    )  # fmt: skip
    args = RewardConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=96,
        learning_rate=3e-3, logging_steps=16, report_to=[], save_strategy="no", use_cpu=True, seed=0,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=Ernie5ForSequenceClassification(config), args=args, train_dataset=dataset,
        eval_dataset=preference_pairs(64, seed=1), processing_class=tok,
    )  # fmt: skip
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    print(f"held-out pair accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, "
          f"loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}")
    # Measured: accuracy 0.52 -> 0.69, loss 0.69 -> 0.39 (chance: 0.5 and ln 2).
    assert after["eval_loss"] < before["eval_loss"] - 0.15
    assert after["eval_accuracy"] > before["eval_accuracy"] + 0.1
