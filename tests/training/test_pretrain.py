"""training/pretrain.py end to end on CPU: YAML/JSON config with command-line overrides, a resumed run that
reproduces the uninterrupted loss curve exactly, and the same script under `torchrun --nproc_per_node 2` (gloo
DDP, replicas checked identical) and `accelerate launch`. Tiny model, tiny corpus, a few steps each."""

import json
import math
import os
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from training.pretrain import load_config_file, parse_args, train

REPO = Path(__file__).resolve().parents[2]
WORDS = (
    "the router sends every token to a few experts while a small bias keeps their load even and the shared expert "
    "sees all tokens so that deep layers can be skipped when the model is trained to work without them"
).split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file and a byte-level BPE tokenizer trained on it."""
    from processing.tokenizer import train_text_tokenizer

    root = tmp_path_factory.mktemp("pretrain_data")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(200)]
    (root / "corpus.txt").write_text("\n\n".join(docs))
    tok = train_text_tokenizer(docs, vocab_size=300)
    tok.save_pretrained(root / "tok")
    return root


def base_args(corpus, out, **extra) -> list[str]:
    args = {
        "train_files": str(corpus / "corpus.txt"),
        "tokenizer_name_or_path": str(corpus / "tok"),
        "output_dir": str(out),
        "block_size": 32,
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "report_to": "none",
        "use_cpu": "true",
        "learning_rate": 3e-3,
        "model_overrides": json.dumps({"num_hidden_layers": 4}),
    }
    args.update(extra)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def test_yaml_config_and_command_line_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        yaml.safe_dump(
            {"output_dir": str(tmp_path / "o"), "elastic": False, "max_steps": 3, "model_overrides": {"num_experts": 4}}
        )
    )
    cfg = parse_args(["--config", str(cfg_file), "--max_steps", "7"])
    assert cfg.max_steps == 7 and cfg.elastic is False and cfg.model_overrides == {"num_experts": 4}
    assert cfg.ddp_find_unused_parameters is False and cfg.ddp_broadcast_buffers is False
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"output_dir": str(tmp_path / "o"), "block_size": 64}))
    assert parse_args(["--config", str(json_file)]).block_size == 64

    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nnum_layerz: 3\n")
    with pytest.raises(ValueError, match="num_layerz"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ValueError, match="model_preset"):
        parse_args(["--output_dir", str(tmp_path), "--model_preset", "huge"])
    with pytest.raises(ValueError, match="ddp_find_unused_parameters"):
        parse_args(["--output_dir", str(tmp_path), "--ddp_find_unused_parameters", "true"])

    # the shipped presets are valid
    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        assert load_config_file(str(path))
    for name in ("tiny_elastic.yaml", "tiny_baseline.yaml"):
        cfg = parse_args(["--config", str(REPO / "training" / "configs" / name), "--output_dir", str(tmp_path / name)])
        assert cfg.elastic is (name == "tiny_elastic.yaml")
    from accelerate.commands.config.config_args import load_config_from_file

    for path in sorted((REPO / "training" / "accelerate_configs").glob("*.yaml")):
        launch = load_config_from_file(str(path))  # what `accelerate launch --config_file` reads
        assert launch.distributed_type is not None
        if launch.distributed_type == "FSDP":  # the final save_model writes weights for a full state dict only
            assert launch.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def _per_step(history):
    return {h["step"]: h for h in history if "loss" in h and "train_runtime" not in h}


def test_resume_reproduces_the_uninterrupted_loss_curve(corpus, tmp_path):
    from safetensors.torch import load_file

    full = tmp_path / "full"
    train(parse_args(base_args(corpus, full, max_steps=6, save_steps=3, report_to="tensorboard")))
    resumed = tmp_path / "resumed"
    train(parse_args(base_args(corpus, resumed, max_steps=6, save_steps=3, resume_from_checkpoint=full / "checkpoint-3")))

    a = _per_step(json.loads((full / "checkpoint-6" / "trainer_state.json").read_text())["log_history"])
    b = _per_step(json.loads((resumed / "checkpoint-6" / "trainer_state.json").read_text())["log_history"])
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "grad_norm", "loss_full", "expert_load_cv", "router_bias_absmax"):
            # Equal up to fp32 rounding: the fast expert kernel picks grouped_mm or per-expert mm by buffer
            # alignment, which can differ between processes and changes the summation order.
            assert math.isclose(a[step][key], b[step][key], rel_tol=1e-5, abs_tol=1e-7), (step, key, a[step][key], b[step][key])
    assert any("loss_depth" in h or "loss_width" in h or "loss_sparsity" in h for h in a.values())
    wa, wb = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert any(n.endswith("e_score_correction_bias") and wa[n].abs().sum() > 0 for n in wa), "the bias never moved"
    assert list((full / "runs").rglob("events.out.tfevents*")), "no TensorBoard log"
    assert (full / "expert_load.json").exists() and (full / "elastic_losses.png").exists()


DDP_DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, {repo!r})
    from transformers import TrainerCallback
    from training.pretrain import parse_args, train

    class ReplicaCheck(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            vec = torch.cat([p.detach().flatten() for p in model.parameters()]
                            + [r.e_score_correction_bias for r in model.model.routers()])
            got = [torch.zeros_like(vec) for _ in range(dist.get_world_size())]
            dist.all_gather(got, vec)
            assert torch.equal(got[0], got[1]), "DDP replicas diverged"
            moved = float(sum(r.e_score_correction_bias.abs().sum() for r in model.model.routers()))
            if dist.get_rank() == 0:
                print(f"REPLICAS EQUAL world={{dist.get_world_size()}} bias_moved={{moved > 0}}")

    train(parse_args(sys.argv[1:]), callbacks=[ReplicaCheck()])
    """
)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")


