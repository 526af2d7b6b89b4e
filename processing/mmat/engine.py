"""Resumable, sharded execution of one MMAT stage (DESIGN.md §5, STYLE.md §9).

The input of a stage (a list of records with an `id`) is cut into fixed shards. Each finished sample is
appended to the shard's journal (`_journal/shard-NNNNN.jsonl`, flushed and fsynced) before anything else
happens, so a killed run loses no finished sample; on rerun, journalled ids are skipped, so none is
repeated. When every sample of a shard is journalled the shard is sealed: its successes become
`data/shard-NNNNN.parquet` (a Hugging Face `datasets` artefact with fixed features), its failures
`failures/shard-NNNNN.jsonl` (id, reason, detail), its counters `stats/shard-NNNNN.json`; only then is the
journal removed. When all shards are sealed the stage writes `_COMPLETE` and `summary.json`.

A sample that fails for a passing reason (the teacher endpoint is down: :class:`RetryLater`) is not
journalled: its shard stays unsealed, the stage incomplete, and the ids wait in `_retry/shard-NNNNN.jsonl`
(rewritten on every run of the shard) so the summary can say how many a rerun will retry.

Scale-out: shards are independent, so the same code runs in one process (`executor="local"`) or under
datatrove's executors (`executor="datatrove"`): each datatrove task takes the shards with
`shard % world_size == rank`. We chose datatrove over Ray Data because a stage is a per-record map whose
state lives in files; datatrove's model (a pipeline step called with `rank, world_size`, local, Slurm
and Ray executors, per-task logs) fits that directly and is a pure-Python dependency, while Ray Data
brings a cluster runtime and object store this workload does not need. Datatrove's own completion
markers are not relied on (each run logs to a fresh folder): our shard seals are the single source of
truth, so a budget-limited run that ends early is resumed correctly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"


class SampleError(Exception):
    """A sample cannot be processed; it is recorded with `reason` (a short code) and skipped."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class RetryLater(Exception):
    """A sample failed for a reason outside it (teacher unreachable); it is left unfinished for the next run."""


class Stage:
    """Base class of a stage: names its input, processes one record, counts what happened.

    Subclasses set `name` and `features` (a `datasets.Features` of the output records) and implement
    :meth:`input_records` and :meth:`process`. :meth:`counters` returns per-record counts summed into
    the run summary; :meth:`on_complete` runs once when the stage is sealed (exports).
    """

    name: str = ""

    def __init__(self, config):
        self.config = config

    @property
    def features(self):
        raise NotImplementedError

    def input_records(self) -> list[dict]:
        raise NotImplementedError

    def process(self, record: dict) -> dict:
        raise NotImplementedError

    def setup(self) -> None:
        """Load heavy resources (teacher, tools) once, before worker threads start using them."""

    def counters(self, record: dict) -> dict[str, int]:
        return {}

    def usage(self) -> dict:
        return {}

    def on_complete(self, stage_dir: Path) -> None:
        pass


def stage_dir(output_dir: str | os.PathLike, name: str) -> Path:
    return Path(output_dir) / name


def is_complete(output_dir: str | os.PathLike, name: str) -> bool:
    return (stage_dir(output_dir, name) / COMPLETE_MARKER).exists()


