"""The routing heat map (eval/routing_heatmap.py) and the visual-tokenizer training entry point, on tiny sizes."""

import json

import pytest
import torch

from eval.routing_heatmap import js_divergence, plot_heatmaps, routing_usage, toy_batches
from modeling_ernie5 import Ernie5Config
from modeling_ernie5.configuration_ernie5_vision import Ernie5VisionConfig
from modeling_ernie5.modeling_ernie5_vl import Ernie5ForConditionalGeneration
from processing.image_processing import Ernie5ImageProcessor
from processing.processing_ernie5 import Ernie5Processor
from processing.tokenizer import train_text_tokenizer
from processing.toy_world import caption, draw_scene


def test_js_divergence_bounds():
    a = torch.tensor([5.0, 5.0, 0.0, 0.0])
    assert js_divergence(a, a) == pytest.approx(0.0)
    assert js_divergence(a, torch.tensor([0.0, 0.0, 3.0, 1.0])) == pytest.approx(1.0)


def test_routing_usage_counts_every_slot_by_modality(tmp_path):
    texts = [caption(draw_scene(i)[1]) + " Q: How many circles are there? A: 2" for i in range(50)]
    processor = Ernie5Processor(Ernie5ImageProcessor(size=32), train_text_tokenizer(texts, vocab_size=300))
    config = Ernie5Config(
        vocab_size=len(processor.tokenizer), vision_config=Ernie5VisionConfig(),
        pad_token_id=processor.tokenizer.pad_token_id, **processor.vision_token_ids(),
    )  # fmt: skip
    model = Ernie5ForConditionalGeneration(config)
    batches = toy_batches(processor, n_scenes=2, batch_size=2)
    counts = routing_usage(model, batches)
    assert counts.shape == (config.num_hidden_layers, 3, config.num_experts)
    ids = processor.vision_token_ids()
    n_image = sum(int((b["input_ids"] == ids["image_token_id"]).sum()) for b in batches)
    n_gen = sum(int((b["input_ids"] == ids["image_gen_token_id"]).sum()) for b in batches)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    k = config.num_experts_per_tok
    assert counts[0, 1].sum() == n_image * k and counts[0, 2].sum() == n_gen * k
    assert counts[0, 0].sum() == (n_real - n_image - n_gen) * k
    divergences = plot_heatmaps(counts, str(tmp_path / "routing.png"))
    assert (tmp_path / "routing.png").stat().st_size > 1000
    assert set(divergences) == {f"layer_{i}" for i in range(config.num_hidden_layers)}
    assert all(0.0 <= v <= 1.0 for layer in divergences.values() for v in layer.values())


def test_train_visual_tokenizer_entry_point(tmp_path):
    from training.train_visual_tokenizer import main

    out = tmp_path / "vt"
    metrics = main([
        "--output_dir", str(out), "--max_steps", "3", "--batch_size", "4", "--image_size", "16",
        "--channel_multipliers", "1,2", "--eval_images", "4", "--adversarial_weight", "0.1",
    ])  # fmt: skip
    assert (out / "model.safetensors").exists() and (out / "recon.png").exists()
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["psnr_db"] == pytest.approx(metrics["psnr_db"]) and saved["steps"] == 3
    from modeling_ernie5.visual_tokenizer import Ernie5VisualTokenizer

    tok = Ernie5VisualTokenizer.from_pretrained(out)
    assert tok.config.image_size == 16 and tok.config.scale_schedule == [1, 2, 4, 8]
    # A finer schedule (non-power-of-two grids) trains and round-trips too.
    main([
        "--output_dir", str(tmp_path / "vt6"), "--max_steps", "2", "--batch_size", "4", "--image_size", "16",
        "--channel_multipliers", "1,2", "--eval_images", "4", "--scale_schedule", "1,2,3,4,6,8",
    ])  # fmt: skip
    tok6 = Ernie5VisualTokenizer.from_pretrained(tmp_path / "vt6")
    bits = tok6.encode(torch.zeros(1, 3, 16, 16))
    assert [b.shape[1] for b in bits] == [1, 2, 3, 4, 6, 8] == tok6.config.scale_schedule
    with pytest.raises(ValueError, match="scale_schedule"):
        main(["--output_dir", str(tmp_path / "bad"), "--image_size", "16", "--channel_multipliers", "1,2",
              "--scale_schedule", "1,2,4"])  # fmt: skip
    with pytest.raises(ValueError, match="adversarial_weight"):
        main(["--adversarial_weight", "-1"])


def test_semantic_regularisation_aligns_encoder_features_with_a_local_teacher(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from training.train_visual_tokenizer import main

    torch.manual_seed(0)
    teacher_dir = tmp_path / "teacher"
    teacher = SiglipVisionModel(SiglipVisionConfig(
        image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    ))  # fmt: skip
    teacher.save_pretrained(teacher_dir)
    metrics = main([
        "--output_dir", str(tmp_path / "vt"), "--max_steps", "30", "--batch_size", "8", "--image_size", "16",
        "--channel_multipliers", "1,2", "--eval_images", "4", "--semantic_teacher", str(teacher_dir),
        "--semantic_weight", "0.5", "--log_every", "29",
    ])  # fmt: skip
    first, last = metrics["history"][0]["semantic"], metrics["history"][-1]["semantic"]
    assert last < first, f"semantic loss did not fall: {first:.3f} -> {last:.3f}"
    with pytest.raises(ValueError, match="semantic_teacher"):
        main(["--semantic_teacher", str(tmp_path / "missing")])
