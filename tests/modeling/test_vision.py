"""Vision parts of ERNIE 5.0 on CPU with tiny sizes: the bitwise visual tokenizer, Uni-RoPE image positions, the
scale-wise block-causal mask, understanding through the backbone, next-scale generation and save/load."""


import numpy as np
import pytest
import torch

from modeling_ernie5 import Ernie5Config, Ernie5ForCausalLM
from modeling_ernie5.configuration_ernie5_vision import Ernie5VisionConfig, Ernie5VisualTokenizerConfig
from modeling_ernie5.masks import build_block_causal_mask
from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration
from modeling_ernie5.multimodal_layout import ImageLayout, layout_positions_and_blocks
from modeling_ernie5.rope import centered_grid_positions
from modeling_ernie5.vision import Ernie5PatchMerger, flip_bits, group_patches
from modeling_ernie5.visual_tokenizer import Ernie5VisualTokenizer, bits_to_indices, indices_to_bits, psnr

IMG, GEN, BOI, EOI, PAD = 60, 61, 62, 63, 0
U = 16  # understanding tokens per image (8x8 latent, 2x2 merge)
G = 1 + 4 + 16 + 64  # generation tokens per image


def vision_config(**kw):
    return Ernie5Config(
        vocab_size=64, vision_config=Ernie5VisionConfig(**kw), image_token_id=IMG, image_gen_token_id=GEN,
        boi_token_id=BOI, eoi_token_id=EOI, pad_token_id=PAD,
    )  # fmt: skip


