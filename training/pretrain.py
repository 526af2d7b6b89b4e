"""Elastic pretraining of ERNIE 5.0 text models with the Hugging Face Trainer (ERNIE 5.0 §3.2-§3.3; DESIGN.md §4).

One run trains the full model and, in the same backward pass, sampled sub-models of smaller depth, fewer experts
and smaller top-k (`training/elastic_sampler.py`), so that `modeling_ernie5.elastic.extract_submodel` can later
cut standalone models from the checkpoint. The same script, unchanged, runs the non-elastic baseline
(`--elastic false`).

Runs the same way under every launcher; the Trainer picks up the distributed environment:

    python training/pretrain.py --config training/configs/tiny_elastic.yaml
    accelerate launch --config_file training/accelerate_configs/multi_gpu.yaml training/pretrain.py \\
        --config training/configs/tiny_elastic.yaml
    torchrun --nproc_per_node 2 training/pretrain.py --config training/configs/tiny_elastic.yaml   # CPU DDP (gloo)
    ernie5-pretrain --config training/configs/tiny_elastic.yaml --max_steps 20 --output_dir outputs/quick

A YAML or JSON `--config` gives any field of `PretrainConfig` (which extends `TrainingArguments`); flags on the
command line override it; an unknown key is an error. Resume with `--resume_from_checkpoint <dir>` or `last`
(the newest checkpoint in `output_dir`): the model, optimiser, scheduler, RNG and balancing bias are restored and
the elastic draws are a function of the step, so the loss curve continues exactly as without the interruption.

Logged every `logging_steps` (console, `trainer_state.json` and TensorBoard under `output_dir/runs`): the total
loss and its parts, the next-token loss of each configuration kind (`loss_full`, `loss_depth`, `loss_width`,
`loss_sparsity`: samples counted under every axis they reduce), the share of samples of each kind, and
expert-load statistics of the full-configuration forwards (`expert_load_cv`: coefficient of variation of tokens
per expert, `expert_load_max_over_mean`; averaged over MoE layers). At the end `expert_load.json` /
`expert_load.png` hold the per-layer loads and `elastic_losses.png` the per-kind loss curves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

if __package__ in (None, ""):  # `python training/pretrain.py` / torchrun: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from transformers import HfArgumentParser, SchedulerType, TrainerCallback, TrainingArguments

from training.elastic_sampler import KINDS, ElasticSampler
from training.trainer import end_distributed_training

logger = logging.getLogger(__name__)

MODEL_PRESETS = ("tiny", "ablation-3b")


@dataclass
class PretrainConfig(TrainingArguments):
    r"""
    `TrainingArguments` plus the model, data and elastic-training settings of `training/pretrain.py`.

    Model:
        model_preset (`str`, defaults to `"tiny"`): `Ernie5Config` preset for a model trained from scratch.
        model_overrides (`dict` or JSON `str`, *optional*): config fields over the preset, e.g.
            `{"num_hidden_layers": 6, "num_experts": 16}`.
        model_name_or_path (`str`, *optional*): a local checkpoint to continue from instead of a fresh model.
    Data:
        train_files (`list[str]`, *optional*): `.txt` (documents separated by blank lines), `.jsonl` or `.json`
            (records with `text_field`) files; without them the standard-library docstring corpus is used.
        text_field (`str`, defaults to `"text"`), max_docs (`int`, *optional*), val_fraction (`float`, 0.05),
        block_size (`int`, 128): documents are split (not tokens) into train/validation and packed into blocks.
        tokenizer_name_or_path (`str`, *optional*): a saved tokenizer; otherwise a byte-level BPE of `vocab_size`
            tokens is trained on the training documents and saved to `output_dir/tokenizer`.
    Elastic:
        elastic (`bool`, defaults to `True`): sample sub-models (False = the non-elastic baseline, same code path).
        elastic_anchor_full (`bool`, defaults to `True`): first sample of each micro-batch is full (see the sampler).
        max_train_minutes (`float`, *optional*): stop after this wall time (checked every step, agreed across ranks).
    """

    model_preset: str = field(default="tiny", metadata={"help": f"Ernie5Config preset: {MODEL_PRESETS}"})
    model_overrides: str | None = field(default=None, metadata={"help": "JSON dict of config fields over the preset"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "local checkpoint to continue from"})
    train_files: list[str] | None = field(default=None, metadata={"help": ".txt/.jsonl/.json training text files"})
    text_field: str = field(default="text", metadata={"help": "record field holding the text (jsonl/json)"})
    max_docs: int | None = field(default=None, metadata={"help": "use at most this many documents"})
    val_fraction: float = field(default=0.05, metadata={"help": "share of documents held out for validation"})
    block_size: int = field(default=128, metadata={"help": "tokens per packed training block"})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "saved tokenizer directory"})
    vocab_size: int = field(default=512, metadata={"help": "vocabulary of a tokenizer trained here"})
    elastic: bool = field(default=True, metadata={"help": "train sampled sub-models alongside the full model"})
    elastic_anchor_full: bool = field(default=True, metadata={"help": "first sample of a micro-batch is full"})
    max_train_minutes: float | None = field(default=None, metadata={"help": "wall-time limit of training"})
    # Changed defaults. The elastic step runs a few forwards before one backward: DDP must not search for unused
    # parameters (that breaks with several forwards), and the sampler's anchor keeps every parameter used.
    # Buffers are not broadcast: the balancing bias is identical on every rank by construction (loads are
    # all-reduced) and broadcasting would overwrite each rank's pending expert-load counts with rank 0's.
    ddp_find_unused_parameters: bool | None = field(default=False, metadata={"help": "see PretrainConfig"})
    ddp_broadcast_buffers: bool | None = field(default=False, metadata={"help": "see PretrainConfig"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "loggers (tensorboard, none)"})
    lr_scheduler_type: SchedulerType | str = field(
        default="constant_with_warmup", metadata={"help": "ERNIE 5.0 stage 1 is warmup then constant (§3.2)"}
    )
    output_dir: str | None = field(default="outputs/pretrain", metadata={"help": "run directory"})

    def __post_init__(self):
        super().__post_init__()
        if self.model_preset not in MODEL_PRESETS:
            raise ValueError(f"model_preset {self.model_preset!r} unknown; choose one of {MODEL_PRESETS}")
        if isinstance(self.model_overrides, str):
            try:
                self.model_overrides = json.loads(self.model_overrides)
            except json.JSONDecodeError as err:
                raise ValueError(f"model_overrides is not a JSON object: {err}") from err
        if self.model_overrides is not None and not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a mapping of config fields, got {type(self.model_overrides)}")
        if self.block_size < 8:
            raise ValueError(f"block_size must be at least 8 tokens, got {self.block_size}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        if self.max_train_minutes is not None and self.max_train_minutes <= 0:
            raise ValueError(f"max_train_minutes must be positive, got {self.max_train_minutes}")
        if self.elastic and self.ddp_find_unused_parameters:
            raise ValueError(
                "elastic training runs several forwards before one backward, which DDP's unused-parameter search "
                "does not support; set ddp_find_unused_parameters false (the sampler keeps every parameter in use)"
            )

    # TrainingArguments.to_dict() JSON-serialises fields; keep the overrides readable there too.
    def to_dict(self):
        d = super().to_dict()
        d["model_overrides"] = self.model_overrides
        return d


# ---------------------------------------------------------------------------------------------------------------
# Command line


def make_parser(subparsers=None) -> HfArgumentParser:
    """The argument parser (also usable as a subcommand parser)."""
    if subparsers is not None:
        parser = subparsers.add_parser("pretrain", help="elastic pretraining", dataclass_types=[PretrainConfig])
    else:
        parser = HfArgumentParser(PretrainConfig, description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML or JSON file with PretrainConfig fields")
    return parser


def load_config_file(path: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value")
    known = {f.name for f in fields(PretrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config file {path}: unknown keys {unknown} (not PretrainConfig / TrainingArguments fields)")
    if isinstance(data.get("model_overrides"), dict):
        data["model_overrides"] = json.dumps(data["model_overrides"])
    return data


def parse_args(argv: list[str] | None = None) -> PretrainConfig:
    """Fields from `--config` (if any), overridden by command-line flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = make_parser()
    if known.config:
        parser.set_defaults(**load_config_file(known.config))
    cfg, extra = parser.parse_args_into_dataclasses(args=argv)
    del extra  # the --config namespace entry
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Data and model


