"""Blockwise 8-bit AdEMAMix state (`eqx_ademamix.Blockwise8Bit`): memory, speed,
quality. Writes `benchmarks/RESULTS-8bit.md` and its plots.

    python benchmarks/quantized.py              # everything (~30-60 min on 2 cores)
    python benchmarks/quantized.py --quick      # a smoke test of every section
    python benchmarks/quantized.py --char-lm-steps 0   # skip the language model

Sections:

1. State bytes per parameter on the 33.5M-parameter workload of
   `benchmarks/run.py` (8 leaves of 2048 x 2048), against float32 state.
2. Step time against `optax.contrib.ademamix` in float32, both jitted with the
   parameters and the state donated. Interleaved rounds (every round runs every
   implementation in a fresh random order); ratios are medians of per-round
   ratios, so load from other processes on the machine cancels out.
3. The quantizer alone: the O(1) inversion of the code book against a binary
   search (`jnp.searchsorted`), stochastic against nearest rounding, and reading.
4. Does m1 need stochastic rounding? m1's EMA (b1 = 0.9) with nearest and with
   stochastic rounding against float64, in the situations where rounding matters.
5. Quality on `examples/quickstart.py`'s task: float32 and 8-bit AdEMAMix, same
   seeds, same batches; final training loss, plot of both curves.
6. Quality on `examples/char_lm.py` (if present): its own training loop and
   settings, with an "AdEMAMix 8-bit" run added next to its AdEMAMix run.
"""

import argparse
import datetime
import functools
import importlib.util
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import time
import types


HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
LR, B1, B2, B3, ALPHA, EPS, WD = 1e-3, 0.9, 0.999, 0.9999, 5.0, 1e-8, 0.01
SECTIONS = ("workload", "quantizer", "m1", "quickstart", "char_lm")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, seconds")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="quickstart"
    )
    parser.add_argument(
        "--char-lm-steps",
        type=int,
        default=2000,
        help="steps of the char-LM runs (its default); 0 skips it",
    )
    parser.add_argument(
        "--char-lm-seeds", type=int, nargs="+", default=[0, 1], help="char-LM seeds"
    )
    parser.add_argument(
        "--sections",
        nargs="*",
        choices=SECTIONS,
        default=list(SECTIONS),
        help="sections to run; the others are taken from the JSON file of an earlier "
        "run (next to --out), if there is one",
    )
    parser.add_argument("--out", type=pathlib.Path, default=None, help="results file")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.seeds = 2, 1, args.seeds[:2]
        args.char_lm_steps = min(args.char_lm_steps, 40)
        args.char_lm_seeds = args.char_lm_seeds[:1]
    if args.out is None:
        args.out = HERE / ("RESULTS-8bit-quick.md" if args.quick else "RESULTS-8bit.md")
    return args


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def nbytes(tree) -> int:
    import jax

    return sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))


def interleaved(fns: dict, rounds: int, steps: int, progress) -> dict:
    """Seconds per call of each `fn(carry) -> carry` (first call excluded), measured in
    interleaved rounds. Returns per-name lists of per-round medians."""
    rng = random.Random(0)
    out = {name: [] for name in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            make, fn = fns[name]
            carry = block(fn(make()))  # warm-up (and compile on the first round)
            samples = []
            for _ in range(steps):
                t0 = time.perf_counter()
                carry = block(fn(carry))
                samples.append(time.perf_counter() - t0)
            del carry
            out[name].append(statistics.median(samples))
            progress.update(1)
    return out


def ratio(rounds: dict, a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))


# ---------------------------------------------------------------------------------
# 1-2. Memory and step time on the 33.5M workload.


