"""GRPO/GSPO with ERNIE 5.0's stabilisers on a tiny ERNIE 5.0 model and a locally trained tokenizer (training/rl.py).

Short runs (2-3 steps, 4-8 completions of <= 6 tokens) on CPU, bf16 off, gradient checkpointing off. They check that the
stabilisers run inside TRL's loop and log, that routing replay reaches the backbone and pins the experts, that the
trainer also takes a dense causal LM, and that checkpoints are ordinary ERNIE 5.0 folders.
"""

import json
import logging
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl import GRPOTrainer

import modeling_ernie5  # noqa: F401
from modeling_ernie5 import Ernie5ForCausalLM
from training.rewards import toy_world_reward
from training.rl import (
    RLConfig,
    RLTrainer,
    RoutingRecorder,
    aggregate_token_loss,
    hf_chunked_advance,
    load_rl_dataset,
    main,
    make_parser,
    moe_blocks,
    prompt_key,
    replay_routing,
    toy_world_dataset,
    track_group_success,
)
from training.rl_stabilisers import UnbiasedReplayBuffer, pass_at_k

from rl_config import rl_config
from two_ranks import run_on_two_ranks


def length_reward(completions, **kwargs):
    """Varies across completions, so advantages are non-zero and the policy moves even when untrained."""
    return [float(len(c) % 4) for c in completions]


@pytest.fixture(scope="module")
def dataset():
    return toy_world_dataset(6)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tiny_ernie5, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-ernie5")
    tiny_ernie5(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def rl_args(tmp_path, **overrides):
    fields = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=6, max_steps=2,
                  learning_rate=1e-3)  # fmt: skip
    return rl_config(tmp_path, **(fields | overrides))