def read_records(output_dir: str | os.PathLike, name: str) -> list[dict]:
    """The successful records of a completed stage, in shard order (the next stage's input)."""
    import pyarrow.parquet as pq

    if not is_complete(output_dir, name):
        raise ValueError(
            f"stage {name!r} in {output_dir} is not complete; run it first (`python -m processing.mmat {name}`)"
        )
    rows: list[dict] = []
    for path in sorted((stage_dir(output_dir, name) / "data").glob("shard-*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def load_stage(output_dir: str | os.PathLike, name: str):
    """A completed stage as a `datasets.Dataset`."""
    import datasets

    if not is_complete(output_dir, name):
        raise ValueError(f"stage {name!r} in {output_dir} is not complete")
    files = sorted(str(p) for p in (stage_dir(output_dir, name) / "data").glob("shard-*.parquet"))
    return datasets.Dataset.from_parquet(files)


def with_run_id(config):
    """`config` with a fresh `run_id` unless it has one: the id names the run's spend ledger."""
    if config.run_id:
        return config
    return dataclasses.replace(config, run_id=f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")


def spend_ledger(config) -> Path | None:
    """The file in which every stage and task of a run counts its teacher spend (None before a run id is set)."""
    return Path(config.output_dir) / "_spend" / f"{config.run_id}.json" if config.run_id else None


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class ShardRunner:
    """Runs, journals and seals the shards of one stage."""

    def __init__(self, stage: Stage, records: list[dict]):
        self.stage = stage
        self.config = stage.config
        self.dir = stage_dir(self.config.output_dir, stage.name)
        self.records = records
        size = self.config.shard_size
        self.shards = [records[i : i + size] for i in range(0, len(records), size)]
        self._lock = threading.Lock()

    # ---- plan: a rerun must see the same input, or resuming would mix two datasets
    def check_plan(self) -> None:
        ids = [str(r["id"]) for r in self.records]
        if len(set(ids)) != len(ids):
            dup = next(i for i, c in Counter(ids).items() if c > 1)
            raise ValueError(f"stage {self.stage.name}: input id {dup!r} appears more than once")
        digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
        plan = {"n_records": len(ids), "shard_size": self.config.shard_size, "ids_sha256": digest}
        path = self.dir / "plan.json"
        self.dir.mkdir(parents=True, exist_ok=True)
        if path.exists():
            old = json.loads(path.read_text())
            if old != plan:
                raise ValueError(
                    f"stage {self.stage.name}: the input or shard_size changed since the run that wrote {path} "
                    f"({old['n_records']} -> {plan['n_records']} records, shard_size {old['shard_size']} -> "
                    f"{plan['shard_size']}); use a new output_dir or delete {self.dir}"
                )
        else:
            _atomic_write(path, json.dumps(plan))

    def sealed(self, index: int) -> bool:
        return (self.dir / "stats" / f"{_shard_name(index)}.json").exists()

    def _retry_path(self, index: int) -> Path:
        return self.dir / "_retry" / f"{_shard_name(index)}.jsonl"

    def _journal_path(self, index: int) -> Path:
        return self.dir / "_journal" / f"{_shard_name(index)}.jsonl"

    def _read_journal(self, index: int) -> dict[str, dict]:
        done: dict[str, dict] = {}
        path = self._journal_path(index)
        if not path.exists():
            return done
        with open(path, encoding="utf-8") as f:
            for line in f:
                # A line cut by a kill has no newline and did not finish; its sample is redone.
                if not line.endswith("\n"):
                    break
                entry = json.loads(line)
                done[entry["id"]] = entry
        return done

    def _append(self, handle, entry: dict) -> None:
        with self._lock:
            handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _run_one(self, record: dict) -> dict:
        rid = str(record["id"])
        from .teachers import BudgetExceeded

        try:
            return {"id": rid, "status": "ok", "record": self.stage.process(record)}
        except SampleError as err:
            return {"id": rid, "status": "fail", "reason": err.reason, "detail": err.detail[:500]}
        except RetryLater as err:
            return {"id": rid, "status": "retry", "detail": str(err)[:500]}
        except BudgetExceeded:
            raise
        except Exception as err:  # noqa: BLE001 - a bug on one record is recorded, not fatal to the batch
            logger.exception("stage %s: unexpected error on %s", self.stage.name, rid)
            return {"id": rid, "status": "fail", "reason": "internal_error", "detail": repr(err)[:500]}

    def run_shard(self, index: int, progress=None) -> tuple[int, bool]:
        """Process the missing samples of one shard and seal it. Returns (processed, budget_exhausted).

        Samples that raised :class:`RetryLater` are listed in the shard's retry file, not journalled.
        """
        from .teachers import BudgetExceeded

        if self.sealed(index):
            return 0, False
        shard = self.shards[index]
        done = self._read_journal(index)
        pending = [r for r in shard if str(r["id"]) not in done]
        path = self._journal_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Truncate a partial last line left by a kill before appending new entries.
        if path.exists():
            with open(path, "rb+") as f:
                data = f.read()
                keep = data.rfind(b"\n") + 1
                f.truncate(keep)
        processed, exhausted, retry = 0, False, []
        if pending:
            # Building models lazily from several threads at once races inside imports (half-initialised
            # transformers / cv2 modules), so resources are loaded here, on one thread.
            self.stage.setup()
        with open(path, "a", encoding="utf-8") as journal, ThreadPoolExecutor(self.config.concurrency) as pool:
            todo = iter(pending)
            running = set()
            while True:
                while not exhausted and len(running) < self.config.concurrency:
                    record = next(todo, None)
                    if record is None:
                        break
                    running.add(pool.submit(self._run_one, record))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        entry = future.result()
                    except BudgetExceeded as err:
                        if not exhausted:
                            logger.warning("stage %s stops early: %s", self.stage.name, err)
                        exhausted = True
                        continue
                    if entry["status"] == "retry":
                        retry.append({"id": entry["id"], "detail": entry["detail"]})
                        continue
                    self._append(journal, entry)
                    done[entry["id"]] = entry
                    processed += 1
                    if progress is not None:
                        progress.update(1)
        self._write_retry(index, retry, done)
        if not exhausted and all(str(r["id"]) in done for r in shard):
            self._seal(index, [done[str(r["id"])] for r in shard])
        return processed, exhausted

    def _write_retry(self, index: int, retry: list[dict], done: dict[str, dict]) -> None:
        """Keep the shard's retry file to the samples still waiting: this run's, plus earlier ones not reached."""
        path = self._retry_path(index)
        tried = {r["id"] for r in retry}
        if path.exists():
            earlier = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            retry = [r for r in earlier if r["id"] not in done and r["id"] not in tried] + retry
        if retry:
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in retry))
        else:
            path.unlink(missing_ok=True)

    def _seal(self, index: int, entries: list[dict]) -> None:
        name = _shard_name(index)
        rows = [e["record"] for e in entries if e["status"] == "ok"]
        failures = [{k: e[k] for k in ("id", "reason", "detail")} for e in entries if e["status"] == "fail"]
        counts: Counter = Counter()
        for row in rows:
            counts.update(self.stage.counters(row))
        counts["ok"] = len(rows)
        counts["failed"] = len(failures)
        for f in failures:
            counts[f"failed/{f['reason']}"] += 1
        data_dir = self.dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{name}.parquet.tmp"
        import pyarrow as pa
        import pyarrow.parquet as pq

        # `Features.arrow_schema` carries the Features in the schema metadata, so every shard (even one
        # whose samples all failed) loads back through `datasets` with identical types.
        features = self.stage.features
        table = pa.Table.from_pylist([features.encode_example(r) for r in rows], schema=features.arrow_schema)
        pq.write_table(table, str(tmp))
        os.replace(tmp, data_dir / f"{name}.parquet")
        (self.dir / "failures").mkdir(exist_ok=True)
        _atomic_write(self.dir / "failures" / f"{name}.jsonl", "".join(json.dumps(f) + "\n" for f in failures))
        (self.dir / "stats").mkdir(exist_ok=True)
        _atomic_write(self.dir / "stats" / f"{name}.json", json.dumps(dict(counts), sort_keys=True))
        self._journal_path(index).unlink(missing_ok=True)

    def retry_count(self) -> int:
        """Samples left unfinished by a passing failure in the last run of their shard."""
        count = 0
        for index in range(len(self.shards)):
            path = self._retry_path(index)
            if path.exists() and not self.sealed(index):
                count += sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line)
        return count

    def finished_count(self) -> int:
        count = 0
        for index, shard in enumerate(self.shards):
            count += len(shard) if self.sealed(index) else len(self._read_journal(index))
        return count


