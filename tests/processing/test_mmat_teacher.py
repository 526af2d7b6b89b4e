"""Teacher clients against a real OpenAI-compatible server on 127.0.0.1 (started here, in a thread).

The server picks its behaviour from the request's `model` field: answer normally, answer 429 or 500
first, hang past the client timeout, return a body that is not JSON, or return a malformed reasoning
step. No paid API is involved; the local transformers teacher runs a tiny random VLM.
"""

import base64
import http.server
import io
import json
import sys
import threading
import time

import pytest
from PIL import Image

from processing.mmat import MMATConfig, read_records, run_stage
from processing.mmat.curate import CurateStage
from processing.mmat.rationale import RationaleStage
from processing.mmat.steps import MalformedReply
from processing.mmat.teachers import (
    Budget,
    BudgetExceeded,
    ChatTeacher,
    OpenAIChatClient,
    TeacherError,
)
from processing.mmat.toy_teacher import make_toy_vqa
from processing.tools import ToolRuntime
from processing.tools.tiny_models import build_tiny_vlm

SAMPLE = {"id": "x", "question": "What word is written?", "answer": "cat", "style": ""}
GOOD_STEP = {
    "thought": "I should read the text.",
    "operators": ["ocr"],
    "rag": {"needed": False, "query": None},
    "next_action": "continue",
}
FINAL_STEP = {
    "thought": "The text says CAT.",
    "operators": [],
    "rag": {"needed": False, "query": None},
    "next_action": "final_answer",
}


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.outage = True  # the "recovering" model answers 503 after its first three requests while this holds


def _reply(handler, status, body, headers=None):
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    handler.send_response(status)
    for k, v in (headers or {}).items():
        handler.send_header(k, v)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def _completion(text):
    return {
        "choices": [{"message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20},
    }


def make_handler(state: State):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            model = body["model"]
            with state.lock:
                n = state.attempts[model] = state.attempts.get(model, 0) + 1
                state.bodies.append(body)
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
            try:
                last = body["messages"][-1]["content"]
                last_text = last if isinstance(last, str) else " ".join(p.get("text", "") for p in last)
                if model == "flaky-429" and n <= 2:
                    return _reply(self, 429, {"error": "slow down"}, {"Retry-After": "0"})
                if model == "down" or (model == "recovering" and state.outage and n > 3):
                    return _reply(self, 503, {"error": "unavailable"})
                if model == "hang":
                    time.sleep(1.5)
                if model == "garbled":
                    return _reply(self, 200, b"{not json")
                if model == "slow":
                    time.sleep(0.15)
                if model == "malformed-once" and n == 1:
                    return _reply(self, 200, _completion("Sure! I think we should use OCR."))
                if model == "malformed":
                    return _reply(self, 200, _completion('{"thought": "x"}'))
                if model in ("scripted", "recovering"):
                    # A well-behaved teacher: read the text, then conclude; the final answer on request.
                    if last_text.startswith("Based on the above information"):
                        return _reply(self, 200, _completion("cat"))
                    done = any(m["role"] == "assistant" for m in body["messages"])
                    return _reply(self, 200, _completion(json.dumps(FINAL_STEP if done else GOOD_STEP)))
                return _reply(self, 200, _completion(json.dumps(GOOD_STEP)))
            finally:
                with state.lock:
                    state.in_flight -= 1

        def log_message(self, *args):
            pass

    return Handler


class _QuietServer(http.server.ThreadingHTTPServer):
    """The "hang" model answers after the client has given up; the write to the closed socket is expected, so it is
    not printed as a server error."""

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture()
def server():
    state = State()
    srv = _QuietServer(("127.0.0.1", 0), make_handler(state))
    srv.daemon_threads = True
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1", state
    srv.shutdown()
    srv.server_close()


def client(url, model, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5)
    return OpenAIChatClient(url, model, api_key_env="MMAT_TEST_KEY_UNSET", **kw)


IMAGE = Image.new("RGB", (16, 16), "blue")


def test_step_roundtrip_sends_image_as_data_url(server):
    url, state = server
    teacher = ChatTeacher(client(url, "ok"))
    step = teacher.step(SAMPLE, IMAGE, [], ["ocr", "label_bbox"])
    assert step.operators == ["ocr"] and step.next_action == "continue"
    body = state.bodies[0]
    assert body["response_format"] == {"type": "json_object"}
    image_part = body["messages"][1]["content"][0]
    assert image_part["type"] == "image_url" and image_part["image_url"]["url"].startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])))
    assert decoded.size == (16, 16)
    assert "Reference answer: cat" in body["messages"][0]["content"]
    assert teacher.usage()["prompt_tokens"] == 100 and teacher.usage()["requests"] == 1


