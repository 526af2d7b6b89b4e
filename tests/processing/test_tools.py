"""Tool runtime: real back-ends (Tesseract, OpenCV, transformers pipelines, bm25s, FAISS, HTTP search).

Runs on CPU and offline: detection and caption checkpoints are tiny random models saved by fixtures,
the search API is a `http.server` on 127.0.0.1 started by the test.
"""

import ast
import http.server
import json
import re
import threading
import time
import urllib.parse

import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from processing.tools import (
    BM25Retriever,
    DenseRetriever,
    Operator,
    ToolResult,
    ToolRuntime,
    WebSearchClient,
    build_runtime,
    canonical_operator_name,
    load_corpus,
)
from processing.tools.detection import OpenVocabDetector
from processing.tools.face import HaarFaceDetector, render_faces
from processing.tools.ocr import TesseractOCR, tesseract_available
from processing.tools.tiny_models import build_tiny_owlvit, build_tiny_vlm

requires_tesseract = pytest.mark.skipif(not tesseract_available(), reason="needs `apt-get install tesseract-ocr`")
FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"

CORPUS = [
    {
        "id": "paris",
        "title": "Paris",
        "text": "Paris is the capital and largest city of France.",
        "url": "https://example.org/paris",
    },
    {"id": "berlin", "title": "Berlin", "text": "Berlin is the capital of Germany, on the river Spree."},
    {"id": "tokyo", "title": "Tokyo", "text": "Tokyo is the capital of Japan and its most populous city."},
    {"id": "nile", "title": "Nile", "text": "The Nile is a major river flowing north through Egypt."},
]


def text_image(text="42 STOP", size=(160, 80)):
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((10, 20), text, fill="black", font=ImageFont.truetype(FONT, 22))
    return image


def cartoon_face(side=120):
    """A drawn face (skin oval, dark eyes and brows, nose, mouth): enough for a Haar cascade."""
    image = Image.new("RGB", (side + 100, side + 100), (200, 200, 200))
    d, o, s = ImageDraw.Draw(image), 50, side
    d.ellipse([o + s * 0.1, o, o + s * 0.9, o + s], fill=(225, 185, 150))
    for ex in (0.32, 0.68):
        d.ellipse([o + s * (ex - 0.09), o + s * 0.36, o + s * (ex + 0.09), o + s * 0.44], fill=(40, 30, 30))
        d.rectangle([o + s * (ex - 0.12), o + s * 0.27, o + s * (ex + 0.12), o + s * 0.30], fill=(60, 40, 30))
    d.polygon(
        [(o + s * 0.5, o + s * 0.45), (o + s * 0.44, o + s * 0.64), (o + s * 0.56, o + s * 0.64)], fill=(190, 140, 110)
    )
    d.ellipse([o + s * 0.36, o + s * 0.72, o + s * 0.64, o + s * 0.80], fill=(150, 60, 60))
    return image.filter(ImageFilter.GaussianBlur(1))


@pytest.fixture(scope="session")
def tiny_owlvit(tmp_path_factory):
    return build_tiny_owlvit(tmp_path_factory.mktemp("owlvit"))


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm"))


# ---------------------------------------------------------------- operators


@requires_tesseract
def test_ocr_reads_drawn_text():
    text, data = TesseractOCR().run(text_image("42 STOP"))
    assert text == "42 STOP"
    assert [w["text"] for w in data["words"]] == ["42", "STOP"]
    assert all(0.0 <= v <= 1.0 for w in data["words"] for v in w["box"])


@requires_tesseract
def test_ocr_blank_image_says_no_text():
    text, data = TesseractOCR().run(Image.new("RGB", (64, 64), "white"))
    assert text == "No text was recognized in the image." and data["words"] == []


def test_face_detection_finds_drawn_face_and_renders_pixel_box():
    image = cartoon_face(120)
    text, data = HaarFaceDetector().run(image)
    assert len(data["boxes"]) == 1
    x0, y0, x1, y1 = data["boxes"][0]
    # The drawn face occupies roughly [50, 50, 170, 170] in pixels.
    assert 30 <= x0 <= 70 and 30 <= y0 <= 70 and 150 <= x1 <= 190 and 150 <= y1 <= 190
    assert text == f"There is one face with a coordinate: {data['boxes'][0]}"
    assert re.fullmatch(r"There is one face with a coordinate: \[\d+\.0, \d+\.0, \d+\.0, \d+\.0\]", text)


