"""Evaluate a local Hugging Face model on Dyn-VQA (three modes) or an MMAT-1M image benchmark.

DESIGN.md §6; MMAT-1M §4 (Tables 3-4); Dyn-VQA from OmniSearch (arXiv 2411.02937).

    # Dyn-VQA, English 202412, all three modes, local BM25 corpus for retrieval
    python -m eval.run --model path/to/model --benchmark dynvqa \
        --data ../shared/dynvqa_data/DynVQA_en.202412.jsonl --image-dir dynvqa_images/ \
        --corpus corpus.jsonl --modes direct,agent,golden --out runs/base
    # an image benchmark from a VLMEvalKit TSV (or a save_to_disk folder)
    python -m eval.run --model path/to/model --benchmark mmstar --data MMStar.tsv --out runs/base-mmstar
    # the same from a YAML file holding RunConfig fields
    python -m eval.run --config run.yaml

Predictions are appended per item to `<out>/predictions.<mode>.jsonl`; a rerun skips finished items.
Dyn-VQA predictions are also written as `<out>/official_input.<mode>.<lang>.jsonl`, the input of the
benchmark's own `evaluate.py`. The report is `<out>/result.json`, `report.md` and `scores.png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import time
import traceback
from pathlib import Path

logger = logging.getLogger("eval.run")


@dataclasses.dataclass
class RunConfig:
    """Settings of one evaluation run (every field is also a `--flag`).

    Args:
        model (`str`): local model folder.
        benchmark (`str`): `"dynvqa"` or a name from `eval.benchmarks.BENCHMARKS`.
        data (`list[str]`): data files: Dyn-VQA JSONL (one per language) or a folder of releases, a
            TSV, or a saved dataset.
        release (`str`): Dyn-VQA release read from a data folder (default 202412, the cleanest).
        langs (`list[str]`): Dyn-VQA languages read from a data folder.
        out (`str`): output folder.
        run_name (`str`, *optional*): label in reports (default: the output folder's name).
        modes (`list[str]`): Dyn-VQA modes among `direct`, `agent`, `golden`.
        image_dir (`str`, *optional*): Dyn-VQA image cache folder (see `eval.images`).
        corpus (`str`, *optional*): JSONL corpus `{id, title, text, url?}` for the local BM25 retriever.
        web_search_url (`str`, *optional*): HTTP search endpoint tried before the corpus.
        top_k (`int`): results per search (MMAT-1M evaluates with 3).
        search_rounds (`int`): agent-mode queries per item.
        batch_size (`int`): items per generate call.
        max_new_tokens (`int`): answer length budget.
        limit (`int`, *optional*): first N items per data file.
        split (`str`, *optional*): split of a saved DatasetDict.
        device (`str`), dtype (`str`, *optional*), trust_remote_code (`bool`), model_kind (`str`, *optional*):
            model loading, see `eval.model.GenerationModel`.
        drop_language_mismatch (`bool`): skip English Dyn-VQA items whose answers are all Chinese.
    """

    model: str = ""
    benchmark: str = "dynvqa"
    data: list[str] = dataclasses.field(default_factory=list)
    out: str = "runs/eval"
    run_name: str | None = None
    release: str = "202412"
    langs: list[str] = dataclasses.field(default_factory=lambda: ["en"])
    modes: list[str] = dataclasses.field(default_factory=lambda: ["direct", "agent", "golden"])
    image_dir: str | None = None
    corpus: str | None = None
    web_search_url: str | None = None
    top_k: int = 3
    search_rounds: int = 1
    batch_size: int = 8
    max_new_tokens: int = 64
    limit: int | None = None
    split: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    trust_remote_code: bool = False
    model_kind: str | None = None
    drop_language_mismatch: bool = False

    def __post_init__(self):
        from .dynvqa_agent import MODES

        if isinstance(self.modes, str):
            self.modes = [m.strip() for m in self.modes.split(",") if m.strip()]
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.langs, str):
            self.langs = [m.strip() for m in self.langs.split(",") if m.strip()]
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown Dyn-VQA mode(s) {bad}; choose from {MODES}")
        if self.batch_size < 1 or self.top_k < 1 or self.search_rounds < 1:
            raise ValueError("batch_size, top_k and search_rounds must all be >= 1")
        if self.run_name is None:
            self.run_name = Path(self.out).name

    @classmethod
    def from_yaml(cls, path: str, **overrides) -> "RunConfig":
        import yaml

        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown RunConfig field(s) {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def build_search_runtime(cfg: RunConfig):
    """The shared tool runtime with retrieval only (no image operators are needed to evaluate)."""
    from processing.tools import BM25Retriever, ToolRuntime, WebSearchClient, load_corpus

    retrievers, parts = [], []
    if cfg.web_search_url:
        retrievers.append(WebSearchClient(cfg.web_search_url))
        parts.append(f"web search at {cfg.web_search_url}")
    if cfg.corpus:
        docs = load_corpus(cfg.corpus)
        retrievers.append(BM25Retriever(docs))
        parts.append(f"BM25 over local corpus {cfg.corpus} ({len(docs)} docs)")
    if not retrievers:
        logger.warning("no --corpus or --web-search-url: every agent/golden search will fail and be counted")
        return None, "none (no corpus or search endpoint given)"
    return ToolRuntime(retriever=retrievers), " then ".join(parts)


def _record_error(out: Path, item_id: str, mode: str, err: BaseException) -> None:
    with open(out / "errors.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": item_id, "mode": mode, "error": f"{type(err).__name__}: {err}",
                            "time": _now()}, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------
# Dyn-VQA
# ---------------------------------------------------------------------------------------------

def _dynvqa_scores(samples, predictions: dict[str, str]) -> dict:
    from .benchmarks import load_metric
    from .metrics.dynvqa_f1_recall.dynvqa_f1_recall import clean_item_scores

    metric = load_metric("dynvqa_f1_recall")
    scored = [s for s in samples if s.question_id in predictions]
    official, clean, f1s = {}, {}, {}
    for lang in sorted({s.lang for s in scored}):
        group = [s for s in scored if s.lang == lang]
        preds = [predictions[s.question_id] for s in group]
        off = metric.compute(predictions=preds, references=[s.official_answers for s in group],
                             lang=lang, mode="official", return_per_item=True)
        cl = metric.compute(predictions=preds, references=[s.answers for s in group],
                            mode="clean", return_per_item=True)
        for s, o, c in zip(group, off["scores"], cl["scores"]):
            official[s.question_id] = o
            clean[s.question_id] = c
            f1s[s.question_id] = clean_item_scores(predictions[s.question_id], s.answers)[1]

    def mean(values):
        values = list(values)
        return round(100 * sum(values) / len(values), 2) if values else None

    def summary(per_item):
        return {
            "all": mean(per_item.values()),
            "by_lang": {lang: mean(per_item[s.question_id] for s in scored if s.lang == lang)
                        for lang in sorted({s.lang for s in scored})},
            "without_language_mismatch": mean(per_item[s.question_id] for s in scored if not s.language_mismatch),
        }

    result = {"n": len(scored), "official": summary(official), "clean": summary(clean)}
    result["clean"]["token_f1"] = mean(f1s.values())
    result["per_item"] = {qid: {"official": official[qid], "clean": clean[qid]} for qid in official}
    return result


def _write_official_inputs(out: Path, mode: str, samples, predictions: dict[str, str]) -> list[str]:
    paths = []
    for lang in sorted({s.lang for s in samples}):
        path = out / f"official_input.{mode}.{lang}.jsonl"
        with open(path, "w", encoding="utf-8") as f:
            for s in samples:
                if s.lang == lang and s.question_id in predictions:
                    f.write(json.dumps({**s.raw, "prediction": predictions[s.question_id]}, ensure_ascii=False) + "\n")
        paths.append(str(path))
    return paths


def run_dynvqa(cfg: RunConfig, model) -> dict:
    from tqdm.auto import tqdm

    from .dynvqa_agent import run_batch
    from .images import open_image
    from .loaders.dynvqa import load_dynvqa, release_path
    from .predictions import PredictionStore

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    samples, data_info = [], []
    files = []
    for entry in cfg.data:
        if os.path.isdir(entry):
            files.extend(str(release_path(entry, lang, cfg.release)) for lang in cfg.langs)
        else:
            files.append(entry)
    for path in files:
        loaded, report = load_dynvqa(path, image_dir=cfg.image_dir, drop_language_mismatch=cfg.drop_language_mismatch,
                                     limit=cfg.limit)
        samples.extend(loaded)
        data_info.append({"file": os.path.basename(path), "path": os.path.abspath(path), "sha256": _sha256(path),
                          "lang": report.lang, "release": report.release, "loader": report.to_dict()})
    ids = [s.question_id for s in samples]
    if len(ids) != len(set(ids)):
        raise ValueError("the same question_id appears in two data files; give each language's file once")
    runtime, backend = (None, "not used")
    if any(m in ("agent", "golden") for m in cfg.modes):
        runtime, backend = build_search_runtime(cfg)

    modes: dict[str, dict] = {}
    official_files: dict[str, list[str]] = {}
    for mode in cfg.modes:
        store = PredictionStore(out / f"predictions.{mode}.jsonl")
        todo = [s for s in samples if s.question_id not in store]
        for batch in tqdm(list(_batches(todo, cfg.batch_size)), desc=f"dynvqa/{mode}", unit="batch"):
            items = []
            for sample in batch:
                image, problem = (None, "no image in the local store")
                if model.accepts_images and sample.image_path:
                    image, problem = open_image(sample.image_path)
                items.append((sample, image, problem))
            try:
                outputs = run_batch(model, [(s, img) for s, img, _ in items], mode, runtime=runtime,
                                    top_k=cfg.top_k, search_rounds=cfg.search_rounds)
            except Exception as err:  # noqa: BLE001 - one bad batch must not end the run
                logger.error("batch failed in mode %s: %s", mode, traceback.format_exc(limit=3))
                for sample, _, _ in items:
                    _record_error(out, sample.question_id, mode, err)
                continue
            for (sample, image, problem), (prediction, trace) in zip(items, outputs):
                store.add({
                    "id": sample.question_id, "mode": mode, "prediction": prediction, "lang": sample.lang,
                    "image_missing": image is None, "image_problem": None if image is not None else problem,
                    **dataclasses.asdict(trace),
                })
        predictions = {qid: r["prediction"] for qid, r in store.records.items()}
        stats = _dynvqa_scores(samples, predictions)
        done = [store.records[s.question_id] for s in samples if s.question_id in store]
        stats["images_missing"] = sum(bool(r.get("image_missing")) for r in done)
        stats["search_failures"] = sum(len(r.get("search_errors", [])) for r in done)
        stats["query_fallbacks"] = sum("query_fallback" in r.get("flags", []) for r in done)
        stats["golden_query_fallbacks"] = sum("golden_query_fallback" in r.get("flags", []) for r in done)
        stats["not_predicted"] = len(samples) - len(done)
        modes[mode] = stats
        official_files[mode] = _write_official_inputs(out, mode, samples, predictions)
    return {
        "benchmark": "dynvqa",
        "run_name": cfg.run_name,
        "model": cfg.model,
        "model_kind": model.kind,
        "date": _now(),
        "config": dataclasses.asdict(cfg),
        "data": data_info,
        "retrieval": {"backend": backend, "top_k": cfg.top_k, "search_rounds": cfg.search_rounds},
        "modes": modes,
        "official_input_files": official_files,
    }


# ---------------------------------------------------------------------------------------------
# Image benchmarks
# ---------------------------------------------------------------------------------------------

def load_benchmark_data(path: str, split: str | None = None, limit: int | None = None):
    """Samples from a VLMEvalKit TSV file or a `save_to_disk` folder."""
    from .loaders import load_hf_disk, load_vlmeval_tsv

    if os.path.isdir(path):
        return load_hf_disk(path, split=split, limit=limit)
    if path.endswith(".tsv"):
        return load_vlmeval_tsv(path, limit=limit)
    raise ValueError(f"{path}: expected a .tsv file or a dataset folder written by save_to_disk")


def run_benchmark(cfg: RunConfig, model) -> dict:
    from tqdm.auto import tqdm

    from . import benchmarks
    from .model import Prompt
    from .predictions import PredictionStore

    spec = benchmarks.get_benchmark(cfg.benchmark)
    if len(cfg.data) != 1:
        raise ValueError(f"{spec.name} takes one data path, got {len(cfg.data)}")
    path = cfg.data[0]
    samples, loader_report = load_benchmark_data(path, cfg.split, cfg.limit)
    samples = [benchmarks.prepare(spec, s) for s in samples]
    out = Path(cfg.out)
    store = PredictionStore(out / "predictions.jsonl")
    todo = [s for s in samples if s.id not in store]
    for batch in tqdm(list(_batches(todo, cfg.batch_size)), desc=spec.name, unit="batch"):
        prompts, missing = [], []
        for sample in batch:
            images, problems = sample.load_images() if model.accepts_images else ([], [])
            # One image per prompt: the first; multi-image items are rare in these benchmarks.
            prompts.append(Prompt(benchmarks.build_prompt(spec, sample), images[0] if images else None))
            missing.append(not images)
        try:
            outputs = model.generate(prompts)
        except Exception as err:  # noqa: BLE001 - one bad batch must not end the run
            logger.error("batch failed: %s", traceback.format_exc(limit=3))
            for sample in batch:
                _record_error(out, sample.id, spec.name, err)
            continue
        for sample, prediction, miss in zip(batch, outputs, missing):
            store.add({"id": sample.id, "prediction": prediction, "image_missing": miss})
    predictions = {k: r["prediction"] for k, r in store.records.items()}
    scores = benchmarks.score(spec, samples, predictions)
    return {
        "benchmark": spec.name,
        "paper_name": spec.paper_name,
        "run_name": cfg.run_name,
        "model": cfg.model,
        "model_kind": model.kind,
        "date": _now(),
        "config": dataclasses.asdict(cfg),
        "data": {"file": os.path.basename(os.path.normpath(path)), "path": os.path.abspath(path),
                 "sha256": _sha256(path) if os.path.isfile(path) else "dataset-folder",
                 "loader": {k: v for k, v in loader_report.items() if k != "skipped"}},
        "images_missing": sum(bool(r.get("image_missing")) for r in store.records.values()),
        **{k: v for k, v in scores.items()},
    }


def _check_resume_target(cfg: RunConfig) -> None:
    """Refuse to resume into a folder whose predictions came from another model or benchmark."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "run_meta.json"
    local = lambda path: os.path.abspath(path) if path else None  # noqa: E731
    # Everything that changes what a finished item's prediction would be (item filters such as --limit do not).
    meta = {"model": local(cfg.model), "benchmark": cfg.benchmark.lower(), "data": [local(d) for d in cfg.data],
            "split": cfg.split, "release": cfg.release, "max_new_tokens": cfg.max_new_tokens, "top_k": cfg.top_k,
            "search_rounds": cfg.search_rounds, "image_dir": local(cfg.image_dir), "corpus": local(cfg.corpus),
            "web_search_url": cfg.web_search_url, "dtype": cfg.dtype, "model_kind": cfg.model_kind}  # fmt: skip
    if meta_path.exists():
        previous = json.loads(meta_path.read_text(encoding="utf-8"))
        # Keys an older version did not record cannot be checked.
        changed = {k: (previous[k], v) for k, v in meta.items() if k in previous and previous[k] != v}
        if changed:
            raise ValueError(f"{out} holds predictions made with other settings {changed}; "
                             "finished items would be mixed in. Use a new --out or delete the folder.")
    else:
        meta_path.write_text(json.dumps(meta, indent=1), encoding="utf-8")


def evaluate_run(cfg: RunConfig, model=None) -> dict:
    """Run one configuration end to end and write its report; returns the result dict."""
    from .model import GenerationModel
    from .report import write_run_report

    if not cfg.model and model is None:
        raise ValueError("no --model given")
    if not cfg.data:
        raise ValueError("no --data given")
    _check_resume_target(cfg)
    start = time.perf_counter()
    if model is None:
        model = GenerationModel(cfg.model, device=cfg.device, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                max_new_tokens=cfg.max_new_tokens, kind=cfg.model_kind)
    result = run_dynvqa(cfg, model) if cfg.benchmark.lower() == "dynvqa" else run_benchmark(cfg, model)
    result["elapsed_s"] = round(time.perf_counter() - start, 2)
    result["report_files"] = write_run_report(result, cfg.out)
    return result


def make_parser(subparsers=None) -> argparse.ArgumentParser:
    description = "Evaluate a local HF model on Dyn-VQA or an MMAT-1M benchmark."
    parser = (subparsers.add_parser("run", description=description) if subparsers is not None
              else argparse.ArgumentParser(prog="python -m eval.run", description=description))
    parser.add_argument("--config", help="YAML file of RunConfig fields (flags override it)")
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool",) or field.type is bool:
            parser.add_argument(flag, action="store_true", default=None)
        elif field.name == "data":
            parser.add_argument(flag, action="append", default=None, help="repeat for several files")
        elif field.type in ("int", "int | None"):
            parser.add_argument(flag, type=int, default=None)
        else:
            parser.add_argument(flag, default=None)
    return parser


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = vars(make_parser().parse_args(argv))
    config_path = args.pop("config")
    overrides = {k: v for k, v in args.items() if v is not None}
    cfg = RunConfig.from_yaml(config_path, **overrides) if config_path else RunConfig(**overrides)
    result = evaluate_run(cfg)
    print(Path(result["report_files"]["markdown"]).read_text(encoding="utf-8"))
    return result


if __name__ == "__main__":
    main()
