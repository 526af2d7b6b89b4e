"""Invariants of the ERNIE 5.0 text backbone (transformers-style model tests, CPU, tiny sizes)."""

import copy
import inspect
import json

import pytest
import torch
import torch.nn.functional as F

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM, Ernie5Model
from modeling_ernie5.moe import Ernie5SparseMoeBlock, reference_experts_forward

VOCAB = 96


def tiny_config(**overrides):
    fields = dict(vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, bos_token_id=1, experts_backend="reference")
    fields.update(overrides)
    return Ernie5Config.from_preset("tiny", **fields)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Ernie5ForCausalLM(tiny_config(**overrides)).eval()


def ids(batch=2, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_attention_heads=3), "num_attention_heads"),
        (dict(rope_section=[1, 1, 1]), "rope_section"),
        (dict(head_dim=15), "head_dim"),
        (dict(elastic_width_full_prob=1.5), "elastic_width_full_prob"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(router_bias_update_rate=-1.0), "router_bias_update_rate"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


def test_config_presets_and_auto_config():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("ernie5", hidden_size=32, num_experts=4, num_experts_per_tok=2)
    assert isinstance(cfg, Ernie5Config) and cfg.hidden_size == 32 and cfg.num_experts == 4
    big = Ernie5Config.from_preset("ablation-3b")
    assert (big.num_hidden_layers, big.num_experts, big.num_experts_per_tok) == (16, 64, 8)
    assert sum(big.rope_section) == big.head_dim // 2
    with pytest.raises(ValueError, match="unknown Ernie5 preset"):
        Ernie5Config.from_preset("huge")


def test_ablation_preset_parameter_counts_match_the_paper():
    from modeling_ernie5.elastic import parameter_counts

    counts = parameter_counts(Ernie5Config.from_preset("ablation-3b"))
    assert 3.0e9 < counts["total"] < 3.4e9  # paper: 3.2B total
    assert 0.42e9 < counts["active"] < 0.48e9  # paper: 454M active


# ---------------------------------------------------------------------------------------------- attention


def test_causality_future_tokens_never_change_past_logits():
    model = tiny_model()
    x = ids(1, 12)
    y = x.clone()
    y[0, 7:] = torch.randint(3, VOCAB, (5,))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_sdpa_and_eager_agree_with_padding():
    x = ids(2, 9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0
    outs = {}
    for impl in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=impl)
        model.config._attn_implementation = impl
        with torch.no_grad():
            outs[impl] = model(x, attention_mask=mask).logits
    torch.testing.assert_close(outs["eager"][0], outs["sdpa"][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outs["eager"][1, 3:], outs["sdpa"][1, 3:], atol=1e-5, rtol=1e-4)


def test_attention_implementation_can_be_switched_on_a_built_model():
    # transformers allows `set_attn_implementation` only for modules that dispatch through
    # `ALL_ATTENTION_FUNCTIONS.get_interface(`; a registered custom kernel must then actually be called.
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []

    def counting_sdpa(module, *args, **kwargs):
        calls.append(module.layer_idx)
        return sdpa_attention_forward(module, *args, **kwargs)

    AttentionInterface.register("ernie5_test_counting_sdpa", counting_sdpa)
    model = tiny_model(attn_implementation="sdpa")
    x = ids(2, 9)
    with torch.no_grad():
        want = model(x).logits
        model.set_attn_implementation("ernie5_test_counting_sdpa")
        assert model.config._attn_implementation == "ernie5_test_counting_sdpa"
        got = model(x).logits
        assert calls == list(range(model.config.num_hidden_layers))
        model.set_attn_implementation("eager")
        eager = model(x).logits
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(eager, want, atol=1e-5, rtol=1e-4)


def test_text_position_ids_2d_and_3d_are_equivalent():
    model = tiny_model()
    x = ids(2, 8)
    pos = torch.arange(8).expand(2, -1)
    with torch.no_grad():
        a = model(x, position_ids=pos).logits
        b = model(x, position_ids=pos.unsqueeze(0).expand(3, -1, -1)).logits
        c = model(x).logits
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=torch.zeros(2, 2, 8, dtype=torch.long))


def test_left_padding_leaves_logits_and_aux_loss_unchanged():
    """Padding changes neither the logits of the real tokens, nor the balance and z losses (computed over real
    tokens only), nor the expert loads that the next bias update balances."""
    model = tiny_model(router_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    x = ids(1, 7)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    labels = padded.masked_fill(mask == 0, -100)
    labels[:, 3] = -100  # the first real token has nothing before it to be predicted from, as in the unpadded row
    with torch.no_grad():
        plain = model(x, labels=x)
        left = model(padded, attention_mask=mask, labels=labels)
    torch.testing.assert_close(plain.logits, left.logits[:, 3:], atol=1e-5, rtol=1e-4)
    assert plain.aux_loss is not None and plain.z_loss is not None
    torch.testing.assert_close(plain.aux_loss, left.aux_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain.z_loss, left.z_loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(plain.loss, left.loss, atol=1e-5, rtol=1e-5)
    # A row of padding only contributes nothing (not nan) to either term.
    from modeling_ernie5.modeling_ernie5 import router_z_loss, sequence_balance_loss

    with torch.no_grad():
        out = model(torch.cat([padded, padded]), attention_mask=torch.cat([mask, torch.zeros_like(mask)]),
                    output_router_logits=True, output_routing_indices=True)  # fmt: skip
    k, e = model.config.num_experts_per_tok, model.config.num_experts
    only_pads = torch.zeros(2, 10, dtype=torch.bool)
    assert sequence_balance_loss(out.router_logits, out.routing_indices, e, k, 2, only_pads) == 0
    assert router_z_loss(out.router_logits, only_pads) == 0
    torch.testing.assert_close(
        sequence_balance_loss(out.router_logits, out.routing_indices, e, k, 2, torch.cat([mask, only_pads[:1]]).bool()),
        left.aux_loss, atol=1e-6, rtol=1e-5,
    )  # fmt: skip
    # Training forwards count loads for the balancing bias: the real tokens' assignments only.
    model.train()
    with torch.no_grad():
        model(x)
        plain_loads = [r.expert_load.clone() for r in model.model.routers()]
        for router in model.model.routers():
            router.expert_load.zero_()
        model(padded, attention_mask=mask)
    k = model.config.num_experts_per_tok
    for router, want in zip(model.model.routers(), plain_loads):
        assert router.expert_load.sum() == 7 * k
        torch.testing.assert_close(router.expert_load, want)


# ---------------------------------------------------------------------------------------------- generation


def test_outputs_hold_the_cache_in_transformers_order_and_only_when_there_is_one():
    """`return_dict=False` gives (loss, logits, cache, ...) as transformers' causal LMs do; without a cache the
    output has none (not a None entry), so beam search without a cache runs instead of trying to reorder one."""
    model = tiny_model()
    x = ids(2, 5)
    with torch.no_grad():
        out = model(x, use_cache=False)
        assert list(out.keys()) == ["logits"]
        loss, logits, cache, lm_loss = model(x, labels=x, use_cache=True, return_dict=False)
        assert logits.shape == (2, 5, VOCAB) and cache.get_seq_length() == 5 and torch.equal(loss, lm_loss)
        hidden, cache, pre_norm = model.model(x, use_cache=True, return_dict=False)
        assert hidden.shape == pre_norm.shape and cache.get_seq_length() == 5
    kwargs = dict(num_beams=3, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(x, use_cache=False, **kwargs), model.generate(x, use_cache=True, **kwargs))


def test_greedy_generation_with_cache_equals_without_cache():
    model = tiny_model()
    prompt = ids(2, 5)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0  # left padding in the batch
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (2, 17)


def test_cache_is_a_dynamic_cache_under_both_argument_names():
    from transformers.cache_utils import DynamicCache

    model = tiny_model()
    x = ids(1, 6)
    with torch.no_grad():
        out = model(x[:, :4], use_cache=True)
        cache = out.past_key_values
        assert isinstance(cache, DynamicCache)
        step_a = model(x[:, 4:5], past_key_values=copy.deepcopy(cache)).logits
        step_b = model(x[:, 4:5], cache=copy.deepcopy(cache)).logits
        full = model(x[:, :5]).logits
    torch.testing.assert_close(step_a, step_b)
    torch.testing.assert_close(step_a[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_sampling_options_work_the_hf_way():
    model = tiny_model()
    prompt = ids(1, 4)
    torch.manual_seed(0)
    a = model.generate(prompt, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, max_new_tokens=6, pad_token_id=0)
    torch.manual_seed(0)
    b = model.generate(prompt, do_sample=True, top_k=5, top_p=0.9, temperature=0.7, max_new_tokens=6, pad_token_id=0)
    assert torch.equal(a, b) and a.shape == (1, 10)
    beams = model.generate(prompt, num_beams=3, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert beams.shape == (1, 8)


# ---------------------------------------------------------------------------------------------- MoE


def naive_moe(block: Ernie5SparseMoeBlock, x_TD):
    """Token-by-token loop over the chosen experts, written independently of the kernels."""
    probs = (x_TD.float() @ block.gate.weight.float().T).softmax(-1)
    scores = probs + block.gate.e_score_correction_bias
    out = torch.zeros_like(x_TD)
    k = block.gate.top_k
    for t in range(x_TD.shape[0]):
        chosen = scores[t].topk(k).indices
        w = probs[t, chosen] / probs[t, chosen].sum()
        for e, we in zip(chosen.tolist(), w):
            gu = block.experts.gate_up_proj[e] @ x_TD[t]  # (2F, D) weights, (out, in) like nn.Linear
            g, u = gu.chunk(2)
            out[t] += we * (block.experts.down_proj[e] @ (torch.nn.functional.silu(g) * u))
    return out + block.shared_experts(x_TD)


def test_moe_block_equals_naive_per_token_loop():
    model = tiny_model()
    block = model.model.layers[1].mlp
    block.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.05)  # the bias must influence selection only
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        got, _, _ = block(x)
        want = naive_moe(block, x.view(-1, 64)).view(2, 5, 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_router_never_receives_modality_information():
    params = list(inspect.signature(Ernie5SparseMoeBlock.forward).parameters)
    assert not any("modal" in p or "token_type" in p for p in params)
    model = tiny_model()
    seen = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(lambda m, args, out: seen.append(args))
    with torch.no_grad():
        model(ids(1, 5))
    hook.remove()
    hidden = seen[0][0]
    assert hidden.shape == (5, 64)
    assert all(a is None or isinstance(a, (bool, int)) for a in seen[0][1:])


def test_balancing_bias_moves_toward_underloaded_experts_and_stays_fixed_in_eval():
    model = tiny_model(router_bias_update_rate=0.01)
    router = model.model.layers[0].mlp.gate
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0].fill_(1.0)  # expert 0 wins for inputs with a positive sum
    model.train()
    x = ids(4, 16)
    model(x)
    load = router.expert_load.clone()
    assert load.sum() == 4 * 16 * 2
    model(x)  # the second training forward applies the step earned by the first
    bias = router.e_score_correction_bias
    mean = load.mean()
    assert torch.all(bias[load > mean] < 0) and torch.all(bias[load < mean] > 0)
    model.eval()
    before = bias.clone()
    with torch.no_grad():
        model(x)
        model(x)
    assert torch.equal(before, router.e_score_correction_bias)


def test_mtp_routers_balance_too():
    model = tiny_model(router_bias_update_rate=0.01).train()
    x = ids(2, 12)
    model(x, labels=x)
    model(x, labels=x)
    assert torch.count_nonzero(model.mtp[0].block.mlp.gate.e_score_correction_bias) > 0


def test_balancing_can_be_switched_off():
    model = tiny_model(moe_use_correction_bias=False)
    model.train()
    model(ids(2, 8))
    model(ids(2, 8))
    assert all(torch.count_nonzero(r.e_score_correction_bias) == 0 for r in model.model.routers())


def test_no_token_dropped_under_extreme_imbalance():
    model = tiny_model()
    block = model.model.layers[0].mlp
    with torch.no_grad():
        block.gate.weight.zero_()
        block.gate.weight[3].fill_(5.0)
        block.gate.weight[5].fill_(4.0)
    x = torch.rand(3, 40, 64) + 0.1  # every token prefers experts 3 and 5
    with torch.no_grad():
        out, _, idx = block(x)
    assert set(idx.flatten().tolist()) == {3, 5}
    routed_only = out - block.shared_experts(x)
    assert (routed_only.abs().sum(-1) > 0).all()  # every one of the 120 tokens received expert output


def test_gradients_reach_exactly_the_chosen_experts_and_the_router():
    model = tiny_model()
    block = model.model.layers[0].mlp
    x = torch.randn(1, 3, 64)
    out, _, idx = block(x)
    out.pow(2).sum().backward()
    chosen = set(idx.flatten().tolist())
    for e in range(8):
        has_grad = block.experts.gate_up_proj.grad[e].abs().sum() > 0
        assert has_grad == (e in chosen), f"expert {e}: grad {bool(has_grad)}, chosen {e in chosen}"
        assert (block.experts.down_proj.grad[e].abs().sum() > 0) == (e in chosen)
    assert block.gate.weight.grad is not None and block.gate.weight.grad.abs().sum() > 0


def test_router_and_bias_stay_fp32_in_bf16_models(tmp_path):
    """The balancing bias keeps fp32 and its values through saving, bf16 loading and `.to(bfloat16)` (a cast to
    bf16 and back would round 0.5001 to 0.5 and lose every 1e-4 step)."""
    source = tiny_model()
    bias = torch.tensor([0.0123456, -0.0031234, 1e-4, 3e-4, 0.5001, -0.2, 0.0, 7e-5])[: source.config.num_experts]
    source.model.layers[0].mlp.gate.e_score_correction_bias.copy_(bias)
    source.save_pretrained(tmp_path)
    model = Ernie5ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    router = model.model.layers[0].mlp.gate
    assert router.weight.dtype == torch.float32
    assert router.e_score_correction_bias.dtype == torch.float32 and torch.equal(router.e_score_correction_bias, bias)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    cast = source.to(torch.bfloat16).model.layers[0].mlp.gate.e_score_correction_bias
    assert cast.dtype == torch.float32 and torch.equal(cast, bias)
    with torch.no_grad():
        out = model(ids(1, 5), output_router_logits=True)
    assert out.router_logits[0].dtype == torch.float32
    assert out.logits.dtype == torch.bfloat16


def test_sentinel_slots_and_per_token_topk_in_the_reference():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    gu, dn = torch.randn(3, 8, 6), torch.randn(3, 6, 4)  # (out, in) per expert
    idx = torch.tensor([[0, 3], [1, 2], [3, 3], [2, 0]])
    w = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.3, 0.7]])
    out = reference_experts_forward(x, gu, dn, idx, w)
    assert torch.count_nonzero(out[2]) == 0
    single = reference_experts_forward(x[:1], gu, dn, idx[:1, :1], w[:1, :1])
    torch.testing.assert_close(out[:1], single)


def test_dense_prefix_layers():
    model = tiny_model(first_k_dense_replace=2)
    assert [layer.is_moe for layer in model.model.layers] == [False, False, True, True]
    out = model(ids(1, 6), output_router_logits=True)
    assert len(out.router_logits) == 2


def test_unknown_experts_backend_raises_with_choices():
    model = tiny_model(experts_backend="nope")
    with pytest.raises(ValueError, match="registered"):
        model(ids(1, 4))


# ---------------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_loss"])
def test_mtp_depths_read_caller_shifted_labels_at_their_own_offset(fused):
    """`shift_labels` (labels the caller already shifted, as context parallelism does) gives the same losses as
    `labels`, for the next-token loss and for every MTP depth (each depth shifts them further itself)."""
    model = tiny_model(num_nextn_predict_layers=2, fused_linear_cross_entropy=fused).train()
    x = ids(2, 12)
    labels = x.masked_fill(torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) < 0.2, -100)
    with torch.no_grad():  # no grad: the training-mode forward then leaves the balancing biases alone
        plain = model(x, labels=labels)
        shifted = model(x, labels=labels, shift_labels=F.pad(labels[:, 1:], (0, 1), value=-100))
    torch.testing.assert_close(shifted.lm_loss, plain.lm_loss)
    torch.testing.assert_close(shifted.mtp_loss, plain.mtp_loss)


def test_mtp_loss_is_present_weighted_and_ignored_at_inference():
    model = tiny_model(mtp_loss_weight=0.3).train()
    x = ids(2, 12)
    out = model(x, labels=x)
    assert out.mtp_loss is not None and out.mtp_loss > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.3 * out.mtp_loss)
    out.loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0
    no_mtp = tiny_model(num_nextn_predict_layers=0).train()
    out2 = no_mtp(x, labels=x)
    assert out2.mtp_loss is None
    torch.testing.assert_close(out2.loss, out2.lm_loss)
    model.eval()
    assert model(x, labels=x).mtp_loss is None  # evaluation loss is the next-token loss alone
    with torch.no_grad():  # at inference the MTP modules do not run
        calls = []
        h = model.mtp[0].register_forward_hook(lambda *a: calls.append(1))
        model.generate(x[:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        h.remove()
    assert not calls


def test_aux_and_z_losses_are_reported_and_added():
    model = tiny_model(router_aux_loss_coef=0.1, router_z_loss_coef=0.01).train()
    x = ids(2, 10)
    out = model(x, labels=x, output_router_logits=True)
    assert out.aux_loss > 0 and out.z_loss > 0
    expected = out.lm_loss + 0.3 * out.mtp_loss + 0.1 * out.aux_loss + 0.01 * out.z_loss
    torch.testing.assert_close(out.loss, expected)
    assert len(out.router_logits) == 4 and out.router_logits[0].shape == (20, 8)


def test_perfectly_balanced_routing_gives_unit_sequence_balance_loss():
    from modeling_ernie5.modeling_ernie5 import sequence_balance_loss

    logits = torch.zeros(8, 4)  # uniform probabilities
    idx = torch.tensor([[0, 1], [2, 3]] * 4)
    loss = sequence_balance_loss([logits], [idx], num_experts=4, top_k=2, batch=1)
    torch.testing.assert_close(loss, torch.tensor(1.0))


def test_routing_replay_reproduces_recorded_routing():
    model = tiny_model()
    x = ids(2, 7)
    with torch.no_grad():
        rec = model(x, output_routing_indices=True)
        replay = model(x, routing_indices=list(rec.routing_indices), output_routing_indices=True)
    torch.testing.assert_close(rec.logits, replay.logits)
    shuffled = [torch.roll(r, 1, dims=1) for r in rec.routing_indices]  # same experts, same weights
    forced = [torch.zeros_like(r) + torch.arange(r.shape[1]) for r in rec.routing_indices]
    with torch.no_grad():
        out = model(x, routing_indices=forced, output_routing_indices=True)
        same = model(x, routing_indices=shuffled).logits
    assert torch.equal(out.routing_indices[0], forced[0])
    torch.testing.assert_close(same, rec.logits, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out.logits, rec.logits)


# ---------------------------------------------------------------------------------------------- save / load


def test_save_and_load_roundtrip(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    model = tiny_model()
    model.model.layers[0].mlp.gate.e_score_correction_bias.fill_(0.01)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "ernie5"
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_ernie5.Ernie5ForCausalLM"
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = ids(2, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, loaded(x).logits)
    assert torch.all(loaded.model.layers[0].mlp.gate.e_score_correction_bias == 0.01)
    backbone = AutoModel.from_pretrained(tmp_path)
    assert isinstance(backbone, Ernie5Model)
    # A checkpoint from before the (E, out, in) expert layout is refused, not loaded with transposed experts.
    assert cfg["expert_weight_layout"] == "out_in"
    del cfg["expert_weight_layout"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="saved before the expert weights moved to the \\(E, out, in\\) layout"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_checkpoint_from_before_the_expert_layout_change_converts(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from modeling_ernie5.convert_expert_layout import convert

    model = tiny_model(num_nextn_predict_layers=1)  # MTP blocks hold experts too
    model.save_pretrained(tmp_path / "new")
    # Rewrite it as the previous format stored it: experts (E, in, out) and no layout field.
    old = tmp_path / "old"
    old.mkdir()
    state = load_file(tmp_path / "new" / "model.safetensors")
    experts = [k for k in state if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]
    assert len(experts) == 2 * (model.config.num_hidden_layers + 1)
    transposed = {k: (v.transpose(1, 2).contiguous() if k in experts else v) for k, v in state.items()}
    save_file(transposed, old / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "new" / "config.json").read_text())
    del cfg["expert_weight_layout"]
    (old / "config.json").write_text(json.dumps(cfg))
    (old / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="convert_expert_layout"):
        AutoModelForCausalLM.from_pretrained(old)
    convert(old, tmp_path / "converted")
    assert (tmp_path / "converted" / "tokenizer.json").exists()
    assert (tmp_path / "converted" / "modeling_ernie5.py").exists()  # fresh remote code
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted").eval()
    x = ids(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    with pytest.raises(ValueError, match="already records expert_weight_layout"):
        convert(tmp_path / "converted", tmp_path / "again")


def test_sequence_classification_head_reads_the_last_real_token(tmp_path):
    from transformers import AutoModelForSequenceClassification

    lm = tiny_model()
    lm.save_pretrained(tmp_path / "lm")
    reward = AutoModelForSequenceClassification.from_pretrained(tmp_path / "lm", num_labels=1).eval()
    assert type(reward).__name__ == "Ernie5ForSequenceClassification"
    torch.testing.assert_close(reward.model.layers[0].mlp.experts.gate_up_proj, lm.model.layers[0].mlp.experts.gate_up_proj)
    x = ids(2, 7)
    padded = torch.cat([x, torch.zeros(2, 3, dtype=torch.long)], dim=1)  # right padding with pad_token_id 0
    with torch.no_grad():
        alone = reward(x).logits
        with_pad = reward(padded, attention_mask=(padded != 0).long()).logits
        hidden = reward.model(x).last_hidden_state
    assert alone.shape == (2, 1)
    torch.testing.assert_close(with_pad, alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone, reward.score(hidden[:, -1]))
    out = reward(x, labels=torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.squeeze(-1), torch.tensor([0.5, -1.0])))
    reward.save_pretrained(tmp_path / "rm")
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForSequenceClassification"] == "modeling_ernie5.Ernie5ForSequenceClassification"


def test_remote_code_load_in_a_process_without_the_package(tmp_path, without_ernie5_packages):
    from modeling_ernie5 import Ernie5ForSequenceClassification

    model = tiny_model()
    save = tmp_path / "ckpt"
    model.save_pretrained(save)
    torch.manual_seed(0)
    reward = Ernie5ForSequenceClassification(tiny_config(num_labels=1)).eval()
    reward.save_pretrained(tmp_path / "rm")
    for name in ("configuration_ernie5.py", "modeling_ernie5.py", "moe.py", "rope.py", "masks.py", "elastic.py"):
        assert (save / name).exists(), name
    x = ids(2, 6)
    torch.save(x, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(model(x).logits, tmp_path / "want.pt")
        torch.save(reward(x).logits, tmp_path / "want_rm.pt")
    stdout = without_ernie5_packages(
        f"""
        import torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(save)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        x = torch.load({str(tmp_path / 'ids.pt')!r}, weights_only=True)
        want = torch.load({str(tmp_path / 'want.pt')!r}, weights_only=True)
        with torch.no_grad():
            got = m(x).logits
        torch.testing.assert_close(got, want)
        out = m.generate(x[:, :3], max_new_tokens=4, do_sample=False, pad_token_id=0)
        from transformers import AutoModel, AutoModelForSequenceClassification
        backbone = AutoModel.from_pretrained({str(save)!r}, trust_remote_code=True).eval()
        assert type(backbone).__name__ == "Ernie5Model", type(backbone)
        with torch.no_grad():
            torch.testing.assert_close(m.lm_head(backbone(x).last_hidden_state), want)
        rm = AutoModelForSequenceClassification.from_pretrained({str(tmp_path / 'rm')!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(rm(x).logits, torch.load({str(tmp_path / 'want_rm.pt')!r}, weights_only=True))
        print("OK", tuple(out.shape))
        """,
        tmp_path,
    )
    assert "OK (2, 7)" in stdout


def test_peft_lora_on_3d_expert_weights_trains_and_merges(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = tiny_model()
    x = ids(2, 8)
    with torch.no_grad():
        base = model(x).logits
    cfg = LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )  # fmt: skip
    peft_model = get_peft_model(model, cfg)
    adapted = peft_model(x).logits
    assert not torch.allclose(adapted, base)
    adapted.pow(2).mean().backward()
    lora_grads = [
        p.grad for n, p in peft_model.named_parameters() if "lora_" in n and "experts" in n and ".mtp." not in n
    ]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    peft_model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, adapted.detach())
        torch.testing.assert_close(reloaded.merge_and_unload()(x).logits, adapted.detach(), atol=1e-5, rtol=1e-4)