def read_documents(paths: list[str], text_field: str = "text") -> list[str]:
    """Documents from .txt (blank-line separated), .jsonl or .json files; malformed records are counted and skipped."""
    docs, skipped = [], 0
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ValueError(f"training file {path} does not exist")
        if path.suffix == ".txt":
            docs.extend(d.strip() for d in path.read_text(encoding="utf-8", errors="replace").split("\n\n") if d.strip())
            continue
        if path.suffix == ".jsonl":
            records = []
            for line in path.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    skipped += 1
        elif path.suffix == ".json":
            records = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json training file must hold a list of records")
        else:
            raise ValueError(f"training file {path}: expected .txt, .jsonl or .json")
        for r in records:
            text = r.get(text_field) if isinstance(r, dict) else None
            if isinstance(text, str) and text.strip():
                docs.append(text.strip())
            else:
                skipped += 1
    if skipped:
        print(f"[pretrain] skipped {skipped} records without a non-empty '{text_field}' string", file=sys.stderr)
    if not docs:
        raise ValueError(f"no documents found in {paths}")
    return docs


def corpus_documents(train_files, text_field, seed: int, max_docs: int | None) -> list[str]:
    """The documents a run splits into training and validation (`eval.elastic_grid` re-derives the same held-out
    split from the settings `train` records in `pretrain_summary.json`)."""
    if train_files:
        docs = read_documents(train_files, text_field)
    else:
        from processing.tokenizer import builtin_corpus

        docs = builtin_corpus(seed=seed)
    return docs[:max_docs] if max_docs else docs