def toy_pixels(n, seed=0):
    from processing.toy_world import draw_scene

    arrays = [np.asarray(draw_scene(seed + i, size=32)[0], dtype=np.float32) / 127.5 - 1 for i in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def trained_tokenizer():
    """A tokenizer trained for a few seconds on toy scenes: enough to beat the untrained one by a wide margin."""
    torch.manual_seed(0)
    tok = Ernie5VisualTokenizer(Ernie5VisualTokenizerConfig(base_channels=8))
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
    for step in range(40):
        out = tok(toy_pixels(16, seed=100 + 16 * step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return tok.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Ernie5ForConditionalGeneration(vision_config()).eval()


def test_tokenizer_round_trip_and_psnr(trained_tokenizer):
    x = toy_pixels(8, seed=5000)
    bits = trained_tokenizer.encode(x)
    assert [tuple(b.shape) for b in bits] == [(8, s, s, 8) for s in (1, 2, 4, 8)]
    assert all(b.dtype == torch.uint8 and int(b.max()) <= 1 for b in bits)
    recon = trained_tokenizer.decode(bits)
    value = psnr(x, recon)
    untrained = Ernie5VisualTokenizer(Ernie5VisualTokenizerConfig(base_channels=8)).eval()
    baseline = psnr(x, untrained.decode(untrained.encode(x)))
    print(f"tokenizer PSNR after 40 steps: {value:.2f} dB (untrained {baseline:.2f} dB)")
    assert value > baseline + 5 and value > 12
    # Decoding is a pure function of the bits; encoding is deterministic.
    assert torch.equal(recon, trained_tokenizer.decode(trained_tokenizer.encode(x)))
    # More scales = better reconstruction: dropping the finest scale's information hurts.
    coarse = [b.clone() for b in bits]
    coarse[-1].zero_()
    assert psnr(x, trained_tokenizer.decode(coarse)) < value


def test_coarsest_scale_carries_global_content(trained_tokenizer):
    # Standardising the latent with dataset statistics keeps each image's mean, so the 1x1 scale alone already
    # says how bright an image is (about 0.45 correlation after 40 steps). Per-image standardisation zeroes that
    # mean: the first scale's bits were then rounding noise (60 codes for 64 images, correlation -0.09).
    x = toy_pixels(64, seed=7000)
    first = trained_tokenizer.encode(x)[:1]
    with torch.no_grad():
        coarse = trained_tokenizer.decoder(trained_tokenizer.quantizer.bits_to_latent(first).unsqueeze(2)).squeeze(2)
    corr = torch.corrcoef(torch.stack([coarse.mean((1, 2, 3)), x.mean((1, 2, 3))]))[0, 1]
    assert corr > 0.3, f"first-scale reconstruction vs image brightness: correlation {corr:.2f}"
    assert int(trained_tokenizer.latent_batches) == 40
    assert all(torch.equal(a, b) for a, b in zip(trained_tokenizer.encode(x)[:1], first))  # encoding leaves stats alone


def test_prefix_loss_decodes_coarse_scales(trained_tokenizer):
    x = toy_pixels(4, seed=300)
    assert trained_tokenizer(x).prefix_loss is None
    tok = Ernie5VisualTokenizer(Ernie5VisualTokenizerConfig(base_channels=8, prefix_loss_weight=0.5)).eval()
    tok.load_state_dict(trained_tokenizer.state_dict())
    out = tok(x)
    assert out.prefix_loss is not None and out.prefix_loss > 0
    torch.testing.assert_close(out.loss, out.reconstruction_loss + 0.25 * out.commitment_loss + 0.5 * out.prefix_loss)
    # A prefix lacks the finest scale, so its reconstruction is worse than the full one.
    assert out.prefix_loss > out.reconstruction_loss
    with pytest.raises(ValueError, match="prefix_loss_weight"):
        Ernie5VisualTokenizerConfig(prefix_loss_weight=-1.0)


def test_tokenizer_indices_and_errors(trained_tokenizer):
    bits = torch.randint(0, 2, (3, 4, 8), dtype=torch.uint8)
    idx = bits_to_indices(bits)
    assert int(idx.max()) < 256 and torch.equal(indices_to_bits(idx, 8), bits)
    with pytest.raises(ValueError, match="32x32"):
        trained_tokenizer.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="scales"):
        trained_tokenizer.decode(trained_tokenizer.encode(toy_pixels(1))[:2])


def test_tokenizer_is_causal_in_time():
    tok = Ernie5VisualTokenizer(Ernie5VisualTokenizerConfig(base_channels=8)).eval()
    video = torch.rand(1, 3, 3, 32, 32) * 2 - 1
    changed = video.clone()
    changed[:, :, 2] = -changed[:, :, 2]
    a, b = tok(video).reconstruction, tok(changed).reconstruction
    assert torch.allclose(a[:, :, :2], b[:, :, :2], atol=1e-5)  # earlier frames ignore the future
    assert not torch.allclose(a[:, :, 2], b[:, :, 2])
    # A still image equals a one-frame video.
    img = video[:, :, 0]
    assert torch.allclose(tok(img).reconstruction, tok(img.unsqueeze(2)).reconstruction[:, :, 0], atol=1e-5)


def test_tokenizer_save_load_alone_and_inside_model(tmp_path, trained_tokenizer):
    trained_tokenizer.save_pretrained(tmp_path / "tok")
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path / "tok")
    assert isinstance(loaded, Ernie5VisualTokenizer)
    x = toy_pixels(2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.encode(x), trained_tokenizer.encode(x)))

    vl = Ernie5ForConditionalGeneration(vision_config(tokenizer_config=trained_tokenizer.config.to_dict()))
    vl.load_visual_tokenizer(loaded)
    vl.save_pretrained(tmp_path / "vl")
    again = Ernie5ForConditionalGeneration.from_pretrained(tmp_path / "vl")
    assert all(torch.equal(a, b) for a, b in zip(again.visual_tokenizer.encode(x), trained_tokenizer.encode(x)))


