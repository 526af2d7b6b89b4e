"""Ernie5Processor / Ernie5ImageProcessor: placeholder expansion, Uni-RoPE positions, masks, errors, save/load."""

import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_ernie5 import Ernie5Config
from modeling_ernie5.configuration_ernie5_vision import Ernie5VisionConfig
from processing.image_processing import Ernie5ImageProcessor
from processing.processing_ernie5 import BOI_TOKEN, EOI_TOKEN, Ernie5Processor
from processing.tokenizer import train_text_tokenizer
from processing.toy_world import caption, draw_scene

U, G = 16, 85


@pytest.fixture(scope="module")
def processor():
    texts = [caption(draw_scene(i)[1]) + " How many circles are there? Draw a red square." for i in range(100)]
    tok = train_text_tokenizer(texts, vocab_size=300)
    return Ernie5Processor(Ernie5ImageProcessor(size=32), tok)


@pytest.fixture(scope="module")
def config(processor):
    return Ernie5Config(
        vocab_size=len(processor.tokenizer), vision_config=Ernie5VisionConfig(),
        pad_token_id=processor.tokenizer.pad_token_id, **processor.vision_token_ids(),
    )  # fmt: skip


def scene_image(seed=0, size=64):
    return draw_scene(seed, size=size)[0]


def test_understanding_expansion(processor):
    ids = processor.vision_token_ids()
    batch = processor(text=["<image> How many circles?", "no image here"], images=[scene_image()])
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row.count(ids["image_token_id"]) == U
    start = row.index(ids["boi_token_id"])
    assert row[start + 1 : start + 1 + U] == [ids["image_token_id"]] * U and row[start + 1 + U] == ids["eoi_token_id"]
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    # Left padding (what generation and TRL expect).
    assert batch["attention_mask"][1, 0] == 0 and batch["attention_mask"][1, -1] == 1


def test_generation_expansion_and_prompt(processor):
    ids = processor.vision_token_ids()
    train = processor(text=["draw a red circle <|image_gen|>"], gen_images=[scene_image()])
    row = train["input_ids"][0].tolist()
    assert row.count(ids["image_gen_token_id"]) == G and row[-1] == ids["eoi_token_id"]
    assert train["gen_pixel_values"].shape == (1, 3, 32, 32)
    prompt = processor(text=["draw a red circle <|image_gen|>"])
    assert prompt["input_ids"][0, -1].item() == ids["boi_token_id"]
    for trailing in (" ", "\n", " \n "):  # whitespace after the tag would follow <boi> and break generate_image
        spaced = processor(text=["draw a red circle <|image_gen|>" + trailing])
        assert torch.equal(spaced["input_ids"], prompt["input_ids"]), repr(trailing)
    assert ids["image_gen_token_id"] not in prompt["input_ids"][0].tolist()


def test_positions_resume_after_image(processor):
    from modeling_ernie5.multimodal_layout import layout_positions_and_blocks

    batch = processor(text=["a <image> b c"], images=[scene_image()])
    assert "position_ids" not in batch  # the model derives them from the ids
    pos = layout_positions_and_blocks(batch["input_ids"], batch["attention_mask"], processor.layout)[0][:, 0]
    ids = batch["input_ids"][0].tolist()
    img = [i for i, t in enumerate(ids) if t == processor.vision_token_ids()["image_token_id"]]
    p0 = pos[0, img[0]].item()
    assert torch.all(pos[0, img] == p0)  # t: one frame
    assert pos[1, img].max().item() == p0 + 3 and pos[2, img].max().item() == p0 + 3  # 4x4 grid
    eoi = img[-1] + 1
    assert pos[:, eoi].tolist() == [p0 + 4] * 3  # text counter resumes at max + 1
    assert pos[:, eoi + 1].tolist() == [p0 + 5] * 3


def test_bf16_cast_batch_keeps_positions(processor, config):
    """`batch.to(torch.bfloat16)` (the usual way to get bf16 pixels) must not round positions: past 256 bf16 keeps
    only every other integer, and fractional scale positions sooner."""
    from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration
    from modeling_ernie5.multimodal_layout import layout_positions_and_blocks

    torch.manual_seed(0)
    model = Ernie5ForConditionalGeneration(config).eval()
    batch = processor(text=["how many circles " * 120 + "<image> how many"], images=[scene_image()]).to(torch.bfloat16)
    positions = layout_positions_and_blocks(batch["input_ids"], batch["attention_mask"], processor.layout)[0]
    assert positions.max() > 300 and batch["input_ids"].dtype == torch.long
    with torch.no_grad():
        exact = model(**{**batch, "position_ids": positions}).logits
        cast = model(**batch).logits
    torch.testing.assert_close(cast, exact, rtol=0, atol=0)


