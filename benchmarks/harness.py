"""What every benchmark script shares: the optimizer variants, the workloads,
interleaved timing with paired ratios, the environment (load average before and
after), state bytes per parameter, and a report written as Markdown + JSON.

Each script answers one question (`step_time.py`, `compile_time.py`,
`dispatch.py`, `memory.py`, `quantiser.py`, `quality.py`) and writes
`benchmarks/results/<name>.md` and `.json`. Targets live in `targets.py`, which
reads the JSON; no report here judges its numbers.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


# ------------------------------------------------------------------ variants


def variants() -> dict[str, Callable[[Any], Any]]:
    """name -> factory(learning_rate) of an optax.GradientTransformation. The
    first is the reference every ratio is taken against."""
    import eqx_ademamix as eam
    import jax.numpy as jnp
    import optax

    def ours(**kw):
        return lambda lr: eam.AdEMAMix(lr, **kw).to_optax()

    return {
        "optax f32": lambda lr: optax.contrib.ademamix(lr),
        "f32": ours(),
        "bf16": ours(mu_dtype=jnp.bfloat16),
        "bf16 round-to-nearest": ours(
            mu_dtype=jnp.bfloat16, storage=eam.CastStorage(stochastic_rounding=False)
        ),
        "float8 (BlockwiseFloat8)": ours(storage=eam.BlockwiseFloat8()),
        "8-bit tree (Blockwise8Bit)": ours(storage=eam.Blockwise8Bit()),
    }


# ------------------------------------------------------------------ workloads


def large_shapes(quick: bool) -> dict:
    """8 leaves of 2048 x 2048: 33,554,432 parameters (quick: 8 x 128 x 128)."""
    n = 128 if quick else 2048
    return {f"w{i}": (n, n) for i in range(8)}


def gpt_shapes(quick: bool) -> dict:
    """A GPT-like decoder: 6 blocks of width 384 (fused qkv, 10 leaves a block),
    an 8192-token embedding and 1024 positions: 62 leaves, 14.2M parameters
    (quick: width 32, 1 block, 12 leaves)."""
    d, layers, vocab, ctx = (32, 1, 64, 16) if quick else (384, 6, 8192, 1024)
    block = {
        "ln1": {"scale": (d,), "bias": (d,)},
        "qkv": (d, 3 * d),
        "proj": (d, d),
        "ln2": {"scale": (d,), "bias": (d,)},
        "fc": {"weight": (d, 4 * d), "bias": (4 * d,)},
        "out": {"weight": (4 * d, d), "bias": (d,)},
    }
    blocks = [block for _ in range(layers)]
    return {"tok_embed": (vocab, d), "pos_embed": (ctx, d), "blocks": blocks}


def tiny_shapes(quick: bool) -> dict:
    """300 leaves of 16 floats (quick: 30)."""
    return {f"p{i:03d}": (16,) for i in range(30 if quick else 300)}


def is_shape(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def materialise(shapes: Any, seed: int = 0) -> tuple[Any, Any]:
    """`(params, grads)` of these shapes: float32, deterministic, not constant."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
    params, grads = [], []
    for i, shape in enumerate(leaves):
        key = jax.random.key(seed * 1000 + i)
        params.append(0.02 * jax.random.normal(key, shape, jnp.float32))
        grads.append(jax.random.normal(jax.random.fold_in(key, 1), shape))
    return treedef.unflatten(params), treedef.unflatten(grads)


def count_params(tree: Any) -> int:
    import jax

    return sum(x.size for x in jax.tree.leaves(tree))


def state_bytes(state: Any) -> int:
    """Bytes of every array (or abstract `jax.ShapeDtypeStruct`) in `state`."""
    import jax
    import numpy as np

    return sum(
        int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(state)
        if hasattr(x, "shape") and hasattr(x, "dtype")
    )


def bytes_moved_per_param(state_per_param: float, param_bytes: int = 4) -> float:
    """The bytes a memory-bound step reads and writes per parameter: the
    parameter (read, write), the gradient (read) and the state (read, write).
    On a GPU, where the step is memory-bound, time scales with this."""
    return 3 * param_bytes + 2 * state_per_param