def test_centre_aligned_positions_and_text_resumes():
    assert centered_grid_positions(1, 8).tolist() == [3.5]
    assert centered_grid_positions(2, 8).tolist() == [1.5, 5.5]
    assert centered_grid_positions(8, 8).tolist() == list(range(8))
    layout = ImageLayout(IMG, GEN, 4, (1, 2, 4, 8))
    ids = torch.tensor([[PAD, 1, 2, BOI] + [GEN] * G + [EOI, 3]])
    mask = (ids != PAD).long()
    pos, blocks, deltas = layout_positions_and_blocks(ids, mask, layout)
    start = 3  # three real tokens before the image
    first = pos[:, 0, 4]  # the 1x1 scale: t = start, (h, w) centred on the 8x8 grid
    assert first.tolist() == [start, start + 3.5, start + 3.5]
    finest = pos[:, 0, 4 + 21 : 4 + G]
    assert finest[0].eq(start).all() and finest[1].min() == start and finest[1].max() == start + 7
    assert pos[:, 0, 4 + G].tolist() == [start + 8] * 3  # EOI resumes at max + 1
    assert pos[:, 0, -1].tolist() == [start + 9] * 3
    assert deltas.tolist() == [(start + 10) - int(mask.sum())]
    # One block per text token, one per scale.
    assert blocks[0, 4] != blocks[0, 5] and (blocks[0, 5:9] == blocks[0, 5]).all()
    assert len(set(blocks[0, 1:].tolist())) == 3 + 4 + 2


def test_block_causal_mask_rules():
    layout = ImageLayout(IMG, GEN, 4, (1, 2, 4, 8))
    ids = torch.tensor([[1, BOI] + [GEN] * G + [EOI, 2]])
    _, blocks, _ = layout_positions_and_blocks(ids, None, layout)
    allowed = build_block_causal_mask(blocks, None, torch.float32)[0, 0] == 0
    s2 = slice(3, 7)  # the 2x2 scale
    assert allowed[s2, s2].all()  # bidirectional inside a scale
    assert allowed[s2, :3].all() and not allowed[s2, 7:].any()  # sees coarser scales and text, nothing later
    assert not allowed[0, 1] and allowed[1, 0]  # text stays causal
    assert allowed[-1].all()  # text after the image sees everything before it
    with pytest.raises(ValueError, match="whole scales"):
        layout_positions_and_blocks(torch.tensor([[1, BOI] + [GEN] * 3]), None, layout)
    with pytest.raises(ValueError, match="multiple of"):
        layout_positions_and_blocks(torch.tensor([[1, BOI] + [IMG] * 5]), None, layout)


def test_patch_merger_shapes_and_grouping():
    grid = torch.arange(16.0).view(1, 4, 4, 1)
    groups = group_patches(grid, 2)
    assert groups[0, :, 0].tolist() == [0, 1, 4, 5] and groups[1, :, 0].tolist() == [2, 3, 6, 7]
    merger = Ernie5PatchMerger(cnn_dim=12, vit_dim=8, out_dim=20, num_patches=4, num_heads=2)
    assert merger(torch.randn(5, 4, 12), torch.randn(5, 4, 8)).shape == (5, 20)
    with pytest.raises(ValueError):
        merger(torch.randn(5, 3, 12), torch.randn(5, 3, 8))


def test_bit_flips_rate():
    bits = [torch.zeros(200, 8, 8, 8, dtype=torch.uint8)]
    rate = flip_bits(bits, 0.1, torch.Generator().manual_seed(0))[0].float().mean().item()
    assert 0.09 < rate < 0.11
    assert flip_bits(bits, 0.0) is bits