def test_4d_mask_matches_model_rules(processor, config):
    from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration

    torch.manual_seed(0)
    model = Ernie5ForConditionalGeneration(config).eval()
    args = dict(text=["<image> what?", "draw a blue square <|image_gen|>"], images=[scene_image()], gen_images=[scene_image(1)])
    plain, four_d = processor(**args), processor(**args, return_4d_attention_mask=True)
    assert four_d["attention_mask"].shape == (2, 1, plain["input_ids"].shape[1], plain["input_ids"].shape[1])
    assert four_d["attention_mask"].dtype == torch.bool
    with torch.no_grad():
        a, b = model(**plain).logits, model(**four_d).logits
    real = plain["attention_mask"].bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_backbone_and_causal_lm_take_the_processor_batch_as_is(processor, config):
    """AutoModel / AutoModelForCausalLM given an image batch with the caller's position_ids (as TRL and older
    processor versions pass them) must still use the block-causal mask, as the multimodal class does."""
    from modeling_ernie5 import Ernie5ForCausalLM
    from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration
    from modeling_ernie5.multimodal_layout import layout_positions_and_blocks

    def with_positions(batch):
        positions, _, _ = layout_positions_and_blocks(batch["input_ids"], batch["attention_mask"], processor.layout)
        batch["position_ids"] = positions
        return batch

    torch.manual_seed(0)
    model = Ernie5ForConditionalGeneration(config).eval()
    texts = ["<image> how many circles", "draw <|image_gen|>"]
    batch = with_positions(processor(text=texts, images=[scene_image()], gen_images=[scene_image(1)]))
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        bits = model.visual_tokenizer.encode(batch["gen_pixel_values"])
        ref = model(**batch, output_hidden_states=True).hidden_states[-1]
        inputs = {k: v for k, v in batch.items() if k != "gen_pixel_values"}
        hidden = model.model(**inputs, image_gen_bits=bits).last_hidden_state
    torch.testing.assert_close(hidden[real], ref[real], atol=1e-5, rtol=1e-5)
    # The causal LM's MTP loss follows the same rule: caller positions, block-causal mask.
    lm_config = copy.deepcopy(config)
    lm_config.router_bias_update_rate = 0.0  # both training forwards route alike
    # Depth 2 attends depth 1's states at the image tokens, which the mask decides (labels there are ignored).
    lm_config.num_nextn_predict_layers = 2
    lm = Ernie5ForCausalLM(lm_config).train()
    texts = ["<image> how many circles", "the <image> circles"]
    text = with_positions(processor(text=texts, images=[scene_image(), scene_image(2)]))
    labels = text["input_ids"].masked_fill(text["input_ids"] == config.image_token_id, -100)
    given = lm(**text, labels=labels)
    derived = lm(**{k: v for k, v in text.items() if k != "position_ids"}, labels=labels)
    torch.testing.assert_close(given.lm_loss, derived.lm_loss, rtol=0, atol=0)
    torch.testing.assert_close(given.mtp_loss, derived.mtp_loss, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(text=["<image> <image>"], images=[scene_image()]), "2 <image> tags in the text but 1 images"),
        (dict(text=["no tag"], images=[scene_image()]), "0 <image> tags"),
        (dict(text=["<|image_gen|> then more text"]), "only a final tag"),
        (dict(text=["<image>"], images=[b"definitely not an image"]), "unreadable"),
        (dict(text=["<image>"], images=["/nonexistent/picture.png"]), "unreadable"),
        (dict(text=["<image>"], images=[Image.new("RGB", (4, 40))]), "smaller than min_image_size"),
        (dict(text=["<image>"], images=[np.zeros((5, 5, 7))]), "shape"),
        (dict(text=["<image>"], images=[np.full((16, 16, 3), 300)]), r"integer image values must be in \[0, 255\]"),
    ],
)
def test_errors_name_the_problem(processor, kwargs, message):
    with pytest.raises(ValueError, match=message):
        processor(**kwargs)


def test_too_long_sequence(processor):
    short = Ernie5Processor(processor.image_processor, processor.tokenizer, max_length=20)
    with pytest.raises(ValueError, match="exceed max_length=20"):
        short(text=["<image> how many?"], images=[scene_image()])


def test_image_inputs_of_every_kind(tmp_path, processor):
    image = scene_image(3)
    path = tmp_path / "scene.png"
    image.save(path)
    as_array = np.array(image)
    as_tensor = torch.from_numpy(as_array).permute(2, 0, 1).float() / 255
    # Integers are read by value whatever their dtype (torchvision's read_image gives uint8 CHW tensors), numpy
    # arrays may be channels-first like tensors, and floats above 1 are taken as [0, 255] with a warning.
    as_uint8_tensor = torch.from_numpy(as_array).permute(2, 0, 1)
    others = [as_tensor, as_uint8_tensor, as_array.astype(np.int64), as_array.transpose(2, 0, 1)]
    with pytest.warns(UserWarning, match=r"\[0, 255\]"):
        out = processor.image_processor(
            [image, str(path), path.read_bytes(), as_array, *others, as_array.astype(np.float32)], return_tensors="pt"
        )
    px = out["pixel_values"]
    assert px.shape == (9, 3, 32, 32)
    for i in range(1, 9):
        assert torch.allclose(px[0], px[i], atol=2 / 255), i
    round_trip = processor.image_processor.postprocess(px[:1])[0]
    assert round_trip.size == (32, 32)