# ------------------------------------------------------------------ timing


def donated_step(tx: Any) -> Callable:
    """`step(params, state, grads) -> (params, state)`, jitted, the parameters
    and state donated (as a training loop runs it)."""
    import jax
    import optax

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def time_steps(
    shapes: Any, rounds: int, steps: int, desc: str, extra: dict | None = None
) -> tuple[dict, dict, int, int]:
    """Interleaved timing of a donated step of every variant on `shapes`:
    `(times per round in seconds per step, {name: bytes per parameter},
    parameter count, leaf count)`. `extra`: more variants, as `variants()`."""
    import jax

    params, grads = materialise(shapes)
    n = count_params(params)
    cases, info = {}, {}
    for name, make in {**variants(), **(extra or {})}.items():
        tx = make(1e-3)
        step = donated_step(tx)
        carry = [jax.tree.map(lambda x: x.copy(), params), None]
        carry[1] = tx.init(carry[0])
        per_param = (state_bytes(carry[1]) - 8) / n  # minus the two counters
        carry[0], carry[1] = step(carry[0], carry[1], grads)  # compile, warm up

        def run(step=step, carry=carry):
            def go():
                for _ in range(steps):
                    carry[0], carry[1] = step(carry[0], carry[1], grads)
                return carry

            return timed(go) / steps

        cases[name] = run
        info[name] = {
            "state_bytes_per_param": per_param,
            "bytes_moved_per_param": bytes_moved_per_param(per_param),
        }
    with progress_bar(rounds * len(cases), desc) as bar:
        times = interleaved(cases, rounds, bar)
    return times, info, n, len(jax.tree.leaves(params))


def interleaved(
    cases: dict[str, Callable[[], float]], rounds: int, progress: Any = None
) -> dict[str, list[float]]:
    """Run every case once per round, in an order that rotates from round to
    round, and collect its time (seconds): slow drifts of the machine then hit
    every case alike, and per-round ratios pair cases measured seconds apart."""
    names = list(cases)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(cases[name]())
            if progress is not None:
                progress.update(1)
    return times


def paired_ratio(times: dict[str, list[float]], ref: str, name: str) -> dict:
    """Speed of `name` relative to `ref` (ref's time / name's time) per round:
    median and the range of the middle half."""
    ratios = sorted(a / b for a, b in zip(times[ref], times[name]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": statistics.median(ratios), "q1": q[0], "q3": q[-1]}


def summary(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[-1]}


def progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


# ------------------------------------------------------------------ reports


def environment() -> dict:
    import jax

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M"
        ),
        "commit": commit,
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds")
    p.add_argument("--out", type=pathlib.Path, default=None, help="report stem")
    return p


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(
    name: str,
    title: str,
    args: argparse.Namespace,
    body: str,
    data: dict,
    load_before: list[float],
) -> pathlib.Path:
    """`<out>.md` (title, command, environment, load before and after, body) and
    `<out>.json` (the same data); `out` defaults to `benchmarks/results/<name>`."""
    env = environment()
    load_after = load_average()
    stem = args.out if args.out is not None else RESULTS / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/" + name + ".py " + " ".join(sys.argv[1:])
    text = [
        f"# {title}",
        "",
        f"Command: `{command.strip()}`",
        "",
        f"Taken {env['date_utc']} UTC at commit {env['commit']} on {env['backend']} "
        f"({env['cpu_count']} CPUs, {env['machine']}), JAX {env['jax']}, "
        f"Python {env['python']}. Load average (1, 5, 15 min) before: "
        f"{load_before}, after: {load_after}"
        + (
            " (the machine was shared: other jobs ran)."
            if max(load_before[0], load_after[0]) > 1.2
            else " (idle)."
        ),
        "",
        body.strip(),
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(text))
    payload = {
        "environment": env,
        "load_before": load_before,
        "load_after": load_after,
        "command": command.strip(),
        **data,
    }
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    return stem


def timed(fn: Callable[[], Any]) -> float:
    """Seconds `fn()` takes, its result waited for."""
    import jax

    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t