def test_final_answer_request_alternates_roles_and_asks_for_the_answer_only(server):
    url, state = server
    history = [
        {**GOOD_STEP, "results": [{"name": "ocr", "ok": True, "text": "CAT"}], "rag_result": None},
        {**FINAL_STEP, "results": [], "rag_result": None},
    ]
    assert ChatTeacher(client(url, "scripted")).final_answer(SAMPLE, IMAGE, history, ["ocr"]) == "cat"
    messages = state.bodies[-1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "CAT" in messages[3]["content"] and messages[-1]["content"].startswith("Based on the above information")
    assert "JSON" not in messages[0]["content"].replace("no JSON", "") and "answer only" in messages[0]["content"]
    assert messages[0]["content"].endswith("Reference answer: cat")  # in view to the end, as in the paper's prompt
    assert "response_format" not in state.bodies[-1]


def test_429_is_retried_with_backoff(server):
    url, state = server
    c = client(url, "flaky-429")
    assert json.loads(c.chat([{"role": "user", "content": "hi"}]).text) == GOOD_STEP
    assert state.attempts["flaky-429"] == 3 and c.retries == 2


def test_5xx_exhausts_retries_into_teacher_error(server):
    url, state = server
    with pytest.raises(TeacherError, match="failed after 3 attempts: HTTP 503"):
        client(url, "down", max_retries=2).chat([{"role": "user", "content": "hi"}])
    assert state.attempts["down"] == 3


def test_timeout_is_retried_then_reported(server):
    url, state = server
    start = time.perf_counter()
    with pytest.raises(TeacherError, match="timeout after 0.3 s"):
        client(url, "hang", timeout_s=0.3, max_retries=1).chat([{"role": "user", "content": "hi"}])
    assert state.attempts["hang"] == 2 and time.perf_counter() - start < 3


def test_unreadable_body_is_retried_then_reported(server):
    url, state = server
    with pytest.raises(TeacherError, match="unreadable response body"):
        client(url, "garbled", max_retries=1).chat([{"role": "user", "content": "hi"}])
    assert state.attempts["garbled"] == 2


def test_malformed_step_is_rejected_and_retried(server):
    url, state = server
    teacher = ChatTeacher(client(url, "malformed-once"))
    assert teacher.step(SAMPLE, IMAGE, [], ["ocr"]).operators == ["ocr"]
    assert teacher.rejected_replies == 1
    retry_turn = state.bodies[1]["messages"][-1]["content"]
    assert retry_turn.startswith("Your reply was rejected: the reply is not valid JSON")
    stubborn = ChatTeacher(client(url, "malformed"), max_format_retries=2)
    with pytest.raises(MalformedReply, match="misses field"):
        stubborn.step(SAMPLE, IMAGE, [], ["ocr"])
    assert state.attempts["malformed"] == 3


def test_budget_and_concurrency_bound(server):
    url, state = server
    c = client(url, "ok", budget=Budget(max_requests=2))
    c.chat([{"role": "user", "content": "1"}])
    c.chat([{"role": "user", "content": "2"}])
    with pytest.raises(BudgetExceeded, match="request budget spent"):
        c.chat([{"role": "user", "content": "3"}])
    cost = Budget(max_cost_usd=0.001, prompt_price_per_1k=0.01, completion_price_per_1k=0.03)
    c2 = client(url, "ok", budget=cost)
    c2.chat([{"role": "user", "content": "1"}])  # 100 * 0.01/1000 + 20 * 0.03/1000 = 0.0016 USD
    assert cost.snapshot()["cost_usd"] == pytest.approx(0.0016)
    with pytest.raises(BudgetExceeded, match="cost budget spent"):
        c2.chat([{"role": "user", "content": "2"}])
    bounded = client(url, "slow", max_concurrency=2)
    threads = [threading.Thread(target=bounded.chat, args=([{"role": "user", "content": "x"}],)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.attempts["slow"] == 6 and state.max_in_flight == 2


class StubOCR:
    name = "ocr"
    needs_query = False

    def run(self, image, query=None):
        return "CAT", {"words": []}


def test_rationale_stage_with_http_teacher_records_each_failure_kind(server, tmp_path):
    url, state = server
    source = make_toy_vqa(tmp_path / "toy", n_items=4, seed=3)
    base = dict(
        inputs=[str(source)],
        progress=False,
        shard_size=2,
        teacher="openai",
        teacher_base_url=url,
        teacher_backoff_s=0.01,
        teacher_max_retries=1,
        teacher_timeout_s=0.5,
        max_format_retries=1,
    )
    results = {}
    for model in ("scripted", "malformed", "down", "hang"):
        config = MMATConfig(output_dir=str(tmp_path / model), teacher_model=model, **base)
        run_stage(CurateStage(config))
        stage = RationaleStage(config, runtime=ToolRuntime({"ocr": StubOCR()}))
        results[model] = run_stage(stage)
    ok = read_records(tmp_path / "scripted", "rationale")
    assert len(ok) == 4 and all(r["teacher_answer"] == "cat" and r["n_steps"] == 2 for r in ok)
    assert json.loads(ok[0]["steps"])[0]["results"][0]["text"] == "CAT"
    assert results["scripted"]["counts"]["operator/ocr"] == 4 and results["scripted"]["cost"]["prompt_tokens"] > 0
    assert results["malformed"]["counts"]["failed/malformed_step"] == 4
    # An unreachable teacher fails no sample for good: all four wait for a rerun and the stage stays open.
    for model in ("down", "hang"):
        assert not results[model]["complete"] and results[model]["retry_samples"] == 4
        assert results[model]["finished_samples"] == 0 and "failed/teacher_error" not in results[model]["counts"]
    assert not (tmp_path / "down" / "rationale" / "_COMPLETE").exists()


def test_teacher_outage_leaves_samples_for_a_rerun_that_retries_only_them(server, tmp_path, capsys):
    """503s after the first sample: the CLI exits non-zero naming the count; the rerun finishes only the rest."""
    from processing.mmat.__main__ import main

    url, state = server
    source = make_toy_vqa(tmp_path / "toy", n_items=4, seed=3)
    out = tmp_path / "out"
    run_stage(CurateStage(MMATConfig(inputs=[str(source)], output_dir=str(out), progress=False, shard_size=2)))
    args = ["rationale", "--inputs", str(source), "--output_dir", str(out), "--progress", "false", "--shard_size", "2"]
    args += ["--teacher", "openai", "--teacher_base_url", url, "--teacher_model", "recovering"]
    args += ["--teacher_backoff_s", "0.01", "--teacher_max_retries", "1", "--face", "false", "--ocr", "false"]
    assert main(args) == 3
    assert "rationale: 3 samples failed transiently" in capsys.readouterr().err
    summary = json.loads((out / "rationale" / "summary.json").read_text())
    assert summary["finished_samples"] == 1 and summary["retry_samples"] == 3 and not summary["complete"]
    assert not (out / "rationale" / "_COMPLETE").exists()
    before = state.attempts["recovering"]
    state.outage = False
    assert main(args) == 0
    summary = json.loads((out / "rationale" / "summary.json").read_text())
    assert summary["complete"] and summary["retry_samples"] == 0 and summary["counts"]["ok"] == 4
    assert summary["runs"][-1]["processed"] == 3
    # Three requests per sample (step, step, answer): the first sample is not asked again.
    assert state.attempts["recovering"] - before == 9
    assert len(read_records(out, "rationale")) == 4


def test_teacher_outage_in_reflection_is_left_for_a_rerun(server, tmp_path):
    from processing.mmat.reflection import ReflectionStage

    url, state = server
    base = served_run(tmp_path, url, teacher_backoff_s=0.01, teacher_max_retries=1)
    del base["teacher_model"]
    run_stage(CurateStage(MMATConfig(teacher_model="scripted", **base)))
    stage = RationaleStage(MMATConfig(teacher_model="scripted", **base), runtime=ToolRuntime({"ocr": StubOCR()}))
    assert run_stage(stage)["complete"]
    summary = run_stage(ReflectionStage(MMATConfig(teacher_model="down", **base)))
    assert not summary["complete"] and summary["retry_samples"] == 4 and summary["finished_samples"] == 0
    assert "failed/teacher_error" not in summary["counts"]


def served_run(tmp_path, url, **overrides) -> dict:
    """Config fields of a run over 4 toy items whose teacher is the loopback server's scripted model."""
    source = make_toy_vqa(tmp_path / "toy", n_items=4, seed=3)
    fields = dict(inputs=[str(source)], output_dir=str(tmp_path / "out"), progress=False, teacher="openai",
                  teacher_base_url=url, teacher_model="scripted")  # fmt: skip
    return {**fields, **overrides}


def test_budget_exhaustion_stops_run_and_resume_finishes(server, tmp_path):
    url, state = server
    base = served_run(tmp_path, url, shard_size=2)
    run_stage(CurateStage(MMATConfig(**base)))
    first = run_stage(RationaleStage(MMATConfig(budget_requests=4, **base), runtime=ToolRuntime({"ocr": StubOCR()})))
    assert not first["complete"] and first["runs"][-1]["budget_exhausted"]
    assert first["finished_samples"] == 1  # three requests per sample; the second sample ran out
    second = run_stage(RationaleStage(MMATConfig(**base), runtime=ToolRuntime({"ocr": StubOCR()})))
    assert second["complete"] and second["runs"][-1]["processed"] == 3
    assert len(read_records(tmp_path / "out", "rationale")) == 4


def test_budget_caps_the_whole_run_across_stages_and_datatrove_tasks(server, tmp_path):
    """One ledger per run: 12 requests finish rationale in two processes, reflection may spend only 2 more."""
    from processing.mmat import run_pipeline

    url, state = server
    config = MMATConfig(**served_run(tmp_path, url, shard_size=1, face=False, executor="datatrove", tasks=2, workers=2,
                                     budget_requests=14))  # fmt: skip
    summaries = run_pipeline(config, ["curate", "rationale", "reflection"])
    assert summaries["rationale"]["complete"] and not summaries["reflection"]["complete"]
    assert state.attempts["scripted"] == 14
    assert summaries["rationale"]["cost"]["requests"] == 12 and summaries["reflection"]["cost"]["requests"] == 2
    assert summaries["rationale"]["cost"]["prompt_tokens"] == 1200
    (ledger,) = (tmp_path / "out" / "_spend").glob("*.json")
    assert json.loads(ledger.read_text())["total"]["requests"] == 14


def test_local_transformers_teacher_runs_and_rejects_noise(tmp_path):
    from processing.mmat import build_teacher

    vlm = build_tiny_vlm(tmp_path / "vlm")
    config = MMATConfig(teacher="transformers", teacher_model=vlm, teacher_max_new_tokens=3, max_format_retries=1)
    teacher = build_teacher(config)
    with pytest.raises(MalformedReply):
        teacher.step(SAMPLE, IMAGE, [], ["ocr"])
    usage = teacher.usage()
    assert usage["requests"] == 2 and usage["rejected_replies"] == 2 and 0 < usage["completion_tokens"] <= 6
    # The device setting reaches the model (an unknown device is torch's error, not a silent CPU run).
    with pytest.raises(RuntimeError, match="nodevice"):
        build_teacher(MMATConfig(teacher="transformers", teacher_model=vlm, teacher_device="nodevice"))
