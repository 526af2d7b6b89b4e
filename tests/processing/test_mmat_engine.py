"""The four MMAT stages end to end on the toy world, their failure records, scale-out and resume.

Offline and on CPU: the toy teacher is a program, the operators are the real Tesseract/OpenCV back-ends
and a tiny random OWL-ViT saved by a fixture. The resume test kills a real `python -m processing.mmat`
subprocess with SIGKILL and reruns it.
"""

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from processing.mmat import MMATConfig, load_stage, read_records, run_pipeline, run_stage
from processing.mmat.curate import CurateStage, style_constraint
from processing.mmat.rationale import RationaleStage, answers_match
from processing.mmat.reflection import ReflectionStage, is_math_sample
from processing.mmat.toy_teacher import ToyTeacher, make_toy_vqa
from processing.tools import Operator, ToolRuntime
from processing.tools.face import HaarFaceDetector
from processing.tools.ocr import tesseract_available
from processing.tools.tiny_models import build_tiny_owlvit

REPO = Path(__file__).resolve().parents[2]
RR_STEP = re.compile(
    r"<THOUGHT>.+</THOUGHT>(<OPERATOR>[a-z_ ,]+</OPERATOR>)?(<RAG>.+</RAG>)?\n?<SIGNAL>(continue|end|reflection)</SIGNAL>",
    re.S,
)
pytestmark = pytest.mark.skipif(not tesseract_available(), reason="needs `apt-get install tesseract-ocr`")


def cfg(tmp_path, **kw):
    kw.setdefault("output_dir", str(tmp_path / "out"))
    kw.setdefault("progress", False)
    kw.setdefault("shard_size", 4)
    return MMATConfig(**kw)


@pytest.fixture(scope="module")
def toy_source(tmp_path_factory):
    return make_toy_vqa(tmp_path_factory.mktemp("toy"), n_items=15, seed=1)


@pytest.fixture(scope="module")
def tiny_owlvit(tmp_path_factory):
    return build_tiny_owlvit(tmp_path_factory.mktemp("owlvit"))


def failures(out, stage):
    rows = []
    for path in sorted((Path(out) / stage / "failures").glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return {r["id"]: r for r in rows}


# ---------------------------------------------------------------- curate


def test_curate_reads_common_formats_and_records_bad_rows(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "ok.png")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "secret.png").write_bytes(b"")
    jsonl = tmp_path / "vqa.jsonl"
    rows = [
        {
            "question_id": 1,
            "image": "ok.png",
            "question": "What color is it?",
            "answers": [{"answer": "red"}, {"answer": "red"}, {"answer": "pink"}],
        },
        {"question_id": 2, "image": "missing.png", "question": "Q?", "answer": "a"},
        {"question_id": 3, "image": "broken.png", "question": "Q?", "answer": "a"},
        {"question_id": 4, "image": "../secret.png", "question": "Q?", "answer": "a"},
        {"question_id": 5, "image": "ok.png", "answer": "a"},
        {"question_id": 1, "image": "ok.png", "question": "Again?", "answer": "b"},
        {"question_id": 6, "image": "ok.png", "question": "Which one?\nA. cat\nB. dog", "answer": "B", "split": "val"},
    ]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    llava = tmp_path / "llava.json"
    llava.write_text(
        json.dumps(
            [
                {
                    "id": "c1",
                    "image": "ok.png",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhat is shown?"},
                        {"from": "gpt", "value": "A red square filling the whole picture area."},
                        {"from": "human", "value": "Is it round?"},
                        {"from": "gpt", "value": "No"},
                    ],
                }
            ]
        )
    )
    table = tmp_path / "table.csv"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "img", "query", "label"])
        writer.writeheader()
        writer.writerow({"id": "r1", "img": "ok.png", "query": "Shape?", "label": "square"})
    config = cfg(tmp_path, inputs=[str(jsonl), str(llava), str(table)], image_root=str(root))
    summary = run_stage(CurateStage(config))
    assert summary["complete"] and summary["counts"]["ok"] == 5 and summary["counts"]["failed"] == 5
    got = {r["id"]: r for r in read_records(config.output_dir, "curate")}
    assert got["vqa/1"]["answer"] == "red" and got["vqa/1"]["image"] == str((root / "ok.png").resolve())
    assert got["vqa/6"]["style"] == "Answer with the option's letter from the given choices directly."
    assert json.loads(got["vqa/6"]["meta"]) == {"split": "val"}
    assert got["llava/c1#0"]["question"] == "What is shown?" and got["llava/c1#0"]["style"] == "Give a short answer."
    assert got["llava/c1#1"]["answer"] == "No" and got["table/r1"]["question"] == "Shape?"
    reasons = {k: v["reason"] for k, v in failures(config.output_dir, "curate").items()}
    assert reasons == {
        "vqa/2": "missing_image",
        "vqa/3": "corrupt_image",
        "vqa/4": "unsafe_image_path",
        "vqa/5": "missing_question",
        "vqa/1~dup1": "duplicate_id",
    }
    assert load_stage(config.output_dir, "curate").num_rows == 5


