"""Stage registry and the resources stages share (teacher, tool runtime), built from an MMATConfig."""

from __future__ import annotations

import logging

from .config import MMATConfig
from .curate import CurateStage
from .engine import Stage, run_stage, with_run_id
from .integration import IntegrateStage
from .rationale import RationaleStage
from .reflection import ReflectionStage

logger = logging.getLogger(__name__)

STAGES = {
    "curate": CurateStage,
    "rationale": RationaleStage,
    "reflection": ReflectionStage,
    "integrate": IntegrateStage,
}
ORDER = tuple(STAGES)


def build_teacher(config: MMATConfig, stage: str = ""):
    """The teacher named by `config.teacher`, with the run's budget (spent by `stage` in the run's ledger)."""
    from .engine import spend_ledger
    from .teachers import Budget, ChatTeacher, OpenAIChatClient, TransformersChatClient

    budget = Budget(
        max_requests=config.budget_requests,
        max_tokens=config.budget_tokens,
        max_cost_usd=config.budget_cost_usd,
        prompt_price_per_1k=config.prompt_price_per_1k,
        completion_price_per_1k=config.completion_price_per_1k,
        ledger=spend_ledger(config),
        scope=stage,
    )
    if config.teacher == "toy":
        from .toy_teacher import ToyTeacher

        return ToyTeacher(latency_s=config.toy_latency_s)
    if config.teacher == "openai":
        client = OpenAIChatClient(
            config.teacher_base_url,
            config.teacher_model,
            api_key_env=config.teacher_api_key_env,
            timeout_s=config.teacher_timeout_s,
            max_retries=config.teacher_max_retries,
            backoff_s=config.teacher_backoff_s,
            max_concurrency=config.teacher_max_concurrency,
            budget=budget,
        )
        return ChatTeacher(client, max_format_retries=config.max_format_retries)
    client = TransformersChatClient(
        config.teacher_model,
        max_new_tokens=config.teacher_max_new_tokens,
        device=config.teacher_device,
        budget=budget,
    )
    return ChatTeacher(client, max_format_retries=config.max_format_retries)


def build_tools(config: MMATConfig):
    """The tool runtime: operators from the config, corpus from `corpus` (or the toy corpus for the toy teacher)."""
    from processing.tools import build_runtime

    corpus = config.corpus
    if corpus is None and config.teacher == "toy" and config.toy_corpus:
        from .toy_teacher import toy_corpus

        corpus = toy_corpus()
    return build_runtime(
        corpus=corpus,
        ocr=config.ocr,
        face=config.face,
        detector_path=config.detector_path,
        captioner_path=config.captioner_path,
        web_search_url=config.web_search_url,
        web_search_api_key_env=config.web_search_api_key_env,
        timeout_s=config.tool_timeout_s,
        device=config.tool_device,
    )


def build_stage(name: str, config: MMATConfig) -> Stage:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; choose from {list(STAGES)}")
    return STAGES[name](config)


def run_pipeline(config: MMATConfig, stages: list[str] | tuple[str, ...] = ORDER) -> dict[str, dict]:
    """Run stages in order (skipping completed ones); stop at the first one left incomplete.

    The stages share one run id, hence one spend ledger: the budget caps the whole pipeline.
    """
    config = with_run_id(config)
    summaries = {}
    for name in stages:
        summary = run_stage(build_stage(name, config))
        summaries[name] = summary
        if not summary["complete"]:
            logger.warning("stage %s did not complete; later stages were not run", name)
            break
    return summaries
