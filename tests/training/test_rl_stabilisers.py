"""The arithmetic of ERNIE 5.0's RL stabilisers, pinned on hand-made tensors (training/rl_stabilisers.py). CPU only."""

import math

import pytest
import torch

from training.rl_stabilisers import (
    HintScheduler,
    SuccessRateTracker,
    UnbiasedReplayBuffer,
    assemble_rollout_routing,
    hint_fraction,
    icepop_token_mask,
    misc_per_token_loss,
    pass_at_k,
    routing_disagreement,
    routing_for_forward,
    sequence_log_ratio,
    wpsm_weights,
)

# --- MISC ------------------------------------------------------------------------------------------------------------


def test_sequence_log_ratio_is_length_normalised_over_the_mask():
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 9.0]])
    old = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = sequence_log_ratio(logps, old, mask)
    # row 0: (0.5 + 0 - 1) / 3; row 1: (0.5 + 0.5) / 2, the padded 9.0 ignored
    assert torch.allclose(got, torch.tensor([[-0.5 / 3], [0.5]]))


def test_icepop_mask_keeps_the_band_and_weights_by_the_ratio():
    rollout = torch.zeros(1, 4)
    train = torch.log(torch.tensor([[0.4, 1.5, 3.0, 1.0]]))
    mask = torch.tensor([[1, 1, 1, 0]])
    weights, kept = icepop_token_mask(train, rollout, mask, alpha=0.5, beta=2.0)
    assert kept.tolist() == [[False, True, False, False]]
    assert torch.allclose(weights, torch.tensor([[0.0, 1.5, 0.0, 0.0]]))
    binary, _ = icepop_token_mask(train, rollout, mask, 0.5, 2.0, weight_by_ratio=False)
    assert binary.tolist() == [[0.0, 1.0, 0.0, 0.0]]
    # the band edges are inclusive
    edges, _ = icepop_token_mask(torch.log(torch.tensor([[0.5, 2.0]])), torch.zeros(1, 2), torch.ones(1, 2), 0.5, 2.0)
    assert torch.allclose(edges, torch.tensor([[0.5, 2.0]]))
    with pytest.raises(ValueError, match="alpha"):
        icepop_token_mask(train, rollout, mask, alpha=1.2, beta=2.0)


def test_misc_value_is_the_gspo_sequence_objective_and_drops_only_mismatched_tokens():
    old = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    # row 0: mean log ratio 0.05 -> s = e^0.05 (inside [0.8, 1.2]); row 1: mean 0.3 -> s = e^0.3 > 1.2, clipped (A > 0)
    logps = (old + torch.tensor([[0.1, 0.0, 0.05], [0.3, 0.3, 0.3]])).requires_grad_(True)
    # k = pi_train / pi_rollout per token, against an asymmetric band [0.5, 3]: 0.4 is dropped and 2.5 kept, while a
    # reversed ratio (rollout / train) would keep 1 / 0.4 and drop 1 / 2.5; kept tokens weigh k, never 1
    k = torch.tensor([[1.25, 0.4, 2.5], [1.25, 1.25, 1.25]])
    rollout = old - k.log()
    mask = torch.ones(2, 3)
    adv = torch.tensor([2.0, 1.0])
    out = misc_per_token_loss(logps, old, rollout, adv, mask, 0.2, 0.2, alpha=0.5, beta=3.0)

    s0, s1 = math.exp(0.05), math.exp(0.3)
    assert torch.allclose(out.seq_ratio, torch.tensor([[s0], [s1]]))
    assert out.token_kept.tolist() == [[True, False, True], [True, True, True]]
    assert out.seq_clipped.flatten().tolist() == [False, True]
    expected = torch.tensor([[-s0 * 2.0 * 1.25, 0.0, -s0 * 2.0 * 2.5], [-1.2 * 1.25] * 3])
    assert torch.allclose(out.per_token_loss, expected, atol=1e-6)

    out.per_token_loss.sum().backward()
    # kept unclipped tokens: d/dlogp of -k s_ij A = -k s_i A; the masked token and the clipped sequence get nothing
    assert torch.allclose(logps.grad[0], torch.tensor([-s0 * 2.0 * 1.25, 0.0, -s0 * 2.0 * 2.5]), atol=1e-6)
    assert torch.all(logps.grad[1] == 0)