def bench_workload(args, progress) -> dict:
    import equinox as eqx
    import eqx_ademamix as eam
    import jax
    import jax.numpy as jnp
    import optax

    n = 128 if args.quick else 2048
    shapes = {f"w{i}": (n, n) for i in range(8)}
    keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
    params = {
        k: jax.random.normal(keys[i], s) for i, (k, s) in enumerate(shapes.items())
    }
    grads = {
        k: 1e-2 * jax.random.normal(keys[len(shapes) + i], s)
        for i, (k, s) in enumerate(shapes.items())
    }
    n_params = sum(x.size for x in jax.tree.leaves(params))
    hyper = dict(b1=B1, b2=B2, b3=B3, alpha=ALPHA, eps=EPS, weight_decay=WD)
    quantized = eam.Blockwise8Bit()
    txs = {
        "optax.contrib.ademamix f32": optax.contrib.ademamix(LR, **hyper),
        "eqx_ademamix f32": eam.AdEMAMix(LR, **hyper).to_optax(),
        "eqx_ademamix bf16 m1/m2": eam.AdEMAMix(
            LR, **hyper, mu_dtype=jnp.bfloat16
        ).to_optax(),
        "eqx_ademamix 8-bit": eam.AdEMAMix(LR, **hyper, quantized=quantized).to_optax(),
    }
    result = {"n_params": n_params, "bytes": {}, "first_call": {}}
    fns = {}
    for name, tx in txs.items():

        def step(p, s, g, tx=tx):  # gradients an argument, not a constant
            u, s = tx.update(g, s, p)
            return eqx.apply_updates(p, u), s

        jitted = jax.jit(step, donate_argnums=(0, 1))

        def make(tx=tx):
            p = jax.tree.map(jnp.copy, params)
            return p, tx.init(p)

        state = jax.eval_shape(tx.init, params)
        result["bytes"][name] = sum(
            x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
        )
        t0 = time.perf_counter()
        block(jitted(*make(), grads))
        result["first_call"][name] = time.perf_counter() - t0
        fns[name] = (make, lambda c, f=jitted: f(*c, grads))
    result["rounds"] = interleaved(fns, args.rounds, args.steps, progress)
    return result


# ---------------------------------------------------------------------------------
# 3. The quantizer alone.


def bench_quantizer(args, progress) -> dict:
    import jax
    import jax.numpy as jnp
    from eqx_ademamix.internal import (
        dequantize_blocks,
        hash_bits,
        mix_seed,
        quantize_blocks,
    )

    rows = 512 if args.quick else 32768  # 8.4M elements
    x = jax.random.normal(jax.random.key(0), (rows, 256))
    codes, absmax = quantize_blocks(x, True, None)

    # Every function takes its data as arguments (no constants for the compiler to
    # fold), returns its full outputs (nothing to drop), and a counter that changes
    # the input at every call.
    def q(search, stochastic):
        @jax.jit
        def f(t, x, codes, absmax):
            bits = hash_bits(x.shape, mix_seed(t)) if stochastic else None
            y = x + t.astype(jnp.float32)
            return t + 1, quantize_blocks(y, True, bits, search=search)

        return f

    @jax.jit
    def read(t, x, codes, absmax):
        return t + 1, dequantize_blocks(codes, absmax + t.astype(jnp.float32), True)

    @jax.jit
    def f32_ema(t, x, codes, absmax):
        # the float32 floor: read, one EMA, write, for the same number of elements
        return t + 1, 0.9 * x + 0.1 * t.astype(jnp.float32)

    fns = {
        "quantize, O(1) inversion, stochastic": q(False, True),
        "quantize, O(1) inversion, nearest": q(False, False),
        "quantize, binary search, stochastic": q(True, True),
        "quantize, binary search, nearest": q(True, False),
        "dequantize": read,
        "float32 EMA (reference)": f32_ema,
    }
    fns = {
        k: (
            lambda: (jnp.zeros((), jnp.uint32), None),
            lambda c, f=f: f(c[0], x, codes, absmax),
        )
        for k, f in fns.items()
    }
    rounds = interleaved(fns, args.rounds, max(args.steps, 3), progress)
    return {"elements": rows * 256, "rounds": rounds}


# ---------------------------------------------------------------------------------
# 4. m1: nearest or stochastic rounding?


