"""U-RB wired into `RLTrainer` (training/rl.py, `use_urb`; ERNIE 5.0 §4.1): short CPU runs on a tiny ERNIE 5.0 model.

The reward functions record what TRL hands them (prompt ids of the rows, completion token ids), so the checks look at
the data training actually consumed: groups in dataset order, later groups started early and resumed chunk by chunk,
and the same seed giving the same run.
"""

import pytest
import torch

import modeling_ernie5  # noqa: F401
from modeling_ernie5 import Ernie5ForCausalLM
from training.rl import RLTrainer, toy_world_dataset
from training.rl_stabilisers import UnbiasedReplayBuffer

from rl_config import rl_config

GROUP_PROMPTS = 2  # per_device_train_batch_size / num_generations: prompts per iteration group
NUM_GENERATIONS = 2
STEPS = 5


@pytest.fixture(scope="module")
def dataset():
    return toy_world_dataset(3)


@pytest.fixture(scope="module")
def model_dir(tokenizer, dataset, tiny_ernie5, tmp_path_factory):
    model = tiny_ernie5(tokenizer)
    # Make EOS likely (about 0.3 per token): rollout lengths then vary, so a group's longest rollout can outlast the
    # previous group's and has to be paused across a training step; a random tiny model almost never emits EOS.
    with torch.no_grad():
        ids = tokenizer(list(dataset["prompt"][:8]), return_tensors="pt", padding=True)
        hidden = model.model(**ids).last_hidden_state[ids["attention_mask"].bool()]
        direction = hidden.mean(0)
        model.lm_head.weight[tokenizer.eos_token_id] = direction / direction.norm() ** 2 * 5.0
    path = tmp_path_factory.mktemp("tiny-ernie5-urb")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def urb_args(tmp_path, **overrides):
    fields = dict(
        per_device_train_batch_size=GROUP_PROMPTS * NUM_GENERATIONS,
        num_generations=NUM_GENERATIONS,
        max_completion_length=12,
        max_steps=STEPS,
        learning_rate=1e-5,  # small: the EOS propensity, hence the spread of rollout lengths, stays put
        shuffle_dataset=False,
        use_urb=True,
        urb_buffer_size=2,
        urb_chunk_tokens=2,
        plot=False,
    )
    return rl_config(tmp_path, **(fields | overrides))


class Recorder:
    """A reward function that keeps what TRL passes it and scores the share of even token ids."""

    __name__ = "recording_reward"

    def __init__(self):
        self.calls = []

    def __call__(self, completions, completion_ids, prompt_id, **kwargs):
        self.calls.append({"prompt_id": list(prompt_id), "completion_ids": [list(c) for c in completion_ids]})
        return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]


