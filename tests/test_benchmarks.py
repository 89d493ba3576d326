"""Smoke test of the benchmark scripts (`--quick`): each runs, writes its
Markdown and JSON report with the load average, and `targets.py` reads them.

A benchmark, not a timed test: nothing here asserts a speed."""

import json
import os
import pathlib
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ["step_time", "compile_time", "dispatch", "memory", "quantiser", "quality"]


def _run(args, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_runs_and_reports(name, tmp_path):
    stem = tmp_path / name
    script = str(ROOT / "benchmarks" / f"{name}.py")
    proc = _run([script, "--quick", "--out", str(stem)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = stem.with_suffix(".md").read_text()
    assert f"Command: `python benchmarks/{name}.py --quick" in report
    assert "Load average (1, 5, 15 min) before: [" in report
    data = json.loads(stem.with_suffix(".json").read_text())
    assert len(data["load_before"]) == 3 and len(data["load_after"]) == 3
    assert data["environment"]["backend"] == "cpu"
    if name in ("step_time", "compile_time"):
        for variant in ("optax f32", "bf16", "float8 (BlockwiseFloat8)"):
            assert f"| {variant} |" in report
    if name == "step_time":
        assert data["variants"]["float8 (BlockwiseFloat8)"][
            "state_bytes_per_param"
        ] == pytest.approx(3 + 3 * 4 / 256)
        targets = _run(
            [str(ROOT / "benchmarks" / "targets.py"), "--results", str(tmp_path)],
            tmp_path,
        )
        assert targets.returncode == 0, targets.stderr[-3000:]
        assert "| float8 state bytes / param | 3.05 | <= 3.6 | yes |" in targets.stdout
