"""How long does the first step wait for tracing and compilation?

For each storage, a fresh donated step of the GPT-like model (62 leaves, 14.2M
parameters) is traced and lowered, then compiled by XLA (abstract shapes only:
nothing is allocated), round by round interleaved; ratios are paired per round
against optax's. Also the size of the lowered program (StableHLO text).
"""

import statistics
import time

import harness


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 5)
    load_before = harness.load_average()

    import jax

    shapes = harness.gpt_shapes(args.quick)
    params, grads = jax.eval_shape(lambda: harness.materialise(shapes))
    leaves = len(jax.tree.leaves(params))
    n = sum(x.size for x in jax.tree.leaves(params))
    sizes: dict[str, int] = {}

    totals = {}
    for name, make in harness.variants().items():
        totals[name] = _both(name, make, params, grads, sizes)
    with harness.progress_bar(rounds * len(totals), "compile time") as bar:
        runs = harness.interleaved(totals, rounds, bar)
    names = list(totals)
    ref = names[0]
    data, rows = {}, []
    for name in names:
        trace = [r[0] for r in runs[name]]
        comp = [r[1] for r in runs[name]]
        total = [a + b for a, b in zip(trace, comp)]
        slower = statistics.median(t / (a + b) for t, (a, b) in zip(total, runs[ref]))
        data[name] = {
            "trace_s": harness.summary(trace),
            "compile_s": harness.summary(comp),
            "total_s": harness.summary(total),
            "total_vs_ref": slower,
            "stablehlo_chars": sizes[name],
        }
        rows.append(
            [
                name,
                f"{statistics.median(trace):.2f}",
                f"{statistics.median(comp):.2f}",
                f"{statistics.median(total):.2f}",
                f"{slower:.2f}x",
                f"{sizes[name]:,}",
            ]
        )
    body = (
        f"GPT-like model: {leaves} leaves, {n:,} parameters; {rounds} interleaved "
        "rounds, medians.\n\n"
        + harness.table(
            [
                "variant",
                "trace + lower (s)",
                "XLA compile (s)",
                "total (s)",
                f"total vs {ref} (paired)",
                "StableHLO characters",
            ],
            rows,
        )
    )
    stem = harness.write_report(
        "compile_time",
        "Trace and compile time by state storage",
        args,
        body,
        {"leaves": leaves, "params": n, "rounds": rounds, "variants": data},
        load_before,
    )
    print(stem.with_suffix(".md").read_text())


def _both(name, make, params, grads, sizes):
    import jax

    def run():
        tx = make(1e-3)
        state = jax.eval_shape(tx.init, params)
        step = harness.donated_step(tx)
        t0 = time.perf_counter()
        lowered = step.lower(params, state, grads)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        sizes[name] = len(lowered.as_text())
        return (t1 - t0, t2 - t1)

    return run


if __name__ == "__main__":
    main()