def _atomic_write(path: Path, text: str) -> None:
    # pid in the temporary name: datatrove workers may write the same file (plan.json) at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def run_shards(stage: Stage, shard_ids: list[int] | None = None, position: int = 0) -> dict:
    """Run the given shards (all by default) of a stage in this process; returns this run's counts."""
    runner = ShardRunner(stage, stage.input_records())
    runner.check_plan()
    ids = range(len(runner.shards)) if shard_ids is None else shard_ids
    total = sum(len(runner.shards[i]) for i in ids)
    already = sum(len(runner.shards[i]) if runner.sealed(i) else len(runner._read_journal(i)) for i in ids)
    processed, exhausted = 0, False
    with tqdm(
        total=total,
        initial=already,
        desc=f"mmat {stage.name}",
        unit="sample",
        disable=not stage.config.progress,
        position=position,
    ) as bar:
        for index in ids:
            n, exhausted = runner.run_shard(index, bar)
            processed += n
            if exhausted:
                break
    return {"processed": processed, "skipped_done": already, "budget_exhausted": exhausted, "usage": stage.usage()}


def finalize(stage: Stage, run_info: dict) -> dict:
    """Write `summary.json` (always) and `_COMPLETE` plus exports (when every shard is sealed)."""
    runner = ShardRunner(stage, stage.input_records())
    directory = runner.dir
    totals: Counter = Counter()
    sealed = 0
    for index in range(len(runner.shards)):
        path = directory / "stats" / f"{_shard_name(index)}.json"
        if path.exists():
            sealed += 1
            totals.update(json.loads(path.read_text()))
    complete = sealed == len(runner.shards)
    summary_path = directory / "summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    runs = previous.get("runs", []) + [run_info]
    summary = {
        "stage": stage.name,
        "complete": complete,
        "n_inputs": len(runner.records),
        "n_shards": len(runner.shards),
        "sealed_shards": sealed,
        "finished_samples": runner.finished_count(),
        "retry_samples": runner.retry_count(),
        "counts": dict(sorted(totals.items())),
        "cost": _sum_usage([r.get("usage", {}) for r in runs]),
        "runs": runs,
    }
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(summary_path, json.dumps(summary, indent=2))
    if complete:
        stage.on_complete(directory)
        _atomic_write(directory / COMPLETE_MARKER, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return summary


def _sum_usage(usages: list[dict]) -> dict:
    total: Counter = Counter()
    for usage in usages:
        for key, value in usage.items():
            if isinstance(value, (int, float)):
                total[key] += value
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in total.items()}


