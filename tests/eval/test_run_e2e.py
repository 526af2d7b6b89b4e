"""End to end: a tiny random Llava (and a tiny text-only Llama) through `eval.run` in the three
Dyn-VQA modes with the shared tool runtime's BM25 retriever, resuming, the official scorer's input
files, reports, comparisons, and an image benchmark from a VLMEvalKit TSV."""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
from PIL import Image

from eval.benchmarks import load_metric
from eval.images import ImageStore
from eval.model import GenerationModel
from eval.report import compare_runs
from eval.run import RunConfig, evaluate_run, main

RECORDS = [
    {"image_url": "https://img.example/a/image_1.jpeg", "question": "What is this person's current club?",
     "question_id": "en1", "answer": ["Al Nassr", "Al Nassr FC"], "gloden_query": "What is Cristiano Ronaldo's current club?"},
    {"image_url": "https://img.example/a/image_2.jpeg", "question": "When was this tower built?",
     "question_id": "en2", "answer": [1889], "gloden_query": "When was the Eiffel Tower built?"},
    {"image_url": "https://img.example/a/image_3.jpeg", "question": "Who designed it?",
     "question_id": "en3", "answer": ["Gustave Eiffel"], "gloden_query": "Who designed the Eiffel Tower?"},
    {"image_url": "https://img.example/a/image_4.jpeg", "question": "How tall is it?",
     "question_id": "en4", "answer": ["330 metres"], "gloden_query": None},
    {"image_url": "https://img.example/a/missing.jpeg", "question": "Where is it?",
     "question_id": "en5", "answer": ["Paris"], "gloden_query": "Where is the Eiffel Tower?"},
]
ZH_RECORDS = [
    {"image_url": "https://img.example/a/image_1.jpeg", "question": "他现在效力于哪家俱乐部？",
     "question_id": "zh1", "answer": ["利雅得胜利", "Al Nassr"], "gloden_query": "C罗现在效力于哪家俱乐部？"},
]
CORPUS = [
    {"id": "d1", "title": "Cristiano Ronaldo", "text": "Cristiano Ronaldo plays for Al Nassr, a club in Riyadh."},
    {"id": "d2", "title": "Eiffel Tower", "text": "The Eiffel Tower in Paris was built in 1889 and designed by Gustave Eiffel's company."},
    {"id": "d3", "title": "Louvre", "text": "The Louvre is a museum in Paris."},
    {"id": "d4", "title": "C罗", "text": "C罗现在效力于利雅得胜利俱乐部。"},
]


