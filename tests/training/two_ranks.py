"""Run a function on two CPU processes joined in a gloo process group, as data-parallel training would."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _rank_main(rank: int, folder: str, body, args: tuple) -> None:
    store = torch.distributed.FileStore(str(Path(folder) / "store"), 2)
    torch.distributed.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        result = body(rank, *args)
    finally:
        torch.distributed.destroy_process_group()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))


def run_on_two_ranks(body, folder, *args) -> list:
    """`body(rank, *args)` on ranks 0 and 1 inside the group; returns what each returned (JSON-able), in rank order.
    `body` must be a module-level function (the processes are spawned)."""
    torch.multiprocessing.spawn(_rank_main, args=(str(folder), body, args), nprocs=2)
    return [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in range(2)]
