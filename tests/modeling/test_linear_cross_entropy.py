"""The fused output projection + cross-entropy against transformers' `ForCausalLMLoss` on materialised logits:
loss and both gradients, ignored labels, gradient-accumulation divisors, odd chunk sizes, bf16, and the model
switch (`config.fused_linear_cross_entropy`) for the causal LM, its MTP loss and the multimodal model."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from modeling_ernie5.linear_cross_entropy import linear_cross_entropy


def case(batch=3, seq=11, hidden=24, vocab=37, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.5).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, :4] = -100  # a masked prompt
    labels[-1, seq // 2] = -100
    return h, w, labels


def loss_and_grads(fn, h, w, upstream=1.0):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def reference(labels, **kw):
    # transformers' loss upcasts the logits to fp32 whatever their dtype.
    return lambda h, w: ForCausalLMLoss(h @ w.t(), labels, w.shape[0], **kw)


def float64_reference(labels, divisor=None, ignore_index=-100):
    def loss(h, w):
        shifted = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:].reshape(-1)
        total = torch.nn.functional.cross_entropy(
            (h @ w.t()).reshape(-1, w.shape[0]), shifted, ignore_index=ignore_index, reduction="sum"
        )
        return total / (divisor if divisor is not None else (shifted != ignore_index).sum())

    return loss


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 33, 256])
@pytest.mark.parametrize("divisor", [None, 50])
def test_matches_float64_cross_entropy(chunk_rows, divisor):
    h, w, labels = case()
    kw = {} if divisor is None else {"num_items_in_batch": divisor}
    want = loss_and_grads(float64_reference(labels, divisor), h, w, upstream=2.5)
    got = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels, chunk_rows=chunk_rows, **kw), h, w, 2.5)
    for name, g, r in zip(("loss", "d_hidden", "d_weight"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("divisor", [None, torch.tensor(50)])
def test_matches_transformers_causal_lm_loss(divisor):
    h, w, labels = case(dtype=torch.float32, seed=3)
    kw = {} if divisor is None else {"num_items_in_batch": divisor}
    want = loss_and_grads(reference(labels, **kw), h, w)
    got = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels, chunk_rows=8, **kw), h, w)
    for name, g, r in zip(("loss", "d_hidden", "d_weight"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)


def test_shift_labels_and_custom_ignore_index():
    h, w, labels = case(seed=1)
    labels = labels.masked_fill(labels == -100, -1)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-1)[..., 1:]
    want = loss_and_grads(float64_reference(labels, ignore_index=-1), h, w)
    got = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, None, shift_labels=shifted, ignore_index=-1), h, w)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_bfloat16_close_to_float32():
    h, w, labels = case(batch=2, seq=64, hidden=32, vocab=300, dtype=torch.float32, seed=2)
    want = loss_and_grads(reference(labels), h, w)
    got = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels, chunk_rows=16), h.bfloat16(), w.bfloat16())
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for name, g, r in zip(("loss", "d_hidden", "d_weight"), got, want):
        rel = ((g.float() - r).abs().max() / r.abs().max()).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g}"


def test_float16_gradients_survive_loss_scaling_and_large_token_counts():
    """fp16 training divides by a large token count and multiplies by GradScaler's 65536: the gradients must match
    the fp32 reference as well as transformers' own fp16 loss does (dividing before the cast underflowed; 65536 in
    fp16 is inf)."""
    h, w, labels = case(batch=1, seq=65, hidden=32, vocab=1000, dtype=torch.float32, seed=4)
    for items, scale in ((4096, 65536.0), (262144, 32768.0)):
        want = loss_and_grads(reference(labels, num_items_in_batch=items), h, w, upstream=scale)
        ours = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels, num_items_in_batch=items), h.half(),
                              w.half(), upstream=scale)  # fmt: skip
        theirs = loss_and_grads(reference(labels, num_items_in_batch=items), h.half(), w.half(), upstream=scale)
        for name, g, t, r in zip(("d_hidden", "d_weight"), ours[1:], theirs[1:], want[1:]):
            assert torch.isfinite(g).all(), name
            ours_err = ((g.float() - r).norm() / r.norm()).item()
            theirs_err = ((t.float() - r).norm() / r.norm()).item()
            assert ours_err <= 2 * theirs_err + 1e-3, f"{name}: {ours_err:.3g} vs transformers' fp16 {theirs_err:.3g}"
    # bf16 has fp32's range: its (vocab, hidden) weight gradient is held in bf16 until backward, not in fp32.
    loss = linear_cross_entropy(h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_(), labels)
    assert [t.dtype for t in loss.grad_fn.saved_tensors] == [torch.bfloat16, torch.bfloat16]


def test_no_counted_token_gives_a_nan_loss_and_zero_gradients_and_no_double_backward():
    """A prompt-only micro-batch: nan loss like a mean over nothing, but zero gradients (not nan, which one optimizer
    step would spread into every weight), as transformers' loss gives. The gradients are computed in forward, so a
    second-order gradient is refused rather than silently wrong."""
    h, w, _ = case(dtype=torch.float32)
    labels = torch.full(h.shape[:2], -100)
    for dtype in (torch.float32, torch.bfloat16):
        loss, grad_h, grad_w = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels), h.to(dtype), w.to(dtype))
        assert loss.isnan() and torch.equal(grad_h, torch.zeros_like(grad_h)) and torch.equal(grad_w, torch.zeros_like(grad_w))
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="no second-order gradients.*fused_linear_cross_entropy=False"):
        torch.autograd.grad(linear_cross_entropy(h2, w2, case(dtype=torch.float32)[2]), h2, create_graph=True)


def test_default_chunks_reuse_one_buffer_per_thread(monkeypatch):
    """By default the chunk holds as many rows as fit `CHUNK_BYTES`; its buffer is kept between calls (a fresh
    mapping each step cost page faults) and remade when the vocabulary, dtype or row count no longer fits. Reuse
    must not change any result, including after a call of another shape."""
    from modeling_ernie5 import linear_cross_entropy as lce

    assert lce.default_chunk_rows(8192, torch.float32) == 1024 and lce.default_chunk_rows(151_936, torch.float32) == 64
    monkeypatch.setattr(lce, "CHUNK_BYTES", 5 * 37 * 8)  # 5 rows of fp64 at V=37: several chunks per call
    monkeypatch.setattr(lce, "MIN_CHUNK_ROWS", 1)
    monkeypatch.setattr(lce, "_buffers", __import__("threading").local())
    h, w, labels = case()
    want = loss_and_grads(float64_reference(labels), h, w)
    for _ in range(2):
        got = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels), h, w)
        for name, g, r in zip(("loss", "d_hidden", "d_weight"), got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)
    first = lce._buffers.logits
    assert first.shape == (5, 37) and first.dtype == torch.float64
    linear_cross_entropy(h, w, labels)
    assert lce._buffers.logits is first  # same shape: the buffer is reused
    h2, w2, labels2 = case(vocab=53, seed=4)  # another vocabulary: a new buffer, and still exact
    want2 = loss_and_grads(float64_reference(labels2), h2, w2)
    got2 = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels2), h2, w2)
    for g, r in zip(got2, want2):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert lce._buffers.logits.shape[1] == 53
    got = loss_and_grads(lambda h, w: linear_cross_entropy(h, w, labels), h, w)  # and back
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_bad_labels_and_chunk_sizes_are_named():
    h, w, labels = case()
    with pytest.raises(ValueError, match="labels must be in"):
        linear_cross_entropy(h, w, labels.masked_fill(labels == labels[1, 3], 10_000))
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, labels, chunk_rows=0)
    with pytest.raises(ValueError, match="labels for"):
        linear_cross_entropy(h, w, None, shift_labels=labels[:, :5])


def tiny_config(**kw):
    return Ernie5Config.from_preset("tiny", router_bias_update_rate=0.0, **kw)


def test_causal_lm_switch_gives_the_same_loss_and_gradients_without_logits():
    torch.manual_seed(0)
    plain = Ernie5ForCausalLM(tiny_config()).double().train()
    fused = Ernie5ForCausalLM(tiny_config(fused_linear_cross_entropy=True)).double().train()
    fused.load_state_dict(plain.state_dict())
    assert plain.config.num_nextn_predict_layers > 0  # the MTP losses go through the same switch
    ids = torch.randint(1, 512, (2, 14))
    labels = ids.masked_fill(torch.rand(ids.shape) < 0.2, -100)
    outs = []
    for model in (plain, fused):
        out = model(ids, labels=labels)
        out.loss.backward()
        outs.append(out)
    assert outs[0].logits is not None and outs[1].logits is None
    for name in ("loss", "lm_loss", "mtp_loss"):
        # transformers' loss runs in fp32 even for fp64 logits; the fused one keeps fp64.
        got, want = getattr(outs[1], name), getattr(outs[0], name)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, check_dtype=False)
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        if p.grad is None:
            assert q.grad is None, name
            continue
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Evaluation keeps the logits (and the plain loss).
    fused.eval()
    with torch.no_grad():
        out = fused(ids, labels=labels)
    assert out.logits is not None
    torch.testing.assert_close(out.loss, plain.eval()(ids, labels=labels).loss)


def test_multimodal_model_uses_the_switch():
    from modeling_ernie5.configuration_ernie5_vision import Ernie5VisionConfig
    from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration

    def config(fused):
        return Ernie5Config(
            vocab_size=64, vision_config=Ernie5VisionConfig(), image_token_id=60, image_gen_token_id=61,
            boi_token_id=62, eoi_token_id=63, pad_token_id=0, router_bias_update_rate=0.0,
            fused_linear_cross_entropy=fused,
        )  # fmt: skip

    torch.manual_seed(0)
    plain = Ernie5ForConditionalGeneration(config(False)).train()
    fused = Ernie5ForConditionalGeneration(config(True)).train()
    fused.load_state_dict(plain.state_dict())
    ids = torch.randint(1, 60, (2, 10))
    want, got = plain(ids, labels=ids), fused(ids, labels=ids)
    assert got.logits is None
    torch.testing.assert_close(got.lm_loss, want.lm_loss, rtol=1e-5, atol=1e-6)
