"""Fixtures shared by the RL test modules: a tokenizer trained on the module's `dataset` and a tiny ernie5 model
sized to it. Each module defines its own `dataset` fixture."""

import os
import signal
import subprocess

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


def _run_launcher(cmd, cwd, env, timeout: float) -> subprocess.CompletedProcess:
    """Run a multi-process launcher (`torchrun`, `accelerate launch`) in its own process group; past `timeout`
    the whole group is killed, so a hung rank fails the test instead of outliving it as an orphan."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[2:4]} still running after {timeout} s; killed.\n{out[-2000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture
def run_launcher():
    """`run_launcher(cmd, cwd, env, timeout)`: a launcher run whose ranks never outlive the test."""
    return _run_launcher
