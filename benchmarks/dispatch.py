"""How much does a step cost when there is almost nothing to compute?

Donated steps on 300 leaves of 16 floats (4,800 parameters): the time is the
per-leaf overhead of the compiled program and the dispatch of the call, not
arithmetic. Interleaved rounds, paired ratios against optax.
"""

import harness


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    p.add_argument("--steps", type=int, default=20, help="steps timed per round")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 15)
    load_before = harness.load_average()
    shapes = harness.tiny_shapes(args.quick)
    import eqx_ademamix as eam

    packed = {"f32 packed": lambda lr: eam.AdEMAMix(lr, packed=True).to_optax()}
    times, _, n, leaves = harness.time_steps(
        shapes, rounds, args.steps, "dispatch", extra=packed
    )
    ref = next(iter(times))
    rows, data = [], {}
    for name in times:
        t = harness.summary(times[name])
        r = harness.paired_ratio(times, ref, name)
        data[name] = {"time_s": t, "speed_vs_ref": r}
        rows.append(
            [
                name,
                f"{1e6 * t['median']:.0f} ({1e6 * t['q1']:.0f}-{1e6 * t['q3']:.0f})",
                f"{r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f})",
            ]
        )
    body = (
        f"{n:,} parameters in {leaves} leaves (all below the 8-bit storages' "
        f"`min_size`, so every storage keeps them as float32 arrays); {rounds} "
        f"rounds of {args.steps} donated steps.\n\n"
        + harness.table(
            ["variant", "us per step, median (middle half)", f"speed vs {ref}"], rows
        )
        + "\n\n`f32 packed`: `packed=True` keeps the moments of the small leaves in "
        "one buffer per dtype (see the performance guide)."
    )
    stem = harness.write_report(
        "dispatch",
        "Per-step overhead on many tiny leaves",
        args,
        body,
        {"params": n, "leaves": leaves, "rounds": rounds, "variants": data},
        load_before,
    )
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