class CountingModel:
    """The real model, with its generate calls counted (to see which items a rerun redoes)."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, prompts):
        self.calls.append(len(prompts))
        return self.model.generate(prompts)


@pytest.fixture()
def dynvqa_setup(tmp_path):
    data = tmp_path / "DynVQA_en.202412.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")
    zh = tmp_path / "DynVQA_zh.202412.jsonl"
    zh.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ZH_RECORDS), encoding="utf-8")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in CORPUS), encoding="utf-8")
    images = tmp_path / "images"
    images.mkdir()
    store = ImageStore(images)
    for r in RECORDS[:4]:
        buf = io.BytesIO()
        Image.new("RGB", (20, 14), "red").save(buf, format="JPEG")
        store.add(r["image_url"], buf.getvalue())
    return {"en": str(data), "zh": str(zh), "corpus": str(corpus), "images": str(images), "root": tmp_path}


@pytest.mark.slow
def test_dynvqa_three_modes_resume_and_official_format(tiny_llava, dynvqa_setup, tmp_path):
    model = CountingModel(GenerationModel(tiny_llava, max_new_tokens=6))
    out = tmp_path / "run-base"
    cfg = RunConfig(model=tiny_llava, data=[dynvqa_setup["en"], dynvqa_setup["zh"]], out=str(out),
                    image_dir=dynvqa_setup["images"], corpus=dynvqa_setup["corpus"], batch_size=2)
    result = evaluate_run(cfg, model=model)

    assert set(result["modes"]) == {"direct", "agent", "golden"}
    for stats in result["modes"].values():
        assert stats["n"] == 6 and stats["not_predicted"] == 0
        assert stats["images_missing"] == 1  # en5's image is not in the store; the run went on
        assert set(stats["official"]["by_lang"]) == {"en", "zh"}
        assert 0.0 <= stats["official"]["all"] <= 100.0
    assert result["modes"]["golden"]["golden_query_fallbacks"] == 1  # en4 has no golden query
    assert result["modes"]["golden"]["search_failures"] == 0
    # direct: 3 batches of 2 (5 en + 1 zh, batches cut per mode over both files); agent: query + answer per batch.
    assert model.calls == [2, 2, 2] + [2, 2, 2, 2, 2, 2] + [2, 2, 2]

    golden = {json.loads(l)["id"]: json.loads(l) for l in open(out / "predictions.golden.jsonl", encoding="utf-8")}
    assert golden["en1"]["retrieved"][0][0] == "d1"  # the golden query finds the Ronaldo page first
    assert golden["en2"]["retrieved"][0][0] == "d2"
    assert golden["en1"]["queries"] == ["What is Cristiano Ronaldo's current club?"]
    agent = [json.loads(l) for l in open(out / "predictions.agent.jsonl", encoding="utf-8")]
    assert all(len(r["queries"]) == 1 and r["query_outputs"] for r in agent)

    # The official scorer's input: the release record unchanged plus "prediction", one file per language.
    lines = [json.loads(l) for l in open(out / "official_input.agent.en.jsonl", encoding="utf-8")]
    assert [l["question_id"] for l in lines] == [r["question_id"] for r in RECORDS]
    assert lines[1]["answer"] == [1889] and "gloden_query" in lines[1] and "prediction" in lines[1]
    metric = load_metric("dynvqa_f1_recall")
    rescored = metric.compute(predictions=[l["prediction"] for l in lines],
                              references=[[str(a) for a in l["answer"]] for l in lines], lang="en")
    assert rescored["f1_recall"] == result["modes"]["agent"]["official"]["by_lang"]["en"]

    for name in ("result.json", "report.md", "scores.png"):
        assert (out / name).stat().st_size > 0
    assert "| agent | 6 | 0 |" in (out / "report.md").read_text(encoding="utf-8")  # n, not predicted

    # Resume: a rerun generates nothing; a lost line and a torn line are redone for that item only.
    model.calls.clear()
    evaluate_run(cfg, model=model)
    assert model.calls == []
    path = out / "predictions.direct.jsonl"
    kept = path.read_text(encoding="utf-8").splitlines()[:-1]
    path.write_text("\n".join(kept) + '\n{"id": "zh1", "predic', encoding="utf-8")
    again = evaluate_run(RunConfig(**{**cfg.__dict__, "modes": ["direct"]}), model=model)
    assert model.calls == [1]
    assert again["modes"]["direct"]["n"] == 6
    assert len(path.read_text(encoding="utf-8").splitlines()) == 6
    with pytest.raises(ValueError, match="other settings"):
        evaluate_run(RunConfig(**{**cfg.__dict__, "max_new_tokens": 9}), model=model)
    with pytest.raises(ValueError, match="image_dir"):  # e.g. the images were forgotten in the first run
        evaluate_run(RunConfig(**{**cfg.__dict__, "image_dir": str(tmp_path / "other-images")}), model=model)


@pytest.mark.slow
def test_text_only_model_cli_and_comparison(tiny_causal_lm, dynvqa_setup, tmp_path):
    out = tmp_path / "run-text"
    # A folder as --data: the release file for each of --langs is picked from it.
    result = main(["--model", tiny_causal_lm, "--data", str(dynvqa_setup["root"]), "--langs", "en", "--out", str(out),
                   "--corpus", dynvqa_setup["corpus"], "--modes", "direct,golden", "--batch-size", "3",
                   "--max-new-tokens", "4", "--limit", "3", "--run-name", "tiny-text"])
    assert result["model_kind"] == "causal-lm"
    assert result["modes"]["golden"]["n"] == 3
    assert result["modes"]["direct"]["images_missing"] == 3  # a text model never sees images
    # No retriever at all: searches fail, are counted, and answers are still produced.
    no_rt = main(["--model", tiny_causal_lm, "--data", dynvqa_setup["en"], "--out", str(tmp_path / "no-rt"),
                  "--modes", "golden", "--limit", "2", "--max-new-tokens", "3"])
    assert no_rt["modes"]["golden"]["search_failures"] == 2 and no_rt["modes"]["golden"]["n"] == 2

    # Two runs that share a name and report the same column would overwrite each other: refused, naming both.
    with pytest.raises(ValueError, match="both named 'no-rt'"):
        compare_runs([str(tmp_path / "no-rt"), str(tmp_path / "no-rt" / "result.json")], tmp_path / "dup")
    table = compare_runs([str(out), str(tmp_path / "no-rt")], tmp_path / "cmp")
    assert "Dyn-VQA golden official (en)" in table["columns"]
    assert table["paper"]["paper: InternVL2.5-8B"]["Dyn-VQA golden official (en)"] == 35.2
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0
    assert "tiny-text" in (tmp_path / "cmp" / "comparison.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_image_benchmark_from_tsv(tiny_llava, tmp_path):
    def b64(color):
        buf = io.BytesIO()
        Image.new("RGB", (12, 12), color).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    rows = ["index\timage\tquestion\tA\tB\tC\tanswer\tcategory"]
    rows += [f"{i}\t{b64('red')}\tWhich colour is shown?\tred\tblue\tgreen\tA\tcolour" for i in range(3)]
    rows += ["3\t0\tWhich shape?\tsquare\tcircle\t\tB\tshape"]
    tsv = tmp_path / "MMStar.tsv"
    tsv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = evaluate_run(RunConfig(model=tiny_llava, benchmark="mmstar", data=[str(tsv)], out=str(tmp_path / "mm"),
                                    batch_size=2, max_new_tokens=3))
    assert result["paper_name"] == "MMStar" and result["n_scored"] == 4
    assert 0.0 <= result["score"] <= 100.0
    assert set(result["by_category"]) == {"colour", "shape"}
    preds = [json.loads(l) for l in open(tmp_path / "mm" / "predictions.jsonl", encoding="utf-8")]
    # The score is exactly what the mc_accuracy module gives on the stored predictions.
    mc = load_metric("mc_accuracy").compute(predictions=[p["prediction"] for p in preds],
                                            references=["A", "A", "A", "B"],
                                            choices=[["red", "blue", "green"]] * 3 + [["square", "circle"]])
    assert result["score"] == pytest.approx(mc["accuracy"])
    assert os.path.getsize(tmp_path / "mm" / "scores.png") > 0
