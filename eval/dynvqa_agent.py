"""The three Dyn-VQA evaluation modes (MMAT-1M Table 4 and OmniSearch; DESIGN.md §6).

- ``direct``: the model answers from the image and question alone.
- ``agent``: the model first writes a web-search query; the shared tool runtime
  (:class:`processing.tools.ToolRuntime`) returns the top-3 results, which MMAT-1M fixes for
  evaluation ("each query returns up to three results"); the model then answers with the snippets
  in its context. ``search_rounds`` > 1 lets it refine the query after seeing results.
- ``golden``: the dataset's golden query (the question rewritten without visual references) is
  sent to the same runtime instead of the model's query, MMAT-1M's "Golden Query" upper bound.
  An item without a golden query falls back to its question, flagged ``golden_query_fallback``.

Queries are read from the model's text in this order: an MMAT RR tag ``<RAG>...</RAG>``, a line
starting ``Query:`` / ``Search query:`` / ``查询：``, else the first non-empty line; an empty result
falls back to the question (flagged ``query_fallback``). The prompts are ours; the paper does not
publish its evaluation prompts.
"""

from __future__ import annotations

import dataclasses
import re

from .model import Prompt

MODES = ("direct", "agent", "golden")
_RAG_TAG = re.compile(r"<RAG>(.*?)(?:</RAG>|$)", re.DOTALL | re.IGNORECASE)
_QUERY_LINE = re.compile(r"^\s*(?:search\s+query|query|查询|搜索)\s*[:：]\s*(.+)$", re.IGNORECASE | re.MULTILINE)
MAX_QUERY_CHARS = 200

PROMPTS = {
    "en": {
        "answer": "{question}\nAnswer the question with a short phrase.",
        "query": (
            "{question}\nTo answer this question about the image you may search the web. "
            "Write the one search query that would find the missing facts, as: Query: <your query>"
        ),
        "refine": (
            "{question}\nEarlier searches returned:\n{evidence}\n"
            "Write a better search query for what is still missing, as: Query: <your query>"
        ),
        "answer_with_evidence": (
            "Web search results:\n{evidence}\n\n{question}\n"
            "Using the image and the search results, answer the question with a short phrase."
        ),
    },
    "zh": {
        "answer": "{question}\n请用简短的词语回答。",
        "query": (
            "{question}\n为回答这个关于图片的问题，你可以进行网络搜索。"
            "请写出一条能查到所需信息的搜索词，格式为：查询：<搜索词>"
        ),
        "refine": "{question}\n之前的搜索结果：\n{evidence}\n请针对仍缺少的信息写一条更好的搜索词，格式为：查询：<搜索词>",
        "answer_with_evidence": (
            "网络搜索结果：\n{evidence}\n\n{question}\n请结合图片和搜索结果，用简短的词语回答问题。"
        ),
    },
}


def extract_query(text: str) -> str:
    """The search query in a model's reply ('' when there is none)."""
    match = _RAG_TAG.search(text)
    if match and match.group(1).strip():
        query = match.group(1)
    else:
        match = _QUERY_LINE.search(text)
        if match:
            query = match.group(1)
        else:
            query = next((line for line in text.splitlines() if line.strip()), "")
    query = " ".join(query.split()).strip(" \"'“”`<>")
    return query[:MAX_QUERY_CHARS]


@dataclasses.dataclass
class ItemTrace:
    """What happened for one item: the prompts' outputs, queries, retrieved ids and flags."""

    queries: list[str] = dataclasses.field(default_factory=list)
    query_outputs: list[str] = dataclasses.field(default_factory=list)
    retrieved: list[list[str]] = dataclasses.field(default_factory=list)
    search_errors: list[str] = dataclasses.field(default_factory=list)
    evidence: list[str] = dataclasses.field(default_factory=list)
    flags: list[str] = dataclasses.field(default_factory=list)


def _search(runtime, query: str, top_k: int, trace: ItemTrace) -> None:
    trace.queries.append(query)
    if runtime is None:
        trace.search_errors.append("no tool runtime configured")
        trace.retrieved.append([])
        return
    result = runtime.search(query, top_k=top_k)
    if not result.ok:
        trace.search_errors.append(result.error or "search failed")
        trace.retrieved.append([])
        return
    hits = result.data.get("results", [])
    trace.retrieved.append([str(h.get("id", "")) for h in hits])
    trace.evidence.append(result.text)


def run_batch(
    model, items: list, mode: str, runtime=None, top_k: int = 3, search_rounds: int = 1
) -> list[tuple[str, ItemTrace]]:
    """Answer a batch of Dyn-VQA items in one mode; one model call per stage for the whole batch.

    Args:
        model (`eval.model.GenerationModel`): anything with `generate(list[Prompt]) -> list[str]`.
        items (`list`): `(sample, image)` pairs, `image` a PIL image or `None`.
        mode (`str`): `"direct"`, `"agent"` or `"golden"`.
        runtime (`processing.tools.ToolRuntime`, *optional*): the retrieval back-end.
        top_k (`int`, *optional*, defaults to 3): results per search.
        search_rounds (`int`, *optional*, defaults to 1): agent queries per item.

    Returns:
        `(prediction, trace)` per item, in order.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if search_rounds < 1:
        raise ValueError(f"search_rounds must be >= 1, got {search_rounds}")
    traces = [ItemTrace() for _ in items]
    texts = [PROMPTS[s.lang if s.lang in PROMPTS else "en"] for s, _ in items]

    if mode == "direct":
        prompts = [Prompt(t["answer"].format(question=s.question), img) for t, (s, img) in zip(texts, items)]
        return list(zip(model.generate(prompts), traces))

    if mode == "golden":
        for (sample, _), trace in zip(items, traces):
            query = sample.golden_query
            if not query:
                trace.flags.append("golden_query_fallback")
                query = sample.question
            _search(runtime, query, top_k, trace)
    else:
        for round_idx in range(search_rounds):
            prompts = []
            for t, (sample, img), trace in zip(texts, items, traces):
                if round_idx == 0:
                    prompts.append(Prompt(t["query"].format(question=sample.question), img))
                else:
                    evidence = "\n".join(trace.evidence) or "(none)"
                    prompts.append(Prompt(t["refine"].format(question=sample.question, evidence=evidence), img))
            for output, (sample, _), trace in zip(model.generate(prompts), items, traces):
                trace.query_outputs.append(output)
                query = extract_query(output)
                if not query:
                    trace.flags.append("query_fallback")
                    query = sample.question
                _search(runtime, query, top_k, trace)

    prompts = []
    for t, (sample, img), trace in zip(texts, items, traces):
        evidence = "\n".join(trace.evidence) or ("(无结果)" if sample.lang == "zh" else "(no results)")
        prompts.append(Prompt(t["answer_with_evidence"].format(question=sample.question, evidence=evidence), img))
    return list(zip(model.generate(prompts), traces))
