"""The toy-world vision demo end to end at a few steps: every stage runs and the report holds what the README cites."""

import json

import pytest


@pytest.mark.slow
def test_vision_toy_runs_and_reports(tmp_path):
    from examples.vision_toy import main

    results = main([
        "--output_dir", str(tmp_path), "--tokenizer_steps", "4", "--model_steps", "3", "--batch_size", "4",
        "--eval_scenes", "3", "--gen_per_prompt", "1", "--hidden_size", "32", "--num_layers", "2",
    ])  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["generation"] == results["generation"]
    gen = results["generation"]
    assert gen["n"] == 6 * 3 * 4  # every (colour, shape, position) prompt once
    for key in ("color", "shape", "position", "all"):
        assert 0.0 <= gen[f"{key}_match"] <= 1.0 and 0.0 <= gen[f"tokenizer_ceiling_{key}"] <= 1.0
    assert gen["all_chance"] == pytest.approx(1 / 72)
    prompted = {kind: sum(seen.values()) for kind, seen in gen["shape_confusion"].items()}
    assert prompted == {"square": 24, "circle": 24, "triangle": 24}
    # The generation targets are drawn large enough for the checkers to read them.
    assert gen["checker_on_real_color"] == 1.0 and gen["checker_on_real_shape"] >= 0.95
    assert results["understanding"]["overall"]["n"] > 0
    # Six scales by default, each scale's loss weighted by its grid side.
    vision_config = json.loads((tmp_path / "model/config.json").read_text())["vision_config"]
    assert vision_config["tokenizer_config"]["scale_schedule"] == [1, 2, 3, 4, 6, 8]
    assert vision_config["scale_loss_weights"] == [1, 2, 3, 4, 6, 8]
    for name in ("generated.png", "losses.png", "routing_heatmap.png", "tokenizer_recon.png", "model/config.json"):
        assert (tmp_path / name).is_file(), name

    # A second run reuses the saved tokenizer (same weights, same held-out PSNR) instead of training one.
    again = tmp_path / "again"
    reused = main([
        "--output_dir", str(again), "--visual_tokenizer", str(tmp_path / "visual_tokenizer"), "--model_steps", "1",
        "--batch_size", "2", "--eval_scenes", "1", "--gen_per_prompt", "1",
        "--hidden_size", "32", "--num_layers", "1",
    ])  # fmt: skip
    assert reused["tokenizer_psnr_db"] == pytest.approx(results["tokenizer_psnr_db"], abs=1e-4)
    assert (again / "tokenizer_recon.png").is_file() and not (again / "visual_tokenizer").exists()
    with pytest.raises(ValueError, match="32"):
        main(["--output_dir", str(tmp_path / "bad"), "--visual_tokenizer", str(tmp_path / "visual_tokenizer"),
              "--image_size", "32"])  # fmt: skip
