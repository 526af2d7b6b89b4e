"""The MMAT-1M data engine (arXiv 2507.21924 §3; DESIGN.md §5): VQA pairs -> RR and ORR agent-tuning data.

Stages (one module each): `curate` -> `rationale` -> `reflection` -> `integrate`, each writing a resumable
`datasets` artefact under `output_dir/<stage>/`. Run them with `python -m processing.mmat all ...` or:

>>> from processing.mmat import MMATConfig, run_pipeline                      # doctest: +SKIP
>>> run_pipeline(MMATConfig(inputs=["toy/toy_vqa.jsonl"], output_dir="out"))  # doctest: +SKIP
"""

from .config import MMATConfig
from .engine import SampleError, Stage, is_complete, load_stage, read_records, run_stage
from .formats import render_orr, render_rr
from .stages import ORDER, build_stage, build_teacher, build_tools, run_pipeline
from .steps import MalformedReply, ReasoningStep, parse_step
from .teachers import Budget, BudgetExceeded, ChatTeacher, OpenAIChatClient, TeacherError, TransformersChatClient

__all__ = [
    "Budget",
    "BudgetExceeded",
    "ChatTeacher",
    "MMATConfig",
    "MalformedReply",
    "ORDER",
    "OpenAIChatClient",
    "ReasoningStep",
    "SampleError",
    "Stage",
    "TeacherError",
    "TransformersChatClient",
    "build_stage",
    "build_teacher",
    "build_tools",
    "is_complete",
    "load_stage",
    "parse_step",
    "read_records",
    "render_orr",
    "render_rr",
    "run_pipeline",
    "run_stage",
]