def test_misc_treats_an_unscored_rollout_token_as_ratio_one():
    """TRL 1.16 stores NaN for a token vLLM could not score; MISC gives it ratio 1 as TRL does (kept, weight 1), so
    loss and gradient equal those of a rollout that matched the trainer on that token, instead of turning NaN."""
    old = torch.zeros(2, 3)
    rollout = torch.tensor([[0.0, float("nan"), 0.1], [0.0, 0.0, float("nan")]])
    matched = torch.where(torch.isnan(rollout), old, rollout)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # also NaN on padding
    results = []
    for rollout_logps in (rollout, matched):
        logps = torch.full((2, 3), 0.01, requires_grad=True)
        out = misc_per_token_loss(logps, old, rollout_logps, torch.tensor([1.0, -1.0]), mask, 0.2, 0.2, 0.5, 2.0)
        loss = (out.per_token_loss * mask).sum()
        loss.backward()
        results.append((loss.detach(), logps.grad, out.token_kept))
    (loss, grad, kept), (loss_ref, grad_ref, kept_ref) = results
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.equal(loss, loss_ref) and torch.equal(grad, grad_ref) and torch.equal(kept, kept_ref)
    assert kept[0, 1]
    impossible_then_unscored = torch.tensor([[float("-inf"), float("nan")]])
    weights, _ = icepop_token_mask(torch.zeros(1, 2), impossible_then_unscored, torch.ones(1, 2), 0.5, 2.0)
    assert weights.tolist() == [[0.0, 1.0]]  # an impossible rollout token (k = inf) is dropped, not NaN


def test_misc_negative_advantage_uses_the_pessimistic_side():
    old = torch.zeros(1, 2)
    logps = torch.full((1, 2), -0.5, requires_grad=True)  # s = e^-0.5 = 0.607 < 0.8
    out = misc_per_token_loss(logps, old, None, torch.tensor([-1.0]), torch.ones(1, 2), 0.2, 0.2, 0.5, 2.0)
    # min(s * -1, 0.8 * -1) = -0.8 -> loss +0.8 per token, clipped (no gradient)
    assert torch.allclose(out.per_token_loss, torch.tensor([[0.8, 0.8]]))
    assert out.seq_clipped.item()


# --- WPSM ------------------------------------------------------------------------------------------------------------


def test_success_rate_tracker_groups_by_prompt_and_decays():
    tracker = SuccessRateTracker(decay=0.5)
    rates = tracker.update(["a", "a", "b", "b"], [True, False, True, True])
    assert rates == {"a": 0.5, "b": 1.0}
    tracker.update(["a", "a"], torch.tensor([True, True]))
    assert tracker.rate("a") == pytest.approx(0.75)
    assert tracker.rate("b") == 1.0 and tracker.rate("unseen") == 0.0
    assert tracker.visits == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="2 prompt keys but 1"):
        tracker.update(["a", "b"], [True])


def test_wpsm_flags_confident_correct_answers_of_solved_prompts():
    entropy = torch.tensor([0.1, 0.5, 0.1, 0.1, 0.3])
    rate = torch.tensor([0.9, 0.9, 0.8, 0.9, 0.9])
    correct = torch.tensor([True, True, True, False, True])
    weights, flagged = wpsm_weights(entropy, rate, correct, tau=0.8, eta=0.3, alpha=0.6)
    # row 1: entropy too high; row 2: rate not > tau; row 3: wrong answer; row 4: entropy not < eta
    assert flagged.tolist() == [True, False, False, False, False]
    assert torch.allclose(weights, torch.tensor([0.4, 1.0, 1.0, 1.0, 1.0]))
    _, flagged_any = wpsm_weights(entropy, rate, correct, 0.8, 0.3, 0.6, positive_only=False)
    assert flagged_any.tolist() == [True, False, False, True, False]


# --- AHRL ------------------------------------------------------------------------------------------------------------


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(2, 3, 1)


def test_hint_fraction_decays_faster_for_easier_prompts():
    assert hint_fraction(0, 0.75, 0.5, 0.1) == 0.5
    assert hint_fraction(10, 0.5, 0.5, 0.1) == pytest.approx(0.5 * math.exp(-0.5))
    assert hint_fraction(10, 0.9, 0.5, 0.1) < hint_fraction(10, 0.1, 0.5, 0.1)
    scheduler = HintScheduler(p_initial=0.5, gamma=0.1, max_pass=0.8, min_fraction=0.05)
    assert scheduler.fraction(0, None) == 0.0  # unmeasured prompts get no hint
    assert scheduler.fraction(0, 0.8) == 0.0  # not hard
    assert scheduler.fraction(0, 0.0) == 0.5
    assert scheduler.fraction(100, 0.5) == 0.0  # 0.5 e^-5 < min_fraction
    assert HintScheduler.prefix(list(range(10)), 0.25) == [0, 1, 2]
    assert HintScheduler.prefix(list(range(10)), 0.0) == []


# --- Routing replay --------------------------------------------------------------------------------------------------


