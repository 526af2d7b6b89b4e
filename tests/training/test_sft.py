"""SFT on MMAT data (training/sft.py) and the released MMAT-1M JSONL loader.

CPU only: a tiny random Llava-style VLM and a tiny ernie5 model are built in fixtures; the training data
is a small toy-world MMAT run made here.
"""

import json
from pathlib import Path

import pytest
import torch

from processing.mmat import MMATConfig, run_pipeline
from processing.mmat.released import load_mmat1m_jsonl
from processing.mmat.toy_teacher import make_toy_vqa
from processing.tools.ocr import tesseract_available
from processing.tools.tiny_models import build_tiny_vlm, train_tiny_tokenizer
from training.sft import build_trainer, main, make_parser

pytestmark = pytest.mark.skipif(not tesseract_available(), reason="needs `apt-get install tesseract-ocr`")
SMALL = ["--max_length", "2048", "--dataloader_num_workers", "0"]
CPU = ["--bf16", "false", "--use_cpu", "true", *SMALL]


@pytest.fixture(scope="module")
def mmat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmat")
    source = make_toy_vqa(root / "toy", n_items=5, seed=4)
    config = MMATConfig(inputs=[str(source)], output_dir=str(root / "out"), progress=False)
    assert all(s["complete"] for s in run_pipeline(config).values())
    return root / "out"


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm"))


def parse(argv):
    return make_parser().parse_args_into_dataclasses(argv)


def assistant_text(messages):
    return "".join(m["content"] + "<|end|>" for m in messages if m["role"] == "assistant")


def test_rr_lora_loss_on_assistant_turns_only(mmat_run, tiny_vlm, tmp_path):
    script_args, training_args = parse(
        [
            "--model_name_or_path",
            tiny_vlm,
            "--dataset_path",
            str(mmat_run),
            "--data_format",
            "rr",
            "--use_peft",
            "true",
            "--output_dir",
            str(tmp_path / "rr"),
            "--max_steps",
            "1",
            *SMALL,  # no precision flags, as in the README: a CPU-only machine must default to fp32 on the CPU
        ]
    )
    assert (
        training_args.learning_rate == 4e-5 and training_args.weight_decay == 0.1 and training_args.assistant_only_loss
    )
    if not torch.cuda.is_available():
        assert training_args.use_cpu and not training_args.bf16
    trainer = build_trainer(script_args, training_args)
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([dict(example)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    tokenizer = trainer.processing_class.tokenizer
    # Exactly the assistant turns (RR steps, reflection turns, final answer) carry loss.
    assert tokenizer.decode(ids[labels != -100]) == assistant_text(example["messages"])
    assert (ids == tokenizer.convert_tokens_to_ids("<image>")).sum() > 1  # the image was expanded into the prompt
    assert any("lora_" in n for n, _ in trainer.model.named_parameters())
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    trainer.save_model(training_args.output_dir)
    assert (Path(training_args.output_dir) / "adapter_config.json").exists()


def test_orr_full_finetune_from_released_jsonl(mmat_run, tiny_vlm, tmp_path):
    released = mmat_run / "integrate" / "orr.jsonl"
    script_args, training_args = parse(
        [
            "--model_name_or_path",
            tiny_vlm,
            "--dataset_path",
            str(released),
            "--output_dir",
            str(tmp_path / "orr"),
            "--max_steps",
            "1",
            "--learning_rate",
            "1e-2",
            *CPU,
        ]
    )
    before = {n: p.detach().clone() for n, p in build_trainer(script_args, training_args).model.named_parameters()}
    metrics = main(script_args, training_args)
    assert metrics["train_loss"] > 0
    from transformers import AutoModelForImageTextToText

    after = dict(AutoModelForImageTextToText.from_pretrained(training_args.output_dir).named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before if n in after)


def test_missing_dataset_and_resume_checkpoint_are_named(mmat_run, tiny_vlm, tmp_path):
    """A mistyped --dataset_path says it does not exist, and --resume_from_checkpoint reaches `trainer.train`
    (which never reads it by itself): a folder without a checkpoint is refused instead of training from step 0."""
    common = ["--model_name_or_path", tiny_vlm, "--output_dir", str(tmp_path / "o"), "--max_steps", "1", *CPU]
    with pytest.raises(ValueError, match="does not exist"):
        main(*parse(["--dataset_path", str(tmp_path / "typo.jsonl"), *common]))
    released = str(mmat_run / "integrate" / "orr.jsonl")
    with pytest.raises(ValueError, match="valid checkpoint"):
        main(*parse(["--dataset_path", released, "--resume_from_checkpoint", str(tmp_path / "nothing"), *common]))


def test_ernie5_text_only_sft_with_lora_on_expert_weights(mmat_run, tmp_path):
    from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM

    tokenizer = train_tiny_tokenizer()
    model = Ernie5ForCausalLM(
        Ernie5Config.from_preset(
            "tiny",
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    path = tmp_path / "ernie5"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    script_args, training_args = parse(
        [
            "--model_name_or_path",
            str(path),
            "--dataset_path",
            str(mmat_run),
            "--text_only",
            "true",
            "--use_peft",
            "true",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--lora_target_parameters",
            "mlp.experts.gate_up_proj",
            "mlp.experts.down_proj",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "1",
            *CPU,
        ]
    )
    trainer = build_trainer(script_args, training_args)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert any("experts" in n and "lora" in n for n in names), names
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora" not in n)
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))


# ---------------------------------------------------------------- released JSONL loader


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_released_loader_maps_both_spellings(tmp_path):
    path = write_jsonl(
        tmp_path / "dataset_qa_rr_val_all_RR_sys.jsonl",
        [
            {
                "id": 7,
                "messages": [
                    {"role": "system", "content": "sys"},
                    {"role": "user", "content": "<image>Q? Please start your reasoning."},
                    {"role": "assistant", "content": "<THOUGHT>t</THOUGHT><SIGNAL>end</SIGNAL>"},
                ],
                "images": ["coco/1.jpg"],
            },
            {
                "conversations": [{"from": "human", "value": "<image>Q2"}, {"from": "gpt", "value": "A2"}],
                "image": "coco/2.jpg",
            },
        ],
    )
    ds = load_mmat1m_jsonl(path, image_root=tmp_path)
    assert ds[0]["id"] == "7" and ds[0]["messages"][1]["content"] == "Q? Please start your reasoning."
    assert ds[0]["images"] == [str(tmp_path / "coco/1.jpg")]
    assert ds[1]["messages"] == [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
    kept = load_mmat1m_jsonl(path, layout="released")
    assert kept[1]["messages"][0]["content"] == "<image>Q2" and kept[1]["images"] == ["coco/2.jpg"]


@pytest.mark.parametrize(
    "record, message",
    [
        (
            {"messages": [{"role": "user", "content": "hi"}], "images": [], "source": "x"},
            r"unknown field\(s\) \['source'\]",
        ),
        ({"messages": [{"role": "user", "content": "hi", "loss": 0}]}, r"message 0 has unknown field\(s\) \['loss'\]"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "unknown role 'robot'"),
        (
            {"messages": [{"role": "user", "content": "<image><image>hi"}], "images": ["a.jpg"]},
            "2 <image> tags but 1 images",
        ),
        (
            {"messages": [{"role": "user", "content": "<image>hi"}], "images": ["../../etc/passwd"]},
            "leaves the image root",
        ),
    ],
)
def test_released_loader_fails_loudly(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(ValueError, match=message):
        load_mmat1m_jsonl(path, image_root=tmp_path)