def build_datasets(cfg: PretrainConfig):
    """(tokenizer, train blocks, validation blocks). Rank 0 trains and saves the tokenizer; other ranks load it."""
    from transformers import AutoTokenizer

    from processing.text_data import pack_texts, split_corpus

    docs = corpus_documents(cfg.train_files, cfg.text_field, cfg.seed, cfg.max_docs)
    train_docs, val_docs = split_corpus(docs, cfg.val_fraction)
    if cfg.tokenizer_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_name_or_path)
    else:
        tok_dir = os.path.join(cfg.output_dir, "tokenizer")
        with cfg.main_process_first(desc="train tokenizer"):
            if os.path.isfile(os.path.join(tok_dir, "tokenizer.json")):
                # A rerun (or resume) into the same output_dir keeps the tokenizer the checkpoints were trained with.
                logger.warning("reusing the tokenizer in %s (--vocab_size and the corpus do not retrain it); "
                               "delete that folder to train a new one", tok_dir)  # fmt: skip
                tokenizer = AutoTokenizer.from_pretrained(tok_dir)
            else:
                from processing.tokenizer import train_text_tokenizer

                tokenizer = train_text_tokenizer(train_docs, vocab_size=cfg.vocab_size)
                tokenizer.save_pretrained(tok_dir)
    train_ds = pack_texts(tokenizer, train_docs, cfg.block_size)
    val_ds = pack_texts(tokenizer, val_docs, cfg.block_size)
    return tokenizer, train_ds, val_ds


