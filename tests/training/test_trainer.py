"""HF Trainer on an ernie5 model: loss falls, gradient checkpointing, bf16 on CPU, loss-part logging."""

import pytest
import torch
from transformers import TrainingArguments

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from processing.text_data import pack_texts, split_corpus
from processing.tokenizer import builtin_corpus, train_text_tokenizer
from training.trainer import Ernie5Trainer, precision_defaults_for_this_machine

from two_ranks import run_on_two_ranks


@pytest.fixture(scope="module")
def data():
    docs = builtin_corpus(max_docs=120)
    train_docs, val_docs = split_corpus(docs, 0.1)
    tok = train_text_tokenizer(train_docs, vocab_size=400)
    return tok, pack_texts(tok, train_docs, 32), pack_texts(tok, val_docs, 32)


def make_model(tok, **overrides):
    torch.manual_seed(0)
    cfg = Ernie5Config.from_preset(
        "tiny", vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **overrides
    )
    return Ernie5ForCausalLM(cfg)


def run(tmp_path, tok, train_ds, val_ds, steps=12, **args):
    model = make_model(tok, router_aux_loss_coef=0.01)
    targs = TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=8, learning_rate=5e-3,
        logging_steps=4, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, **args,
    )  # fmt: skip
    trainer = Ernie5Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    return trainer, before, after


def test_training_lowers_validation_loss_and_logs_loss_parts(tmp_path, data):
    tok, train_ds, val_ds = data
    trainer, before, after = run(tmp_path, tok, train_ds, val_ds)
    assert after < before
    logs = [h for h in trainer.state.log_history if "loss" in h and "eval_loss" not in h]
    assert logs and all(k in logs[-1] for k in ("lm_loss", "mtp_loss", "aux_loss", "router_bias_absmax"))
    assert logs[-1]["router_bias_absmax"] > 0  # the balancing bias moved during training


def test_gradient_checkpointing_gives_the_same_gradients():
    tok = train_text_tokenizer(["abc def ghi jkl"] * 10, vocab_size=270)
    x = torch.randint(3, len(tok), (2, 16))
    grads = []
    for ckpt in (False, True):
        model = make_model(tok)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_trainer_with_gradient_checkpointing_and_bf16_on_cpu(tmp_path, data):
    tok, train_ds, val_ds = data
    trainer, before, after = run(
        tmp_path, tok, train_ds, val_ds, steps=6, bf16=True, gradient_checkpointing=True,
    )
    assert after < before
    router = trainer.model.model.layers[0].mlp.gate
    assert router.e_score_correction_bias.dtype == torch.float32


class _OrderRecorder:
    """Stand-in for the trainer's `Accelerator` (its own teardown is accelerate's business): records the calls and,
    at `end_training`, whether the DDP wrapper was already gone while the process group was still up."""

    def __init__(self, wrapper):
        import weakref

        self._models = [wrapper]
        self.wrapper_ref = weakref.ref(wrapper)
        self.calls = []

    def wait_for_everyone(self):
        self.calls.append("wait")
        torch.distributed.barrier()

    def free_memory(self):
        self.calls.append("free")
        self._models = []

    def end_training(self):
        self.calls.append(("end", self.wrapper_ref() is None, torch.distributed.is_initialized()))
        torch.distributed.destroy_process_group()


def test_end_distributed_training_drops_the_ddp_wrapper_before_the_process_group(tmp_path):
    """A gloo group destroyed from the DDP reducer's destructor can hang a rank (see `end_distributed_training`):
    the wrapper must be released first, with the group still registered, and the group destroyed after."""
    from types import SimpleNamespace

    from training.trainer import end_distributed_training

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = torch.nn.Linear(4, 4)
        wrapper = torch.nn.parallel.DistributedDataParallel(model)
        wrapper(torch.randn(2, 4)).sum().backward()
        trainer = SimpleNamespace(model=model, model_wrapped=wrapper, accelerator=_OrderRecorder(wrapper))
        del wrapper
        end_distributed_training(trainer)
        assert trainer.accelerator.calls == ["wait", "free", ("end", True, True)]
        assert trainer.model_wrapped is model and not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    end_distributed_training(trainer)  # no process group: nothing to do
    assert len(trainer.accelerator.calls) == 3


def test_precision_defaults_follow_the_machine(monkeypatch):
    """TRL's configs default to bf16, which a CPU-only machine rejects without `use_cpu`: the TRL scripts default to
    fp32 on the CPU there, keep bf16 on a CUDA GPU that has it, and leave other accelerators to TRL."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    assert precision_defaults_for_this_machine() == {"use_cpu": True, "bf16": False}
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert precision_defaults_for_this_machine() == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert precision_defaults_for_this_machine() == {"bf16": supported}


def _loss_parts_on_rank(rank, parts):
    from training.trainer import mean_loss_parts

    return mean_loss_parts(parts[rank], torch.device("cpu"))


def test_loss_parts_are_averaged_over_every_process(tmp_path):
    """Two gloo processes with different recorded parts log the same means, taken over both processes' records
    (a term only one process recorded is that process's mean); without a process group, the local means."""
    from training.trainer import mean_loss_parts

    parts = [{"lm_loss": [1.0, 3.0]}, {"lm_loss": [5.0], "mtp_loss": [2.0]}]
    logged = run_on_two_ranks(_loss_parts_on_rank, tmp_path, parts)
    assert logged[0] == logged[1] == {"lm_loss": 3.0, "mtp_loss": 2.0}
    assert mean_loss_parts(parts[0], torch.device("cpu")) == {"lm_loss": 2.0}


def _bias_update_on_rank(rank):
    from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM

    torch.manual_seed(0)
    model = Ernie5ForCausalLM(Ernie5Config.from_preset("tiny", num_hidden_layers=1, num_nextn_predict_layers=0))
    ddp = torch.nn.parallel.DistributedDataParallel(model.train())  # broadcast_buffers=True, the default
    router = model.model.routers()[0]
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(100 + rank))
    ddp(input_ids=x, labels=x).loss.backward()
    total = router.expert_load.clone()
    torch.distributed.all_reduce(total)
    ddp(input_ids=x, labels=x)  # the next training forward applies the pending update
    want = router.bias_update_rate * torch.sign(total.mean() - total)
    return {"bias": router.e_score_correction_bias.tolist(), "want": want.tolist()}


def test_balancing_bias_follows_the_loads_of_every_rank_under_ddp(tmp_path):
    """A plain DDP wrapper (as SFT and RL get it) broadcasts buffers before each forward; the pending expert loads
    must stay per rank so that the bias update sums them, instead of rank 0's load counted twice."""
    got = run_on_two_ranks(_bias_update_on_rank, tmp_path)
    assert got[0]["bias"] == got[1]["bias"]
    torch.testing.assert_close(torch.tensor(got[0]["bias"]), torch.tensor(got[0]["want"]))
