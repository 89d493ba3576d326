"""The AdEMAMix paper's toy problem (its Figure 2): the Rosenbrock function
`f(x, y) = (1 - x)^2 + 100 (y - x^2)^2` minimised from `(-3, 5)`.

Adam with `b1` in {0.9, 0.99, 0.999} against AdEMAMix with `b1 = 0.9`,
`b2 = 0.999`, `alpha = 9` and `b3` in {0.999, 0.9999}, all with the same constant
learning rate and no warm-up schedules. A large `b1` alone makes Adam's iterates
overshoot and oscillate along the valley; AdEMAMix keeps the fast EMA (`b1 = 0.9`)
and adds a slow one, and gets to the minimum `(1, 1)` sooner.

Writes `rosenbrock.png` (trajectories over the contour, and the distance to the
optimum against steps) and `rosenbrock.json` (distances and summary) to
`--out-dir`.

    python examples/rosenbrock.py          # a few seconds on 2 CPU cores
    python examples/rosenbrock.py --help

The learning rate and the number of steps are this script's choices, not values
from the paper.
"""

import argparse
import json
import pathlib
import sys

import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float
from tqdm.auto import tqdm


START = (-3.0, 5.0)
OPTIMUM = (1.0, 1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Minimise the Rosenbrock function from (-3, 5) with Adam (b1 = 0.9, "
            "0.99, 0.999) and AdEMAMix (b3 = 0.999, 0.9999) and plot the paths."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=30_000, help="steps per run")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate")
    parser.add_argument("--alpha", type=float, default=9.0, help="AdEMAMix alpha")
    parser.add_argument(
        "--tol",
        type=float,
        default=1e-2,
        help="report the first step within this distance of (1, 1)",
    )
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=pathlib.Path("rosenbrock_out"),
        help="where the JSON and the PNG go",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lr <= 0:
        parser.error("--steps and --lr must be positive")
    return args


def rosenbrock(xy: Float[Array, "2"]) -> Float[Array, ""]:
    return (1 - xy[0]) ** 2 + 100 * (xy[1] - xy[0] ** 2) ** 2


def optimizers(args: argparse.Namespace) -> dict[str, optax.GradientTransformation]:
    out = {
        f"Adam b1={b1}": optax.adam(args.lr, b1=b1, b2=0.999)
        for b1 in (0.9, 0.99, 0.999)
    }
    for b3 in (0.999, 0.9999):
        out[f"AdEMAMix b3={b3}"] = eam.AdEMAMix(
            args.lr, b1=0.9, b2=0.999, b3=b3, alpha=args.alpha
        ).to_optax()
    return out


def trajectory(
    tx: optax.GradientTransformation, steps: int, bar: tqdm, chunks: int = 10
) -> np.ndarray:
    """The iterates of `steps` steps from START, as a `(steps + 1, 2)` array. The
    steps run inside `lax.scan`, in `chunks` pieces so the progress bar moves."""

    def run(xy, state, length):
        def body(carry, _):
            xy, state = carry
            updates, state = tx.update(jax.grad(rosenbrock)(xy), state, xy)
            xy = optax.apply_updates(xy, updates)
            return (xy, state), xy

        (xy, state), path = jax.lax.scan(body, (xy, state), length=length)
        return xy, state, path

    run = jax.jit(run, static_argnums=2)
    xy = jnp.asarray(START, jnp.float64)
    state = tx.init(xy)
    paths = [np.asarray(xy)[None]]
    done = 0
    while done < steps:
        size = min(-(-steps // chunks), steps - done)
        xy, state, path = run(xy, state, size)
        paths.append(np.asarray(path))
        done += size
        bar.update(size)
    return np.concatenate(paths)


def first_within(distance: np.ndarray, tol: float) -> int | None:
    hits = np.flatnonzero(distance < tol)
    return int(hits[0]) if hits.size else None


def plot(paths: dict[str, np.ndarray], tol: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.8))
    x, y = np.meshgrid(np.linspace(-4, 3, 400), np.linspace(-2, 10, 400))
    z = (1 - x) ** 2 + 100 * (y - x**2) ** 2
    ax1.contour(x, y, z, levels=np.logspace(-1, 4, 16), norm=LogNorm(), cmap="Greys")
    colors = ["C0", "C1", "C4", "C3", "C2"]
    for (name, p), color in zip(paths.items(), colors):
        style = "-" if name.startswith("AdEMAMix") else "--"
        ax1.plot(p[:, 0], p[:, 1], style, color=color, lw=1, label=name)
        d = np.linalg.norm(p - np.asarray(OPTIMUM), axis=1)
        ax2.semilogy(np.maximum(d, 1e-14), style, color=color, lw=1.2, label=name)
    ax1.plot(*START, "ko")
    ax1.plot(*OPTIMUM, "k*", ms=12)
    ax1.set_xlim(-4, 3)
    ax1.set_ylim(-2, 10)
    ax1.set_title("trajectories from (-3, 5)")
    ax1.legend(fontsize=8)
    ax2.axhline(tol, color="k", lw=0.8, ls=":")
    ax2.set_xlabel("step")
    ax2.set_ylabel("distance to (1, 1)")
    ax2.set_title("distance to the optimum")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    txs = optimizers(args)
    # float64, so that the distance to the optimum is not floored by float32 round-off
    # (the optimizers compute in the parameters' dtype).
    with (
        jax.enable_x64(True),
        tqdm(total=len(txs) * args.steps, unit="step", disable=args.no_progress) as bar,
    ):
        paths = {name: trajectory(tx, args.steps, bar) for name, tx in txs.items()}
    summary = {}
    for name, p in paths.items():
        d = np.linalg.norm(p - np.asarray(OPTIMUM), axis=1)
        summary[name] = {
            "final_point": p[-1].tolist(),
            "final_distance": float(d[-1]),
            "first_step_within_tol": first_within(d, args.tol),
        }
        hit = summary[name]["first_step_within_tol"]
        print(
            f"{name:>18}: distance {d[-1]:.2e} after {args.steps} steps; "
            f"within {args.tol:g} of (1, 1) "
            + (f"from step {hit}" if hit is not None else "never")
        )
    every = max(1, args.steps // 500)
    result = {
        "command": "python examples/rosenbrock.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "summary": summary,
        "distance_every": every,
        "distances": {
            name: np.linalg.norm(p[::every] - np.asarray(OPTIMUM), axis=1).tolist()
            for name, p in paths.items()
        },
    }
    (args.out_dir / "rosenbrock.json").write_text(json.dumps(result, indent=1))
    plot(paths, args.tol, args.out_dir / "rosenbrock.png")
    print(f"wrote rosenbrock.json and rosenbrock.png to {args.out_dir}")
    return result


if __name__ == "__main__":
    main()