def build_model(cfg: PretrainConfig, tokenizer):
    import modeling_ernie5  # noqa: F401  (registers the Auto classes)
    from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
    from transformers import AutoModelForCausalLM

    if cfg.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(cfg.model_name_or_path)
    fields_ = dict(
        vocab_size=len(tokenizer),
        max_position_embeddings=max(2048, cfg.block_size),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    fields_.update(cfg.model_overrides or {})
    return Ernie5ForCausalLM(Ernie5Config.from_preset(cfg.model_preset, **fields_))


# ---------------------------------------------------------------------------------------------------------------
# Trainer


def _base_trainer():
    try:  # the package Trainer with per-term loss logging, when present
        from training.trainer import Ernie5Trainer

        return Ernie5Trainer
    except ImportError:
        from transformers import Trainer

        return Trainer


class ElasticTrainer(_base_trainer()):
    """Trainer whose training step runs the sampler's groups (sub-models and full model) into one backward.

    Args:
        sampler (`ElasticSampler`): draws the groups of each micro-batch.
        Everything else as `transformers.Trainer`.
    """

    def __init__(self, *args, sampler: ElasticSampler, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampler = sampler
        # The loss returned here is already a token-weighted mean over the micro-batch; let the Trainer divide by
        # the accumulation steps instead of passing `num_items_in_batch` into every group forward.
        self.model_accepts_loss_kwargs = False
        self._micro = (-1, 0)  # (optimiser step, micro-step within it)
        # Per kind (and a last row for all samples): next-token loss sum, tokens, samples since the last log.
        self._kind_sums = torch.zeros(len(KINDS) + 1, 3, dtype=torch.float64)
        self._load_counts: torch.Tensor | None = None  # (MoE layers, E) tokens per expert since the last log
        self.expert_load_total: torch.Tensor | None = None

    def _unwrapped(self, model):
        return self.accelerator.unwrap_model(model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step
        self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Apply this micro-step's balancing update now, after backward (so activation recompute saw the old bias),
        # at the same point on every rank (the all-reduce inside `update_bias` is a collective), and before a
        # checkpoint can be written (so a saved run holds no pending statistics).
        unwrapped = self._unwrapped(model)
        if hasattr(unwrapped, "update_router_biases"):
            unwrapped.update_router_biases()
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation: the full model, as usual
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        batch = labels.shape[0]
        tokens_B = (labels[:, 1:] != -100).sum(1).double()
        total_tokens = tokens_B.sum().clamp(min=1.0)
        # rank=0 on every rank: all replicas run the same sequence of group forwards (DDP needs the same number of
        # forward calls per rank between backwards; FSDP needs the same modules run in the same order).
        groups = self.sampler.plan(batch, step=self._micro[0], micro_step=self._micro[1], rank=0)
        loss = 0.0
        parts: dict[str, float] = {}
        last_outputs = None
        for group in groups:
            rows = torch.tensor(group.rows, device=labels.device)
            sub = {k: (v.index_select(0, rows) if torch.is_tensor(v) and v.dim() and v.shape[0] == batch else v) for k, v in inputs.items()}
            out = model(**sub, elastic_spec=group.spec, output_routing_indices=group.is_full)
            weight = float(tokens_B[group.rows].sum() / total_tokens)
            loss = loss + weight * out.loss
            self._record(group, sub["labels"], out)
            for name in ("lm_loss", "mtp_loss", "aux_loss", "z_loss"):
                value = out.get(name)
                if value is not None:
                    parts[name] = parts.get(name, 0.0) + weight * float(value.detach().float().mean())
            last_outputs = out
        if hasattr(self, "_loss_parts"):  # Ernie5Trainer's per-term logging
            for name, value in parts.items():
                self._loss_parts[name].append(value)
        return (loss, last_outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, group, labels, out) -> None:
        """Per-kind next-token loss of each row, and expert loads of the full-configuration forward.

        With the fused loss (`config.fused_linear_cross_entropy`) the model returns no logits: rows are still counted
        per kind (`share_*`), but their losses (`loss_*`) are not logged."""
        if out.logits is not None:
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:]
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
            )
            nll_B = nll.view(target.shape).sum(1).double().cpu()
            tok_B = (target != -100).sum(1).double().cpu()
        else:
            nll_B = tok_B = torch.zeros(len(group.draws), dtype=torch.float64)
        for i, draw in enumerate(group.draws):
            row = torch.stack([nll_B[i], tok_B[i], torch.ones((), dtype=torch.float64)])
            for kind in draw.kinds:
                self._kind_sums[KINDS.index(kind)] += row
            self._kind_sums[-1] += row
        if group.is_full and out.routing_indices:
            num_experts = self._unwrapped(self.model).config.num_experts
            counts = torch.stack(
                [torch.bincount(idx[idx < num_experts].cpu(), minlength=num_experts).double() for idx in out.routing_indices]
            )
            self._load_counts = counts if self._load_counts is None else self._load_counts + counts

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and "eval_loss" not in logs:  # a training log; every rank gets here (collectives below)
            sums = self._kind_sums.clone()
            num_layers = len(self._unwrapped(self.model).model.routers())
            num_experts = self._unwrapped(self.model).config.num_experts
            loads = self._load_counts if self._load_counts is not None else torch.zeros(num_layers, num_experts, dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                packed = torch.cat([sums.flatten(), loads.flatten()]).to(self.args.device)
                torch.distributed.all_reduce(packed)
                packed = packed.cpu()
                sums, loads = packed[: sums.numel()].view_as(sums), packed[sums.numel() :].view_as(loads)
            for i, kind in enumerate(KINDS):
                if sums[i, 1] > 0:
                    logs[f"loss_{kind}"] = round(float(sums[i, 0] / sums[i, 1]), 6)
                if sums[-1, 2] > 0:
                    logs[f"share_{kind}"] = round(float(sums[i, 2] / sums[-1, 2]), 4)
            if loads.sum() > 0:
                mean = loads.mean(1, keepdim=True).clamp(min=1e-9)
                logs["expert_load_cv"] = round(float((loads.std(1, unbiased=False, keepdim=True) / mean).mean()), 6)
                logs["expert_load_max_over_mean"] = round(float((loads.max(1, keepdim=True).values / mean).mean()), 6)
                self.expert_load_total = loads if self.expert_load_total is None else self.expert_load_total + loads
            self._kind_sums.zero_()
            self._load_counts = None
        super().log(logs, *args, **kwargs)


class TimeLimitCallback(TrainerCallback):
    """Stop after `minutes` of training; ranks agree (rank 0's clock decides) so none waits in a collective."""

    def __init__(self, minutes: float):
        self.limit_s = minutes * 60.0
        self.start = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        # On the training device: NCCL (multi-GPU, FSDP) broadcasts CUDA tensors only.
        stop = torch.tensor([float(time.time() - self.start > self.limit_s)], device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(stop, src=0)  # one small collective per step, only when time-limited
        if stop.item():
            control.should_training_stop = True
            control.should_save = True
        return control


# ---------------------------------------------------------------------------------------------------------------
# Reports


def plot_elastic_losses(log_history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in KINDS:
        pts = [(h["step"], h[f"loss_{kind}"]) for h in log_history if f"loss_{kind}" in h]
        if pts:
            ax.plot(*zip(*pts), label=kind, marker="." if len(pts) < 30 else None)
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if evals:
        ax.plot(*zip(*evals), "k--", label="validation (full)")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("next-token loss")
    ax.set_title("training loss by sub-model kind")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_expert_load(loads: torch.Tensor, out_dir: str) -> None:
    """Per-layer token share of every expert (full-configuration forwards) as JSON and a heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = (loads / loads.sum(1, keepdim=True).clamp(min=1)).float()
    with open(os.path.join(out_dir, "expert_load.json"), "w") as f:
        json.dump({"tokens_per_expert": loads.tolist(), "share_per_expert": share.tolist()}, f, indent=1)
    fig, ax = plt.subplots(figsize=(1 + 0.4 * share.shape[1], 1 + 0.4 * share.shape[0]))
    im = ax.imshow(share.numpy(), cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"token share per expert (uniform = {1 / share.shape[1]:.3f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "expert_load.png"), dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def train(cfg: PretrainConfig, callbacks: list | None = None) -> dict:
    """Build data and model from `cfg`, train (or resume), save the final model and reports; returns a summary."""
    from transformers import default_data_collator, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.elastic and not cfg.elastic_anchor_full and cfg.world_size > 1:
        raise ValueError(
            "elastic_anchor_full=false cannot run data-parallel: a micro-batch without a full-configuration sample "
            "leaves skipped layers without gradients, which DDP/FSDP (without unused-parameter search) cannot reduce"
        )
    set_seed(cfg.seed)
    tokenizer, train_ds, val_ds = build_datasets(cfg)
    model = build_model(cfg, tokenizer)
    sampler = ElasticSampler(model.config, seed=cfg.seed, enabled=cfg.elastic, anchor_full=cfg.elastic_anchor_full)
    callbacks = list(callbacks or [])
    if cfg.max_train_minutes:
        callbacks.append(TimeLimitCallback(cfg.max_train_minutes))
    trainer = ElasticTrainer(
        model=model,
        args=cfg,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        # Packed blocks are full length and carry their labels: stacked as they are. The language-modelling
        # collator would rebuild the labels and mask every pad id, i.e. every EOS when a tokenizer pads with EOS.
        data_collator=default_data_collator,
        callbacks=callbacks,
        sampler=sampler,
    )
    resume = cfg.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(cfg.output_dir)
        if resume is None:
            raise ValueError(f"resume_from_checkpoint='last' but {cfg.output_dir} holds no checkpoint-* directory")
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(cfg.output_dir)
    summary = {"output_dir": cfg.output_dir, "global_step": trainer.state.global_step, "train_loss": result.training_loss,
               "elastic": cfg.elastic, "world_size": cfg.world_size,
               "data": {"train_files": [os.path.abspath(f) for f in cfg.train_files or []] or None,
                        "text_field": cfg.text_field, "seed": cfg.seed,
                        "max_docs": cfg.max_docs, "val_fraction": cfg.val_fraction, "block_size": cfg.block_size}}
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(cfg.output_dir)
        history = trainer.state.log_history
        plot_elastic_losses(history, os.path.join(cfg.output_dir, "elastic_losses.png"))
        if trainer.expert_load_total is not None:
            write_expert_load(trainer.expert_load_total, cfg.output_dir)
        last = next((h for h in reversed(history) if "loss_full" in h), {})
        summary.update({k: v for k, v in last.items() if k.startswith(("loss_", "share_", "expert_load"))})
        with open(os.path.join(cfg.output_dir, "pretrain_summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
    end_distributed_training(trainer)
    return summary


def main(argv: list[str] | None = None) -> dict:
    """Console entry point (`ernie5-pretrain`)."""
    return train(parse_args(argv))


@torch.no_grad()
def lm_loss_on(model, blocks, batch_size: int = 16) -> float:
    """Mean next-token loss of `model` on packed blocks (a dataset with input_ids), token-weighted."""
    model.eval()
    device = next(model.parameters()).device
    total = count = 0.0
    ids_all = torch.tensor(blocks["input_ids"])
    for i in range(0, len(ids_all), batch_size):
        ids = ids_all[i : i + batch_size].to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        n = ids[:, 1:].numel()
        total += float(out.lm_loss) * n
        count += n
    return total / max(count, 1)


def run_elastic_demo(output_dir: str = "outputs/elastic_demo", minutes: float = 3.0, seed: int = 0) -> dict:
    """`make demo`'s elastic part: train a tiny model elastically for `minutes`, cut a sub-model, save and reload it.

    Trains on the standard-library docstring corpus (nothing downloaded), then extracts the sub-model with one
    layer fewer, half the experts (chosen by routing usage on validation text) and top-1, saves it with its
    tokenizer, reloads it with `AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`, checks the
    reloaded logits equal the extracted model's, and compares validation losses. Returns a summary dict (also
    written to `output_dir/elastic_demo.json`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modeling_ernie5.elastic import extract_submodel

    cfg = PretrainConfig(
        output_dir=output_dir,
        # The time limit ends training; this cap (>= 1 s per step on CPU) only keeps the progress bar meaningful.
        max_steps=max(10, int(minutes * 60)),
        max_train_minutes=minutes,
        per_device_train_batch_size=16,
        per_device_eval_batch_size=16,
        learning_rate=3e-3,
        warmup_steps=20,
        weight_decay=0.01,
        logging_steps=20,
        eval_strategy="no",
        save_strategy="no",
        report_to="tensorboard",
        vocab_size=2048,
        block_size=128,
        seed=seed,
        use_cpu=not torch.cuda.is_available(),
        model_overrides=json.dumps(
            dict(hidden_size=128, head_dim=32, moe_intermediate_size=64, num_experts=16, router_bias_update_rate=1e-3)
        ),
        dataloader_num_workers=0,
    )
    t0 = time.time()
    summary = train(cfg)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    parent = AutoModelForCausalLM.from_pretrained(output_dir).eval()
    _, _, val_ds = build_datasets(cfg)
    calib = torch.tensor(val_ds["input_ids"][:16])
    c = parent.config
    child = extract_submodel(
        parent, layers=c.num_hidden_layers - 1, num_experts=c.num_experts // 2, top_k=1, calibration_data=calib
    )
    sub_dir = os.path.join(output_dir, "submodel")
    child.save_pretrained(sub_dir)
    tokenizer.save_pretrained(sub_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(sub_dir, trust_remote_code=True).eval()
    probe = calib[:2]
    with torch.no_grad():
        same = torch.allclose(reloaded(probe).logits, child.eval()(probe).logits, atol=1e-5)
    if not same:
        raise RuntimeError("the reloaded sub-model does not reproduce the extracted one")
    prompt = tokenizer("Return the", return_tensors="pt")
    with torch.no_grad():
        sample = reloaded.generate(**prompt, max_new_tokens=30, do_sample=False)
    src = reloaded.config.elastic_source
    result = {
        **summary,
        "submodel_dir": sub_dir,
        "submodel": {"layers": src["layers"], "num_experts": reloaded.config.num_experts, "top_k": 1},
        "active_fraction": src["active_fraction"],
        "total_fraction": src["total_fraction"],
        "val_loss_full": lm_loss_on(parent, val_ds),
        "val_loss_submodel": lm_loss_on(reloaded, val_ds),
        "sample": tokenizer.decode(sample[0], skip_special_tokens=True),
        "minutes": round((time.time() - t0) / 60, 2),
    }
    print(
        f"[elastic demo] trained {summary['global_step']} steps; sub-model: layers {src['layers']} of "
        f"{c.num_hidden_layers}, {reloaded.config.num_experts} of {c.num_experts} experts, top-1: "
        f"{src['active_fraction']:.0%} active / "
        f"{src['total_fraction']:.0%} total params; val loss {result['val_loss_full']:.3f} (full) vs "
        f"{result['val_loss_submodel']:.3f} (sub-model); reloaded with trust_remote_code from {sub_dir}"
    )
    with open(os.path.join(output_dir, "elastic_demo.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


__all__ = ["ElasticTrainer", "PretrainConfig", "lm_loss_on", "main", "make_parser", "parse_args", "run_elastic_demo", "train"]


if __name__ == "__main__":
    main()
