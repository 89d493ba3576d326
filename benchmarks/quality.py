"""Does low-precision state change what the optimizer does?

1. Bias: 20,000 steps (quick: 2,000) of a constant gradient; the slow EMA m2
   (b3 = 0.9999) and nu against their exact values (float64 formula).
2. Noise: gradients with a per-element signal of magnitude 0.02-0.2 and noise
   of standard deviation 1.0, b3 = 0.9999, 20,000 steps. The final update with
   each storage against the update with float32 state on the same gradients,
   per element; as a yardstick, float32 state on another draw of the noise
   (the EMA's own sampling noise).
3. Training: final training loss of `examples/quickstart.py`'s task with each
   storage against float32 state, same seeds and batches.
"""

import importlib.util
import sys

import harness


def storages():
    import eqx_ademamix as eam
    import jax.numpy as jnp

    return {
        "f32": {},
        "bf16": {"mu_dtype": jnp.bfloat16},
        "float8 (BlockwiseFloat8)": {"storage": eam.BlockwiseFloat8()},
        "8-bit tree (Blockwise8Bit)": {"storage": eam.Blockwise8Bit()},
    }


def final_state(kwargs, grad_fn, steps, n, lr=0.0):
    """State and last update after `steps` updates of gradients `grad_fn(t)`."""
    import eqx_ademamix as eam
    import jax

    opt = eam.AdEMAMix(lr, b3=0.9999, alpha=5.0, **kwargs)
    params = jax.numpy.zeros((n // 64, 64))

    @jax.jit
    def run():
        def body(carry, t):
            state, _ = carry
            update, state = opt.update(grad_fn(t), state, params)
            return (state, update), None

        init = (opt.init(params), params)
        return jax.lax.scan(body, init, jax.numpy.arange(steps))[0]

    state, update = run()

    def read(x):
        return x.decode() if isinstance(x, eam.AbstractEncodedArray) else x

    import numpy as np

    moments = {k: np.asarray(read(getattr(state, k)), np.float64) for k in ("m2", "nu")}
    return moments, np.asarray(update, np.float64)


def bias(steps, n):
    import jax
    import numpy as np

    k1, k2 = jax.random.split(jax.random.key(0))
    mag = jax.numpy.exp(jax.random.uniform(k1, (n // 64, 64), minval=-2.3, maxval=0))
    g = jax.numpy.where(jax.random.bernoulli(k2, 0.5, mag.shape), mag, -mag)
    g64 = np.asarray(g, np.float64)
    exact = {"m2": (1 - 0.9999**steps) * g64, "nu": (1 - 0.999**steps) * g64**2}
    out = {}
    for name, kwargs in storages().items():
        got, _ = final_state(kwargs, lambda t: g, steps, n)
        out[name] = {k: float(np.mean(got[k] / exact[k])) for k in exact}
    return out


def noise(steps, n):
    import jax
    import numpy as np

    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    mag = jax.random.uniform(k1, (n // 64, 64), minval=0.02, maxval=0.2)
    signal = jax.numpy.where(jax.random.bernoulli(k2, 0.5, mag.shape), mag, -mag)

    def grads(key):
        return lambda t: (
            signal + jax.random.normal(jax.random.fold_in(key, t), mag.shape)
        )

    ref_m, ref_u = final_state({}, grads(k3), steps, n, lr=1.0)

    def diff(m, u):
        return {
            "update": float(np.mean(np.abs(u - ref_u)) / np.mean(np.abs(ref_u))),
            "m2": float(
                np.mean(np.abs(m["m2"] - ref_m["m2"])) / np.mean(np.abs(ref_m["m2"]))
            ),
        }

    out = {
        "f32, other noise draw (yardstick)": diff(
            *final_state({}, grads(jax.random.key(9)), steps, n, lr=1.0)
        )
    }
    for name, kwargs in storages().items():
        if name != "f32":
            out[name] = diff(*final_state(kwargs, grads(k3), steps, n, lr=1.0))
    return out


def quickstart(seeds, progress):
    import equinox as eqx
    import eqx_ademamix as eam
    import jax
    import optax

    path = harness.ROOT / "examples" / "quickstart.py"
    spec = importlib.util.spec_from_file_location("_quickstart", path)
    qs = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = qs
    spec.loader.exec_module(qs)
    a = qs.parse_args([])
    (x, y), _ = qs.load_data()
    out = {}
    for seed in seeds:
        batches = qs.batch_indices(len(y), a.steps, a.batch_size, seed)
        key = jax.random.key(seed)
        model0 = eqx.nn.MLP(x.shape[1], 10, 128, 2, key=key)
        for name, kwargs in storages().items():
            lr = optax.warmup_cosine_decay_schedule(0.0, a.lr, a.steps // 10, a.steps)
            opt = eam.AdEMAMix(
                learning_rate=lr,
                alpha_scheduler=eam.alpha_scheduler(a.alpha, warmup=a.steps),
                b3_scheduler=eam.beta3_scheduler(a.b3, beta_start=0.9, warmup=a.steps),
                weight_decay=a.weight_decay,
                **kwargs,
            )
            model = model0
            state = opt.init(eqx.filter(model, eqx.is_inexact_array))
            for idx in batches:
                model, state, _ = qs.train_step(model, state, (x[idx], y[idx]), opt)
            loss, _ = qs.evaluate(model, x, y)
            out.setdefault(name, []).append(float(loss))
            progress.update(1)
    return out


def main(argv=None) -> None:
    p = harness.parser(__doc__)
    p.add_argument("--seeds", type=int, default=5, help="quickstart seeds")
    args = p.parse_args(argv)
    load_before = harness.load_average()
    steps, n = (500, 4096) if args.quick else (20_000, 16384)
    seeds = range(1 if args.quick else args.seeds)
    b = bias(steps, n)
    z = noise(steps, n)
    with harness.progress_bar(len(seeds) * len(storages()), "quickstart") as bar:
        q = quickstart(seeds, bar)
    rows_b = [[k, f"{v['m2']:.4f}", f"{v['nu']:.4f}"] for k, v in b.items()]
    rows_z = [
        [k, f"{100 * v['update']:.1f}%", f"{100 * v['m2']:.1f}%"] for k, v in z.items()
    ]
    rows_q = []
    for k, losses in q.items():
        rel = [lo / r - 1 for lo, r in zip(losses, q["f32"])]
        rows_q.append(
            [
                k,
                " ".join(f"{x:.4f}" for x in losses),
                " ".join(f"{100 * r:+.1f}%" for r in rel),
            ]
        )
    body = "\n\n".join(
        [
            f"## Bias: constant gradient, {steps:,} steps\n\nMean of stored / exact "
            f"over {n:,} elements (1 = unbiased).\n\n"
            + harness.table(["storage", "m2 (b3 = 0.9999)", "nu (b2 = 0.999)"], rows_b),
            f"## Noise: signal 0.02-0.2, noise 1.0, {steps:,} steps\n\nMean absolute "
            "difference per element from float32 state's final update (and m2), "
            "relative to float32's mean magnitude.\n\n"
            + harness.table(["storage", "final update", "m2"], rows_z),
            "## Training: quickstart, final training loss\n\n"
            + harness.table(["storage", "loss per seed", "vs f32 per seed"], rows_q),
        ]
    )
    stem = harness.write_report(
        "quality",
        "Quality of low-precision state",
        args,
        body,
        {"steps": steps, "bias": b, "noise": z, "quickstart": q},
        load_before,
    )
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
