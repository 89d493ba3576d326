"""A byte-level language model on the Python standard library's own source code:
AdamW vs AdEMAMix vs Simplified AdEMAMix.

The corpus is the `.py` files of the running interpreter's standard library (no
download; test suites and vendored packages left out). Whole files are held out
for validation (every 10th file in sorted order). The model is a small
decoder-only transformer written with Equinox.

All three optimizers train the same model from the same initialisation on the
same batches (per seed), with the same learning-rate warm-up and cosine decay,
weight decay, gradient clipping, `b1 = 0.9` and `b2 = 0.999`:

- AdamW: peak learning rate `--lr`. The default, 4e-3, is the best AdamW had in a
  sweep over {1e-3, 2e-3, 4e-3, 8e-3} (2000 steps, seed 0: final validation losses
  1.73, 1.55, 1.46, 1.47).
- AdEMAMix: the same learning rate; `b3 = 0.999`, `alpha = 8`, and `alpha`, `b3`
  warmed up over the whole run (`T_alpha = T_b3 = --steps`, `b3` from `b1`), as the
  paper advises for short runs. Nothing is tuned for it.
- Simplified AdEMAMix: the AdEMAMix run mapped through Morwani et al.'s
  equivalence (`m2 = (1 - b3) m`): `b1` follows the same half-life warm-up from 0.9
  to 0.999, `alpha = 1 / (8 * (1 - 0.999)) = 125`, learning rate
  `8 * (1 - 0.999) * --lr`. (The authors' own rule of thumb, `lr = lr_adam *
  sqrt((1 - 0.9)(1 - 0.999))` and `alpha ~ 100` at small batches, is within 25%.)

It prints the final validation losses (mean and spread over seeds) and the
fraction of AdamW's steps AdEMAMix needs to reach AdamW's final validation loss,
and writes `char_lm.json` (all curves) and `char_lm.png` (validation loss against
steps) to `--out-dir`. Runs checkpoint every evaluation (model and optimizer state,
`eqx.tree_serialise_leaves`); `--resume` continues from there.

    python examples/char_lm.py            # 6 runs; 12.6 min on 2 busy CPU cores
    python examples/char_lm.py --help

Results depend on the Python version (its standard library is the corpus).
Only AdamW's learning rate is tuned here; `lr_study.py` gives each optimizer its
own learning-rate sweep and seeds, with this script's model and optimizers.
"""

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import sysconfig
import time

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree, UInt8
from tqdm.auto import tqdm


