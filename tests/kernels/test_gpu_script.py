"""`benchmarks/gpu_moe.py --smoke` and `benchmarks/gpu_followup.py --smoke`: the GPU scripts run end to end under
Triton's interpreter and their correctness passes find every launcher within tolerance, so the one run a lent GPU
gets is not spent on a crash."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _smoke_run(script: str, out: Path) -> dict:
    """`benchmarks/<script> --smoke` under Triton's interpreter; its JSON report."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_gpu_script_smoke_run_under_the_interpreter(tmp_path):
    out = tmp_path / "smoke.json"
    report = _smoke_run("gpu_moe.py", out)
    assert report["correctness_failures"] == []
    assert report["launchers"] and all(err < 1e-3 for err in report["launchers"].values())
    assert report["points"], "no timing point was written"
    assert report["layout"]["new_over_old"] > 0, report["layout"]  # both weight layouts ran
    assert out.with_suffix(".png").stat().st_size > 0, "no plot was drawn"


def test_gpu_followup_smoke_run_under_the_interpreter(tmp_path):
    """`benchmarks/gpu_followup.py --smoke`: the lease-sized check runs end to end, its routing comparison finds the
    kernels equal to the PyTorch routing, and every weight-gradient GEMM choice was timed."""
    report = _smoke_run("gpu_followup.py", tmp_path / "followup.json")
    assert report["routing"] and all(r["mismatched"] == [] for r in report["routing"].values())
    (row,) = report["weight_grad_gemm"].values()
    assert all(row[f"{choice}_ms"] > 0 for choice in ("triton", "grouped_mm", "auto"))
    assert row["auto_takes_grouped_mm"] is False  # 16-wide experts stay on the Triton dW kernel