def test_face_detection_is_thread_safe():
    """The runtime calls one detector from many threads; each result must equal the serial one."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from processing.mmat.toy_teacher import draw_portrait

    detector = HaarFaceDetector()
    images = [draw_portrait(random.Random(i))[0] for i in range(16)] * 3
    serial = [detector.run(image)[1]["boxes"] for image in images]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda image: detector.run(image)[1]["boxes"], images))
    assert threaded == serial


def test_face_rendering_forms():
    assert render_faces([]) == "No face was detected in the image."
    assert render_faces([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]) == (
        "There are 2 faces with coordinates: [1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]"
    )
    assert HaarFaceDetector().run(Image.new("RGB", (80, 80), "white"))[0] == "No face was detected in the image."


def test_label_bbox_renders_normalised_boxes_in_released_form(tiny_owlvit):
    rt = build_runtime(ocr=False, face=False, detector_path=tiny_owlvit)
    result = rt.call("label_bbox", text_image(), query="closest car, road_lane")
    assert result.ok, result.error
    parsed = ast.literal_eval(result.text)  # a Python-dict string, as in Fig. 14
    assert set(parsed) <= {"closest _ car", "road _ lane"} and parsed
    for boxes in parsed.values():
        assert 1 <= len(boxes) <= 3
        for box in boxes:
            assert len(box) == 4 and all(0.0 <= v <= 1.0 and round(v, 2) == v for v in box)
            assert box[0] < box[2] and box[1] < box[3]
    assert result.data["labels"] == ["closest car", "road_lane"]
    # A label the detector scores below the threshold is left out; none at all is said in words.
    strict = ToolRuntime({"label_bbox": OpenVocabDetector(tiny_owlvit, threshold=0.999)})
    assert strict.call("label_bbox", text_image(), query="car").text == "No queried object was detected in the image."


def test_image_caption_pipeline_from_local_weights(tiny_vlm):
    rt = build_runtime(ocr=False, face=False, captioner_path=tiny_vlm)
    result = rt.call("image_caption", text_image())
    assert result.ok, result.error
    assert isinstance(result.text, str) and all(ch.isprintable() for ch in result.text)
    assert result.data["caption"] == result.text


def test_tool_device_reaches_the_pipelines(tiny_vlm):
    from processing.mmat import MMATConfig, build_tools

    runtime = build_tools(MMATConfig(captioner_path=tiny_vlm, tool_device="cpu", ocr=False, face=False))
    assert runtime.operators["image_caption"].pipe.device.type == "cpu"
    with pytest.raises(RuntimeError, match="nodevice"):
        build_tools(MMATConfig(captioner_path=tiny_vlm, tool_device="nodevice", ocr=False, face=False))


def test_operator_names_are_canonicalised():
    assert canonical_operator_name("face detection") == "face_detection"  # the RR spelling, Fig. 4
    assert canonical_operator_name(" OCR ") == "ocr"
    assert canonical_operator_name("image caption") == "image_caption"
    assert canonical_operator_name("label_bbox") == "label_bbox"


# ---------------------------------------------------------------- runtime failure handling


class SleepyOperator(Operator):
    name = "ocr"

    def run(self, image, query=None):
        time.sleep(5)
        return "late", {}


class CrashingOperator(Operator):
    name = "face_detection"

    def run(self, image, query=None):
        raise RuntimeError("backend exploded")


def test_timeout_becomes_recorded_error():
    rt = ToolRuntime({"ocr": SleepyOperator()}, timeout_s=0.2)
    start = time.perf_counter()
    result = rt.call("ocr", Image.new("RGB", (8, 8)))
    assert time.perf_counter() - start < 2
    assert result == ToolResult("ocr", False, "", {}, result.error, result.elapsed_s)
    assert result.error.startswith("timeout")


def test_crash_unknown_and_missing_input_become_errors():
    rt = ToolRuntime({"face_detection": CrashingOperator()})
    crashed = rt.call("face detection", Image.new("RGB", (8, 8)))
    assert not crashed.ok and crashed.error == "RuntimeError: backend exploded"
    unknown = rt.call("teleport", Image.new("RGB", (8, 8)))
    assert not unknown.ok and "unknown or unavailable operator 'teleport'" in unknown.error
    no_image = rt.call("face_detection", None)
    assert not no_image.ok and "needs an image" in no_image.error
    assert not rt.search("anything").ok  # no retriever configured
    assert rt.available() == ["face_detection"]


def test_runtime_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        ToolRuntime(timeout_s=0)


# ---------------------------------------------------------------- retrieval


def test_bm25_ranks_relevant_document_first():
    hits = BM25Retriever(CORPUS).search("capital of Japan", top_k=3)
    assert hits[0]["id"] == "tokyo"
    assert len(hits) <= 3 and all(set(h) == {"id", "title", "text", "url", "score"} for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert BM25Retriever(CORPUS).search("zebra", top_k=3) == []
    with pytest.raises(ValueError, match="empty retrieval query"):
        BM25Retriever(CORPUS).search("  ")


def test_dense_faiss_retriever_ranks_relevant_document_first():
    hits = DenseRetriever(CORPUS).search("river Egypt", top_k=2)
    assert hits[0]["id"] == "nile" and len(hits) <= 2


def test_corpus_validation(tmp_path):
    with pytest.raises(ValueError, match=r"misses field\(s\) \['title'\]"):
        load_corpus([{"id": 1, "text": "x"}])
    with pytest.raises(ValueError, match="appears more than once"):
        load_corpus([{"id": 1, "title": "a", "text": "x"}, {"id": "1", "title": "b", "text": "y"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "title": "a", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_corpus(bad)


def test_runtime_search_renders_numbered_snippets(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in CORPUS))
    rt = build_runtime(corpus=str(path), ocr=False, face=False)
    result = rt.search("largest city of France", top_k=2)
    assert result.ok and result.data["results"][0]["id"] == "paris"
    assert result.text.splitlines()[0] == (
        "1. Paris: Paris is the capital and largest city of France. (https://example.org/paris)"
    )
    assert rt.call("rag", query="capital of Germany").data["results"][0]["id"] == "berlin"
    assert rt.available() == ["rag"]


class _SearchHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server API
        params = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        query, num = params["q"][0], int(params["num"][0])
        if query.startswith("fail"):
            self.send_response(500)
            self.end_headers()
            return
        if query == "serp":
            body = {"organic_results": [{"title": "S", "snippet": "serp snippet", "link": "https://s.example"}]}
        else:
            body = {
                "results": [
                    {"title": f"Hit {i} for {query}", "text": f"snippet {i}", "url": f"https://r{i}.example"}
                    for i in range(5)
                ][:num]
            }
        payload = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture()
def search_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SearchHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/search"
    server.shutdown()
    server.server_close()


def test_web_search_adapter_against_loopback_server(search_server):
    hits = WebSearchClient(search_server).search("eiffel tower height", top_k=3)
    assert [h["title"] for h in hits] == [f"Hit {i} for eiffel tower height" for i in range(3)]
    serp = WebSearchClient(search_server).search("serp")
    assert serp[0]["text"] == "serp snippet" and serp[0]["url"] == "https://s.example"


def test_web_search_failure_falls_back_to_local_corpus(search_server):
    rt = build_runtime(corpus=CORPUS, ocr=False, face=False, web_search_url=search_server)
    web = rt.search("capital of Japan")
    assert web.ok and web.data["results"][0]["title"] == "Hit 0 for capital of Japan"
    rt_fail = ToolRuntime(retriever=[WebSearchClient(search_server)])
    failed = rt_fail.search("fail")
    assert not failed.ok and "500" in failed.error
    both = ToolRuntime(retriever=[WebSearchClient(search_server), BM25Retriever(CORPUS)])
    fallback = both.search("fail: capital of Japan")  # the web API errors, so the local corpus answers
    assert fallback.ok and fallback.data["results"][0]["id"] == "tokyo"
    nothing = both.search("fail")  # neither has a hit: ok, empty, with the web error kept
    assert nothing.ok and nothing.data["results"] == [] and "500" in nothing.data["errors"][0]
