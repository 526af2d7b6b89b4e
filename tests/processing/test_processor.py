"""Ernie5Processor / Ernie5ImageProcessor: placeholder expansion, Uni-RoPE positions, masks, errors, save/load."""

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
    assert ids["image_gen_token_id"] not in prompt["input_ids"][0].tolist()


def test_positions_resume_after_image(processor):
    batch = processor(text=["a <image> b c"], images=[scene_image()])
    pos = batch["position_ids"][:, 0]
    ids = batch["input_ids"][0].tolist()
    img = [i for i, t in enumerate(ids) if t == processor.vision_token_ids()["image_token_id"]]
    p0 = pos[0, img[0]].item()
    assert torch.all(pos[0, img] == p0)  # t: one frame
    assert pos[1, img].max().item() == p0 + 3 and pos[2, img].max().item() == p0 + 3  # 4x4 grid
    eoi = img[-1] + 1
    assert pos[:, eoi].tolist() == [p0 + 4] * 3  # text counter resumes at max + 1
    assert pos[:, eoi + 1].tolist() == [p0 + 5] * 3


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
    out = processor.image_processor([image, str(path), path.read_bytes(), as_array, as_tensor], return_tensors="pt")
    px = out["pixel_values"]
    assert px.shape == (5, 3, 32, 32)
    for i in range(1, 5):
        assert torch.allclose(px[0], px[i], atol=2 / 255)
    round_trip = processor.image_processor.postprocess(px[:1])[0]
    assert round_trip.size == (32, 32)


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


def test_from_config_checks_sizes(processor, config):
    p = Ernie5Processor.from_config(processor.image_processor, processor.tokenizer, config)
    assert p.understanding_tokens_per_image == U and p.generation_tokens_per_image == G
    with pytest.raises(ValueError, match="size"):
        Ernie5Processor.from_config(Ernie5ImageProcessor(size=64), processor.tokenizer, config)
