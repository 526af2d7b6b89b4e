"""The official-format rescoring CLI, run configuration checks, and release lookup."""

from __future__ import annotations

import json

import pytest

from conftest import require_real_dynvqa
from eval.loaders import release_path
from eval.run import RunConfig
from eval.score import main as score_main
from eval.score import score_file


def test_score_file_matches_metric_and_skips_what_would_crash(tmp_path, capsys):
    path = tmp_path / "output.jsonl"
    lines = [
        {"question_id": "en1", "answer": ["Al Nassr", "Al Nassr FC"], "prediction": "Al Nassr."},
        {"question_id": "en2", "answer": ["Al-Nassr"], "prediction": "Al-Nassr"},
        {"question_id": "en3", "answer": None, "prediction": "x"},  # official script: TypeError
        {"question_id": "en4", "answer": ["x"], "prediction": None},
        {"question_id": "en5", "answer": [None], "prediction": "x"},  # no usable gold: skipped, not a crash
    ]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines) + "{torn", encoding="utf-8")
    result = score_file(str(path), "en")
    assert (result["n"], result["official_f1_recall"], result["clean_f1_recall"]) == (2, 50.0, 100.0)
    assert [s["reason"] for s in result["skipped"]] == [
        "answer_null_or_empty", "prediction_not_a_string", "answer_null_or_empty", "invalid_json"
    ]  # fmt: skip
    score_main([str(path), "--lang", "en"])
    assert "Token F1-Recall:  50.0" in capsys.readouterr().out
    # A file of another layout (eval.run's own predictions store) is refused with the name of the right file.
    other = tmp_path / "predictions.direct.jsonl"
    other.write_text(json.dumps({"id": "en1", "prediction": "Al Nassr"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no scorable lines \(1 skipped\).*official_input\.<mode>\.<lang>\.jsonl"):
        score_file(str(other), "en")


def test_run_config_checks(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("model: m\ndata: [a.jsonl]\nmodes: direct,golden\nlangs: en,zh\n", encoding="utf-8")
    cfg = RunConfig.from_yaml(str(cfg_file), out=str(tmp_path / "x"))
    assert cfg.modes == ["direct", "golden"] and cfg.langs == ["en", "zh"] and cfg.run_name == "x"
    cfg_file.write_text("model: m\nbogus: 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="bogus"):
        RunConfig.from_yaml(str(cfg_file))
    with pytest.raises(ValueError, match="unknown Dyn-VQA mode"):
        RunConfig(modes=["direct", "oracle"])
    with pytest.raises(ValueError, match=">= 1"):
        RunConfig(batch_size=0)


def test_release_lookup(tmp_path):
    with pytest.raises(ValueError, match="unknown Dyn-VQA release"):
        release_path(tmp_path, "en", "202399")
    with pytest.raises(ValueError, match="not found"):
        release_path(tmp_path, "en", "202408")
    root = require_real_dynvqa()
    assert release_path(root).name == "DynVQA_en.202412.jsonl"
    assert release_path(root, "zh", "202406").name == "DynVQA_zh.202406.jsonl"


def test_prediction_store_survives_a_last_line_without_newline(tmp_path):
    """A writer stopped right after a record's JSON leaves no newline; the next append must not merge into it."""
    from eval.predictions import PredictionStore

    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"id": "a", "prediction": "x"}), encoding="utf-8")  # no trailing newline
    store = PredictionStore(path)
    store.add({"id": "b", "prediction": "y"})
    again = PredictionStore(path)
    assert sorted(again.records) == ["a", "b"] and again.torn_lines == 0


def test_hallusionbench_consistency_and_items_without_prediction():
    """fAcc / qAcc group HallusionBench items as VLMEvalKit does (l2-category + set, figure and question ids from
    the index), and items whose batch failed are counted and can be scored as wrong."""
    from eval.benchmarks import get_benchmark, prepare
    from eval.benchmarks import score as score_benchmark
    from eval.loaders.common import BenchmarkSample
    from eval.report import benchmark_markdown

    spec = get_benchmark("HallusionBench")
    # (set, figure, question, gold, predicted): set 0 asks two questions of two figures, set 1 two of one figure.
    table = [(0, 0, 0, "1", "Yes"), (0, 0, 1, "0", "No"), (0, 1, 0, "0", "Yes"), (0, 1, 1, "1", "Yes"),
             (1, 0, 0, "1", "Yes"), (1, 0, 1, "0", "Yes")]  # fmt: skip
    samples = [prepare(spec, BenchmarkSample(id=f"VS_chart_{n}_{s}_{f}_{q}", question="Is it so?", answers=[gold],
                                             extra={"l2-category": "chart"}))
               for n, (s, f, q, gold, _) in enumerate(table)]  # fmt: skip
    predictions = {sample.id: row[4] for sample, row in zip(samples, table)}
    result = score_benchmark(spec, samples, predictions)
    assert result["score"] == pytest.approx(400 / 6)  # aAcc: 4 of 6 right
    # figures: s0f0 right on both, s0f1 and s1f0 not -> 1/3; questions: s0q1 and s1q0 right on every figure -> 2/4
    consistency = result["consistency"]
    assert (consistency["figures"], consistency["questions"]) == (3, 4)
    assert consistency["fAcc"] == pytest.approx(100 / 3) and consistency["qAcc"] == pytest.approx(50.0)
    markdown = benchmark_markdown({**result, "benchmark": "hallusionbench", "run_name": "t", "model": "m",
                                   "data": {"file": "f", "sha256": "0" * 64, "loader": {"counts": {}}},
                                   "date": "d", "images_missing": 0})  # fmt: skip
    assert "| 66.67 | 33.33 | 50.00 | 3 | 4 |" in markdown
    # One failed item: the mean over predicted items, the count, and the score with it counted wrong.
    del predictions[samples[0].id]
    result = score_benchmark(spec, samples, predictions)
    assert (result["n_scored"], result["not_predicted"]) == (5, 1)
    assert result["score"] == pytest.approx(60.0) and result["score_missing_as_wrong"] == pytest.approx(50.0)
    # Items without the ids (a plain yes/no file): no fAcc / qAcc rather than groups made up from other fields.
    plain = [prepare(spec, BenchmarkSample(id=str(i), question="q", answers=["1"])) for i in range(2)]
    result = score_benchmark(spec, plain, {"0": "Yes", "1": "No"})
    assert result["consistency"]["fAcc"] is None and result["consistency"]["missing_keys"] == 2
    assert "score_missing_as_wrong" in result and "consistency" not in score_benchmark(get_benchmark("mmstar"), plain, {})
