"""Run configuration of the MMAT engine: one dataclass, loadable from YAML, shared by all stages (STYLE.md §4).

Every field is a CLI flag of `python -m processing.mmat` (`--shard_size 64`); `--config run.yaml` loads a
file first and flags override it. Unknown YAML keys raise.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

TEACHERS = ("toy", "openai", "transformers")
EXECUTORS = ("local", "datatrove")


@dataclasses.dataclass
class MMATConfig:
    """Settings of an MMAT run.

    Paths and engine:
        output_dir: where every stage writes `<stage>/data/*.parquet`, failures, stats and `_COMPLETE`.
        inputs: local VQA files (JSONL, JSON, CSV, Parquet) or saved `datasets` folders for curate; `name=path`
            names the source (default: the file stem, see :mod:`processing.mmat.curate`).
        image_root: images named in the inputs are resolved under this folder (no escaping it).
        shard_size / concurrency: samples per shard (the unit of resume) / samples in flight per process.
        executor / tasks / workers: `local` (default) or `datatrove` with `tasks` ranks over `workers` processes.

    Teacher:
        teacher: `toy` (the deterministic toy-world program), `openai` (any OpenAI-compatible endpoint) or
            `transformers` (a local model folder in `teacher_model`).
        budget_requests / budget_tokens / budget_cost_usd: limits for the whole run (every stage and datatrove
            task), kept in the spend ledger `<output_dir>/_spend/<run_id>.json`.
        teacher_device / teacher_max_new_tokens: torch device and reply length of the `transformers` teacher.
        run_id: names the ledger; each invocation picks a fresh one, so a rerun gets a fresh budget. Set it to
            let several invocations share one budget.

    Tools: operators and retrieval of :func:`processing.tools.build_runtime`; `tool_device` is the torch device
    of the detection and captioning pipelines. `web_search_api_key_env` names
    the environment variable holding the search API key: the config is written to disk (datatrove's
    `executor.json`, logs), so a key inside `web_search_url` is refused.

    Filters: `gold_filter` drops samples whose teacher answer differs from the gold answer; `judge` scores
    samples 0-1 and `min_quality` drops those below it; `drop_cheating` drops samples flagged by the
    general reflection instead of inserting a reflection.
    """

    output_dir: str = "mmat_out"
    inputs: list[str] = dataclasses.field(default_factory=list)
    image_root: str | None = None
    max_samples: int | None = None

    # teacher
    teacher: str = "toy"
    teacher_model: str | None = None
    teacher_base_url: str | None = None
    teacher_api_key_env: str = "OPENAI_API_KEY"
    teacher_timeout_s: float = 120.0
    teacher_max_retries: int = 4
    teacher_backoff_s: float = 1.0
    teacher_max_concurrency: int = 4
    teacher_device: str = "cpu"
    teacher_max_new_tokens: int = 512
    max_format_retries: int = 2
    toy_latency_s: float = 0.0
    budget_requests: int | None = None
    budget_tokens: int | None = None
    budget_cost_usd: float | None = None
    run_id: str | None = None
    prompt_price_per_1k: float = 0.0
    completion_price_per_1k: float = 0.0

    # tools
    corpus: str | None = None
    toy_corpus: bool = True
    ocr: bool = True
    face: bool = True
    detector_path: str | None = None
    captioner_path: str | None = None
    web_search_url: str | None = None
    web_search_api_key_env: str | None = None
    tool_timeout_s: float = 30.0
    tool_device: str = "cpu"
    rag_top_k: int = 3

    # rationale / reflection / quality
    max_steps: int = 6
    math_reflection: bool = True
    general_reflection: bool = True
    math_sources: list[str] = dataclasses.field(default_factory=lambda: ["tabmwp", "geoqa", "clevr-math", "mathvista"])
    judge: bool = False
    min_quality: float | None = None
    gold_filter: bool = False
    drop_cheating: bool = False

    # engine
    shard_size: int = 32
    concurrency: int = 1
    executor: str = "local"
    tasks: int = 2
    workers: int = 1
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        if self.teacher not in TEACHERS:
            raise ValueError(f"teacher must be one of {TEACHERS}, got {self.teacher!r}")
        if self.teacher == "openai" and not (self.teacher_base_url and self.teacher_model):
            raise ValueError("teacher='openai' needs teacher_base_url and teacher_model")
        if self.teacher == "transformers" and not self.teacher_model:
            raise ValueError("teacher='transformers' needs teacher_model (a local model folder)")
        if self.executor not in EXECUTORS:
            raise ValueError(f"executor must be one of {EXECUTORS}, got {self.executor!r}")
        positive = ("shard_size", "concurrency", "max_steps", "tasks", "workers", "rag_top_k", "teacher_max_new_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.web_search_url:
            from urllib.parse import parse_qs, urlparse

            params = parse_qs(urlparse(self.web_search_url).query)
            secret = [k for k in params if re.search(r"key|token|secret", k, re.IGNORECASE)]
            if secret:
                raise ValueError(
                    f"web_search_url carries {secret[0]!r}, a credential that would be written to disk with the "
                    "config; put the key in an environment variable and name it with web_search_api_key_env"
                )
        if self.min_quality is not None and not 0.0 <= self.min_quality <= 1.0:
            raise ValueError(f"min_quality must be in [0, 1], got {self.min_quality}")
        if self.min_quality is not None and not self.judge:
            raise ValueError("min_quality filters on the judge's score; set judge=True as well")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "MMATConfig":
        import yaml

        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings at the top level")
        values.update(overrides)
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: dict) -> "MMATConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown MMAT setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
