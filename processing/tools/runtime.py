"""The tool runtime: named operators plus retrieval behind one call that never raises (DESIGN.md §3, §5).

The MMAT engine, the evaluation agent loop and RL all call :meth:`ToolRuntime.call` and
:meth:`ToolRuntime.search`. A crash, a missing input or a call running past `timeout_s` comes back as
`ToolResult(ok=False, error=...)`, so one bad tool never stops a batch job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterable

from PIL import Image

from .base import RAG, Operator, ToolResult, canonical_operator_name
from .retrieval import BM25Retriever, Retriever, WebSearchClient, load_corpus, render_snippets

logger = logging.getLogger(__name__)


def _run_with_timeout(fn, timeout_s: float):
    """Run `fn()` in a daemon thread; return (value, error). A hung call is abandoned, not killed.

    A thread (not a process) keeps loaded pipelines shared; the cost is that a hung back-end keeps its
    thread until it returns, which is acceptable for the rare timeout and keeps the caller moving.
    """
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - every tool failure becomes a recorded error
            box["error"] = f"{type(err).__name__}: {err}"

    thread = threading.Thread(target=target, daemon=True, name="tool-call")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        return None, f"timeout: no result after {timeout_s:g} s"
    if "error" in box:
        return None, box["error"]
    return box["value"], None


class ToolRuntime:
    """Named operators and a retriever, called with a uniform, non-raising interface.

    Args:
        operators (`dict[str, Operator]`, *optional*): operators by canonical name (`"ocr"`, ...).
        retriever (*optional*): any object with `search(query, top_k) -> list[dict]`, or a list of them
            tried in order until one returns results (for example web search, then a local corpus).
        timeout_s (`float`, *optional*, defaults to 30.0): per-call wall-time limit.

    Example:

    ```python
    >>> from processing.tools import ToolRuntime, BM25Retriever
    >>> rt = ToolRuntime(retriever=BM25Retriever([{"id": "1", "title": "Paris", "text": "Capital of France."}]))
    >>> rt.search("capital of France").text
    '1. Paris: Capital of France.'
    ```
    """

    def __init__(
        self,
        operators: dict[str, Operator] | None = None,
        retriever: Retriever | list[Retriever] | None = None,
        timeout_s: float = 30.0,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.operators = {canonical_operator_name(k): v for k, v in (operators or {}).items()}
        if retriever is None:
            self.retrievers = []
        elif isinstance(retriever, (list, tuple)):
            self.retrievers = list(retriever)
        else:
            self.retrievers = [retriever]
        self.timeout_s = timeout_s

    def available(self) -> list[str]:
        """Operator names that can be called, plus `"rag"` when a retriever is configured."""
        return sorted(self.operators) + ([RAG] if self.retrievers else [])

    def call(self, name: str, image: Image.Image | None = None, query: str | None = None) -> ToolResult:
        """Run one operator (or `"rag"`, which is :meth:`search`). Never raises for tool failures."""
        canon = canonical_operator_name(name)
        if canon == RAG:
            return self.search(query or "")
        start = time.perf_counter()
        operator = self.operators.get(canon)
        if operator is None:
            return ToolResult(
                canon, False, error=f"unknown or unavailable operator {name!r}; available: {self.available()}"
            )
        if image is None:
            return ToolResult(canon, False, error=f"operator {canon!r} needs an image and none was given")
        if operator.needs_query and not (query and query.strip()):
            return ToolResult(canon, False, error=f"operator {canon!r} needs a query (object names) and none was given")
        value, error = _run_with_timeout(lambda: operator.run(image, query), self.timeout_s)
        elapsed = time.perf_counter() - start
        if error is not None:
            logger.warning("tool %s failed: %s", canon, error)
            return ToolResult(canon, False, error=error, elapsed_s=elapsed)
        text, data = value
        return ToolResult(canon, True, text=text, data=data, elapsed_s=elapsed)

    def search(self, query: str, top_k: int = 3) -> ToolResult:
        """RAG search; `data["results"]` holds `{"id", "title", "text", "url", "score"}` dicts."""
        start = time.perf_counter()
        if not self.retrievers:
            return ToolResult(RAG, False, error="no retriever configured (pass a corpus or a web_search_url)")
        if not query or not query.strip():
            return ToolResult(RAG, False, error="empty RAG query")
        errors = []
        for retriever in self.retrievers:
            hits, error = _run_with_timeout(lambda r=retriever: r.search(query, top_k=top_k), self.timeout_s)
            if error is not None:
                errors.append(f"{type(retriever).__name__}: {error}")
                continue
            if hits:
                elapsed = time.perf_counter() - start
                return ToolResult(
                    RAG, True, text=render_snippets(hits), data={"results": hits, "query": query}, elapsed_s=elapsed
                )
        elapsed = time.perf_counter() - start
        if errors and len(errors) == len(self.retrievers):
            return ToolResult(RAG, False, error="; ".join(errors), elapsed_s=elapsed)
        return ToolResult(
            RAG,
            True,
            text=render_snippets([]),
            data={"results": [], "query": query, "errors": errors},
            elapsed_s=elapsed,
        )


def build_runtime(
    corpus: str | os.PathLike | Iterable[dict] | None = None,
    ocr: bool = True,
    face: bool = True,
    detector_path: str | None = None,
    captioner_path: str | None = None,
    web_search_url: str | None = None,
    timeout_s: float = 30.0,
    dense: bool = False,
    web_search_api_key_env: str | None = None,
    device: str = "cpu",
) -> ToolRuntime:
    """Build a runtime from local back-ends.

    Args:
        corpus (`str` or `list[dict]`, *optional*): JSONL path or records for local BM25 retrieval.
        ocr (`bool`, *optional*, defaults to True): add Tesseract OCR (raises if the binary is missing).
        face (`bool`, *optional*, defaults to True): add OpenCV Haar face detection.
        detector_path (`str`, *optional*): local zero-shot object detection checkpoint for `label_bbox`.
        captioner_path (`str`, *optional*): local image-text-to-text checkpoint for `image_caption`.
        web_search_url (`str`, *optional*): HTTP JSON search endpoint; tried before the local corpus.
        timeout_s (`float`, *optional*, defaults to 30.0): per-call limit.
        dense (`bool`, *optional*, defaults to False): index the corpus with FAISS (hashing embeddings)
            instead of BM25.
        web_search_api_key_env (`str`, *optional*): name of the environment variable holding the search API
            key; the key is read at request time, so it never sits in a config that gets written to disk.
        device (`str`, *optional*, defaults to `"cpu"`): torch device of the detection and captioning pipelines.
    """
    from .caption import PipelineCaptioner
    from .detection import OpenVocabDetector
    from .face import HaarFaceDetector
    from .ocr import TesseractOCR
    from .retrieval import DenseRetriever

    operators: dict[str, Operator] = {}
    if captioner_path:
        operators["image_caption"] = PipelineCaptioner(captioner_path, device=device)
    if detector_path:
        operators["label_bbox"] = OpenVocabDetector(detector_path, device=device)
    if ocr:
        operators["ocr"] = TesseractOCR()
    if face:
        operators["face_detection"] = HaarFaceDetector()
    retrievers: list = []
    if web_search_url:
        retrievers.append(WebSearchClient(web_search_url, api_key_env=web_search_api_key_env, timeout_s=timeout_s))
    if corpus is not None:
        docs = load_corpus(corpus)
        retrievers.append(DenseRetriever(docs) if dense else BM25Retriever(docs))
    return ToolRuntime(operators, retrievers or None, timeout_s=timeout_s)
