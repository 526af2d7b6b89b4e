"""Loaders: Dyn-VQA in every release's format (small inline fixtures plus the real files), the
image store, VLMEvalKit TSV and datasets saved to disk. Each quirk is checked for its outcome
(kept / normalised / skipped) and its count."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from conftest import require_real_dynvqa
from eval.images import ImageStore, url_key
from eval.loaders import load_dynvqa, load_hf_disk, load_vlmeval_tsv

URL = "https://example.oss/rallm/mm_data/vfreshqa_datasets_v2/Freshqa_zh/imgs/image_{}.jpeg"


def _write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def _jpeg(color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_release_202406_gloden_query_numbers_and_nan(tmp_path):
    path = _write(tmp_path / "DynVQA_en.202406.jsonl", [
        {"image_url": URL.format(1), "question": "What is this person's current club?", "question_id": "en1",
         "answer": ["Al Nassr", "Al Nassr FC"], "gloden_query": "What is Cristiano Ronaldo's current club?"},
        {"image_url": URL.format(2), "question": "When was it built?", "question_id": "en2",
         "answer": [1889, 1889.0, "1889"], "gloden_query": "When was the Eiffel Tower built?"},
        # The real en625 record: a bare NaN token, which Python's json reads.
        '{"image_url": "%s", "question": "Q?", "question_id": "en3", "answer": ["x"], "gloden_query": NaN}' % URL.format(3),
    ])
    samples, report = load_dynvqa(path)
    assert (report.lang, report.release, report.kept) == ("en", "202406", 3)
    assert samples[0].golden_query == "What is Cristiano Ronaldo's current club?"
    assert samples[1].answers == ["1889", "1889.0"]  # stringified, repeated "1889" kept once
    assert samples[1].official_answers == ["1889", "1889.0", "1889"]  # the scorer's view: raw list, str()-ed
    assert samples[2].golden_query is None
    assert report.counts["golden_query_spelt_gloden"] == 3
    assert report.counts["answer_numeric"] == 1
    assert report.counts["answer_duplicate"] == 1
    assert report.counts["golden_query_nan"] == 1


def test_release_202408_null_answers_are_skipped(tmp_path):
    path = _write(tmp_path / "DynVQA_zh.202408.jsonl", [
        {"image_url": URL.format(1), "question": "他是谁？", "question_id": "zh1", "answer": None, "gloden_query": "q"},
        {"image_url": URL.format(2), "question": "这是哪里？", "question_id": "zh2", "answer": ["巴黎"], "gloden_query": "q"},
    ])
    samples, report = load_dynvqa(path)
    assert [s.question_id for s in samples] == ["zh2"]
    assert report.counts["answer_null"] == 1
    assert report.skipped == [{"line": 1, "question_id": "zh1", "reason": "answer_null"}]


def test_release_202410_nested_lists_are_flattened(tmp_path):
    path = _write(tmp_path / "DynVQA_en.202410.jsonl", [
        {"image_url": URL.format(1), "question": "Who?", "question_id": "en1",
         "answer": [["未知", "不确定"], "unknown"], "gloden_query": "q"},
    ])
    samples, report = load_dynvqa(path)
    assert samples[0].answers == ["未知", "不确定", "unknown"]
    # The official scorer would str() the inner list; the official view keeps that behaviour.
    assert samples[0].official_answers == ["['未知', '不确定']", "unknown"]
    assert report.counts["answer_nested"] == 1


def test_release_202502_golden_query_and_language_mismatch(tmp_path):
    records = [
        {"image_url": URL.format(1), "question": "What is this person's current club?", "question_id": "en302",
         "answer": ["Al-Nassr FC"], "golden_query": "What is Cristiano Ronaldo's current club?"},
        {"image_url": URL.format(2), "question": "Who is the CEO?", "question_id": "en5",
         "answer": ["蒂姆·库克", "库克"], "golden_query": "Who is Apple's CEO?"},
        {"image_url": URL.format(3), "question": "Who is the CEO?", "question_id": "en6",
         "answer": ["蒂姆·库克", "Tim Cook"], "golden_query": "Who is Apple's CEO?"},
    ]
    path = _write(tmp_path / "DynVQA_en.202502.jsonl", records)
    samples, report = load_dynvqa(path)
    assert [s.golden_query for s in samples][0] == "What is Cristiano Ronaldo's current club?"
    assert "golden_query_spelt_gloden" not in report.counts
    assert [s.language_mismatch for s in samples] == [False, True, False]
    assert report.counts["answer_language_mismatch"] == 1
    assert report.counts["answer_has_chinese_variant"] == 1
    kept, dropped = load_dynvqa(path, drop_language_mismatch=True)
    assert [s.question_id for s in kept] == ["en302", "en6"]
    assert dropped.counts["answer_language_mismatch"] == 1


def test_broken_records_are_counted_not_raised(tmp_path):
    path = _write(tmp_path / "odd.jsonl", [
        "{not json",
        "[1, 2]",
        {"question": "no id", "answer": ["a"]},
        {"question_id": "en1", "question": "ok?", "answer": "bare string"},
        {"question_id": "en1", "question": "dup", "answer": ["a"]},
        {"question_id": "en2", "question": "  ", "answer": ["a"]},
        {"question_id": "en3", "question": "blank answers", "answer": ["", None, float("nan")]},
        {"question_id": "en4", "question": "no golden query, no image", "answer": [True, "yes"]},
        "",
    ])
    samples, report = load_dynvqa(path, lang="en")
    assert [s.question_id for s in samples] == ["en1", "en4"]
    assert samples[0].answers == ["bare string"] and samples[1].answers == ["yes"]
    c = report.counts
    assert (c["invalid_json"], c["not_an_object"], c["missing_question_id"], c["duplicate_question_id"],
            c["missing_question"], c["answer_empty"]) == (1, 1, 1, 1, 1, 1)
    assert (c["answer_scalar"], c["answer_bad_element"], c["golden_query_missing"], c["image_url_missing"]) == (1, 1, 2, 2)
    assert c["blank_line"] == 1
    with pytest.raises(ValueError, match="does not exist"):
        load_dynvqa(tmp_path / "absent.jsonl")


def test_images_by_url_hash_and_mirror(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    store = ImageStore(root)
    stored = store.add(URL.format(1), _jpeg())
    assert stored.name == url_key(URL.format(1)) + ".jpeg"
    mirror = root / "rallm/mm_data/vfreshqa_datasets_v2/Freshqa_zh/imgs/image_2.jpeg"
    mirror.parent.mkdir(parents=True)
    mirror.write_bytes(_jpeg("blue"))
    (root / (url_key(URL.format(3)) + ".jpg")).write_bytes(b"not an image")
    assert store.locate(URL.format(1))[0] == stored
    assert store.locate(URL.format(2))[0] == mirror.resolve()
    image, reason = store.open(URL.format(3))
    assert image is None and "unreadable" in reason
    assert store.locate("https://x.org/../../../etc/passwd")[0] is None  # never leaves the root
    path = _write(tmp_path / "DynVQA_en.202412.jsonl", [
        {"image_url": URL.format(i), "question": "q?", "question_id": f"en{i}", "answer": ["a"], "gloden_query": "g"}
        for i in (1, 2, 4)
    ])
    samples, report = load_dynvqa(path, image_dir=root)
    assert [s.image_path is not None for s in samples] == [True, True, False]
    assert report.counts["image_missing"] == 1


def test_real_dynvqa_files():
    root = require_real_dynvqa()
    expected = {  # records, numeric-answer records, NaN golden queries (research note B1 + this loader)
        "DynVQA_en.202406.jsonl": (715, 44, 1),
        "DynVQA_en.202412.jsonl": (715, 9, 1),
        "DynVQA_zh.202406.jsonl": (737, 39, 0),
        "DynVQA_zh.202412.jsonl": (737, 36, 0),
    }
    for name, (n, numeric, nan) in expected.items():
        samples, report = load_dynvqa(root / name)
        assert report.kept == report.lines == n, name
        assert report.counts["answer_numeric"] == numeric, name
        assert report.counts["golden_query_nan"] == nan, name
        assert report.counts["golden_query_spelt_gloden"] == n, name
        assert report.counts.get("answer_language_mismatch", 0) == 0, name  # 202406/202412 are clean here
        assert all(s.answers for s in samples)
    en = {s.question_id: s for s in load_dynvqa(root / "DynVQA_en.202412.jsonl")[0]}
    assert en["en302"].answers == ["Al Nassr", "Al Nassr FC"]
    assert en["en625"].golden_query is None


def _b64(color):
    return base64.b64encode(_jpeg(color)).decode()


def test_vlmeval_tsv(tmp_path):
    header = "index\timage\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory"
    rows = [
        f"0\t{_b64('red')}\tWhat colour?\tLook closely\tred\tblue\t\t\tA\tcolour",
        "1\t0\tSame image, again?\t\tyes\tno\t\t\tno\tcolour",  # image shared by index, answer as option text
        f"2\t{_b64('blue')}\tNo options here\t\t\t\t\t\t['STOP', 'stop sign']\tocr",
        f"3\t{_b64('red')}\t\t\tx\ty\t\t\tA\tbad",  # no question: skipped
        "4\tnot-base64!!\tBroken image\t\ta\tb\t\t\tC\tbad",  # answer not an option, image broken
    ]
    path = tmp_path / "bench.tsv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n", encoding="utf-8")
    samples, report = load_vlmeval_tsv(path)
    assert [s.id for s in samples] == ["0", "1", "2", "4"]
    first, shared, ocr, broken = samples
    assert first.question == "Hint: Look closely\nWhat colour?"
    assert (first.choices, first.answer_letter, first.answers) == (["red", "blue"], "A", ["red", "A"])
    assert shared.answer_letter == "B" and shared.images == first.images
    assert ocr.choices is None and ocr.answers == ["STOP", "stop sign"]
    images, problems = first.load_images()
    assert images[0].size == (8, 8) and not problems
    assert broken.answer_letter is None
    assert report["counts"]["missing_question"] == 1
    assert report["counts"]["image_shared"] == 1
    assert report["counts"]["answer_given_as_option_text"] == 1
    assert report["counts"]["answer_not_an_option"] == 1
    assert broken.load_images()[0] == [] or broken.load_images()[1]


def test_hf_disk(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({
        "id": ["a", "b", "c"],
        "question": ["Which animal?", "How many?", ""],
        "options": [["cat", "dog"], [], ["x"]],
        "answer": ["dog", "3", "x"],
        "image": [Image.new("RGB", (8, 8), "red"), None, None],
    }).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "bench"))
    samples, report = load_hf_disk(tmp_path / "bench")
    assert [s.id for s in samples] == ["a", "b"]
    assert samples[0].answer_letter == "B" and samples[0].answers == ["dog", "B"]
    assert samples[1].choices is None and samples[1].answers == ["3"]
    assert samples[0].load_images()[0][0].size == (8, 8)
    assert report["counts"] == {"missing_question": 1, "no_image": 1}
    with pytest.raises(ValueError, match="not in the dataset"):
        load_hf_disk(tmp_path / "bench", columns={"question": "prompt"})