def run_stage(stage: Stage) -> dict:
    """Run a stage to completion (or until the budget is spent) and return its summary.

    A completed stage (`_COMPLETE` present) is not run again.
    """
    # A stage run on its own is a run: its budget is counted in a ledger of its own.
    stage.config = config = with_run_id(stage.config)
    directory = stage_dir(config.output_dir, stage.name)
    if is_complete(config.output_dir, stage.name):
        logger.info("stage %s already complete in %s", stage.name, directory)
        return json.loads((directory / "summary.json").read_text())
    start = time.time()
    if config.executor == "datatrove":
        from datatrove.executor import LocalPipelineExecutor

        from .distributed import MMATStageStep

        step = MMATStageStep(dataclasses.asdict(config), stage.name)
        log_dir = directory / "_datatrove" / time.strftime("run-%Y%m%d-%H%M%S") / f"{os.getpid()}"
        executor = LocalPipelineExecutor(
            pipeline=[step], tasks=config.tasks, workers=config.workers, logging_dir=str(log_dir)
        )
        executor.run()
        info: dict[str, Any] = {"executor": "datatrove", "tasks": config.tasks, "workers": config.workers}
        # The tasks' teachers lived in other processes; what they spent is in the run's ledger.
        from .teachers import Budget

        ledger = spend_ledger(config)
        if ledger.exists():
            info["usage"] = Budget(ledger=ledger, scope=stage.name).snapshot()
    else:
        info = run_shards(stage)
        info["executor"] = "local"
    info["elapsed_s"] = round(time.time() - start, 3)
    summary = finalize(stage, info)
    if summary["retry_samples"]:
        logger.warning(
            "stage %s: %d samples failed transiently (teacher unreachable) and are not recorded as done; rerun the "
            "same command to retry them",
            stage.name,
            summary["retry_samples"],
        )
    elif not summary["complete"] and not info.get("budget_exhausted"):
        logger.warning(
            "stage %s is incomplete (%d/%d shards sealed)", stage.name, summary["sealed_shards"], summary["n_shards"]
        )
    return summary
