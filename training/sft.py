"""Supervised fine-tuning on MMAT RR or ORR data (MMAT-1M §4.1, Table 7) with TRL's SFTTrainer.

Fine-tunes any local vision-language model (`AutoModelForImageTextToText` + `AutoProcessor`) or, with
`--text_only`, a causal LM such as `Ernie5ForCausalLM`, on the `messages` + `images` layout written by
`python -m processing.mmat integrate` or on the released MMAT-1M JSONL files. The loss covers assistant
turns only (TRL `assistant_only_loss`, which needs `{% generation %}` markers in the chat template; TRL
swaps in a training template for models it knows; `--chat_template_path` supplies one). LoRA through peft is optional, including LoRA on
3D expert weights via `--lora_target_parameters mlp.experts.gate_up_proj mlp.experts.down_proj`.

Defaults follow the paper's Table 7 (LoRA, 1 epoch, batch 1, lr 4e-5, weight decay 0.1, max length 16384,
seed 42); pass `--bf16 true` and a DeepSpeed ZeRO-2 config through accelerate for the paper's setting. Without a
GPU the script defaults to `--use_cpu true --bf16 false` (fp32 on the CPU); with one, TRL's bf16 default stays.

    accelerate launch training/sft.py --model_name_or_path ./my-vlm --dataset_path mmat_out --data_format rr \
        --use_peft true --output_dir sft-rr
    python training/sft.py --model_name_or_path ./tiny-vlm --dataset_path mmat_out --max_steps 2 --output_dir /tmp/sft
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python training/sft.py`: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.trainer import end_distributed_training, precision_defaults_for_this_machine  # noqa: E402

logger = logging.getLogger(__name__)

# MMAT-1M Table 7, applied as parser defaults (flags still override them).
PAPER_DEFAULTS = dict(
    num_train_epochs=1,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=1,
    learning_rate=4e-5,
    weight_decay=0.1,
    max_length=16384,
    seed=42,
    assistant_only_loss=True,
    report_to="none",
    logging_steps=1,
    save_strategy="no",
)


@dataclasses.dataclass
class SFTScriptArguments:
    """Model and data arguments of `training/sft.py` (training settings come from TRL's `SFTConfig`)."""

    model_name_or_path: str = dataclasses.field(
        metadata={"help": "Local model folder (weights + processor or tokenizer)."}
    )
    dataset_path: str = dataclasses.field(
        metadata={"help": "An MMAT output dir (or its integrate/ dir), or a released MMAT-1M .jsonl file."}
    )
    data_format: str = dataclasses.field(default="rr", metadata={"help": "`rr` (multi-turn) or `orr` (one-turn)."})
    image_root: str | None = dataclasses.field(
        default=None, metadata={"help": "Image folder for released JSONL files."}
    )
    text_only: bool = dataclasses.field(
        default=False, metadata={"help": "Drop images and load AutoModelForCausalLM (e.g. ernie5)."}
    )
    max_samples: int | None = dataclasses.field(default=None, metadata={"help": "Use at most this many samples."})
    use_peft: bool = dataclasses.field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank (not given in the paper)."})
    lora_alpha: int = dataclasses.field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = dataclasses.field(
        default=0.0, metadata={"help": "LoRA dropout (must be 0 with --lora_target_parameters)."}
    )
    lora_target_modules: list[str] = dataclasses.field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], metadata={"help": "nn.Linear names to adapt."}
    )
    lora_target_parameters: list[str] | None = dataclasses.field(
        default=None,
        metadata={
            "help": "nn.Parameter names to adapt, e.g. mlp.experts.gate_up_proj mlp.experts.down_proj (3D experts)."
        },
    )

    def __post_init__(self):
        if self.data_format not in ("rr", "orr"):
            raise ValueError(f"data_format must be 'rr' or 'orr', got {self.data_format!r}")
        if self.lora_target_parameters and self.lora_dropout:
            raise ValueError(
                f"lora_dropout={self.lora_dropout} with lora_target_parameters: peft applies LoRA to raw parameters "
                "(3D expert weights) without dropout; set --lora_dropout 0"
            )


def load_sft_dataset(args: SFTScriptArguments):
    """The training set in TRL's layout: `messages` (and `images` as PIL unless `text_only`)."""
    import datasets

    from processing.mmat.released import load_mmat1m_jsonl

    path = Path(args.dataset_path)
    if not path.exists():
        raise ValueError(f"--dataset_path {path} does not exist (a released MMAT-1M JSONL file or an MMAT output folder)")
    if path.is_file():
        ds = load_mmat1m_jsonl(path, image_root=args.image_root, max_samples=args.max_samples)
    else:
        directory = path / "integrate" if (path / "integrate").is_dir() else path
        if not (directory / "_COMPLETE").exists():
            raise ValueError(f"{directory} is not a completed MMAT integrate stage (no _COMPLETE marker)")
        files = sorted(str(p) for p in (directory / "data").glob("shard-*.parquet"))
        ds = datasets.Dataset.from_parquet(files)
        column = f"{args.data_format}_messages"
        ds = ds.select_columns(["id", column, "images"]).rename_column(column, "messages")
        if args.max_samples:
            ds = ds.select(range(min(args.max_samples, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"{args.dataset_path}: no samples to train on")
    if args.text_only:
        return ds.remove_columns(["images", "id"])
    return ds.remove_columns(["id"]).cast_column("images", datasets.Sequence(datasets.Image()))


def build_trainer(script_args: SFTScriptArguments, training_args):
    """Model, processor, dataset and (optionally) LoRA, assembled into a TRL `SFTTrainer`."""
    import transformers
    from trl import SFTTrainer

    import modeling_ernie5  # noqa: F401  (registers ernie5 with the Auto classes)

    if script_args.text_only:
        processing_class = transformers.AutoTokenizer.from_pretrained(script_args.model_name_or_path)
        model = transformers.AutoModelForCausalLM.from_pretrained(script_args.model_name_or_path)
    else:
        processing_class = transformers.AutoProcessor.from_pretrained(script_args.model_name_or_path)
        model = transformers.AutoModelForImageTextToText.from_pretrained(script_args.model_name_or_path)
    peft_config = None
    if script_args.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules or None,
            target_parameters=script_args.lora_target_parameters or None,
            task_type="CAUSAL_LM",
        )
    dataset = load_sft_dataset(script_args)
    return SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=processing_class,
        peft_config=peft_config,
    )


def main(script_args: SFTScriptArguments, training_args) -> dict:
    """Train, save the model (or adapter) and processor, and return the final training metrics."""
    trainer = build_trainer(script_args, training_args)
    # `Trainer` does not read this argument itself: the script passes it on.
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    metrics = dict(result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    end_distributed_training(trainer)
    return metrics


def make_parser(subparsers=None):
    """`HfArgumentParser` over (SFTScriptArguments, trl.SFTConfig) with the paper's defaults."""
    from trl import SFTConfig, TrlParser

    dataclass_types = (SFTScriptArguments, SFTConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("sft", help="MMAT SFT", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types)
    parser.set_defaults(**PAPER_DEFAULTS, **precision_defaults_for_this_machine())
    return parser


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    script_args, training_args = make_parser().parse_args_and_config()
    main(script_args, training_args)