def test_assemble_rollout_routing_lays_out_prefill_and_decode_steps():
    E, K = 8, 2
    # Rollout prompt width 3: row 0 has 3 real tokens, row 1 has 2 (left padded). One MoE layer.
    prefill = [torch.tensor([[[0, 1], [2, 3], [4, 5]], [[9, 9], [6, 7], [1, 2]]])]
    rollout_mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    # Training layout pads prompts to width 4.
    train_mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    # two decode calls: one with a KV cache (B, K), one recomputing 2 positions without a cache (B, 2, K)
    steps = [[torch.tensor([[3, 4], [5, 6]])], [torch.tensor([[[1, 1], [7, 0]], [[1, 1], [0, 7]]])]]
    out = assemble_rollout_routing(prefill, steps, rollout_mask, train_mask, completion_length=3, num_experts=E)
    assert out.shape == (2, 1, 4 + 3, K)
    assert out[0, 0].tolist() == [[8, 8], [0, 1], [2, 3], [4, 5], [3, 4], [7, 0], [8, 8]]
    assert out[1, 0].tolist() == [[8, 8], [8, 8], [6, 7], [1, 2], [5, 6], [0, 7], [8, 8]]
    flat = routing_for_forward(out)
    assert len(flat) == 1 and flat[0].shape == (2 * 7, K)
    assert flat[0][7 + 2].tolist() == [6, 7]
    with pytest.raises(ValueError, match="prompt lengths differ"):
        assemble_rollout_routing(prefill, steps, rollout_mask, torch.ones(2, 4), 3, E)


def test_routing_disagreement_compares_expert_sets():
    a = torch.tensor([[[[0, 1], [2, 3], [4, 5]]]])  # (B=1, N=1, L=3, K=2)
    b = torch.tensor([[[[1, 0], [2, 4], [8, 8]]]])  # same set, different set, unrouted
    assert routing_disagreement(a, b, torch.ones(1, 3), num_experts=8) == pytest.approx(0.5)
    assert routing_disagreement(a, b, torch.tensor([[1, 0, 1]]), num_experts=8) == 0.0


# --- U-RB ------------------------------------------------------------------------------------------------------------


def fake_generator(lengths):
    """Each tick generates one token per active rollout; a rollout finishes after `lengths[id]` tokens."""

    def advance(rollouts):
        out = []
        for r in rollouts:
            done_tokens = (r.state or 0) + 1
            out.append((done_tokens, done_tokens >= lengths[r.request_id]))
        return out

    return advance


def test_urb_releases_groups_in_order_and_resumes_early_rollouts():
    groups = [["a", "b"], ["c", "d"], ["e", "f"]]
    lengths = {"a": 1, "b": 3, "c": 5, "d": 1, "e": 2, "f": 1}
    buf = UnbiasedReplayBuffer(groups, batch_size=2, buffer_size=2)
    assert buf.capacity == 4
    advance = fake_generator(lengths)

    assert buf.release() is None  # nothing generated yet
    assert [r.request_id for r in buf.pool()] == ["a", "b", "c", "d"]  # group 1 starts early
    buf.tick(advance)
    buf.tick(advance)
    assert buf.release() is None  # b still running: group 0 waits for its longest rollout
    buf.tick(advance)
    released = buf.release()
    assert [r.request_id for r in released] == ["a", "b"] and all(r.finished for r in released)
    # c has been generating since tick 0 and keeps its partial state (3 of 5 tokens): it resumes, not restarts
    c = next(r for r in buf.pool() if r.request_id == "c")
    assert c.state == 3 and not c.finished and c.started_at == 0
    assert buf.release() is None  # group 1 is not done (c), even though e and f could run
    assert [r.request_id for r in buf.pool()] == ["c", "d", "e", "f"]

    rest = list(buf.run(advance))
    assert [[r.request_id for r in g] for g in rest] == [["c", "d"], ["e", "f"]]
    assert buf.done and buf.tick_count == 5  # c needed 5 ticks in all; e and f finished meanwhile
    assert {r.request_id: r.state for g in rest for r in g} == {"c": 5, "d": 1, "e": 2, "f": 1}


def test_urb_keeps_order_when_a_later_group_finishes_first():
    groups = [["x"], ["y"]]
    buf = UnbiasedReplayBuffer(groups, batch_size=1, buffer_size=2)
    order = [[r.request_id for r in g] for g in buf.run(fake_generator({"x": 4, "y": 1}))]
    assert order == [["x"], ["y"]]


def test_urb_capacity_limits_early_starts_and_rejects_oversized_groups():
    buf = UnbiasedReplayBuffer([["a", "b"], ["c", "d"]], batch_size=2, buffer_size=1)
    buf.tick(fake_generator({"a": 1, "b": 1, "c": 1, "d": 1}))
    assert [r.request_id for r in buf.pool()] == ["a", "b"]  # no room for group 1 yet
    with pytest.raises(ValueError, match="group 0 has 3 requests"):
        UnbiasedReplayBuffer([["a", "b", "c"]], batch_size=2, buffer_size=1)
