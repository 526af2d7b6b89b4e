"""Datatrove pipeline step that runs the shards of one MMAT stage belonging to a task (see engine.py).

Each datatrove task (`rank` of `world_size`) builds the stage from the plain config dict it was given (so
the step pickles cheaply into worker processes) and runs the shards with `shard % world_size == rank`.
"""

from __future__ import annotations

from datatrove.pipeline.base import PipelineStep


class MMATStageStep(PipelineStep):
    """One MMAT stage as a datatrove step.

    Args:
        config_dict (`dict`): an :class:`~processing.mmat.config.MMATConfig` as a dict.
        stage_name (`str`): `curate`, `rationale`, `reflection` or `integrate`.
    """

    name = "MMAT stage"
    type = "MMAT"

    def __init__(self, config_dict: dict, stage_name: str):
        super().__init__()
        self.config_dict = config_dict
        self.stage_name = stage_name

    def run(self, data, rank: int = 0, world_size: int = 1):
        from .config import MMATConfig
        from .engine import run_shards
        from .stages import build_stage

        stage = build_stage(self.stage_name, MMATConfig.from_dict(self.config_dict))
        n_shards = -(-len(stage.input_records()) // stage.config.shard_size)
        mine = [i for i in range(n_shards) if i % world_size == rank]
        info = run_shards(stage, mine, position=rank)
        self.stat_update("processed", value=info["processed"])
        self.stat_update("skipped_done", value=info["skipped_done"])
        if data:
            yield from data