@pytest.mark.slow
def test_torchrun_two_cpu_processes(corpus, tmp_path, run_launcher):
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER.format(repo=str(REPO)))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver),
           *base_args(corpus, out, max_steps=3, save_strategy="no", report_to="tensorboard")]  # fmt: skip
    result = run_launcher(cmd, cwd=tmp_path, env=_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "REPLICAS EQUAL world=2 bias_moved=True" in result.stdout, result.stdout[-2000:]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 3
    assert "loss_full" in summary and "expert_load_cv" in summary
    # sub-models really ran next to the full model (several forwards before one backward on every rank)
    assert summary["share_full"] < 1 and max(summary.get(f"share_{k}", 0) for k in ("depth", "width", "sparsity")) > 0
    assert list((out / "runs").rglob("events.out.tfevents*"))


@pytest.mark.slow
def test_accelerate_launch_runs_the_same_script(corpus, tmp_path, run_launcher):
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "training" / "accelerate_configs" / "cpu.yaml"), str(REPO / "training" / "pretrain.py"),
           *base_args(corpus, out, max_steps=2, save_strategy="no")]  # fmt: skip
    result = run_launcher(cmd, cwd=tmp_path, env=_env(), timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["elastic"] is True
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()


def test_fused_loss_trains_elastically_and_counts_rows_per_kind(corpus, tmp_path):
    """With `fused_linear_cross_entropy` the model returns no logits: elastic training still runs, counts its rows
    per kind (`share_*`) and leaves out the per-kind losses it cannot compute without logits."""
    out = tmp_path / "fused"
    overrides = json.dumps({"num_hidden_layers": 4, "fused_linear_cross_entropy": True})
    train(parse_args(base_args(corpus, out, max_steps=3, save_steps=3, model_overrides=overrides)))
    steps = _per_step(json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"])
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(h["loss"]) for h in steps.values())
    assert all(any(k.startswith("share_") for k in h) for h in steps.values())
    assert not any(k.startswith("loss_") for h in steps.values() for k in h)
    # The data settings are recorded, so that eval.elastic_grid validates on this run's held-out split.
    data = json.loads((out / "pretrain_summary.json").read_text())["data"]
    assert data["train_files"] == [str(corpus / "corpus.txt")] and data["block_size"] == 32


def test_eos_labels_are_kept_when_the_tokenizer_pads_with_eos(corpus, tmp_path, monkeypatch):
    """Many tokenizers set pad = EOS. Packed blocks have no padding, so every EOS is a target the model must learn
    (where a document ends); the batches reaching the loss keep those labels."""
    from transformers import AutoTokenizer

    from training.pretrain import ElasticTrainer

    tok = AutoTokenizer.from_pretrained(corpus / "tok")
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path / "tok")
    seen = []
    original = ElasticTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        seen.append((inputs["input_ids"].clone(), inputs["labels"].clone()))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ElasticTrainer, "compute_loss", spy)
    train(parse_args(base_args(corpus, tmp_path / "o", max_steps=2, tokenizer_name_or_path=tmp_path / "tok")))
    ids, labels = seen[0]
    assert (ids == tok.eos_token_id).any() and torch.equal(labels, ids)
