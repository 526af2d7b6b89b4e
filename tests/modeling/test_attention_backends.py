"""Every attention implementation a user can select gets the mask in the form its kernel takes, and the model's
outputs follow transformers' conventions (`output_hidden_states`, `output_attentions`, `return_dict=False`)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from modeling_ernie5.masks import build_block_causal_mask, mask_for_attention

VOCAB = 96


def tiny_model(attn_implementation, seed=0, **overrides):
    config = Ernie5Config.from_preset(
        "tiny", vocab_size=VOCAB, pad_token_id=0, eos_token_id=2, bos_token_id=1, experts_backend="reference",
        attn_implementation=attn_implementation, **overrides,
    )  # fmt: skip
    torch.manual_seed(seed)
    return Ernie5ForCausalLM(config).eval()


def padded_batch():
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def flash_contract_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A plain-PyTorch kernel with flash attention's contract: `attention_mask` is None or the (B, K) padding mask,
    causality (aligned to the last key, as flash-attn >= 2.1) is the kernel's job, padded queries output zeros.
    Registered under a name containing "flash", which is how models recognise flash kernels."""
    assert attention_mask is None or attention_mask.dim() == 2, "flash kernels take a 2D padding mask"
    q_len, k_len = query.shape[2], key.shape[2]
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len).expand(query.shape[0], -1, -1)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    elif kwargs.get("position_ids") is not None and q_len == k_len:  # varlen: a sequence starts where positions restart
        starts = F.pad(kwargs["position_ids"].diff(dim=-1) != 1, (1, 0), value=False).long().cumsum(-1)
        allowed = allowed & (starts[:, :, None] == starts[:, None, :])
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(query.dtype).min)[:, None]
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(
        query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1), attn_mask=additive, scale=scaling
    )
    out = out.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0)
    return out.transpose(1, 2), None


AttentionInterface.register("ernie5_test_flash_contract", flash_contract_attention)


def test_flash_kernels_get_the_padding_mask_and_match_sdpa():
    ids, mask = padded_batch()
    want, got = tiny_model("sdpa"), tiny_model("sdpa")
    # Set after construction: at load time transformers resolves any "*flash*" name to a flash-attn package or a Hub
    # kernel, neither of which runs on CPU.
    got.config._attn_implementation = "ernie5_test_flash_contract"
    with torch.no_grad():
        a, b = want(ids, attention_mask=mask).logits, got(ids, attention_mask=mask).logits
    torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b[1, 3:], a[1, 3:], atol=1e-5, rtol=1e-4)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got.generate(ids, **kwargs), want.generate(ids, **kwargs))


def test_flash_rejects_a_4d_mask_naming_the_alternatives():
    block_causal = build_block_causal_mask(torch.tensor([[0, 1, 2, 2, 2, 3]]), None, torch.float32)
    with pytest.raises(ValueError, match="cannot apply a 4D attention mask.*flex_attention"):
        mask_for_attention("flash_attention_2", block_causal, 1, 6, 0, torch.float32, "cpu")
    assert mask_for_attention("flash_attention_2", torch.ones(1, 6), 1, 6, 0, torch.float32, "cpu") is None


@pytest.mark.slow  # compiles the flex kernel (~20 s on 2 cores)
def test_flex_attention_matches_sdpa_with_padding_block_causal_masks_and_cache():
    ids, mask = padded_batch()
    want, got = tiny_model("sdpa"), tiny_model("flex_attention")
    with torch.no_grad():
        a, b = want(ids, attention_mask=mask).logits, got(ids, attention_mask=mask).logits
        assert torch.isfinite(b).all()  # fully masked (pad) query rows stay finite
        torch.testing.assert_close(b[0], a[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b[1, 3:], a[1, 3:], atol=1e-5, rtol=1e-4)
        # A 4D block-causal mask (the image-generation rule): bidirectional inside blocks 2 and 5.
        blocks = torch.tensor([[0, 1, 2, 2, 2, 3, 4, 5, 5]] * 2)
        block_causal = build_block_causal_mask(blocks, None, torch.float32)
        a = want(ids, attention_mask=block_causal, position_ids=torch.arange(9).expand(2, -1)).logits
        b = got(ids, attention_mask=block_causal, position_ids=torch.arange(9).expand(2, -1)).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got.generate(ids, **kwargs), want.generate(ids, **kwargs))
    a, b, packed, positions = packed_pair()  # padding-free packing: a BlockMask per sequence
    with torch.no_grad():
        torch.testing.assert_close(got(packed, position_ids=positions).logits[:, a.shape[1] :], want(b).logits,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


def test_flex_rejects_additive_masks_that_carry_biases():
    bias = torch.zeros(1, 1, 4, 4)
    bias[..., 0] = -0.5
    with pytest.raises(ValueError, match="0 \\(attend\\) and the dtype's minimum"):
        mask_for_attention("flex_attention", bias, 1, 4, 0, torch.float32, "cpu")


def test_hidden_states_attentions_and_tuple_outputs_follow_transformers():
    model = tiny_model("eager")
    ids, _ = padded_batch()
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
        plain = model(ids)
        as_tuple = model(ids, return_dict=False)
    # embeddings + one per layer, the last one after the final norm (what the LM head reads)
    assert len(out.hidden_states) == layers + 1
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    torch.testing.assert_close(model.lm_head(out.hidden_states[-1]), out.logits)
    assert len(out.attentions) == layers and out.attentions[0].shape == (2, model.config.num_attention_heads, 9, 9)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, model.config.num_attention_heads, 9))
    assert torch.all(out.attentions[0][..., 0, 1:] == 0)  # causal: the first token sees only itself
    assert plain.hidden_states is None and plain.attentions is None
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], plain.logits)


def packed_pair(len_a=5, len_b=7):
    """Two sequences packed into one row the way TRL's padding-free collator does: no mask, restarting positions."""
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randint(3, VOCAB, (1, len_a), generator=gen), torch.randint(3, VOCAB, (1, len_b), generator=gen)
    positions = torch.cat([torch.arange(len_a), torch.arange(len_b)])[None]
    return a, b, torch.cat([a, b], dim=1), positions


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "ernie5_test_flash_contract"])
def test_packed_sequences_do_not_attend_to_each_other(implementation):
    model = tiny_model("sdpa")
    model.config._attn_implementation = implementation  # set after construction, as above for the flash kernel
    a, b, packed, positions = packed_pair()
    with torch.no_grad():
        both = model(packed, position_ids=positions).logits
        torch.testing.assert_close(both[:, : a.shape[1]], model(a).logits, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(both[:, a.shape[1] :], model(b).logits, atol=1e-5, rtol=1e-4)


def test_packed_mtp_targets_stay_inside_their_sequence():
    # TRL's collator masks each sequence's first label; with the first sequence's labels all masked, the packed
    # row must give the second sequence's own LM and MTP losses (an MTP target across the boundary would add terms).
    model = tiny_model("sdpa", num_nextn_predict_layers=2, router_bias_update_rate=0.0).train()
    a, b, packed, positions = packed_pair(6, 9)
    labels = packed.clone()
    labels[:, : a.shape[1] + 1] = -100
    alone_labels = b.clone()
    alone_labels[:, 0] = -100
    both = model(packed, position_ids=positions, labels=labels)
    alone = model(b, labels=alone_labels)
    torch.testing.assert_close(both.lm_loss, alone.lm_loss)
    torch.testing.assert_close(both.mtp_loss, alone.mtp_loss)
