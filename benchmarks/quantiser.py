"""How fast are the encoders and decoders of each low-precision storage?

One moment of 2**22 elements (quick: 2**16): writing (bf16 stochastic rounding,
float8 blocks, dynamic tree blocks; stochastic rounding on) and reading back,
jitted, interleaved rounds; nanoseconds per element, with a float32 EMA of the
same size (read, multiply-add, write) as the yardstick.
"""

import harness


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 20)
    load_before = harness.load_average()

    import eqx_ademamix as eam
    import jax
    import jax.numpy as jnp
    from eqx_ademamix.internal import mix_seed

    n = 2**16 if args.quick else 2**22
    x = jax.random.normal(jax.random.key(0), (n // 256, 256))
    seed = mix_seed(1)
    storages = {
        "bf16 (stochastic rounding)": (eam.CastStorage(), jnp.bfloat16),
        "float8 (BlockwiseFloat8)": (eam.BlockwiseFloat8(min_size=0), jnp.float32),
        "8-bit tree (Blockwise8Bit)": (eam.Blockwise8Bit(min_size=0), jnp.float32),
    }
    cases = {"f32 EMA (yardstick)": _f32(x)}
    for name, (storage, dtype) in storages.items():
        stored = storage.write(storage.init(x, dtype, True), x, seed)
        write = jax.jit(lambda s, v, storage=storage: storage.write(s, v, seed))
        read = jax.jit(lambda s, storage=storage: storage.read(s))
        jax.block_until_ready((write(stored, x), read(stored)))
        cases[f"{name}: write"] = lambda w=write, s=stored: harness.timed(
            lambda: w(s, x)
        )
        cases[f"{name}: read"] = lambda r=read, s=stored: harness.timed(lambda: r(s))
    with harness.progress_bar(rounds * len(cases), "quantiser") as bar:
        times = harness.interleaved(cases, rounds, bar)
    data, rows = {}, []
    for name, t in times.items():
        s = harness.summary(t)
        data[name] = {"ns_per_element": 1e9 * s["median"] / n}
        rows.append([name, f"{1e9 * s['median'] / n:.2f}"])
    body = f"{n:,} elements, {rounds} interleaved rounds, medians.\n\n" + harness.table(
        ["operation", "ns per element"], rows
    )
    stem = harness.write_report(
        "quantiser", "Encoders and decoders", args, body, {"cases": data}, load_before
    )
    print(stem.with_suffix(".md").read_text())


def _f32(x):
    import jax

    ema = jax.jit(lambda m, g: 0.9 * m + 0.1 * g)
    ema(x, x).block_until_ready()
    return lambda: harness.timed(lambda: ema(x, x))


if __name__ == "__main__":
    main()
