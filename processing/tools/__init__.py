"""Agent tool runtime shared by the MMAT engine, evaluation and RL (MMAT-1M §3.2; DESIGN.md §3, §5).

>>> from processing.tools import build_runtime
>>> rt = build_runtime(corpus=[{"id": "1", "title": "Eiffel Tower", "text": "A tower in Paris."}])
>>> rt.available()
['face_detection', 'ocr', 'rag']
"""

from .base import (
    FACE_DETECTION,
    IMAGE_CAPTION,
    LABEL_BBOX,
    OCR,
    OPERATOR_NAMES,
    RAG,
    Operator,
    ToolResult,
    canonical_operator_name,
)
from .retrieval import (
    BM25Retriever,
    DenseRetriever,
    HashingEmbedder,
    TransformersEmbedder,
    WebSearchClient,
    load_corpus,
    render_snippets,
)
from .runtime import ToolRuntime, build_runtime

__all__ = [
    "BM25Retriever",
    "DenseRetriever",
    "FACE_DETECTION",
    "HashingEmbedder",
    "IMAGE_CAPTION",
    "LABEL_BBOX",
    "OCR",
    "OPERATOR_NAMES",
    "Operator",
    "RAG",
    "ToolResult",
    "ToolRuntime",
    "TransformersEmbedder",
    "WebSearchClient",
    "build_runtime",
    "canonical_operator_name",
    "load_corpus",
    "render_snippets",
]
