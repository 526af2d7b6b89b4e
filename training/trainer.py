"""A `transformers.Trainer` that reports ERNIE 5.0's loss terms next to the total loss.

The model returns one `loss` (next-token + weighted MTP + optional balance and z terms); the Trainer optimises it
unchanged. This subclass only records the parts (`lm_loss`, `mtp_loss`, `aux_loss`, `z_loss`) of every training
forward and logs their means over the logging interval (and over processes), plus the spread of the balancing bias, so a run shows
what each objective is doing.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from transformers import Trainer

LOSS_PARTS = ("lm_loss", "mtp_loss", "aux_loss", "z_loss")


class Ernie5Trainer(Trainer):
    """`Trainer` with per-term loss logging for ernie5 models (works unchanged for any causal LM)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_parts: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            for name in LOSS_PARTS:
                value = outputs.get(name) if hasattr(outputs, "get") else None
                if value is not None:
                    self._loss_parts[name].append(value.detach().float().mean().item())  # sync point, once per step
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (every rank gets here): attach the means of the recorded parts
            for name, value in mean_loss_parts(self._loss_parts, self.args.device).items():
                logs[name] = round(value, 6)
            self._loss_parts.clear()
            biases = router_biases(self.model)
            if biases is not None:
                logs["router_bias_absmax"] = round(biases.abs().max().item(), 6)
        super().log(logs, *args, **kwargs)


def mean_loss_parts(parts: dict[str, list[float]], device) -> dict[str, float]:
    """Mean of each recorded loss term over the logging interval and, in a distributed run, over every process
    (one all-reduce of a (term, [sum, count]) table on `device`, so the logged parts describe the same batches as the
    Trainer's gathered `loss`, not rank 0's share alone). Terms no process recorded are left out."""
    table = torch.tensor([[sum(parts.get(name, ())), len(parts.get(name, ()))] for name in LOSS_PARTS],
                         dtype=torch.float64)  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        table = table.to(device)
        torch.distributed.all_reduce(table)
        table = table.cpu()
    return {name: float(total / count) for name, (total, count) in zip(LOSS_PARTS, table.tolist()) if count > 0}


def router_biases(model) -> torch.Tensor | None:
    """Stack of every router's balancing bias (layers x experts), or None for models without one."""
    found = [m.e_score_correction_bias for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    return torch.stack([b.detach().float().cpu() for b in found]) if found else None


def precision_defaults_for_this_machine() -> dict:
    """Parser defaults that let a TRL script run as typed on the machine at hand (flags still override them).

    TRL's configs turn `bf16` on unless told otherwise, and `TrainingArguments` rejects bf16 on a machine without a
    GPU unless `use_cpu` is set too, so `python training/sft.py ...` failed on a CPU-only machine. There the scripts
    now default to `use_cpu=True, bf16=False` (fp32, as the pretraining script does); a CUDA GPU keeps bf16 where it
    has it. Other accelerators (MPS, XPU, NPU) keep TRL's own defaults."""
    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported()}
    others = [getattr(torch.backends, "mps", None), getattr(torch, "xpu", None), getattr(torch, "npu", None)]
    if any(backend is not None and backend.is_available() for backend in others):
        return {}
    return {"use_cpu": True, "bf16": False}


def end_distributed_training(trainer) -> None:
    """Tear down a multi-process run at the end of a training script (a no-op in a single process): every rank
    waits for the others (rank 0 may still be writing files), then the process group is destroyed, here, while the
    interpreter still runs. A gloo group left alive at exit sometimes aborts a rank ("terminate called without an
    active exception").

    The order matters. A gloo group's destructor joins its worker threads without releasing the GIL, and a worker
    may still need the GIL to free the tensors of the last collectives (the barrier holds them). Destroyed from the
    DDP reducer's destructor when the trainer is dropped, the group hung rank 0 for good (seen in a clean-clone test
    run, torch 2.13, 1 run in many). So the DDP wrapper goes first while the group is still registered, the GIL is
    released for a moment so the workers finish, and only then is the group destroyed."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    trainer.accelerator.wait_for_everyone()
    trainer.model_wrapped = trainer.model
    trainer.accelerator.free_memory()  # drops the accelerator's references to the wrapper, then collects
    time.sleep(0.1)
    trainer.accelerator.end_training()


__all__ = ["Ernie5Trainer", "end_distributed_training", "precision_defaults_for_this_machine", "router_biases"]
