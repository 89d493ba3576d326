"""How fast is one optimizer step with each state storage, against optax?

Donated `jax.jit` steps (parameters and state donated, gradients an argument) on
the large workload (8 leaves of 2048 x 2048, 33.5M parameters), every variant
interleaved round by round; speed is the paired ratio optax's time / the
variant's time per round. Also lists the bytes a step moves per parameter, the
expectation on a GPU, where the step is memory-bound.
"""

import harness


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    p.add_argument("--steps", type=int, default=3, help="steps timed per round")
    p.add_argument("--plot", action="store_true", help="also write a PNG")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 15)
    load_before = harness.load_average()

    shapes = harness.large_shapes(args.quick)
    times, info, n, leaves = harness.time_steps(shapes, rounds, args.steps, "step time")
    ref = next(iter(times))
    rows, data = [], {}
    for name in times:
        t = harness.summary(times[name])
        r = harness.paired_ratio(times, ref, name)
        moved = info[name]["bytes_moved_per_param"]
        gpu = info[ref]["bytes_moved_per_param"] / moved
        data[name] = {"time_s": t, "speed_vs_ref": r, **info[name], "gpu_speed": gpu}
        rows.append(
            [
                name,
                f"{1e3 * t['median']:.1f} ({1e3 * t['q1']:.1f}-{1e3 * t['q3']:.1f})",
                f"{r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f})",
                f"{info[name]['state_bytes_per_param']:.2f}",
                f"{moved:.2f}",
                f"{gpu:.2f}x",
            ]
        )
    body = (
        f"{n:,} parameters in {leaves} leaves; {rounds} "
        f"interleaved rounds of {args.steps} donated steps each.\n\n"
        + harness.table(
            [
                "variant",
                "ms per step, median (middle half)",
                f"speed vs {ref}, paired (middle half)",
                "state bytes / param",
                "bytes moved / param / step",
                "memory-bound (GPU) expectation vs ref",
            ],
            rows,
        )
        + "\n\nBytes moved: the parameter read and written, the gradient read, the "
        "state read and written (float32 parameters). On a CPU the step is not "
        "purely memory-bound, so the last column is an expectation for GPUs, "
        "not a measurement."
    )
    stem = harness.write_report(
        "step_time",
        "Step time by state storage",
        args,
        body,
        {"workload": "large", "params": n, "rounds": rounds, "variants": data},
        load_before,
    )
    if args.plot:
        plot(data, ref, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())


def plot(data: dict, ref: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(data)
    med = [data[k]["speed_vs_ref"]["median"] for k in names]
    lo = [m - data[k]["speed_vs_ref"]["q1"] for k, m in zip(names, med)]
    hi = [data[k]["speed_vs_ref"]["q3"] - m for k, m in zip(names, med)]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, med, xerr=[lo, hi], color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel(f"speed relative to {ref} (paired, higher is faster)")
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
