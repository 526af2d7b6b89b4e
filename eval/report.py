"""Run reports (JSON + Markdown + PNG) and comparisons of several runs with the papers' numbers.

A run directory holds `result.json` (everything needed to redo the table: data files and hashes,
loader counts, retrieval back-end, top-k, date), `report.md` and `scores.png`. A comparison reads
several `result.json` files and writes `comparison.{json,md,png}` with published numbers alongside
(`eval.paper_numbers`). DESIGN.md §6; MMAT-1M Tables 3-4.

    python -m eval.report compare runs/base runs/rr --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import paper_numbers

DYNVQA_MODE_TO_PAPER = {"agent": 0, "golden": 1}  # MMAT-1M Table 4 columns: Query, Golden Query


def _fmt(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def dynvqa_markdown(result: dict) -> str:
    lines = [
        f"# Dyn-VQA: {result['run_name']}",
        "",
        f"- model: `{result['model']}` ({result.get('model_kind', '?')})",
        "- data: " + ", ".join(f"{d['file']} (lang {d['lang']}, release {d['release']}, sha256 {d['sha256'][:16]})"
                               for d in result["data"]),
        f"- retrieval: {result['retrieval']['backend']}, top-k {result['retrieval']['top_k']}, "
        f"search rounds {result['retrieval']['search_rounds']}",
        f"- date: {result['date']}",
        "",
        "| mode | n | not predicted | F1-recall (official) | F1-recall (clean) | token F1 (clean) "
        "| official, without lang-mismatch | images missing | failed searches |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, m in result["modes"].items():
        # Items whose generation failed are left out of the scores: shown so that a smaller n is not missed.
        lines.append(
            f"| {mode} | {m['n']} | {m.get('not_predicted', 0)} | {_fmt(m['official']['all'])} | "
            f"{_fmt(m['clean']['all'])} | {_fmt(m['clean']['token_f1'])} | "
            f"{_fmt(m['official']['without_language_mismatch'])} | {m['images_missing']} | {m['search_failures']} |"
        )
    by_lang = [(mode, m) for mode, m in result["modes"].items() if len(m["official"]["by_lang"]) > 1]
    if by_lang:
        lines += ["", "| mode | lang | official | clean |", "|---|---|---|---|"]
        for mode, m in by_lang:
            for lang, value in m["official"]["by_lang"].items():
                lines.append(f"| {mode} | {lang} | {_fmt(value)} | {_fmt(m['clean']['by_lang'].get(lang))} |")
    lines += ["", "Loader counts (per file):", ""]
    for d in result["data"]:
        counts = ", ".join(f"{k}: {v}" for k, v in d["loader"]["counts"].items())
        lines.append(f"- {d['file']}: {d['loader']['kept']} kept of {d['loader']['lines']} lines; {counts}")
    return "\n".join(lines) + "\n"


def benchmark_markdown(result: dict) -> str:
    lines = [
        f"# {result['benchmark']}: {result['run_name']}",
        "",
        f"- model: `{result['model']}` ({result.get('model_kind', '?')})",
        f"- data: {result['data']['file']} (sha256 {result['data']['sha256'][:16]})",
        f"- metric: {result['metric']}; date: {result['date']}",
        "",
        "| score | n scored | not predicted | score, not predicted = wrong | unscorable | letter not found "
        "| images missing |",
        "|---|---|---|---|---|---|---|",
        f"| {_fmt(result['score'])} | {result['n_scored']} | {result.get('not_predicted', 0)} | "
        f"{_fmt(result.get('score_missing_as_wrong', result['score']))} | {result['unscorable']} | "
        f"{result['extraction_failures']} | {result['images_missing']} |",
    ]
    consistency = result.get("consistency")
    if consistency is not None:
        if consistency["missing_keys"]:
            lines += ["", f"fAcc / qAcc: not computed, {consistency['missing_keys']} items carry no l2-category / "
                          "set, figure and question ids"]
        else:
            lines += ["", "| aAcc | fAcc | qAcc | figures | questions |", "|---|---|---|---|---|",
                      f"| {_fmt(result['score'])} | {_fmt(consistency['fAcc'])} | {_fmt(consistency['qAcc'])} | "
                      f"{consistency['figures']} | {consistency['questions']} |"]
    if len(result["by_category"]) > 1:
        lines += ["", "| category | score |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in result["by_category"].items()]
    counts = ", ".join(f"{k}: {v}" for k, v in result["data"]["loader"]["counts"].items()) or "none"
    lines += ["", f"Loader counts: {counts}"]
    return "\n".join(lines) + "\n"


def plot_run(result: dict, path: str | os.PathLike) -> None:
    """Bars of the run's headline numbers: official vs clean per mode, or per category."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if result["benchmark"] == "dynvqa":
        modes = list(result["modes"])
        xs = range(len(modes))
        official = [result["modes"][m]["official"]["all"] or 0 for m in modes]
        clean = [result["modes"][m]["clean"]["all"] or 0 for m in modes]
        for offset, values, label in ((-0.2, official, "official"), (0.2, clean, "clean")):
            bars = ax.bar([x + offset for x in xs], values, 0.4, label=label)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(list(xs), modes)
        ax.set_ylim(0, 100)
        ax.set_ylabel("F1-recall (x100)")
        ax.legend()
    else:
        cats = list(result["by_category"]) or ["all"]
        values = [result["by_category"].get(c, result["score"] or 0) for c in cats]
        bars = ax.bar(range(len(cats)), values)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_ylim(0, result["scale"])
        ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"score (x{result['scale']:g})")
    ax.set_title(f"{result['benchmark']}: {result['run_name']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_run_report(result: dict, out_dir: str | os.PathLike) -> dict[str, str]:
    """Write `result.json`, `report.md` and `scores.png` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": str(out / "result.json"), "markdown": str(out / "report.md"), "plot": str(out / "scores.png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)
    markdown = dynvqa_markdown(result) if result["benchmark"] == "dynvqa" else benchmark_markdown(result)
    Path(paths["markdown"]).write_text(markdown, encoding="utf-8")
    plot_run(result, paths["plot"])
    return paths


def _load_result(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    if not p.is_file():
        raise ValueError(f"no result.json at {path}")
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def compare_runs(
    run_paths: list[str],
    out_dir: str | os.PathLike,
    paper_models: tuple[str, ...] = ("GPT-4o", "InternVL2.5-8B", "InternVL2.5-8B-RR", "GPT-4V"),
) -> dict:
    """Compare runs (Dyn-VQA modes and/or image benchmarks) with the papers' numbers.

    Args:
        run_paths (`list[str]`): run folders or their `result.json` files.
        out_dir (`str`): where `comparison.{json,md,png}` go.
        paper_models (`tuple[str]`): published rows to show: MMAT-1M Tables 3-4 model names, or
            OmniSearch Table 4 ones (`"GPT-4V"`, `"Qwen-VL-Chat"`, `"OmniSearch (GPT-4V)"`, ...).
    """
    if not run_paths:
        raise ValueError("give at least one run to compare")
    results = [_load_result(p) for p in run_paths]
    columns: list[str] = []
    rows: dict[str, dict[str, float | None]] = {}
    filled_by: dict[tuple[str, str], str] = {}  # (row, column) -> the run that filled it
    for path, r in zip(run_paths, results):
        # Runs sharing a name form one row (one model, several benchmarks); two runs may not fill one cell.
        row = rows.setdefault(r["run_name"], {})
        cells = {}
        if r["benchmark"] == "dynvqa":
            langs = "+".join(sorted({d["lang"] for d in r["data"]}))
            for mode, m in r["modes"].items():
                for kind in ("official", "clean"):
                    cells[f"Dyn-VQA {mode} {kind} ({langs})"] = m[kind]["all"]
        else:
            cells[r.get("paper_name") or r["benchmark"]] = r["score"]
        for col, value in cells.items():
            other = filled_by.setdefault((r["run_name"], col), str(path))
            if other != str(path):
                raise ValueError(
                    f"{other} and {path} are both named {r['run_name']!r} and both report {col!r}; "
                    "give them distinct names (`eval.run --run-name`)"
                )
            row[col] = value
            if col not in columns:
                columns.append(col)
    paper_rows: dict[str, dict[str, float | None]] = {}
    for model in paper_models:
        prow = {}
        for col in columns:
            if col.startswith("Dyn-VQA") and " official " in col:
                mode = col.split()[1]
                langs = col.rsplit("(", 1)[1].rstrip(")")
                omni = {"direct": paper_numbers.OMNISEARCH_DIRECT, "golden": paper_numbers.OMNISEARCH_GOLDEN,
                        "agent": paper_numbers.OMNISEARCH_AGENT}[mode]
                if mode in DYNVQA_MODE_TO_PAPER and model in paper_numbers.MMAT_DYNVQA:
                    prow[col] = paper_numbers.MMAT_DYNVQA[model][DYNVQA_MODE_TO_PAPER[mode]]
                elif model in omni:
                    # OmniSearch Table 4 reports zh, en and all separately.
                    prow[col] = omni[model][{"zh": 0, "en": 1}.get(langs, 2)]
            elif col in paper_numbers.MMAT_BENCHMARKS and model in paper_numbers.MMAT_TABLE3:
                prow[col] = paper_numbers.mmat_table3_row(model)[col]
        if prow:
            paper_rows[f"paper: {model}"] = prow
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = {"columns": columns, "runs": rows, "paper": paper_rows, "note": paper_numbers.PAPER_SETUP_NOTE}
    with open(out / "comparison.json", "w", encoding="utf-8") as f:
        json.dump(table, f, ensure_ascii=False, indent=1)
    lines = ["| run | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in list(rows.items()) + list(paper_rows.items()):
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    lines += ["", paper_numbers.PAPER_SETUP_NOTE]
    (out / "comparison.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    plt = _plt()
    series = list(rows.items()) + list(paper_rows.items())
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.2 * len(columns)), 3.8))
    for i, (name, row) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(columns))]
        # OCRBench is on 0-1000; shown /10 as the paper's Average treats it, so bars share one axis.
        values = [(row.get(c) or 0.0) / (10 if c == "OCRBench" else 1) for c in columns]
        ax.bar(xs, values, width, label=name, hatch="//" if name.startswith("paper:") else None,
               alpha=0.6 if name.startswith("paper:") else 1.0)
    ax.set_xticks(range(len(columns)), columns, rotation=25, ha="right", fontsize=7)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title("runs vs published numbers (OCRBench shown /10)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=110)
    plt.close(fig)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="compare run folders with the papers' numbers")
    cmp.add_argument("runs", nargs="+")
    cmp.add_argument("--out", required=True)
    cmp.add_argument("--paper-models", default="GPT-4o,InternVL2.5-8B,InternVL2.5-8B-RR,GPT-4V")
    args = parser.parse_args(argv)
    table = compare_runs(args.runs, args.out, tuple(m for m in args.paper_models.split(",") if m))
    print(Path(args.out, "comparison.md").read_text(encoding="utf-8"))
    del table


if __name__ == "__main__":
    main()