def logged(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def test_grpo_with_misc_replay_wpsm_and_a_bf16_rollout(model_dir, tokenizer, dataset, tmp_path):
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = rl_args(
        tmp_path, misc=True, routing_replay=True, wpsm=True, rollout_dtype="bfloat16", num_iterations=2,
        max_steps=3, loss_type="grpo",
    )  # fmt: skip
    trainer = RLTrainer(
        model=model, reward_funcs=[length_reward, toy_world_reward], args=args, train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    assert trainer.rollout_engine.copy is not None
    assert next(trainer.rollout_engine.copy.parameters()).dtype == torch.bfloat16
    trainer.train()

    for key in (
        "reward", "entropy", "mismatch/logp_absdiff_mean", "mismatch/replay_logp_absdiff_mean",
        "mismatch/routing_disagreement", "misc/token_masked_frac", "clip_ratio/region_mean", "wpsm/flagged_frac",
        "moe/load_max_over_uniform", "moe/load_cv",
    ):  # fmt: skip
        values = logged(trainer, key)
        assert values and all(v == v for v in values), key  # present and not NaN
    assert logged(trainer, "mismatch/logp_absdiff_mean")[0] > 0  # bf16 rollout vs fp32 training: a real gap
    # every update forward routed exactly as the rollout did
    assert logged(trainer, "mismatch/update_routing_disagreement") and not any(
        logged(trainer, "mismatch/update_routing_disagreement")
    )
    assert logged(trainer, "mismatch/update_logp_absdiff_mean")
    changed = [k for k, v in trainer.model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert any("experts" in k for k in changed) and any("gate.weight" in k for k in changed)

    out = tmp_path / "out"
    assert (out / "rl_curves.png").stat().st_size > 0
    metrics = json.loads((out / "rl_metrics.json").read_text())
    assert metrics["history"] and len(metrics["expert_load"][0]["share"]) == model.config.num_experts


def test_wpsm_and_misc_act_on_the_batch(model_dir, tokenizer, dataset, tmp_path, monkeypatch):
    """The stabilisers act on the batch, not only log: every response is correct on a solved prompt and confident
    (tau 0, eta huge), so WPSM halves TRL's advantages; a bf16 rollout against a tight IcePop band masks tokens, which
    it can only do when MISC receives the rollout log-probs."""
    seen = {}
    trl_generate, rl_generate = GRPOTrainer._generate_and_score_completions, RLTrainer._generate_and_score_completions

    def trl_side(self, inputs):
        output = trl_generate(self, inputs)
        seen["trl"] = output["advantages"].clone()
        return output

    def rl_side(self, inputs):
        output = rl_generate(self, inputs)
        seen["rl"] = output["advantages"].clone()
        return output

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", trl_side)
    monkeypatch.setattr(RLTrainer, "_generate_and_score_completions", rl_side)
    args = rl_args(
        tmp_path, max_steps=1, misc=True, misc_alpha=0.999, misc_beta=1.001, rollout_dtype="bfloat16", wpsm=True,
        wpsm_tau=0.0, wpsm_eta=1e9, wpsm_alpha=0.5, success_threshold=-1.0, plot=False,
    )  # fmt: skip
    trainer = RLTrainer(
        model=Ernie5ForCausalLM.from_pretrained(model_dir), reward_funcs=[length_reward], args=args,
        train_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert seen["trl"].abs().sum() > 0
    assert torch.allclose(seen["rl"], seen["trl"] * 0.5)
    assert logged(trainer, "wpsm/flagged_frac") == [1.0]
    assert logged(trainer, "misc/token_masked_frac")[0] > 0


def test_side_forwards_get_the_multimodal_inputs_of_trls_loss_forward(tokenizer, dataset, tmp_path, monkeypatch):
    """TRL hands a VLM's image inputs (`pixel_values`, `num_images`, `token_type_ids`, ...) to every log-prob forward;
    the stabilisers' own forwards (old log-probs, WPSM entropies, MISC's loss) must pass the same rows, or an image
    prompt is scored as text. TRL's batch gets LLaVA-style image inputs (one image per row, row i filled with i)."""
    trl_generate = GRPOTrainer._generate_and_score_completions

    def with_images(self, inputs):
        output = trl_generate(self, inputs)
        rows = output["prompt_ids"].shape[0]
        width = output["prompt_ids"].shape[1] + output["completion_ids"].shape[1]
        row_id = torch.arange(rows)
        output["num_images"] = [1] * rows
        output["pixel_values"] = row_id.float().view(rows, 1, 1, 1).expand(rows, 3, 2, 2).clone()
        output["token_type_ids"] = row_id.view(rows, 1).expand(rows, width).clone()
        return output

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", with_images)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    scored = []

    def record_image_inputs(backbone, args, kwargs):
        # TRL's fused LM head calls the backbone with use_cache=False (generation keeps its cache) and the image
        # inputs it was given; this text backbone takes none, so they are recorded and taken out here.
        if kwargs.get("use_cache") is False:
            scored.append((kwargs.pop("pixel_values", None), kwargs.pop("token_type_ids", None)))
        return args, kwargs

    model.model.register_forward_pre_hook(record_image_inputs, with_kwargs=True)
    args = rl_args(tmp_path, max_steps=1, misc=True, wpsm=True, per_device_train_batch_size=4, plot=False)
    trainer = RLTrainer(
        model=model, reward_funcs=[length_reward], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    # one no-grad forward for old log-probs and entropies, then MISC's loss forward
    assert len(scored) == 2
    for pixel_values, token_type_ids in scored:
        assert pixel_values is not None and token_type_ids is not None
        assert torch.equal(pixel_values[:, 0, 0, 0].long(), token_type_ids[:, 0])  # the same rows of both


def test_trls_old_logp_forward_does_not_count_expert_load(model_dir, tokenizer, dataset, tmp_path):
    """With num_iterations=2 TRL computes old log-probs itself, in a no-grad forward of the policy in train mode; an
    ERNIE 5.0 training-mode forward counts expert load, which the next training forward turns into a bias step. Only
    the gradient forward may count: after generation (TRL's forward and the trainer's own) nothing is pending."""
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    args = rl_args(tmp_path, misc=True, num_iterations=2, plot=False)
    assert args.gradient_accumulation_steps % (args.steps_per_generation * args.num_iterations) != 0
    trainer = RLTrainer(
        model=model, reward_funcs=[length_reward], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.model.train()
    routers = list(model.model.routers())
    for router in routers:
        router.expert_load.zero_()
    bias = [router.e_score_correction_bias.clone() for router in routers]
    output = trainer._generate_and_score_completions([dataset[0]] * 4 + [dataset[1]] * 4)
    assert "old_per_token_logps" in output
    assert all(not router.expert_load.any() for router in routers)
    assert all(torch.equal(router.e_score_correction_bias, b) for router, b in zip(routers, bias))
    assert trainer.model.training


def even_token_reward(completion_ids, **kwargs):
    """Share of even token ids: learnable from scratch by shifting the output distribution."""
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]


@pytest.mark.slow
def test_reward_rises_with_misc_and_replay(model_dir, tokenizer, dataset, tmp_path):
    """The whole loop optimises: bf16 rollout, replayed routing, MISC loss; the reward must climb within 8 steps."""
    torch.manual_seed(0)
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    args = rl_args(
        tmp_path, misc=True, routing_replay=True, rollout_dtype="bfloat16", max_steps=8, learning_rate=3e-2,
        per_device_train_batch_size=32, num_generations=8, loss_type="grpo", plot=False,
    )  # fmt: skip
    trainer = RLTrainer(
        model=model, reward_funcs=[even_token_reward], args=args, train_dataset=dataset, processing_class=tokenizer
    )
    trainer.train()
    rewards = logged(trainer, "reward")
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards


def test_replayed_routing_reaches_the_backbone_through_trls_fused_head(model_dir, tokenizer, dataset, tmp_path):
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    trainer = RLTrainer(
        model=model, reward_funcs=[length_reward], args=rl_args(tmp_path, routing_replay=True),
        train_dataset=dataset, processing_class=tokenizer,
    )  # fmt: skip
    ids = torch.randint(5, len(tokenizer), (3, 7))
    attn = torch.ones_like(ids)
    n_layers, top_k, num_experts = len(moe_blocks(model)), model.config.num_experts_per_tok, model.config.num_experts
    forced = torch.zeros(3, n_layers, 7, top_k, dtype=torch.long)
    forced[..., 1] = num_experts - 1  # every token -> experts {0, E-1}
    recorder = RoutingRecorder(model)
    with torch.no_grad(), recorder:
        free, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, 4, batch_size=2)
        trainer._replay = forced
        replayed, _, _ = trainer._get_per_token_logps_and_entropies(model, ids, attn, 4, batch_size=2)
        trainer._replay = None
    # calls: two chunks without replay, then two chunks (rows 0-1, row 2) with the forced routing
    assert len(recorder.calls) == 4
    for call, rows in zip(recorder.calls[2:], (slice(0, 2), slice(2, 3))):
        for layer, idx in enumerate(call):
            assert torch.equal(idx, forced[rows, layer])
    assert not torch.allclose(free, replayed)


def test_replay_keeps_rollout_routing_after_the_policy_moves(model_dir):
    """What routing replay is for: the policy changes between rollout and training (or runs at another precision);
    the training forward must still route every token to the experts the rollout used."""
    model = Ernie5ForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(5, model.config.vocab_size, (2, 9))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(ids)
    rollout = torch.stack(rec.calls[0], dim=1)  # (B, N, L, K)
    with torch.no_grad():
        for router in model.model.routers():
            router.weight.add_(torch.randn_like(router.weight) * 0.5)
        with RoutingRecorder(model) as moved:
            model(ids)
        with RoutingRecorder(model) as pinned, replay_routing(model, rollout):
            model(ids)
    assert not torch.equal(torch.stack(moved.calls[0], 1), rollout)
    assert torch.equal(torch.stack(pinned.calls[0], 1), rollout)


def test_trainer_takes_a_dense_causal_lm(tokenizer, dataset, tmp_path):
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    trainer = RLTrainer(
        model=model, reward_funcs=[length_reward], args=rl_args(tmp_path, misc=True), train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.train()
    assert logged(trainer, "misc/token_masked_frac") and not logged(trainer, "moe/load_cv")
    with pytest.raises(ValueError, match="routing_replay needs an MoE model"):
        RLTrainer(
            model=model, reward_funcs=[length_reward], args=rl_args(tmp_path, routing_replay=True),
            train_dataset=dataset, processing_class=tokenizer,
        )  # fmt: skip


def test_ahrl_hints_hard_prompts_and_measures_pass_at_k(model_dir, tokenizer, tmp_path):
    rows = toy_world_dataset(2).to_list()[:4]
    for i, row in enumerate(rows):
        row["reference_reasoning"] = f"Look at the list of shapes. The answer is {row['answer']}."
    from datasets import Dataset

    ds = Dataset.from_list(rows)
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    args = rl_args(tmp_path, ahrl=True, ahrl_p_initial=0.5, ahrl_gamma=0.1, ahrl_k=2)
    trainer = RLTrainer(
        model=model, reward_funcs=[toy_world_reward], args=args, train_dataset=ds, processing_class=tokenizer
    )
    measured = trainer.measure_pass_at_k()
    assert set(measured) == {r["prompt_id"] for r in rows} and all(0.0 <= v <= 1.0 for v in measured.values())

    trainer.ahrl_pass_at_k = {rows[0]["prompt_id"]: 0.0, rows[1]["prompt_id"]: 1.0}  # hard, solved, unmeasured x2
    hinted = trainer._apply_hints(rows)
    reference_ids = tokenizer(rows[0]["reference_reasoning"], add_special_tokens=False)["input_ids"]
    hint = tokenizer.decode(reference_ids[: -(-len(reference_ids) // 2)])
    assert hinted[0]["prompt"] == rows[0]["prompt"] + hint
    assert [h["prompt"] for h in hinted[1:]] == [r["prompt"] for r in rows[1:]]
    assert rows[0]["prompt"] != hinted[0]["prompt"]  # inputs are not modified in place


def every_other_reward(completions, **kwargs):
    """Alternate fail / pass within a batch: a prompt's n consecutive samples pass exactly n / 2 times."""
    return [float(i % 2) for i in range(len(completions))]


def test_ahrl_measured_pass_at_k_is_fractional_and_hints_decay(model_dir, tokenizer, tmp_path):
    """pass@k estimated from n = 4k samples (here c = n/2 of them pass): a prompt solved sometimes is hard but not
    hopeless, and Eq. 5 shortens its hint as steps go by. From n = k samples it would be 1 (never hinted) or 0."""
    rows = toy_world_dataset(2).to_list()[:2]
    for row in rows:
        row["reference_reasoning"] = "Look at the list of shapes, count each colour, then compare the counts. " * 3
    from datasets import Dataset

    args = rl_args(tmp_path, ahrl=True, ahrl_p_initial=0.8, ahrl_gamma=0.1, ahrl_k=2, plot=False)
    assert args.ahrl_pass_samples == 8
    trainer = RLTrainer(
        model=Ernie5ForCausalLM.from_pretrained(model_dir), reward_funcs=[every_other_reward], args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )  # fmt: skip
    measured = trainer.measure_pass_at_k()
    assert measured == {row["prompt_id"]: pytest.approx(pass_at_k(8, 4, 2)) for row in rows}

    prompt_lengths = []
    for step in (0, 10, 20):
        trainer.state.global_step = step
        hinted = trainer._apply_hints(rows)
        prompt_lengths.append([len(h["prompt"]) for h in hinted])
    fractions = trainer._metrics["train"]["ahrl/hint_fraction_mean"]
    assert trainer._metrics["train"]["ahrl/hinted_frac"][0] == 1.0
    assert fractions[0] == pytest.approx(0.8) and fractions[0] > fractions[1] > fractions[2] > 0
    assert all(a > b for a, b in zip(prompt_lengths[0], prompt_lengths[2]))


def test_wpsm_tracks_a_prompt_under_its_unhinted_key(model_dir, tokenizer, tmp_path):
    """Without a prompt id column the WPSM key is the prompt itself; AHRL's hint shrinks from step to step, and the
    tracker must still see one prompt, not a new one per hint length."""
    from datasets import Dataset

    rows = [{k: v for k, v in row.items() if k != "prompt_id"} for row in toy_world_dataset(2).to_list()[:2]]
    for row in rows:
        row["reference_reasoning"] = "Look at the list of shapes, count each colour, then compare the counts."
    args = rl_args(tmp_path, ahrl=True, ahrl_p_initial=0.8, ahrl_gamma=0.2, wpsm=True, plot=False)
    trainer = RLTrainer(
        model=Ernie5ForCausalLM.from_pretrained(model_dir), reward_funcs=[length_reward], args=args,
        train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
    )  # fmt: skip
    keys = [prompt_key(row) for row in rows]
    trainer.ahrl_pass_at_k = dict.fromkeys(keys, 0.5)
    trainer.model.train()
    for step in (0, 10):
        trainer.state.global_step = step
        trainer._generate_and_score_completions([rows[0]] * 4 + [rows[1]] * 4)
    fractions = trainer._metrics["train"]["ahrl/hint_fraction_mean"]
    assert fractions[0] > fractions[1] > 0  # the hinted prompts differ between the two steps
    assert trainer.success_tracker.visits == dict.fromkeys(keys, 2)


def test_misc_warns_when_epsilon_is_trls_token_level_default(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="training.rl"):
        rl_args(tmp_path, misc=True)
    assert "epsilon=3e-4, epsilon_high=4e-4" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="training.rl"):
        rl_args(tmp_path, misc=True, epsilon=3e-4, epsilon_high=4e-4)
        rl_args(tmp_path, misc=True, epsilon_high=0.28)  # a choice, even with epsilon at TRL's default
        rl_args(tmp_path)
    assert "epsilon" not in caplog.text


def test_parser_defaults_to_fp32_on_a_cpu_only_machine(monkeypatch):
    """Without precision flags TRL would turn bf16 on and `TrainingArguments` would refuse it on a CPU-only machine;
    the parser defaults to `use_cpu` + fp32 there, and an explicit `--bf16 true` still wins."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU-only machine, wherever the suite runs
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    base = ["--output_dir", "unused", "--model_name_or_path", "unused"]
    _, args = make_parser().parse_args_and_config(base)
    assert args.use_cpu and not args.bf16
    _, args = make_parser().parse_args_and_config([*base, "--bf16", "true"])
    assert args.use_cpu and args.bf16


def test_yaml_config_main_and_checkpoint_is_a_normal_ernie5_folder(model_dir, tmp_path):
    config = tmp_path / "rl.yaml"
    out = tmp_path / "run"
    config.write_text(
        f"model_name_or_path: {model_dir}\n"
        "dataset_name: toy_world\ntoy_world_scenes: 3\nreward_funcs: [toy_world]\n"
        f"output_dir: {out}\nuse_cpu: true\nbf16: false\ngradient_checkpointing: false\nreport_to: none\n"
        "save_strategy: 'no'\nper_device_train_batch_size: 4\nnum_generations: 4\nmax_completion_length: 4\n"
        "max_steps: 2\nlogging_steps: 1\nmisc: true\nrouting_replay: true\nmisc_beta: 3.0\nplot: false\n"
    )
    script_args, training_args = make_parser().parse_args_and_config(["--config", str(config)])
    assert isinstance(training_args, RLConfig)
    assert training_args.misc and training_args.routing_replay and training_args.misc_beta == 3.0
    assert training_args.router_aux_loss_coef == 0.0
    trainer = main(script_args, training_args)

    from transformers import AutoModelForCausalLM

    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "ernie5" and os.path.exists(out / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(reloaded, Ernie5ForCausalLM)
    trained = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert not (out / "rl_curves.png").exists()


def test_main_resumes_from_a_checkpoint(model_dir, tmp_path):
    """`--resume_from_checkpoint` reaches `trainer.train` (the Trainer never reads it by itself): the resumed run
    starts at the checkpoint's step and trains only the steps that are left."""
    out = tmp_path / "run"

    def run(max_steps, *extra):
        argv = ["--model_name_or_path", str(model_dir), "--toy_world_scenes", "3", "--output_dir", str(out),
                "--gradient_checkpointing", "false", "--report_to", "none", "--per_device_train_batch_size", "4",
                "--num_generations", "4", "--max_completion_length", "4", "--logging_steps", "1", "--plot", "false",
                "--save_strategy", "steps", "--save_steps", "1", "--max_steps", str(max_steps), *extra]  # fmt: skip
        return main(*make_parser().parse_args_and_config(argv))

    run(1)
    assert (out / "checkpoint-1" / "trainer_state.json").exists()
    resumed = run(2, "--resume_from_checkpoint", str(out / "checkpoint-1"))
    assert resumed.state.global_step == 2
    assert [h["step"] for h in resumed.state.log_history if "loss" in h] == [1, 2]  # step 1 restored, step 2 new
    with pytest.raises(ValueError, match="valid checkpoint|not a valid"):
        run(2, "--resume_from_checkpoint", str(tmp_path / "nothing"))


def test_rl_dataset_without_a_prompt_column_is_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"no 'prompt' column \(columns: \['question', 'answer'\]\)"):
        load_rl_dataset(str(path))
    path.write_text(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    assert load_rl_dataset(str(path))[0]["prompt"] == "2+2?"


def test_config_rejects_impossible_settings(tmp_path):
    with pytest.raises(ValueError, match="misc_alpha"):
        rl_args(tmp_path, misc=True, misc_alpha=1.5)
    with pytest.raises(ValueError, match="routing_replay needs the expert choices"):
        rl_args(tmp_path, routing_replay=True, use_vllm=True)
    with pytest.raises(ValueError, match="rollout_dtype"):
        rl_args(tmp_path, rollout_dtype="int8")
    with pytest.raises(ValueError, match="loss_type 'cispo'"):
        rl_args(tmp_path, misc=True, loss_type="cispo")


def test_urb_with_hf_generation_releases_groups_in_order(model_dir, tokenizer):
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    prompts = {f"p{i}": tokenizer(f"Q: question {i}\nA:")["input_ids"] for i in range(6)}
    buf = UnbiasedReplayBuffer([["p0", "p1"], ["p2", "p3"], ["p4", "p5"]], batch_size=2, buffer_size=2)
    for r in buf._queue:
        r.state = prompts[r.request_id]
    advance = hf_chunked_advance(model, tokenizer, chunk_tokens=2, max_new_tokens=5, do_sample=True, top_k=0)
    groups = list(buf.run(advance))
    assert [[r.request_id for r in g] for g in groups] == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    for g in groups:
        for r in g:
            assert r.finished and r.state["prompt_ids"] == prompts[r.request_id]
            assert 1 <= len(r.state["completion_ids"]) <= 5


def test_misc_token_loss_normalised_per_loss_type_as_trl_does():
    """bnpo is the micro-batch token mean (not dapo's window-wide token count); each type by hand."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    items = torch.tensor(16.0)  # tokens of the generation batch on all processes

    def agg(loss_type, **kw):
        return aggregate_token_loss(loss, mask, loss_type, accumulation=2, max_completion_length=3,
                                    num_items_in_batch=items, num_processes=2, **kw).item()

    assert agg("grpo") == pytest.approx((2.0 + 4.0) / 2 / 2)
    assert agg("bnpo") == pytest.approx(10.0 / 4 / 2)
    assert agg("dr_grpo") == pytest.approx(10.0 / (2 * 3) / 2)
    assert agg("dapo", steps_per_generation=4) == pytest.approx(10.0 / (16 / 2 * 2 / 4))
    assert agg("dapo") == pytest.approx(10.0 / (16 / 2))  # evaluation: no window rescaling
    with pytest.raises(ValueError, match="loss_type 'cispo'"):
        agg("cispo")


def _wpsm_rates_on_rank(rank):
    from training.rl_stabilisers import SuccessRateTracker

    # Prompt "a"'s four completions are split 3 / 1 over the two processes; "b" lies on process 1 only.
    local_keys = [["a", "a", "a"], ["a", "b", "b"]][rank]
    correct_all = torch.tensor([True, True, False, False, True, True])  # gathered, process order
    tracker = SuccessRateTracker(decay=0.0)
    rates = track_group_success(tracker, local_keys, correct_all)
    return {"rates": rates, "tracker": tracker.rates}


def test_wpsm_success_rates_cover_whole_groups_across_processes(tmp_path):
    """A group split over processes is rated on all its completions, and both processes keep the same tracker
    (rated on the local rows, "a" would be 2/3 on process 0 and 0 on process 1)."""
    got = run_on_two_ranks(_wpsm_rates_on_rank, tmp_path)
    assert got[0]["tracker"] == got[1]["tracker"] == {"a": 0.5, "b": 1.0}
    assert got[0]["rates"] == [0.5] * 3 and got[1]["rates"] == [0.5, 1.0, 1.0]
