"""Text retrieval for the `rag` step: BM25 and dense search over a local corpus, and a web-search adapter.

MMAT-1M sends the teacher's RAG query to the Google API and keeps the top results; at evaluation time
"each query returns up to three results (top-k=3)" (§4). RAG is text-to-text only. Offline we search
a local corpus of `{"id", "title", "text", "url"?}` records: lexically with BM25 (`bm25s`) or densely
with a FAISS inner-product index over normalised embeddings. :class:`WebSearchClient` talks to an HTTP
JSON search API (SerpAPI-, Google-CSE- or plain `{"results": [...]}`-shaped answers).

Every retriever returns a list of `{"id", "title", "text", "url", "score"}` dicts, best first;
:func:`render_snippets` writes them as the numbered snippets fed back to the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Callable, Iterable, Protocol

import numpy as np

_REQUIRED = ("id", "title", "text")


class Retriever(Protocol):
    def search(self, query: str, top_k: int = 3) -> list[dict]: ...


def load_corpus(source: str | os.PathLike | Iterable[dict]) -> list[dict]:
    """Read a corpus from a JSONL path or an iterable of dicts and check its fields.

    Raises:
        ValueError: a record misses `id`, `title` or `text`, or ids repeat.
    """
    if isinstance(source, (str, os.PathLike)):
        records = []
        with open(source, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{source}:{lineno}: not valid JSON ({err})") from err
    else:
        records = list(source)
    seen = set()
    docs = []
    for i, rec in enumerate(records):
        missing = [k for k in _REQUIRED if k not in rec]
        if missing:
            raise ValueError(f"corpus record {i} misses field(s) {missing}; every record needs {list(_REQUIRED)}")
        doc_id = str(rec["id"])
        if doc_id in seen:
            raise ValueError(f"corpus id {doc_id!r} appears more than once")
        seen.add(doc_id)
        docs.append(
            {"id": doc_id, "title": str(rec["title"]), "text": str(rec["text"]), "url": str(rec.get("url") or "")}
        )
    return docs


def _hit(doc: dict, score: float) -> dict:
    return {"id": doc["id"], "title": doc["title"], "text": doc["text"], "url": doc["url"], "score": float(score)}


class BM25Retriever:
    """Okapi BM25 over a local corpus with `bm25s` (English stop words removed).

    Args:
        documents (`list[dict]`): records with `id`, `title`, `text` and optionally `url`; the title is
            indexed together with the text.
    """

    def __init__(self, documents: list[dict]):
        import bm25s

        self.documents = load_corpus(documents)
        if not self.documents:
            raise ValueError("BM25Retriever needs at least one document")
        self._bm25s = bm25s
        tokens = bm25s.tokenize(
            [f"{d['title']} {d['text']}" for d in self.documents], stopwords="en", show_progress=False
        )
        self._index = bm25s.BM25()
        self._index.index(tokens, show_progress=False)

    def search(self, query: str, top_k: int = 3) -> list[dict]:
        if not query or not query.strip():
            raise ValueError("empty retrieval query")
        k = min(top_k, len(self.documents))
        tokens = self._bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not any(len(ids) for ids in tokens.ids):
            return []
        idx, scores = self._index.retrieve(tokens, k=k, show_progress=False)
        return [_hit(self.documents[int(i)], s) for i, s in zip(idx[0], scores[0]) if s > 0]


class HashingEmbedder:
    """Feature-hashing bag-of-words embedder (no weights): a real, deterministic sparse embedding.

    Useful offline and in tests; pass :class:`TransformersEmbedder` for learned embeddings.
    """

    def __init__(self, dim: int = 512):
        self.dim = dim

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) == 0 else -1.0
        return out


class TransformersEmbedder:
    """Mean-pooled last hidden states of a local transformers encoder.

    Args:
        model_path (`str`): local folder with a model and tokenizer (e.g. a sentence-embedding BERT).
        max_length (`int`, *optional*, defaults to 256): truncation length.
    """

    def __init__(self, model_path: str, max_length: int = 256):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path).eval()
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        with torch.no_grad():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().numpy()


class DenseRetriever:
    """Cosine search with a FAISS flat inner-product index.

    Args:
        documents (`list[dict]`): corpus records, as for :class:`BM25Retriever`.
        embed (`Callable[[list[str]], np.ndarray]`, *optional*): text encoder; defaults to
            :class:`HashingEmbedder`.
    """

    def __init__(self, documents: list[dict], embed: Callable[[list[str]], np.ndarray] | None = None):
        import faiss

        self.documents = load_corpus(documents)
        if not self.documents:
            raise ValueError("DenseRetriever needs at least one document")
        self.embed = embed or HashingEmbedder()
        vectors = self._normalise(self.embed([f"{d['title']} {d['text']}" for d in self.documents]))
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(vectors)

    @staticmethod
    def _normalise(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    def search(self, query: str, top_k: int = 3) -> list[dict]:
        if not query or not query.strip():
            raise ValueError("empty retrieval query")
        k = min(top_k, len(self.documents))
        scores, idx = self._index.search(self._normalise(self.embed([query])), k)
        return [_hit(self.documents[int(i)], s) for i, s in zip(idx[0], scores[0]) if i >= 0 and s > 0]


class WebSearchClient:
    """Adapter for an HTTP JSON search API (`GET url?q=...&num=k`).

    Understands answers shaped `{"results": [{"title", "text"|"snippet", "url"|"link"}]}`, SerpAPI's
    `{"organic_results": [...]}` and Google CSE's `{"items": [...]}`.

    Args:
        url (`str`): endpoint.
        api_key_env (`str`, *optional*): name of an environment variable holding the key; it is sent as
            the `api_key` parameter and never logged.
        timeout_s (`float`, *optional*, defaults to 10.0): HTTP timeout.
        extra_params (`dict`, *optional*): fixed query parameters (engine, locale, ...).
    """

    def __init__(
        self, url: str, api_key_env: str | None = None, timeout_s: float = 10.0, extra_params: dict | None = None
    ):
        import httpx

        self._httpx = httpx
        self.url = url
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.extra_params = dict(extra_params or {})

    def search(self, query: str, top_k: int = 3) -> list[dict]:
        if not query or not query.strip():
            raise ValueError("empty retrieval query")
        params = {"q": query, "num": top_k, **self.extra_params}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(f"environment variable {self.api_key_env} (search API key) is not set")
            params["api_key"] = key
        response = self._httpx.get(self.url, params=params, timeout=self.timeout_s)
        response.raise_for_status()
        payload = response.json()
        items = None
        for field in ("results", "organic_results", "items"):
            if isinstance(payload, dict) and isinstance(payload.get(field), list):
                items = payload[field]
                break
        if items is None:
            raise ValueError(f"search API answer has none of results/organic_results/items: keys {sorted(payload)[:8]}")
        hits = []
        for rank, item in enumerate(items[:top_k]):
            hits.append(
                {
                    "id": str(item.get("id", item.get("link", item.get("url", rank)))),
                    "title": str(item.get("title", "")),
                    "text": str(item.get("text", item.get("snippet", ""))),
                    "url": str(item.get("url", item.get("link", ""))),
                    "score": float(item.get("score", 1.0 / (rank + 1))),
                }
            )
        return hits


NO_RESULTS = "No relevant results were found."


def render_snippets(hits: list[dict], max_chars: int = 400) -> str:
    """Numbered snippets, one per line: `1. Title: text (url)`; long texts are cut at `max_chars`."""
    if not hits:
        return NO_RESULTS
    lines = []
    for n, hit in enumerate(hits, 1):
        text = " ".join(hit["text"].split())
        if len(text) > max_chars:
            text = text[: max_chars - 3].rstrip() + "..."
        line = f"{n}. {hit['title']}: {text}" if hit["title"] else f"{n}. {text}"
        if hit.get("url"):
            line += f" ({hit['url']})"
        lines.append(line)
    return "\n".join(lines)