def test_inputs_with_the_same_stem_become_distinct_sources(tmp_path):
    for name in ("textvqa", "geoqa"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8), "red").save(tmp_path / name / "a.png")
        rows = [{"question_id": i, "image": "a.png", "question": f"{name} q{i}?", "answer": "red"} for i in range(2)]
        (tmp_path / name / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_a, train_b = str(tmp_path / "textvqa" / "train.jsonl"), str(tmp_path / "geoqa" / "train.jsonl")
    summary = run_stage(CurateStage(cfg(tmp_path, inputs=[train_a, train_b])))
    assert summary["counts"]["ok"] == 4 and summary["counts"]["failed"] == 0
    assert summary["counts"]["source/textvqa/train"] == 2 and summary["counts"]["source/geoqa/train"] == 2
    rows = {r["id"]: r for r in read_records(tmp_path / "out", "curate")}
    assert rows["geoqa/train/1"]["question"] == "geoqa q1?"
    assert is_math_sample(rows["geoqa/train/1"], ["geoqa"]) and not is_math_sample(rows["textvqa/train/1"], ["geoqa"])
    # An explicit `name=path` names the source; inputs that still share one are refused.
    named = run_stage(CurateStage(cfg(tmp_path, output_dir=str(tmp_path / "named"), inputs=[f"text={train_a}"])))
    assert named["counts"]["source/text"] == 2
    for inputs in ([train_a, train_a], [f"x={train_a}", f"x={train_b}"]):
        with pytest.raises(ValueError, match="map to the source .* name them apart with `name=path`"):
            run_stage(CurateStage(cfg(tmp_path, output_dir=str(tmp_path / "clash"), inputs=inputs)))


def test_non_object_rows_and_dataset_dict_folders(tmp_path):
    import datasets

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    good = {"id": 1, "image": "a.png", "question": "q?", "answer": "a"}
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(json.dumps(good) + "\nnull\n\n[1, 2]\n\"text\"\n")
    splits = {"train": [good], "test": [{**good, "question": "other?"}]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(tmp_path / "hf")
    config = cfg(tmp_path, inputs=[str(jsonl), str(tmp_path / "hf")], image_root=str(tmp_path))
    summary = run_stage(CurateStage(config))
    assert summary["counts"]["ok"] == 3 and summary["counts"]["failed/not_an_object"] == 3
    fails = failures(config.output_dir, "curate")
    assert fails["mixed/#1"]["detail"] == f"{jsonl}:2: expected a JSON object, got NoneType"
    assert fails["mixed/#2"]["detail"] == f"{jsonl}:4: expected a JSON object, got list"
    rows = {r["id"]: r for r in read_records(config.output_dir, "curate")}
    assert rows["hf/test/1"]["question"] == "other?" and rows["hf/train/1"]["source"] == "hf/train"


def test_embedded_images_of_similar_ids_do_not_overwrite_each_other(tmp_path):
    import io

    def png(colour):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rows = [
        {"id": "a/b", "image": png("red"), "question": "q?", "answer": "red"},
        {"id": "a_b", "image": png("blue"), "question": "q?", "answer": "blue"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "emb.parquet")
    config = cfg(tmp_path, inputs=[str(tmp_path / "emb.parquet")])
    run_stage(CurateStage(config))
    images = {r["answer"]: r["image"] for r in read_records(config.output_dir, "curate")}
    assert images["red"] != images["blue"]
    assert Image.open(images["red"]).getpixel((0, 0)) == (255, 0, 0)
    assert Image.open(images["blue"]).getpixel((0, 0)) == (0, 0, 255)


def test_style_constraints():
    assert style_constraint("How many?", "3") == "Answer the question using a single word or phrase."
    assert (
        style_constraint("Pick.\n(A) x\n(B) y", "A")
        == "Answer with the option's letter from the given choices directly."
    )
    assert style_constraint("Explain.", "because the long answer goes on for many many words here") is None
    assert style_constraint("How many? Answer the question using a single word or phrase.", "3") is None
    assert answers_match("The answer is: Two", "2") and not answers_match("3", "2")


def test_answer_matching_keeps_scripts_signs_and_option_letters():
    assert answers_match("上海", "上海。") and not answers_match("上海", "北京")
    assert not answers_match("-5", "5") and answers_match("The answer is: -5", "-5") and answers_match("5-3", "5 3")
    assert answers_match("The answer is: A", "A") and not answers_match("A", "B") and answers_match("a cat", "The cat")
    assert not answers_match("", "") and not answers_match("?!", "...")


# ---------------------------------------------------------------- full toy pipeline


def test_toy_pipeline_end_to_end(tmp_path, toy_source, tiny_owlvit):
    config = cfg(tmp_path, inputs=[str(toy_source)], detector_path=tiny_owlvit, judge=True, concurrency=2)
    summaries = run_pipeline(config)
    assert all(s["complete"] for s in summaries.values())
    counts = summaries["rationale"]["counts"]
    assert counts["ok"] == 15
    # Every operator the toy questions need was really called (OCR, detector, faces, RAG).
    for name in ("ocr", "label_bbox", "face_detection", "rag"):
        assert counts[f"operator/{name}"] >= 1, name
    refl = summaries["reflection"]["counts"]
    assert refl["reflection/general"] + refl["reflection/math"] + refl["reflection/none"] == 15
    # A random detector cannot localise the shapes, so the evidence check flags those samples.
    assert refl["reflection/general"] >= 1
    rows = read_records(config.output_dir, "integrate")
    reflections = {r["id"]: json.loads(r["reflection"]) for r in read_records(config.output_dir, "reflection")}
    for row in rows:
        rr, orr = row["rr_released"], row["orr_released"]
        assert rr[0]["role"] == "system" and rr[1]["content"].startswith("<image>")
        assert rr[1]["content"].endswith(" Please start your reasoning.")
        steps = [m["content"] for m in rr[2:-2] if m["role"] == "assistant"]
        assert steps and all(RR_STEP.fullmatch(s) for s in steps), steps
        assert steps[-1].endswith("<SIGNAL>end</SIGNAL>")
        assert ("<SIGNAL>reflection</SIGNAL>" in "".join(steps)) == (reflections[row["id"]] is not None)
        assert rr[-2]["content"].startswith("Based on the above information, please summarize and give the answer")
        assert len(orr) == 3 and "<RAG>" not in orr[1]["content"] and "The search" not in orr[1]["content"]
        # ORR has no RAG: the thoughts in the assistant turn never quote or announce the retrieval either.
        assert "retrieved" not in orr[2]["content"] and "look up" not in orr[2]["content"]
        assert re.fullmatch(r"<THOUGHT>.+</THOUGHT><ANSWER>The answer is: .+</ANSWER>", orr[2]["content"], re.S)
        assert all("<image>" not in m["content"] for m in row["rr_messages"] + row["orr_messages"])
    released = [
        json.loads(line) for line in (Path(config.output_dir) / "integrate" / "rr.jsonl").read_text().splitlines()
    ]
    assert len(released) == 15 and set(released[0]) == {"id", "messages", "images"}
    judged = read_records(config.output_dir, "reflection")
    assert all(0.0 <= r["judge_score"] <= 1.0 and r["judge_reason"] for r in judged)
    assert (Path(config.output_dir) / "integrate" / "_COMPLETE").exists()
    # A completed stage is not run again.
    assert run_stage(CurateStage(config))["runs"] == summaries["curate"]["runs"]


def test_gold_filter_missing_and_corrupt_images_and_tool_crash(tmp_path, toy_source):
    lines = [json.loads(line) for line in Path(toy_source).read_text().splitlines()][:10]
    face = next(i for i, line in enumerate(lines) if line["meta"]["qa_kind"] == "face")
    lines[face]["answer"] = "7"  # the teacher answers from the detector, so this gold answer cannot match
    source = tmp_path / "toy.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = cfg(tmp_path, inputs=[str(source)], image_root=str(Path(toy_source).parent), gold_filter=True)
    run_stage(CurateStage(config))
    curated = read_records(config.output_dir, "curate")
    # Images disappear or rot between curate and rationale.
    os.rename(curated[0]["image"], curated[0]["image"] + ".gone")
    try:
        Path(tmp_path / "corrupt.png").write_bytes(b"garbage")
        broken = dict(curated[1])

        class CrashingOCR(Operator):
            name = "ocr"

            def run(self, image, query=None):
                raise RuntimeError("tesseract crashed")

        runtime = ToolRuntime({"ocr": CrashingOCR(), "face_detection": HaarFaceDetector()}, timeout_s=5)
        stage = RationaleStage(config, teacher=ToyTeacher(), runtime=runtime)
        original = stage.input_records

        def patched():
            records = original()
            records[1] = {**broken, "image": str(tmp_path / "corrupt.png")}
            return records

        stage.input_records = patched
        summary = run_stage(stage)
    finally:
        os.rename(curated[0]["image"] + ".gone", curated[0]["image"])
    fails = failures(config.output_dir, "rationale")
    assert fails[curated[0]["id"]]["reason"] == "missing_image"
    assert fails[curated[1]["id"]]["reason"] == "corrupt_image"
    assert fails[f"toy/{lines[face]['id']}"]["reason"] == "answer_mismatch"
    assert summary["counts"]["tool_error/ocr"] >= 1  # crashes are recorded in the trajectory, the sample goes on
    kept = read_records(config.output_dir, "rationale")
    crashed = [
        json.loads(r["steps"])[0]["results"][0] for r in kept if json.loads(r["steps"])[0]["operators"] == ["ocr"]
    ]
    assert crashed and all(r["error"] == "RuntimeError: tesseract crashed" for r in crashed)
    assert summary["counts"]["ok"] + summary["counts"]["failed"] == 10


def test_reflection_drop_cheating_and_quality_threshold(tmp_path, toy_source):
    config = cfg(tmp_path, inputs=[str(toy_source)], face=False, drop_cheating=True)
    run_pipeline(config, ["curate", "rationale"])
    summary = run_stage(ReflectionStage(config))
    assert summary["counts"].get("failed/cheating", 0) >= 1
    assert summary["counts"]["ok"] + summary["counts"]["failed"] == 15
    with pytest.raises(ValueError, match="min_quality filters on the judge's score"):
        MMATConfig(min_quality=0.5)
    # The same trajectories again, judged: those scored below min_quality are dropped as `low_quality`.
    shutil.rmtree(Path(config.output_dir) / "reflection")
    judged = cfg(tmp_path, inputs=[str(toy_source)], face=False, judge=True, min_quality=0.8)
    summary = run_stage(ReflectionStage(judged))
    low = {k: v for k, v in failures(judged.output_dir, "reflection").items() if v["reason"] == "low_quality"}
    assert low and summary["counts"]["failed/low_quality"] == len(low) == 15 - summary["counts"]["ok"]
    assert all(re.match(r"judge score 0\.[0-7] < 0\.8: ", v["detail"]) for v in low.values())
    kept = read_records(judged.output_dir, "reflection")
    assert kept and all(r["judge_score"] >= 0.8 for r in kept)


def test_datatrove_executor_local_mode(tmp_path, toy_source):
    config = cfg(tmp_path, inputs=[str(toy_source)], executor="datatrove", tasks=3, workers=1, face=False)
    summaries = run_pipeline(config)
    assert all(s["complete"] for s in summaries.values())
    assert summaries["integrate"]["counts"]["rr"] == 15
    assert (Path(config.output_dir) / "rationale" / "_datatrove").is_dir()
    ids = [r["id"] for r in read_records(config.output_dir, "integrate")]
    assert len(ids) == len(set(ids)) == 15


def test_web_search_key_comes_from_the_environment_and_is_never_written(tmp_path, toy_source, monkeypatch):
    import http.server
    import threading
    import urllib.parse

    keys = []

    class Search(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            keys.append(urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("api_key"))
            payload = json.dumps({"results": [{"title": "Shapes", "text": "A square has four sides."}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Search)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/search"
    secret = "sk-search-0123456789"
    monkeypatch.setenv("MMAT_TEST_SEARCH_KEY", secret)
    try:
        config = cfg(
            tmp_path,
            inputs=[str(toy_source)],
            face=False,
            executor="datatrove",
            tasks=2,
            web_search_url=url,
            web_search_api_key_env="MMAT_TEST_SEARCH_KEY",
        )
        summaries = run_pipeline(config, ["curate", "rationale"])
    finally:
        server.shutdown()
        server.server_close()
    assert summaries["rationale"]["complete"] and keys and all(k == [secret] for k in keys)
    written = [p for p in Path(config.output_dir).rglob("*") if p.is_file()]
    assert any(p.name == "executor.json" for p in written)
    assert not [p for p in written if secret.encode() in p.read_bytes()]
    with pytest.raises(ValueError, match="web_search_url carries 'api_key'.*web_search_api_key_env"):
        cfg(tmp_path, web_search_url=f"{url}?api_key={secret}")


def test_changed_input_is_refused_on_resume(tmp_path, toy_source):
    config = cfg(tmp_path, inputs=[str(toy_source)], max_samples=4)
    run_stage(CurateStage(config))
    (Path(config.output_dir) / "curate" / "_COMPLETE").unlink()
    with pytest.raises(ValueError, match="the input or shard_size changed"):
        run_stage(CurateStage(cfg(tmp_path, inputs=[str(toy_source)], max_samples=8)))


# ---------------------------------------------------------------- resume after a real kill


def _finished_ids(stage_dir: Path) -> dict[str, dict]:
    done = {}
    for path in (stage_dir / "data").glob("*.parquet"):
        done.update({r["id"]: r for r in pq.read_table(path).to_pylist()})
    for path in (stage_dir / "_journal").glob("*.jsonl"):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                entry = json.loads(line)
                done[entry["id"]] = entry.get("record", entry)
    return done


def test_killed_run_resumes_without_loss_or_repeats(tmp_path, toy_source):
    out = tmp_path / "out"
    config = cfg(tmp_path, inputs=[str(toy_source)], output_dir=str(out))
    run_stage(CurateStage(config))
    cmd = [
        sys.executable,
        "-m",
        "processing.mmat",
        "rationale",
        "--inputs",
        str(toy_source),
        "--output_dir",
        str(out),
        "--shard_size",
        "4",
        "--concurrency",
        "2",
        "--progress",
        "false",
        "--face",
        "false",
    ]
    proc = subprocess.Popen(
        cmd + ["--toy_latency_s", "0.25"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    stage_dir = out / "rationale"
    deadline = time.time() + 60
    try:
        # Kill once at least 6 of the 15 samples are finished (the run is slowed to ~0.25 s per step).
        while time.time() < deadline and proc.poll() is None:
            if stage_dir.exists() and len(_finished_ids(stage_dir)) >= 6:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = _finished_ids(stage_dir)
    assert 6 <= len(before) < 15, "the run must be killed part-way"
    assert not (stage_dir / "_COMPLETE").exists()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["complete"] and (out / "summary.png").stat().st_size > 0
    # The rerun processed exactly the samples the killed run had not finished ...
    assert summary["runs"][-1]["processed"] == 15 - len(before)
    assert summary["runs"][-1]["skipped_done"] == len(before)
    final = {r["id"]: r for r in read_records(out, "rationale")}
    ids = [r["id"] for r in read_records(out, "rationale")]
    assert len(ids) == len(set(ids)) == 15
    # ... and the samples finished before the kill are kept exactly as they were written.
    for sid, record in before.items():
        assert final[sid] == record


def test_cli_runs_a_stage_from_yaml_with_flag_overrides(tmp_path, toy_source):
    from processing.mmat.__main__ import main

    config = tmp_path / "run.yaml"
    config.write_text(f"inputs: [{toy_source}]\noutput_dir: {tmp_path / 'out'}\nshard_size: 100\nmax_samples: 3\n")
    assert main(["curate", "--config", str(config), "--shard_size", "2", "--progress", "false"]) == 0
    summary = json.loads((tmp_path / "out" / "curate" / "summary.json").read_text())
    assert summary["n_shards"] == 2 and summary["counts"]["ok"] == 3
    assert (tmp_path / "out" / "summary.png").exists()


def test_cli_help_and_bad_config(tmp_path):
    help_out = subprocess.run(
        [sys.executable, "-m", "processing.mmat", "all", "--help"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert help_out.returncode == 0 and "--shard_size" in help_out.stdout and "--teacher" in help_out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("shard_sise: 4\n")
    with pytest.raises(ValueError, match=r"unknown MMAT setting\(s\) \['shard_sise'\]"):
        MMATConfig.from_yaml(bad)
    with pytest.raises(ValueError, match="teacher='openai' needs teacher_base_url"):
        MMATConfig(teacher="openai")
    with pytest.raises(ValueError, match="rationale' in .* is not complete"):
        read_records(tmp_path, "rationale")
