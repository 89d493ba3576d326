"""Smoke test of `benchmarks/run.py --quick`: every section runs and is reported.

A benchmark, not a timed test: nothing here asserts a speed. Peers that are not
installed (the PyTorch one) are skipped by the script, with a message.
"""

import os
import pathlib
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quick_benchmark_runs_and_reports(tmp_path):
    out, fig = tmp_path / "RESULTS.md", tmp_path / "results.png"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "run.py"),
            "--quick",
            "--out",
            str(out),
            "--plot",
            str(fig),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = out.read_text()
    for section in (
        "## Step time: large",
        "## Step time: tiny",
        "## Compile time",
        "## Dispatch overhead",
        "## Crossover: packed vs per-leaf state",
        "## Peak memory",
    ):
        assert section in report, section
    for name in (
        "floor f32 (donated)",
        "optax.contrib.ademamix (donated)",
        "eqx_ademamix (donated)",
        "eqx_ademamix bf16 (donated)",
        "eqx_ademamix packed (donated)",
    ):
        assert f"| {name} |" in report, name
    assert "Command: `python benchmarks/run.py --quick" in report
    assert "failed" not in report and "skipped: " not in report
    # The PyTorch peer is measured if installed, and skipped with a reason if not.
    try:
        import pytorch_optimizer  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        assert "pytorch_optimizer" in report and "not installed" in report
    else:
        assert "| pytorch_optimizer AdEMAMix (for loop) |" in report
    assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