def test_understanding_goes_through_the_backbone(model):
    ids = torch.tensor([[1, 2, BOI] + [IMG] * U + [EOI, 3, 4]])
    px = toy_pixels(1)
    out = model(ids, pixel_values=px, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], 64) and torch.isfinite(out.loss)
    # The merge happens in the backbone's embedding hook, so a backbone call sees the image too.
    hidden = model.model(ids, pixel_values=px).last_hidden_state
    hidden_other = model.model(ids, pixel_values=toy_pixels(1, seed=9)).last_hidden_state
    assert not torch.allclose(hidden[:, -1], hidden_other[:, -1])
    # Called directly (as TRL does), the backbone derives the image's positions and block mask itself.
    torch.testing.assert_close(model.lm_head(hidden), out.logits)
    # transformers' output conventions hold for the multimodal class too.
    with_states = model(ids, pixel_values=px, output_hidden_states=True)
    assert len(with_states.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(with_states.hidden_states[-1], hidden)
    assert torch.equal(model(ids, pixel_values=px, return_dict=False)[0], with_states.logits)
    with pytest.raises(ValueError, match="placeholder"):
        model.model(ids, pixel_values=toy_pixels(2))
    with pytest.raises(ValueError, match="text-only"):
        Ernie5ForCausalLM(Ernie5Config()).model(ids, pixel_values=px)


def test_evaluation_loss_is_unscaled_and_mtp_routers_balance_in_training():
    """In evaluation the loss is the plain next-token loss (no running-scale division, which made a fresh model's
    loss exactly 1, and no MTP term, as in the causal LM) plus the weighted vision loss; in training the MTP block's
    router bias moves like the backbone's."""
    cfg = vision_config()
    cfg.router_bias_update_rate = 0.01
    torch.manual_seed(0)
    vl = Ernie5ForConditionalGeneration(cfg).eval()
    assert len(vl.mtp) == 1
    ids = torch.tensor([[1, 2, BOI] + [IMG] * U + [EOI, 3, 4, 5]])
    with torch.no_grad():
        out = vl(ids, pixel_values=toy_pixels(1), labels=ids)
        assert out.mtp_loss is None and torch.equal(out.loss, out.lm_loss) and out.loss.item() > 2.0
        gen = torch.tensor([[1, 2, BOI] + [GEN] * G + [EOI]])
        out = vl(gen, labels=gen, gen_pixel_values=toy_pixels(1))
        weight = cfg.vision_config.vision_loss_weight
        torch.testing.assert_close(out.loss, out.lm_loss + weight * out.vision_loss)
    vl.train()
    gate = vl.mtp[0].block.mlp.gate
    text = torch.randint(1, 60, (2, 12))
    for _ in range(3):
        vl(text, labels=text).loss.backward()
    assert torch.count_nonzero(gate.e_score_correction_bias) > 0
    assert gate.expert_load.sum() == 2 * 12 * cfg.num_experts_per_tok  # only the last forward's load is pending


def test_causal_lm_mtp_loss_takes_the_image_layout_like_the_backbone():
    """A text-class model given image placeholders (TRL loads `AutoModelForCausalLM`) derives the image's positions and
    block mask in the backbone; the MTP loss must use the same ones, not plain text positions and a causal mask."""
    from modeling_ernie5.multimodal_layout import image_positions_and_mask

    cfg = vision_config()
    cfg.router_bias_update_rate = 0.0
    torch.manual_seed(0)
    lm = Ernie5ForCausalLM(cfg).train()
    assert len(lm.mtp) == 1
    ids = torch.randint(1, 60, (2, 30))
    ids[:, 4], ids[:, 5 : 5 + U], ids[:, 5 + U] = BOI, IMG, EOI
    labels = ids.masked_fill(ids == IMG, -100)
    implicit = lm(ids, labels=labels)
    positions, mask, _ = image_positions_and_mask(ids, None, cfg, torch.float32)
    explicit = lm(ids, labels=labels, position_ids=positions, attention_mask=mask)
    torch.testing.assert_close(implicit.lm_loss, explicit.lm_loss, rtol=0, atol=0)
    torch.testing.assert_close(implicit.mtp_loss, explicit.mtp_loss, rtol=0, atol=0)


def test_cached_text_generation_after_an_image_matches_full_forward(model):
    ids = torch.tensor([[1, 2, BOI] + [IMG] * U + [EOI, 3]])
    px = toy_pixels(1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=px, max_new_tokens=4, do_sample=False)
    full = model(out[:, :-1], pixel_values=px).logits
    assert torch.equal(full[0, ids.shape[1] - 1 :].argmax(-1), out[0, ids.shape[1] :])
    assert model.rope_deltas is not None and int(model.rope_deltas[0]) == 4 - U  # a 4x4 grid advances the counter by 4


def test_text_generation_after_a_generated_image_in_the_context(model):
    """An image generated earlier in the conversation is embedded at prefill; decode steps must not get it again."""
    ids = torch.tensor([[1, 2, BOI] + [GEN] * G + [EOI, 3]])
    px = toy_pixels(1)
    mask = torch.ones_like(ids)
    out = model.generate(ids, attention_mask=mask, gen_pixel_values=px, max_new_tokens=3, do_sample=False)
    full = model(out[:, :-1], gen_pixel_values=px).logits
    assert torch.equal(full[0, ids.shape[1] - 1 :].argmax(-1), out[0, ids.shape[1] :])


def test_num_return_sequences_keeps_each_rows_images(model):
    """Expanded rows (num_return_sequences, beams) must see their own images: pixel_values hold one entry per image
    and the first sample has two, so repeating per image would hand rows the wrong ones."""
    image = [BOI] + [IMG] * U + [EOI]
    first = torch.tensor([[1] + image + image + [2]])
    second = torch.tensor([[3] + image + [4]])
    pad = first.shape[1] - second.shape[1]
    ids = torch.cat([first, torch.cat([torch.full((1, pad), PAD), second], dim=1)])
    mask = (ids != PAD).long()
    px = toy_pixels(3)
    kw = dict(max_new_tokens=1, pad_token_id=PAD, eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        both = model.generate(
            ids, attention_mask=mask, pixel_values=px, num_return_sequences=2, do_sample=True, top_k=1, **kw
        )
        alone = [
            model.generate(row, attention_mask=torch.ones_like(row), pixel_values=p, do_sample=False, **kw).logits[0][0]
            for row, p in ((first, px[:2]), (second, px[2:]))
        ]
    for r, ref in enumerate([alone[0], alone[0], alone[1], alone[1]]):
        torch.testing.assert_close(both.logits[0][r], ref, atol=1e-4, rtol=1e-4)


def test_bf16_model_understands_and_generates_images(model):
    """A model loaded in bf16 takes the processor's float32 pixels (CNN and ViT paths) and decodes its own bits."""
    import copy

    low = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.tensor([[1, 2, BOI] + [IMG] * U + [EOI, 3]])
    px = toy_pixels(1)  # float32, as the processor returns them
    assert torch.isfinite(low(ids, pixel_values=px).logits).all()
    out = low.generate(ids, attention_mask=torch.ones_like(ids), pixel_values=px, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 2)
    gen = torch.tensor([[1, 2, BOI] + [GEN] * G + [EOI]])
    assert torch.isfinite(low(gen, labels=gen, gen_pixel_values=px).vision_loss)
    images = low.generate_image(torch.tensor([[1, 2, BOI]]), temperature=0.0)
    assert images[0].size == (32, 32)


def test_generation_training_losses_and_scale_weights(model):
    ids = torch.tensor([[1, 2, BOI] + [GEN] * G + [EOI]])
    model.train()
    try:
        out = model(ids, labels=ids, gen_pixel_values=toy_pixels(1))
    finally:
        model.eval()
    assert out.vision_logits.shape == (G, 8)
    assert torch.isfinite(out.vision_loss) and torch.isfinite(out.text_loss)
    # Each modality divided by its own running scale: both terms are ~1 right after the first update.
    assert out.loss.item() == pytest.approx(2.0, rel=1e-4)
    assert out.loss_scales[1].item() == pytest.approx(out.vision_loss.item(), rel=1e-5)
    bits = model.visual_tokenizer.encode(toy_pixels(1))
    logits = torch.zeros(G, 8)
    logits[0] = 10 * (bits[0].view(8).float() * 2 - 1)  # the 1x1 scale predicted perfectly, the rest at chance
    equal = model.bit_loss(logits, bits).item()
    model.config.vision_config.scale_loss_weights = [1.0, 0.0, 0.0, 0.0]
    try:
        assert model.bit_loss(logits, bits).item() < 0.01 < equal
    finally:
        model.config.vision_config.scale_loss_weights = None


def teacher_forced_bits(model, prompts, mask, bits, **images):
    """The likelier bits the training layout predicts when fed `bits` as the ground truth: what greedy generation
    must have produced scale by scale, since each scale sees only the coarser ones."""
    ids = torch.cat([prompts, torch.full((prompts.shape[0], G), GEN)], dim=1)
    mask = torch.cat([mask, torch.ones(prompts.shape[0], G, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, image_gen_bits=bits, **images).vision_logits
    return (logits > 0).to(torch.uint8).view(prompts.shape[0], G, -1)


def test_next_scale_generation_produces_images(model):
    prompts = torch.tensor([[1, 2, 3, BOI], [PAD, PAD, 5, BOI]])
    mask = (prompts != PAD).long()
    images, bits = model.generate_image(prompts, mask, temperature=1.0, generator=torch.Generator().manual_seed(0), return_bits=True)
    assert [im.size for im in images] == [(32, 32)] * 2 and images[0].mode == "RGB"
    assert [tuple(b.shape) for b in bits] == [(2, s, s, 8) for s in (1, 2, 4, 8)]
    # Greedy generation (cached, scale by scale) agrees with the teacher-forced training forward on every bit.
    _, greedy = model.generate_image(prompts, mask, temperature=0.0, return_bits=True)
    flat = torch.cat([b.flatten(1, 2) for b in greedy], dim=1)
    assert torch.equal(teacher_forced_bits(model, prompts, mask, greedy), flat)
    assert not torch.equal(flat[0], flat[1])  # the prompt matters
    # Per-scale temperatures: greedy coarse scales and sampled fine ones agree with all-greedy on the coarse bits.
    _, mixed = model.generate_image(
        prompts, mask, temperature=[0.0, 0.0, 1.0, 1.0], generator=torch.Generator().manual_seed(1), return_bits=True
    )
    _, all_greedy = model.generate_image(prompts, mask, temperature=0.0, return_bits=True)
    assert all(torch.equal(a, b) for a, b in zip(mixed[:2], all_greedy[:2]))
    with pytest.raises(ValueError, match="<boi>"):
        model.generate_image(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="one per scale"):
        model.generate_image(prompts, mask, temperature=[1.0, 1.0])


def test_image_generation_sees_the_prompts_images(model):
    """A prompt may hold images to edit or follow; they reach the prefill, and the processor's batch (with
    position_ids from earlier versions) can be passed as is."""
    prompts = torch.tensor([[1, BOI] + [IMG] * U + [EOI, 2, BOI], [PAD] * (U + 2) + [3, 4, BOI]])
    batch = {"input_ids": prompts, "attention_mask": (prompts != PAD).long(), "pixel_values": toy_pixels(1)}
    batch["position_ids"] = layout_positions_and_blocks(prompts, batch["attention_mask"], model.layout)[0]
    _, bits = model.generate_image(**batch, temperature=0.0, return_bits=True)
    flat = torch.cat([b.flatten(1, 2) for b in bits], dim=1)
    forced = teacher_forced_bits(model, prompts, batch["attention_mask"], bits, pixel_values=batch["pixel_values"])
    assert torch.equal(forced, flat)
    # An untrained model's bit logits are ~0.01, too faint for the image to move greedy bits; sampled at a matching
    # temperature from the same random draws, the image changes its own row's bits and only those.
    sampled = []
    for seed in (0, 7):
        images = {**batch, "pixel_values": toy_pixels(1, seed=seed)}
        generator = torch.Generator().manual_seed(0)
        _, bits = model.generate_image(**images, temperature=0.01, generator=generator, return_bits=True)
        sampled.append(torch.cat([b.flatten(1, 2) for b in bits], dim=1))
    assert not torch.equal(sampled[0][0], sampled[1][0]) and torch.equal(sampled[0][1], sampled[1][1])
    with pytest.raises(ValueError, match="no pixel_values"):
        model.generate_image(prompts, batch["attention_mask"])
    # An image generated earlier in the conversation goes in as its pixels too.
    earlier = torch.tensor([[1, BOI] + [GEN] * G + [EOI, 2, BOI]])
    assert model.generate_image(earlier, gen_pixel_values=toy_pixels(1), temperature=0.0)[0].size == (32, 32)
    with pytest.raises(ValueError, match="no gen_pixel_values"):
        model.generate_image(earlier)


def test_text_only_config_unchanged():
    cfg = Ernie5Config()
    assert cfg.vision_config is None and Ernie5ForCausalLM(cfg).model.vision is None
    with pytest.raises(ValueError, match="image_token_id"):
        Ernie5Config(vision_config=Ernie5VisionConfig())
    with pytest.raises(ValueError, match="patch grid"):
        from modeling_ernie5.configuration_ernie5_vision import tiny_vit_config

        Ernie5VisionConfig(vit_config=tiny_vit_config(patch_size=8))
    with pytest.raises(ValueError, match=r"image_size \(64\) must equal the visual tokenizer's image_size \(32\)"):
        Ernie5VisionConfig(vit_config=tiny_vit_config(image_size=64, patch_size=8))  # same 8x8 grid, other pixels
    with pytest.raises(ValueError, match="scale_schedule"):
        Ernie5VisualTokenizerConfig(scale_schedule=[1, 2, 4])


@pytest.mark.slow
def test_vl_model_save_load_and_remote_code(tmp_path, model, without_ernie5_packages):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    model.save_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, BOI] + [IMG] * U + [EOI, 3]])
    px = toy_pixels(1)
    ref = model(ids, pixel_values=px).logits
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, Ernie5ForConditionalGeneration)
    assert torch.allclose(loaded(ids, pixel_values=px).logits, ref, atol=1e-5)
    text = torch.tensor([[1, 2, 3, 4, 5]])
    text_ref = model(text).logits
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is Ernie5ForCausalLM
    torch.save({"ids": ids, "px": px, "ref": ref, "text": text, "text_ref": text_ref}, tmp_path / "probe.pt")
    # In a process where the ernie5 packages cannot be imported: the saved code is all there is.
    stdout = without_ernie5_packages(
        f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
        m = AutoModelForImageTextToText.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
        probe = torch.load({str(tmp_path / "probe.pt")!r}, weights_only=True)
        out = m(probe["ids"], pixel_values=probe["px"]).logits
        assert torch.allclose(out, probe["ref"], atol=1e-5), (out - probe["ref"]).abs().max()
        lm = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(lm).__name__ == "Ernie5ForCausalLM" and type(lm).__module__.startswith("transformers_modules")
        assert torch.allclose(lm(probe["text"]).logits, probe["text_ref"], atol=1e-5)
        print("remote ok")
        """,
        tmp_path,
        timeout=120,
    )
    assert "remote ok" in stdout


def test_tokenizer_statistics_missing_from_a_checkpoint_start_fresh(tmp_path):
    from safetensors.torch import load_file, save_file

    Ernie5VisualTokenizer(Ernie5VisualTokenizerConfig(base_channels=8)).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for name in ("latent_mean", "latent_var", "latent_batches"):
        weights.pop(name)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    tok = Ernie5VisualTokenizer.from_pretrained(tmp_path)
    assert torch.equal(tok.latent_mean, torch.zeros(8)) and torch.equal(tok.latent_var, torch.ones(8))
    assert int(tok.latent_batches) == 0
