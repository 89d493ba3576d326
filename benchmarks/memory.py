"""How much memory does each storage take, and how many bytes does a step move?

For the GPT-like model (62 leaves) and the large workload: the state's bytes per
parameter (measured from the arrays), the scratch memory XLA allocates for a
donated step (its compiled memory analysis, per parameter), and the bytes a step
reads and writes per parameter, which sets the speed of a memory-bound (GPU)
step. Abstract shapes only: nothing is allocated.
"""

import harness


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    args = p.parse_args(argv)
    load_before = harness.load_average()

    import jax

    data, rows = {}, []
    for workload, shapes_fn in (
        ("gpt", harness.gpt_shapes),
        ("large", harness.large_shapes),
    ):
        shapes = shapes_fn(args.quick)
        params, grads = jax.eval_shape(lambda s=shapes: harness.materialise(s))
        n = sum(x.size for x in jax.tree.leaves(params))
        for name, make in harness.variants().items():
            tx = make(1e-3)
            state = jax.eval_shape(tx.init, params)
            per_param = (harness.state_bytes(state) - 8) / n
            compiled = harness.donated_step(tx).lower(params, state, grads).compile()
            analysis = compiled.memory_analysis()
            temp = getattr(analysis, "temp_size_in_bytes", None)
            temp_pp = None if temp is None else temp / n
            moved = harness.bytes_moved_per_param(per_param)
            data[f"{workload}/{name}"] = {
                "params": n,
                "state_bytes_per_param": per_param,
                "temp_bytes_per_param": temp_pp,
                "bytes_moved_per_param": moved,
            }
            rows.append(
                [
                    workload,
                    name,
                    f"{per_param:.2f}",
                    "-" if temp_pp is None else f"{temp_pp:.2f}",
                    f"{moved:.2f}",
                ]
            )
    body = (
        "Bytes per parameter (float32 parameters).\n\n"
        + harness.table(
            [
                "workload",
                "variant",
                "state",
                "XLA scratch of a donated step",
                "moved per step (read + write)",
            ],
            rows,
        )
        + "\n\nState: m1, m2 and nu (8-bit storages: 1 byte per element and one "
        "float32 scale per block of 256, small leaves such as biases stay float32). "
        "Moved per step: parameter read and written (8), gradient read (4), state "
        "read and written (2x state)."
    )
    stem = harness.write_report(
        "memory", "Memory by state storage", args, body, {"variants": data}, load_before
    )
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
