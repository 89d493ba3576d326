"""The project's performance targets (issue 11), checked against the reports in
`benchmarks/results/*.json`. The reports only measure; the targets are here.

    python benchmarks/targets.py [--results DIR]
"""

import argparse
import json
import pathlib


RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# (report, what, how to read it from the JSON, comparison, bound)
TARGETS = [
    (
        "step_time",
        "float8 step speed vs optax f32",
        ("variants", "float8 (BlockwiseFloat8)", "speed_vs_ref", "median"),
        ">=",
        0.5,
    ),
    (
        "step_time",
        "float8 state bytes / param",
        ("variants", "float8 (BlockwiseFloat8)", "state_bytes_per_param"),
        "<=",
        3.6,
    ),
    (
        "compile_time",
        "float8 trace + compile vs optax f32",
        ("variants", "float8 (BlockwiseFloat8)", "total_vs_ref"),
        "<=",
        3.0,
    ),
    (
        "step_time",
        "bf16 step speed vs optax f32",
        ("variants", "bf16", "speed_vs_ref", "median"),
        ">=",
        0.95,
    ),
    (
        "step_time",
        "bf16 state bytes / param",
        ("variants", "bf16", "state_bytes_per_param"),
        "<=",
        8.5,
    ),
    (
        "compile_time",
        "bf16 trace + compile vs optax f32",
        ("variants", "bf16", "total_vs_ref"),
        "<=",
        1.5,
    ),
    (
        "step_time",
        "f32 step speed vs optax f32",
        ("variants", "f32", "speed_vs_ref", "median"),
        ">=",
        0.95,
    ),
    (
        "quality",
        "float8 m2 bias (constant gradient)",
        ("bias", "float8 (BlockwiseFloat8)", "m2"),
        "within 1% of",
        1.0,
    ),
    (
        "quality",
        "bf16 m2 bias (constant gradient)",
        ("bias", "bf16", "m2"),
        "within 1% of",
        1.0,
    ),
]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--results", type=pathlib.Path, default=RESULTS)
    args = p.parse_args(argv)
    print("| target | measured | bound | met |\n|---|---|---|---|")
    for report, what, keys, op, bound in TARGETS:
        path = args.results / f"{report}.json"
        if not path.exists():
            print(f"| {what} | (no {report}.json) | {op} {bound} | - |")
            continue
        value = json.loads(path.read_text())
        for k in keys:
            value = value[k]
        if op == ">=":
            met = value >= bound
        elif op == "<=":
            met = value <= bound
        else:
            met = abs(value - bound) <= 0.01 * bound
        print(f"| {what} | {value:.3g} | {op} {bound} | {'yes' if met else 'no'} |")
    # bf16's stochastic rounding against round-to-nearest writes (<= 5% slower)
    path = args.results / "step_time.json"
    if path.exists():
        v = json.loads(path.read_text())["variants"]
        cost = (
            v["bf16 round-to-nearest"]["speed_vs_ref"]["median"]
            / v["bf16"]["speed_vs_ref"]["median"]
            - 1
        )
        met = "yes" if cost <= 0.05 else "no"
        what = "bf16 stochastic rounding cost over round-to-nearest"
        print(f"| {what} | {100 * cost:+.1f}% | <= 5% | {met} |")


if __name__ == "__main__":
    main()