OPTIMIZERS = ("AdamW", "AdEMAMix", "Simplified AdEMAMix")
B1, B2 = 0.9, 0.999
ALPHA, B3 = 8.0, 0.999
# `--state`: keyword arguments of the AdEMAMix optimizers for each state storage.
STATES = {
    "f32": lambda: {},
    "bf16": lambda: {"mu_dtype": jnp.bfloat16},
    "float8": lambda: {"storage": eam.BlockwiseFloat8()},
    "tree": lambda: {"storage": eam.Blockwise8Bit()},
}
EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train a byte-level transformer on the Python standard library's source "
            "with AdamW, AdEMAMix and Simplified AdEMAMix (same model, data order "
            "and schedule) and compare their validation losses."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--steps", type=int, default=1200, help="steps per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences/batch")
    parser.add_argument("--seq-len", type=int, default=64, help="context in bytes")
    parser.add_argument("--width", type=int, default=96, help="model width")
    parser.add_argument("--depth", type=int, default=2, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--lr", type=float, default=4e-3, help="peak learning rate")
    parser.add_argument(
        "--warmup", type=float, default=0.05, help="lr warm-up, fraction of steps"
    )
    parser.add_argument("--weight-decay", type=float, default=0.1, help="decoupled")
    parser.add_argument("--clip", type=float, default=1.0, help="global-norm clip")
    parser.add_argument(
        "--eval-every", type=int, default=100, help="steps between evaluations"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=16, help="validation batches per eval"
    )
    parser.add_argument(
        "--max-corpus-mb",
        type=float,
        default=0.0,
        help="use at most this many MB of source (0: all of it)",
    )
    parser.add_argument(
        "--optimizers",
        nargs="+",
        choices=OPTIMIZERS,
        default=list(OPTIMIZERS),
        help="which optimizers to run",
    )
    parser.add_argument(
        "--out-dir",
        type=pathlib.Path,
        default=pathlib.Path("char_lm_out"),
        help="where the JSON, the PNG and the checkpoints go",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in --out-dir (same settings required)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop after this many evaluation intervals in total (0: run to the end); "
        "everything is checkpointed, continue with --resume",
    )
    parser.add_argument(
        "--state",
        choices=tuple(STATES),
        default="f32",
        help="how the AdEMAMix optimizers store their moments (AdamW: float32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.eval_every < 1:
        parser.error("--steps, --batch-size and --eval-every must be positive")
    if args.width % args.heads:
        parser.error("--width must be a multiple of --heads")
    if "AdamW" not in args.optimizers:
        parser.error("AdamW is the baseline: keep it in --optimizers")
    return args


# ----------------------------------------------------------------------------- data


def stdlib_files() -> list[pathlib.Path]:
    """The standard library's `.py` files, sorted, without tests and vendored code."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = [
        f
        for f in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(f.relative_to(root).parts[:-1])
    ]
    if not files:
        raise RuntimeError(f"found no Python source files under {root}")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def load_corpus(max_mb: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """Bytes of the training and validation files (every 10th file is held out)."""
    train, val = [], []
    total = 0
    for i, f in enumerate(stdlib_files()):
        data = f.read_bytes()
        (val if i % 10 == 0 else train).append(data)
        total += len(data)
        if max_mb and total >= max_mb * 1e6:
            break
    info = {
        "python": sys.version.split()[0],
        "train_files": len(train),
        "val_files": len(val),
        "train_bytes": sum(map(len, train)),
        "val_bytes": sum(map(len, val)),
    }
    as_array = lambda parts: np.frombuffer(b"\n".join(parts), np.uint8)  # noqa: E731
    return as_array(train), as_array(val), info


def sample_windows(
    data: UInt8[Array, " n"], key: PRNGKeyArray, batch: int, seq_len: int
) -> Int[Array, "batch seq_plus_1"]:
    """`batch` random windows of `seq_len + 1` bytes."""
    starts = jr.randint(key, (batch,), 0, data.shape[0] - seq_len - 1)
    window = lambda s: jax.lax.dynamic_slice(data, (s,), (seq_len + 1,))  # noqa: E731
    return jax.vmap(window)(starts).astype(jnp.int32)


# ---------------------------------------------------------------------------- model


class Block(eqx.Module):
    """Pre-LayerNorm transformer block: causal self-attention and a GELU MLP."""

    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, width: int, heads: int, key: PRNGKeyArray):
        k1, k2, k3 = jr.split(key, 3)
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attention = eqx.nn.MultiheadAttention(heads, width, key=k1)
        self.norm2 = eqx.nn.LayerNorm(width)
        self.up = eqx.nn.Linear(width, 4 * width, key=k2)
        self.down = eqx.nn.Linear(4 * width, width, key=k3)

    def __call__(self, x: Float[Array, "seq width"]) -> Float[Array, "seq width"]:
        n = x.shape[0]
        causal = jnp.tril(jnp.ones((n, n), bool))
        h = jax.vmap(self.norm1)(x)
        x = x + self.attention(h, h, h, mask=causal)
        h = jax.vmap(self.norm2)(x)
        return x + jax.vmap(lambda v: self.down(jax.nn.gelu(self.up(v))))(h)


class ByteTransformer(eqx.Module):
    """A decoder-only transformer over bytes (vocabulary 256), learned positions."""

    embed: eqx.nn.Embedding
    positions: Float[Array, "seq width"]
    blocks: list[Block]
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear

    def __init__(
        self, width: int, depth: int, heads: int, seq_len: int, key: PRNGKeyArray
    ):
        keys = jr.split(key, depth + 3)
        self.embed = eqx.nn.Embedding(256, width, key=keys[0])
        self.positions = 0.02 * jr.normal(keys[1], (seq_len, width))
        self.blocks = [Block(width, heads, k) for k in keys[3:]]
        self.norm = eqx.nn.LayerNorm(width)
        self.head = eqx.nn.Linear(width, 256, key=keys[2])

    def __call__(self, tokens: Int[Array, " seq"]) -> Float[Array, "seq 256"]:
        x = jax.vmap(self.embed)(tokens) + self.positions[: tokens.shape[0]]
        for block in self.blocks:
            x = block(x)
        return jax.vmap(lambda v: self.head(self.norm(v)))(x)


def loss_fn(model: ByteTransformer, windows: Int[Array, "batch n"]) -> Float[Array, ""]:
    """Mean next-byte cross-entropy in nats."""
    logits = jax.vmap(model)(windows[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, windows[:, 1:]
    ).mean()


def decay_mask(params: PyTree) -> PyTree:
    """Weight decay on matrices only (not on biases, LayerNorm scales)."""
    return jax.tree.map(lambda p: p is not None and p.ndim >= 2, params)


# ------------------------------------------------------------------------ optimizers


def make_optimizer(name: str, args: argparse.Namespace):
    """The three optimizers, with the same schedule, clipping and weight decay."""

    def lr_schedule(peak: float):
        return optax.warmup_cosine_decay_schedule(
            0.0,
            peak,
            warmup_steps=max(1, int(args.warmup * args.steps)),
            decay_steps=args.steps,
            end_value=0.1 * peak,
        )

    T = args.steps
    common = dict(weight_decay=args.weight_decay, mask=decay_mask)
    if name == "AdamW":
        core = optax.adamw(lr_schedule(args.lr), b1=B1, b2=B2, **common)
    elif name == "AdEMAMix":
        core = eam.AdEMAMix(
            lr_schedule(args.lr),
            b1=B1,
            b2=B2,
            b3=eam.beta3_scheduler(B3, beta_start=B1, warmup=T),
            alpha=eam.alpha_scheduler(ALPHA, warmup=T),
            **common,
            **STATES[args.state](),
        ).to_optax()
    elif name == "Simplified AdEMAMix":
        core = eam.SimplifiedAdEMAMix(
            lr_schedule(ALPHA * (1 - B3) * args.lr),
            b1=eam.beta3_scheduler(B3, beta_start=B1, warmup=T),
            b2=B2,
            alpha=1 / (ALPHA * (1 - B3)),
            **common,
            **STATES[args.state](),
        ).to_optax()
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    return optax.chain(optax.clip_by_global_norm(args.clip), core)


# -------------------------------------------------------------------------- training


class Stopped(Exception):
    """Raised when `--stop-after` intervals have run."""


@dataclasses.dataclass
class Session:
    """What the runs of one invocation share: the number of intervals run so far."""

    intervals: int = 0


@dataclasses.dataclass
class Run:
    name: str
    seed: int
    steps: list[int] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    train_loss: list[float] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.name.replace(' ', '_')}_seed{self.seed}"


_COMPILED: dict = {}


def make_chunk(name: str, args: argparse.Namespace):
    """A jitted function that trains with optimizer `name` for `eval_every` steps
    inside one `lax.scan` (one dispatch per interval) and returns the mean training
    loss. Cached, so that seeds (and repeated `main` calls) compile it once."""
    cache_key = (name, tuple(sorted(config(args).items())))
    if cache_key in _COMPILED:
        return _COMPILED[cache_key]
    tx = make_optimizer(name, args)

    @eqx.filter_jit
    def chunk(model, opt_state, data, data_key, first_step):
        params, static = eqx.partition(model, eqx.is_inexact_array)

        def step(carry, t):
            params, opt_state = carry
            windows = sample_windows(
                data, jr.fold_in(data_key, t), args.batch_size, args.seq_len
            )
            loss, grads = jax.value_and_grad(
                lambda p: loss_fn(eqx.combine(p, static), windows)
            )(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        steps = first_step + jnp.arange(args.eval_every)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), steps)
        return eqx.combine(params, static), opt_state, losses.mean()

    _COMPILED[cache_key] = chunk
    return chunk


@eqx.filter_jit
def evaluate(model: ByteTransformer, val_windows: Int[Array, "k batch n"]) -> Array:
    return jax.lax.map(lambda w: loss_fn(model, w), val_windows).mean()


def run_one(
    run: Run,
    args: argparse.Namespace,
    train: Array,
    val_windows: Array,
    bar: tqdm,
    session: "Session",
) -> Run:
    init_key, data_key = jr.split(jr.key(run.seed))
    model = ByteTransformer(
        args.width, args.depth, args.heads, args.seq_len, init_key
    )  # the same initialisation and data order for every optimizer of a seed
    tx = make_optimizer(run.name, args)
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    ckpt = args.out_dir / "checkpoints" / f"{run.key}.eqx"
    meta = ckpt.with_suffix(".json")
    done = 0
    if args.resume and meta.exists():
        saved = json.loads(meta.read_text())
        if saved["config"] != config(args):
            raise ValueError(
                f"{meta} was written with other settings; rerun without --resume or "
                "with the same arguments."
            )
        model, opt_state = eqx.tree_deserialise_leaves(ckpt, (model, opt_state))
        run = Run(**saved["run"])
        done = run.steps[-1] if run.steps else 0
        bar.update(done)
    chunk = make_chunk(run.name, args)
    while done < args.steps:
        if args.stop_after and session.intervals >= args.stop_after:
            raise Stopped
        model, opt_state, train_loss = chunk(
            model, opt_state, train, data_key, jnp.asarray(done)
        )
        done += args.eval_every
        run.steps.append(done)
        run.train_loss.append(float(train_loss))
        run.val_loss.append(float(evaluate(model, val_windows)))
        bar.update(args.eval_every)
        bar.set_postfix_str(f"{run.name} seed {run.seed}: val {run.val_loss[-1]:.3f}")
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        eqx.tree_serialise_leaves(ckpt, (model, opt_state))
        meta.write_text(
            json.dumps({"config": config(args), "run": dataclasses.asdict(run)})
        )
        session.intervals += 1
    return run


def config(args: argparse.Namespace) -> dict:
    """The settings a checkpoint depends on."""
    keys = (
        "steps batch_size seq_len width depth heads lr warmup weight_decay clip "
        "eval_every eval_batches max_corpus_mb state"
    ).split()
    return {k: getattr(args, k) for k in keys}


# --------------------------------------------------------------------------- report


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float:
    """The first step at which `losses` reaches `target`, interpolating linearly
    between evaluations; `inf` if it never does."""
    prev_step, prev_loss = 0, math.inf
    for s, loss in zip(steps, losses):
        if loss <= target:
            if math.isinf(prev_loss):
                return float(s)
            frac = (prev_loss - target) / (prev_loss - loss)
            return prev_step + frac * (s - prev_step)
        prev_step, prev_loss = s, loss
    return math.inf


def summarise(runs: list[Run], names: list[str], seeds: list[int], total: int) -> dict:
    by = {(r.name, r.seed): r for r in runs}
    summary = {}
    for name in names:
        finals = np.array([by[name, s].val_loss[-1] for s in seeds])
        entry = {
            "final_val_loss_mean": float(finals.mean()),
            "final_val_loss_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
            "final_val_loss_per_seed": finals.tolist(),
        }
        if name != "AdamW":
            fractions = [
                steps_to_reach(
                    by[name, s].steps, by[name, s].val_loss, by["AdamW", s].val_loss[-1]
                )
                / total
                for s in seeds
            ]
            # None: AdamW's final loss not reached within the run (JSON has no inf).
            entry["fraction_of_adamw_steps_per_seed"] = [
                f if math.isfinite(f) else None for f in fractions
            ]
            reached = all(map(math.isfinite, fractions))
            entry["fraction_of_adamw_steps_mean"] = (
                float(np.mean(fractions)) if reached else None
            )
        summary[name] = entry
    return summary


def plot(runs: list[Run], names: list[str], seeds: list[int], path: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r.name, r.seed): r for r in runs}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, zoom in zip(axes, (False, True)):
        for name, color in zip(names, ("C0", "C3", "C2")):
            steps = np.array(by[name, seeds[0]].steps)
            losses = np.array([by[name, s].val_loss for s in seeds])
            ax.plot(steps, losses.mean(0), color=color, label=name)
            ax.fill_between(steps, losses.min(0), losses.max(0), color=color, alpha=0.2)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        if zoom and len(steps) >= 4:
            half = len(steps) // 2
            tail = [v for r in runs for v in r.val_loss[half:]]
            ax.set_xlim(steps[half], steps[-1])
            ax.set_ylim(min(tail) - 0.01, max(tail) + 0.01)
            ax.set_title("second half")
        else:
            ax.set_title(f"mean and range over seeds {seeds}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.steps % args.eval_every:
        args.steps += args.eval_every - args.steps % args.eval_every
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train_np, val_np, info = load_corpus(args.max_corpus_mb)
    train = jnp.asarray(train_np)
    val_keys = jr.split(jr.key(12345), args.eval_batches)  # fixed for every run
    val_windows = jax.vmap(
        lambda k: sample_windows(jnp.asarray(val_np), k, args.batch_size, args.seq_len)
    )(val_keys)
    params = eqx.filter(
        ByteTransformer(args.width, args.depth, args.heads, args.seq_len, jr.key(0)),
        eqx.is_inexact_array,
    )
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(
        f"corpus: Python {info['python']} stdlib, {info['train_bytes'] / 1e6:.1f} MB "
        f"train ({info['train_files']} files), {info['val_bytes'] / 1e6:.1f} MB "
        f"validation ({info['val_files']} files); model: {n_params / 1e6:.2f}M "
        "parameters"
    )
    names = [n for n in OPTIMIZERS if n in args.optimizers]
    runs = [Run(name, seed) for seed in args.seeds for name in names]
    start = time.perf_counter()
    session = Session()
    with tqdm(
        total=len(runs) * args.steps, unit="step", disable=args.no_progress
    ) as bar:
        try:
            runs = [run_one(r, args, train, val_windows, bar, session) for r in runs]
        except Stopped:
            print(f"stopped after {args.stop_after} intervals; continue with --resume")
            return {}
    elapsed = time.perf_counter() - start
    summary = summarise(runs, names, args.seeds, args.steps)
    print(f"\n{len(runs)} runs of {args.steps} steps in {elapsed / 60:.1f} min")
    for name, s in summary.items():
        line = (
            f"{name:>20}: final val loss {s['final_val_loss_mean']:.4f} "
            f"± {s['final_val_loss_std']:.4f} (std over {len(args.seeds)} seeds)"
        )
        if "fraction_of_adamw_steps_mean" in s:
            fr = s["fraction_of_adamw_steps_per_seed"]
            mean = s["fraction_of_adamw_steps_mean"]
            line += (
                "; reaches AdamW's final val loss after "
                + ("(not in every seed)" if mean is None else f"{mean:.2f}")
                + " of AdamW's steps (per seed: "
                + ", ".join("never" if f is None else f"{f:.2f}" for f in fr)
                + ")"
            )
        print(line)
    result = {
        "command": "python examples/char_lm.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": config(args),
        "seeds": args.seeds,
        "corpus": info,
        "parameters": n_params,
        "minutes": elapsed / 60,
        "summary": summary,
        "runs": [dataclasses.asdict(r) for r in runs],
    }
    (args.out_dir / "char_lm.json").write_text(json.dumps(result, indent=1))
    plot(runs, names, args.seeds, args.out_dir / "char_lm.png")
    print(f"wrote {args.out_dir / 'char_lm.json'} and {args.out_dir / 'char_lm.png'}")
    return result


if __name__ == "__main__":
    main()