def run(model_dir, tokenizer, dataset, tmp_path, resume=None, global_seed=123, **overrides):
    torch.manual_seed(global_seed)  # the trainer must reseed from args.seed; a different global state must not matter
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    reward = Recorder()
    trainer = RLTrainer(
        model=model, reward_funcs=[reward], args=urb_args(tmp_path, **overrides), train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    advances = []  # per tick: (request id, optimiser step, completion so far, finished) of every advanced rollout
    inner = trainer._urb_advance

    def traced(rollouts):
        results = inner(rollouts)
        step = trainer.state.global_step
        advances.append(
            [(r.request_id, step, tuple(state["completion_ids"]), done) for r, (state, done) in zip(rollouts, results)]
        )
        return results

    trainer._urb_advance = traced
    trainer.train(resume_from_checkpoint=resume)
    return trainer, reward, advances


def test_urb_training_keeps_dataset_order_starts_early_and_resumes(model_dir, tokenizer, dataset, tmp_path):
    trainer, reward, advances = run(model_dir, tokenizer, dataset, tmp_path)

    # (a) training consumed the groups in dataset order, each prompt repeated num_generations times
    ids = dataset["prompt_id"]
    assert len(reward.calls) == STEPS
    for g, call in enumerate(reward.calls):
        rows = range(g * GROUP_PROMPTS, (g + 1) * GROUP_PROMPTS)
        assert call["prompt_id"] == [ids[r] for r in rows for _ in range(NUM_GENERATIONS)]
    # ... and what it scored is exactly what the buffer generated for those rows, group by group
    assert [rec["group"] for rec in trainer.urb_log] == list(range(STEPS))
    for g, (call, rec) in enumerate(zip(reward.calls, trainer.urb_log)):
        rows = range(g * GROUP_PROMPTS, (g + 1) * GROUP_PROMPTS)
        assert rec["rows"] == [r for r in rows for _ in range(NUM_GENERATIONS)]
        assert call["completion_ids"] == rec["completion_ids"]
        assert all(1 <= len(c) <= 12 for c in call["completion_ids"])

    # (b) the first tick already advanced the head group and group 1 (spare pool capacity) ...
    assert {rid[0] for rid, *_ in advances[0]} == {0, 1}
    history = {}
    for tick, entries in enumerate(advances):
        for rid, step, completion, done in entries:
            history.setdefault(rid, []).append((tick, step, completion, done))
    for rid, seen in history.items():
        # ... every rollout grows by at most urb_chunk_tokens per tick, keeping what it had (state kept between ticks)
        previous = ()
        for _, _, completion, _ in seen:
            assert completion[: len(previous)] == previous and 1 <= len(completion) - len(previous) <= 2, (rid, seen)
            previous = completion
        assert seen[-1][3] and not any(done for *_, done in seen[:-1])
    # ... and some later-group rollout was paused mid-generation across an optimiser step, then resumed
    carried = [
        rid
        for rid, seen in history.items()
        if rid[0] >= 1 and len({step for _, step, _, _ in seen}) >= 2 and not seen[0][3]
    ]
    assert carried, "no rollout was resumed after a training step"
    assert sum(rec["resumed"] for rec in trainer.urb_log) == len(carried)
    assert sum(rec["started_early"] for rec in trainer.urb_log) >= len(carried)
    assert all(rec["stale_tokens"] > 0 for rec in trainer.urb_log if rec["resumed"])

    logs = trainer.state.log_history
    for key in ("urb/pool_occupancy", "urb/waiting_rollouts", "urb/started_early_rollouts", "urb/resumed_rollouts",
                "urb/groups_started_early", "urb/stale_token_frac", "urb/ticks"):  # fmt: skip
        assert any(key in h for h in logs), key
    assert [h["urb/groups_started_early"] for h in logs if "urb/groups_started_early" in h][-1] >= 1
    occupancy = [h["urb/pool_occupancy"] for h in logs if "urb/pool_occupancy" in h]
    assert 0.5 < occupancy[0] <= 1.0  # the first batch waited with the pool (nearly) full

    # (c) the same seed gives the same rollouts, rewards and weights
    again, reward2, advances2 = run(model_dir, tokenizer, dataset, tmp_path / "again", global_seed=456)
    assert reward2.calls == reward.calls and advances2 == advances
    for (k, v), (k2, v2) in zip(trainer.model.state_dict().items(), again.model.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_urb_config_rejects_unsupported_settings(tmp_path):
    with pytest.raises(ValueError, match="shuffle_dataset=False"):
        urb_args(tmp_path, shuffle_dataset=True)
    with pytest.raises(ValueError, match="routing_replay"):
        urb_args(tmp_path, routing_replay=True)
    with pytest.raises(ValueError, match="ahrl"):
        urb_args(tmp_path, ahrl=True)
    with pytest.raises(ValueError, match="urb_chunk_tokens must be >= 1"):
        urb_args(tmp_path, urb_chunk_tokens=0)
    with pytest.raises(ValueError, match="urb_buffer_size must be >= 1"):
        urb_args(tmp_path, urb_buffer_size=0)
    # without use_urb the same settings are fine
    assert not urb_args(tmp_path, use_urb=False, shuffle_dataset=True, urb_chunk_tokens=0).use_urb


def test_urb_refuses_a_batch_that_is_not_its_next_group(model_dir, tokenizer, dataset, tmp_path):
    model = Ernie5ForCausalLM.from_pretrained(model_dir)
    trainer = RLTrainer(
        model=model, reward_funcs=[Recorder()], args=urb_args(tmp_path), train_dataset=dataset,
        processing_class=tokenizer,
    )  # fmt: skip
    trainer.state.max_steps = 2
    prompts = [dataset[r]["prompt"] for r in (2, 2, 3, 3)]  # group 1's rows where group 0 is due
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    with pytest.raises(RuntimeError, match="differs from pre-assigned group 0"):
        trainer._urb_generate(prompt_ids, NUM_GENERATIONS)
    with pytest.raises(ValueError, match="num_generations=2"):
        trainer._urb_generate(prompt_ids, 3)


def test_free_finished_slots_refill_the_pool_during_a_long_tail():
    lengths = {"a": 1, "b": 4, "c": 1, "d": 2, "e": 1, "f": 1}

    def advance(rollouts):  # each tick adds one token; a rollout finishes at its length
        out = []
        for r in rollouts:
            n = (r.state or 0) + 1
            out.append((n, n >= lengths[r.request_id]))
        return out

    groups = [["a", "b"], ["c", "d"], ["e", "f"]]
    held = UnbiasedReplayBuffer(groups, batch_size=2, buffer_size=1)
    freed = UnbiasedReplayBuffer(groups, batch_size=2, buffer_size=1, free_finished_slots=True)
    for buf in (held, freed):
        buf.tick(advance)
        buf.tick(advance)
    assert [r.request_id for r in held.pool()] == ["a", "b"]  # "a" finished but keeps its slot
    # "a" finished at tick 0, so "c" (group 1, one ahead) took its slot; group 2 is beyond the look-ahead
    assert [r.request_id for r in freed.pool()] == ["a", "b", "c"] and freed.generating() == 1
    assert [r.request_id for r in freed.pool() if r.started_at == 1] == ["c"]
    order = [[r.request_id for r in g] for g in freed.run(advance)]
    assert order == groups


def test_urb_with_slots_held_until_release_keeps_the_order(model_dir, tokenizer, dataset, tmp_path):
    trainer, reward, _ = run(model_dir, tokenizer, dataset, tmp_path, urb_free_finished_slots=False, max_steps=2)
    ids = dataset["prompt_id"]
    assert [call["prompt_id"] for call in reward.calls] == [
        [ids[r] for r in range(g * GROUP_PROMPTS, (g + 1) * GROUP_PROMPTS) for _ in range(NUM_GENERATIONS)]
        for g in range(2)
    ]
    assert [rec["rows"] for rec in trainer.urb_log] == [[0, 0, 1, 1], [2, 2, 3, 3]]


def test_urb_resumes_from_a_checkpoint_at_the_group_due_next(model_dir, tokenizer, dataset, tmp_path):
    first, _, _ = run(model_dir, tokenizer, dataset, tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint.is_dir() and [rec["group"] for rec in first.urb_log] == [0, 1]
    resumed, reward, _ = run(model_dir, tokenizer, dataset, tmp_path, resume=str(checkpoint), max_steps=3)
    ids = dataset["prompt_id"]
    assert resumed.state.global_step == 3
    assert [(rec["group"], rec["rows"]) for rec in resumed.urb_log] == [(2, [4, 4, 5, 5])]
    assert [call["prompt_id"] for call in reward.calls] == [[ids[4], ids[4], ids[5], ids[5]]]