def test_transparency_and_exif_orientation(processor):
    """Transparent pixels become white (their RGB is often black); photos are turned upright by their EXIF tag."""
    ip = processor.image_processor
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    assert torch.equal(ip(clear)["pixel_values"], torch.ones(1, 3, 32, 32))
    photo = scene_image(4, size=64).crop((0, 0, 64, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: stored rotated, display turned 90 degrees clockwise
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", exif=exif, quality=95)
    upright = Image.open(io.BytesIO(buffer.getvalue())).transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(ip(buffer.getvalue())["pixel_values"], ip(upright)["pixel_values"])


def test_tokenizer_options_are_honoured_or_refused(processor):
    args = dict(text=["<image> how many circles are there"], images=[scene_image()])
    with pytest.raises(ValueError, match="truncation.*cut through its images"):
        processor(**args, truncation=True, max_length=U)
    seen = []
    tokenize = type(processor.tokenizer).__call__

    def spy(tokenizer, *a, **kw):
        seen.append(kw.get("add_special_tokens"))
        return tokenize(tokenizer, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(processor.tokenizer), "__call__", spy)
        processor(**args, add_special_tokens=True)
        processor(**args)
    assert seen == [True, False]  # passed through when asked, off by default (the expansion places its own tokens)
    no_mask = processor(**args, return_attention_mask=False)
    assert "attention_mask" not in no_mask and torch.equal(no_mask["input_ids"], processor(**args)["input_ids"])
    lists = processor(**args, return_tensors=None)
    assert isinstance(lists["input_ids"], list) and lists["pixel_values"].shape == (1, 3, 32, 32)
    for refused in (dict(return_tensors="np"), dict(return_attention_mask=False)):
        with pytest.raises(ValueError, match="return_4d_attention_mask needs"):
            processor(**args, return_4d_attention_mask=True, **refused)


def test_chat_messages(processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many circles?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<image>" in text
    batch = processor(text=[text], images=[scene_image()])
    assert (batch["input_ids"] == processor.vision_token_ids()["image_token_id"]).sum() == U


def test_save_and_auto_load(tmp_path, processor, config):
    from transformers import AutoProcessor

    config.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, Ernie5Processor) and isinstance(loaded.image_processor, Ernie5ImageProcessor)
    assert loaded.vision_token_ids() == processor.vision_token_ids()
    assert loaded.scale_schedule == processor.scale_schedule and loaded.image_processor.size == 32
    args = dict(text=["<image> what?"], images=[scene_image()])
    assert torch.equal(loaded(**args)["input_ids"], processor(**args)["input_ids"])
    assert BOI_TOKEN in loaded.tokenizer.get_vocab() and EOI_TOKEN in loaded.tokenizer.get_vocab()


def test_remote_code_processor_loads_without_the_packages(tmp_path, processor, without_ernie5_packages):
    """The processor and image processor save their code with the checkpoint; a process that cannot import the
    ernie5 packages gets them back from the folder alone, with the same outputs."""
    processor.save_pretrained(tmp_path)
    image = scene_image()
    image.save(tmp_path / "probe.png")
    args = dict(text=["<image> what?", "draw <|image_gen|>"], images=[image])
    torch.save(dict(processor(**args)), tmp_path / "probe.pt")
    stdout = without_ernie5_packages(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoImageProcessor, AutoProcessor
        folder = {str(tmp_path)!r}
        p = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(p).__name__ == "Ernie5Processor" and type(p).__module__.startswith("transformers_modules"), type(p)
        ip = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(ip).__name__ == "Ernie5ImageProcessor", type(ip)
        out = p(text=["<image> what?", "draw <|image_gen|>"], images=[Image.open(folder + "/probe.png")])
        ref = torch.load(folder + "/probe.pt", weights_only=True)
        assert sorted(out.keys()) == sorted(ref.keys()), (out.keys(), ref.keys())
        assert all(torch.equal(out[k], ref[k]) for k in ref)
        print("remote ok")
        """,
        tmp_path,
        timeout=120,
    )
    assert "remote ok" in stdout


def test_from_config_checks_sizes(processor, config):
    p = Ernie5Processor.from_config(processor.image_processor, processor.tokenizer, config)
    assert p.understanding_tokens_per_image == U and p.generation_tokens_per_image == G
    with pytest.raises(ValueError, match="size"):
        Ernie5Processor.from_config(Ernie5ImageProcessor(size=64), processor.tokenizer, config)
