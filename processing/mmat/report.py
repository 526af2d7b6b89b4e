"""Run summary plot: per-stage counts (operators, reflections, failures) as one PNG (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path


def plot_summaries(summaries: dict[str, dict], output_dir: str | Path) -> Path | None:
    """Bar charts of each stage's counters into `<output_dir>/summary.png`; returns the path."""
    if not summaries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(4.5 * len(summaries), 4), squeeze=False)
    for ax, (name, summary) in zip(axes[0], summaries.items()):
        counts = summary.get("counts", {})
        keys = [
            k for k in counts if k.startswith(("operator/", "reflection/", "failed/", "tool_error/", "source/"))
        ] or list(counts)
        ax.barh(
            keys,
            [counts[k] for k in keys],
            color=["tab:red" if k.startswith(("failed/", "tool_error/")) else "tab:blue" for k in keys],
        )
        ax.set_title(f"{name}: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    path = Path(output_dir) / "summary.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