def bench_m1(args, progress) -> dict:
    """m1's EMA (b1 = 0.9) stored in 8 bits, with each rounding, against the same
    EMA in float32 (its rounding errors are ~1e-7, far below what is measured).

    - noisy: gradients mean + 3 * noise, per-element means spread over a decade;
      reference: the same EMA in float64 on the same gradients.
    - steady outlier: one element per block has a constant gradient 10 and starts
      at its converged value; the others see constant gradients in [0.1, 1] from 0.
      The block's scale holds still while they move: the case where
      round-to-nearest drops increments.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from eqx_ademamix.internal import (
        dequantize_blocks,
        hash_bits,
        mix_seed,
        quantize_blocks,
    )

    n, steps, b1 = 4096, (200 if args.quick else 2000), 0.9
    k1, k2, k3 = jax.random.split(jax.random.key(42), 3)
    magnitude = jnp.exp(jax.random.uniform(k1, (n,), minval=-np.log(10), maxval=0))
    mean = jnp.where(jax.random.bernoulli(k2, 0.5, (n,)), magnitude, -magnitude)
    outliers = jnp.arange(n) % 256 == 0

    def scenario(name):
        if name == "noisy":
            m0 = jnp.zeros(n)

            def grad(t):
                return mean + 3 * jax.random.normal(jax.random.fold_in(k3, t), (n,))
        else:
            m0 = jnp.where(outliers, 10.0, 0.0)

            def grad(t):
                return jnp.where(outliers, 10.0, mean)

        return m0, grad

    def run(name, stochastic):
        m0, grad = scenario(name)

        @jax.jit
        def go():
            def body(carry, t):
                codes, absmax, exact = carry
                m = dequantize_blocks(codes, absmax, True).reshape(-1)
                g = grad(t)
                m = b1 * m + (1 - b1) * g
                exact = b1 * exact + (1 - b1) * g
                bits = hash_bits((n // 256, 256), mix_seed(t)) if stochastic else None
                codes, absmax = quantize_blocks(m.reshape(-1, 256), True, bits)
                return (codes, absmax, exact), None

            codes, absmax = quantize_blocks(m0.reshape(-1, 256), True, None)
            (codes, absmax, exact), _ = jax.lax.scan(
                body, (codes, absmax, m0), jnp.arange(steps)
            )
            return dequantize_blocks(codes, absmax, True).reshape(-1), exact

        got, exact = (np.asarray(a, np.float64) for a in go())
        keep = ~np.asarray(outliers)
        got, exact = got[keep], exact[keep]
        progress.update(1)
        return {
            "mean_ratio": float(np.sum(got * exact) / np.sum(exact**2)),
            "relative_error": float(
                np.linalg.norm(got - exact) / np.linalg.norm(exact)
            ),
        }

    return {
        f"{name}, {rounding}": run(name, rounding == "stochastic")
        for name in ("noisy", "steady outlier")
        for rounding in ("nearest", "stochastic")
    }


# ---------------------------------------------------------------------------------
# 5. Quickstart.


def load_example(name: str) -> types.ModuleType | None:
    path = ROOT / "examples" / f"{name}.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(f"_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def quickstart_optimizer(qs, args, quantized):
    """AdEMAMix exactly as `examples/quickstart.py`'s `main` builds it (checked
    against its output in `bench_quickstart`), with or without 8-bit state."""
    import eqx_ademamix as eam
    import optax

    b1 = 0.9
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 10, args.steps)
    return eam.AdEMAMix(
        learning_rate=lr,
        b1=b1,
        b2=0.999,
        alpha_scheduler=eam.alpha_scheduler(args.alpha, warmup=args.steps),
        b3_scheduler=eam.beta3_scheduler(args.b3, beta_start=b1, warmup=args.steps),
        weight_decay=args.weight_decay,
        quantized=quantized,
    )


def bench_quickstart(args, progress) -> dict:
    import equinox as eqx
    import eqx_ademamix as eam
    import jax
    import numpy as np

    qs = load_example("quickstart")
    if qs is None:
        return {"missing": True}
    qargs = qs.parse_args([])
    data = qs.load_data()
    (x_train, y_train), (x_test, y_test) = data
    out = {"steps": qargs.steps, "seeds": list(args.seeds), "runs": {}}
    for seed in args.seeds:
        batches = qs.batch_indices(len(y_train), qargs.steps, qargs.batch_size, seed)
        model0 = eqx.nn.MLP(
            in_size=x_train.shape[1],
            out_size=10,
            width_size=128,
            depth=2,
            key=jax.random.key(seed),
        )
        for label, quantized in (("float32", None), ("8-bit", eam.Blockwise8Bit())):
            opt = quickstart_optimizer(qs, qargs, quantized)
            model = model0
            state = opt.init(eqx.filter(model, eqx.is_inexact_array))
            losses = []
            for idx in batches:
                model, state, loss = qs.train_step(
                    model, state, (x_train[idx], y_train[idx]), opt
                )
                losses.append(loss)
            train_loss, _ = qs.evaluate(model, x_train, y_train)
            test_loss, test_acc = qs.evaluate(model, x_test, y_test)
            out["runs"][f"{label} seed {seed}"] = {
                "curve": [float(x) for x in losses],
                "train_loss": float(train_loss),
                "test_loss": float(test_loss),
                "test_accuracy": float(test_acc),
            }
            if label == "8-bit":  # the large weights are stored in 8 bits
                leaves = jax.tree.leaves(
                    state.m2, is_leaf=lambda x: isinstance(x, eam.Blockwise8BitArray)
                )
                assert any(isinstance(x, eam.Blockwise8BitArray) for x in leaves)
            progress.update(1)
    # The float32 run must be the quickstart's own AdEMAMix run.
    own = qs.main(["--seed", str(args.seeds[0])])["AdEMAMix"]["train_loss"]
    mine = out["runs"][f"float32 seed {args.seeds[0]}"]["train_loss"]
    out["matches_quickstart_main"] = bool(np.isclose(own, mine, rtol=1e-5))
    out["quickstart_main_train_loss"] = own
    return out


def plot_quickstart(res: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    window = 10
    kernel = np.ones(window) / window

    def smooth(label):
        curves = [res["runs"][f"{label} seed {s}"]["curve"] for s in res["seeds"]]
        return np.array([np.convolve(c, kernel, mode="valid") for c in curves])

    f32, q8 = smooth("float32"), smooth("8-bit")
    steps = np.arange(window, f32.shape[1] + window)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for curves, label, style in ((f32, "float32", "-"), (q8, "8-bit", "--")):
        color = "C0" if label == "float32" else "C3"
        axes[0].plot(
            steps, curves.mean(0), style, color=color, label=f"AdEMAMix, {label} state"
        )
        axes[0].fill_between(
            steps, curves.min(0), curves.max(0), color=color, alpha=0.15, lw=0
        )
    axes[0].set_yscale("log")
    axes[0].set_ylabel("training loss (10-step mean)")
    axes[0].set_title(f"mean and range over seeds {res['seeds']}")
    axes[0].legend()
    for i, seed in enumerate(res["seeds"]):
        axes[1].plot(steps, q8[i] / f32[i] - 1, lw=1, label=f"seed {seed}")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_ylabel("8-bit / float32 - 1 (10-step mean loss)")
    axes[1].set_title("relative difference, same seed and batches")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("examples/quickstart.py task: float32 vs blockwise 8-bit state")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------
# 6. The char-level language model.

NAME_8BIT = "AdEMAMix 8-bit"


def bench_char_lm(args) -> dict:
    import eqx_ademamix as eam

    lm = load_example("char_lm")
    if lm is None:
        return {"missing": True}
    if args.char_lm_steps <= 0:
        return {"skipped": True}
    original = lm.make_optimizer

    def make_optimizer(name, run_args):
        # The example's own AdEMAMix, built with 8-bit state: its constructor is
        # looked up through the module's `eam`, swapped for the duration.
        if name != NAME_8BIT:
            return original(name, run_args)
        shim = types.SimpleNamespace(**{k: getattr(eam, k) for k in eam.__all__})
        shim.AdEMAMix = functools.partial(eam.AdEMAMix, quantized=eam.Blockwise8Bit())
        lm.eam = shim
        try:
            return original("AdEMAMix", run_args)
        finally:
            lm.eam = eam

    lm.make_optimizer = make_optimizer
    lm.OPTIMIZERS = ("AdamW", "AdEMAMix", NAME_8BIT)
    with tempfile.TemporaryDirectory() as out_dir:
        argv = ["--steps", str(args.char_lm_steps), "--seeds"]
        argv += [str(s) for s in args.char_lm_seeds]
        if args.quick:
            argv += ["--eval-every", "20", "--max-corpus-mb", "1"]
            argv += ["--eval-batches", "2"]
        shown = [*argv, "--optimizers", "AdamW", "AdEMAMix"]
        result = lm.main([*argv, "--optimizers", *lm.OPTIMIZERS, "--out-dir", out_dir])
        lm.plot(
            [lm.Run(**r) for r in result["runs"]],
            list(lm.OPTIMIZERS),
            args.char_lm_seeds,
            HERE / ("char_lm-8bit-quick.png" if args.quick else "char_lm-8bit.png"),
        )
    result["argv"] = shown
    return result


# ---------------------------------------------------------------------------------
# Report.


def environment() -> list[str]:
    from importlib.metadata import version

    return [
        f"- {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical "
        f"cores, shared with other jobs (hence interleaved timing and ratios)",
        f"- Python {platform.python_version()}; jax {version('jax')}, "
        f"equinox {version('equinox')}, optax {version('optax')}",
    ]


def report(args, res: dict) -> str:
    lines = [
        "# Blockwise 8-bit AdEMAMix state: results",
        "",
        "Written by `benchmarks/quantized.py` (see its docstring for what each "
        "section measures). The commands that produced the sections:",
        "",
        *sorted(
            {
                f"- `{c}`: "
                + ", ".join(k for k in SECTIONS if res["commands"].get(k) == c)
                for c in res["commands"].values()
            }
        ),
        "",
        *environment(),
        "",
    ]
    for name, render in (
        ("workload", report_workload),
        ("quantizer", report_quantizer),
        ("m1", report_m1),
        ("quickstart", report_quickstart),
        ("char_lm", report_char_lm),
    ):
        lines += [""]
        if name in res:
            lines += render(args, res)
        else:
            lines += [f"## {name}", "", "Not run yet."]
    return "\n".join(lines) + "\n"


def report_workload(args, res: dict) -> list[str]:
    w = res["workload"]
    n = w["n_params"]
    f32 = w["bytes"]["eqx_ademamix f32"]
    lines = [
        f"## Memory: state bytes per parameter ({n / 1e6:.1f}M parameters, 8 leaves)",
        "",
        "| state | bytes | bytes / parameter | vs float32 |",
        "|---|---:|---:|---:|",
    ]
    for name, b in w["bytes"].items():
        lines.append(f"| {name} | {b:,} | {b / n:.3f} | {b / f32:.3f}x |")
    lines += [
        "",
        "8-bit: one byte per element and moment, plus one float32 absmax per block "
        "of 256 (3 x 4 / 256 = 0.047 B), plus the two int32 counters.",
        "",
        "## Step time (jitted, parameters and state donated)",
        "",
        "| implementation | median s/step | vs optax.contrib.ademamix f32 "
        "(paired) | first call s |",
        "|---|---:|---:|---:|",
    ]
    base = "optax.contrib.ademamix f32"
    for name, rounds in w["rounds"].items():
        lines.append(
            f"| {name} | {statistics.median(rounds):.4f} | "
            f"{ratio(w['rounds'], name, base):.2f}x | {w['first_call'][name]:.1f} |"
        )
    return lines


def report_quantizer(args, res: dict) -> list[str]:
    q = res["quantizer"]
    e = q["elements"]
    ref = "float32 EMA (reference)"
    lines = [
        f"## The quantizer alone ({e / 1e6:.1f}M elements, one moment)",
        "",
        "| operation | ns / element | vs float32 EMA |",
        "|---|---:|---:|",
    ]
    for name, rounds in q["rounds"].items():
        lines.append(
            f"| {name} | {statistics.median(rounds) / e * 1e9:.2f} | "
            f"{ratio(q['rounds'], name, ref):.1f}x |"
        )
    r = q["rounds"]
    lines += [
        "",
        "O(1) inversion vs binary search (stochastic rounding): "
        f"{ratio(r, 'quantize, binary search, stochastic', 'quantize, O(1) inversion, stochastic'):.2f}x "  # noqa: E501
        "faster. Stochastic vs nearest rounding (O(1)): "
        f"{ratio(r, 'quantize, O(1) inversion, stochastic', 'quantize, O(1) inversion, nearest'):.2f}x "  # noqa: E501
        "the time.",
        "",
    ]
    return lines


def report_m1(args, res: dict) -> list[str]:
    lines = [
        "## Does m1 need stochastic rounding?",
        "",
        "m1's EMA (b1 = 0.9) in 8 bits against the same EMA in float32 on the same "
        "gradients (4096 elements; the block maxima excluded). `mean ratio`: the "
        "component of the 8-bit m1 along the exact one, relative to its size "
        "(1 = unbiased).",
        "",
        "| scenario, rounding | mean ratio | relative error |",
        "|---|---:|---:|",
    ]
    for name, v in res["m1"].items():
        lines.append(f"| {name} | {v['mean_ratio']:.3f} | {v['relative_error']:.3f} |")
    return lines


def report_quickstart(args, res: dict) -> list[str]:
    qs = res["quickstart"]
    lines = ["## Quality: `examples/quickstart.py`", ""]
    if qs.get("missing"):
        lines.append("`examples/quickstart.py` does not exist.")
    else:
        lines += [
            f"The quickstart's AdEMAMix (its defaults: {qs['steps']} steps, its "
            "schedules), float32 state against 8-bit state, same initialisation and "
            "batches per seed. Final loss: the training-set loss after the last step "
            "(the quickstart's `train loss`). The float32 run reproduces "
            "`examples/quickstart.py`'s own output: "
            f"{'yes' if qs['matches_quickstart_main'] else 'NO'} "
            f"({qs['quickstart_main_train_loss']:.5f} for seed {qs['seeds'][0]}).",
            "",
            "| seed | float32 train loss | 8-bit train loss | 8-bit / float32 | "
            "float32 test acc | 8-bit test acc |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        rel = []
        for s in qs["seeds"]:
            a, b = qs["runs"][f"float32 seed {s}"], qs["runs"][f"8-bit seed {s}"]
            rel.append(b["train_loss"] / a["train_loss"])
            lines.append(
                f"| {s} | {a['train_loss']:.5f} | {b['train_loss']:.5f} | "
                f"{rel[-1]:.4f} | {a['test_accuracy']:.2%} | {b['test_accuracy']:.2%} |"
            )
        mean_a = statistics.mean(
            qs["runs"][f"float32 seed {s}"]["train_loss"] for s in qs["seeds"]
        )
        mean_b = statistics.mean(
            qs["runs"][f"8-bit seed {s}"]["train_loss"] for s in qs["seeds"]
        )
        lines += [
            "",
            f"Mean over seeds: float32 {mean_a:.5f}, 8-bit {mean_b:.5f} "
            f"({mean_b / mean_a - 1:+.2%}); per seed from {min(rel) - 1:+.2%} to "
            f"{max(rel) - 1:+.2%}.",
            "",
            f"![quickstart curves]({'quickstart-8bit-quick.png' if args.quick else 'quickstart-8bit.png'})",  # noqa: E501
        ]
    return lines


def report_char_lm(args, res: dict) -> list[str]:
    lm = res["char_lm"]
    lines = ["## Quality: `examples/char_lm.py`", ""]
    if lm.get("missing"):
        lines.append("`examples/char_lm.py` does not exist yet: not run.")
    elif lm.get("skipped"):
        lines.append("Skipped (`--char-lm-steps 0`).")
    else:
        summary = lm["summary"]
        lines += [
            "The example's own training loop, data, model and settings "
            f"(`python examples/char_lm.py {' '.join(lm['argv'])}`), with an "
            "`AdEMAMix 8-bit` run: the example's AdEMAMix built with "
            "`quantized=eam.Blockwise8Bit()`.",
            f"{lm['parameters']:,} parameters; {lm['minutes']:.1f} min for all runs.",
            "",
            "| optimizer | final val loss (mean) | per seed |",
            "|---|---:|---|",
        ]
        for name, s in summary.items():
            lines.append(
                f"| {name} | {s['final_val_loss_mean']:.4f} | "
                + ", ".join(f"{x:.4f}" for x in s["final_val_loss_per_seed"])
                + " |"
            )
        a = summary["AdEMAMix"]["final_val_loss_mean"]
        b = summary[NAME_8BIT]["final_val_loss_mean"]
        lines += [
            "",
            f"8-bit / float32 final validation loss: {b / a:.4f} ({b / a - 1:+.2%}).",
            "",
            f"![char-LM curves]({'char_lm-8bit-quick.png' if args.quick else 'char_lm-8bit.png'})",  # noqa: E501
        ]
    return lines


def main(argv=None) -> dict:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    json_path = args.out.with_suffix(".json")
    run = set(args.sections)
    res = {}
    total = (
        4 * args.rounds * ("workload" in run)
        + 6 * args.rounds * ("quantizer" in run)
        + 4 * ("m1" in run)
        + 2 * len(args.seeds) * ("quickstart" in run)
    )
    with tqdm(total=total, unit="task", desc="8-bit benchmarks") as progress:
        for name, fn in (
            ("workload", bench_workload),
            ("quantizer", bench_quantizer),
            ("m1", bench_m1),
            ("quickstart", bench_quickstart),
        ):
            if name in run:
                res[name] = fn(args, progress)
    if "char_lm" in run:
        res["char_lm"] = bench_char_lm(args)
    command = "python benchmarks/quantized.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    # Merge into the results of earlier runs (read now, not at the start: another
    # invocation may have written other sections meanwhile).
    merged = json.loads(json_path.read_text()) if json_path.exists() else {}
    merged.update(res)
    merged.setdefault("commands", {}).update({name: command.strip() for name in run})
    res = merged
    json_path.write_text(json.dumps(res, indent=1, default=str))
    if "quickstart" in res and not res["quickstart"].get("missing"):
        png = "quickstart-8bit-quick.png" if args.quick else "quickstart-8bit.png"
        plot_quickstart(res["quickstart"], HERE / png)
    text = report(args, res)
    args.out.write_text(text)
    print(text)
    print(f"wrote {args.out} and {json_path}")
    return res


if __name__ == "__main__":
    main()
