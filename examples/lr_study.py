"""A tuned comparison of AdamW, AdEMAMix and Simplified AdEMAMix on the byte-level
language model of `char_lm.py` (same model, data, schedule and optimizer settings;
this script only chooses the learning rates and the seeds).

1. **Sweep**: every optimizer trains with every peak learning rate of `--lrs`
   (the same grid, factor 2 apart) on `--sweep-seed`. For Simplified AdEMAMix the
   value is `char_lm.py`'s `--lr` (its AdamW-equivalent learning rate: the step it
   takes is `8 * (1 - 0.999)` times it, see `char_lm.py`).
2. **Seeds**: every optimizer trains at its own best learning rate (lowest final
   validation loss of the sweep) on each of `--seeds`, fresh seeds that the sweep
   did not use (other initialisation, other batches). Every optimizer gets the same
   number of runs.

Besides the validation loss every `--eval-every` steps, every `--forget-every`
steps it measures the loss on three fixed sets of training batches: the batches of
the first `--forget-batches` steps (trained on at the very start), those of the
steps from the middle of the run on (trained on at mid-run; before that they are
unseen), and as many batches the run never trains on (same files, same sampling).
Forgetting, as in the AdEMAMix paper: how fast the loss on batches the model has
trained on rises back to the loss on batches it never saw.

Results go to `--json` after every run; a rerun skips the runs that are already
there (the settings must match), so an interrupted study continues where it
stopped. `lr_study_report.py` makes the plots and tables from that JSON.

    taskset -c 1 python examples/lr_study.py          # 24 runs of 5,000 steps
    python examples/lr_study_report.py                 # plots and tables
    python examples/lr_study.py --help

Model and data flags not listed in `--help` go to `char_lm.py` (`--width`,
`--steps`, ...; the defaults here are a smaller model than `char_lm.py`'s).
"""

import argparse
import json
import os
import pathlib
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from tqdm.auto import tqdm


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import char_lm  # noqa: E402  (the model, data and optimizers of the example)


# One core's worth of model: 5,000 steps in about 2 minutes on one CPU core.
MODEL_DEFAULTS = [
    "--steps", "5000", "--width", "64", "--depth", "2", "--heads", "4",
    "--seq-len", "32", "--batch-size", "32", "--eval-every", "100",
    "--eval-batches", "32",
]  # fmt: skip
DEFAULT_JSON = pathlib.Path("docs/assets/lr_study/lr_study.json")
UNSEEN_START = 10**6  # batch indices from here on are never trained on


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=(
            "Learning-rate sweep, then seeds at each optimizer's best learning rate, "
            "for AdamW, AdEMAMix and Simplified AdEMAMix on char_lm.py's model; "
            "other flags go to char_lm.py."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--lrs",
        type=float,
        nargs="+",
        default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
        help="peak learning rates of the sweep (char_lm.py's --lr)",
    )
    parser.add_argument("--sweep-seed", type=int, default=0, help="seed of the sweep")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds at the best lr"
    )
    parser.add_argument(
        "--forget-batches",
        type=int,
        default=128,
        help="batches in each forgetting set (the first: twice as many)",
    )
    parser.add_argument(
        "--forget-every", type=int, default=500, help="steps between forgetting evals"
    )
    parser.add_argument(
        "--final-eval-batches",
        type=int,
        default=256,
        help="validation batches of the final loss",
    )
    parser.add_argument(
        "--json",
        type=pathlib.Path,
        default=DEFAULT_JSON,
        help="results file (read to resume, written after every run)",
    )
    args, rest = parser.parse_known_args(argv)
    lm = char_lm.parse_args(MODEL_DEFAULTS + rest)
    if lm.steps % lm.eval_every or args.forget_every % lm.eval_every:
        parser.error("--steps and --forget-every must be multiples of --eval-every")
    return args, lm


def settings(args: argparse.Namespace, lm: argparse.Namespace) -> dict:
    """Everything the results depend on; a resumed study must have the same."""
    return {
        "model": char_lm.config(lm),
        "optimizers": [n for n in char_lm.OPTIMIZERS if n in lm.optimizers],
        "lrs": args.lrs,
        "sweep_seed": args.sweep_seed,
        "seeds": args.seeds,
        "forget_batches": args.forget_batches,
        "forget_every": args.forget_every,
        "final_eval_batches": args.final_eval_batches,
        "forget_sets": forget_sets(args, lm),
    }


def forget_sets(args: argparse.Namespace, lm: argparse.Namespace) -> dict:
    """Training-batch indices (= the step that trains on them) of each set."""
    n, mid = args.forget_batches, lm.steps // 2
    return {
        "first": [0, 2 * n],
        "middle": [mid, mid + n],
        "unseen": [UNSEEN_START, UNSEEN_START + n],
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_key(name: str, lr: float, seed: int) -> str:
    return f"{name} lr={lr:g} seed={seed}"


def train_one(name, lr, seed, args, lm, data, label) -> dict:
    """One run of `char_lm`'s training chunk; the curves and the final losses."""
    lm = argparse.Namespace(**{**vars(lm), "lr": lr})
    init_key, data_key = jr.split(jr.key(seed))  # as char_lm.py: same per seed
    model = char_lm.ByteTransformer(lm.width, lm.depth, lm.heads, lm.seq_len, init_key)
    opt_state = char_lm.make_optimizer(name, lm).init(
        eqx.filter(model, eqx.is_inexact_array)
    )
    chunk = char_lm.make_chunk(name, lm)
    batches = {
        set_name: jax.vmap(
            lambda t: char_lm.sample_windows(
                data["train"], jr.fold_in(data_key, t), lm.batch_size, lm.seq_len
            )
        )(jnp.arange(*bounds))
        for set_name, bounds in forget_sets(args, lm).items()
    }
    out = {"name": name, "lr": lr, "seed": seed, "steps": [], "val_loss": []}
    out |= {"train_loss": [], "forget_steps": []}
    out |= {f"{k}_loss": [] for k in batches}
    start = time.perf_counter()
    with tqdm(total=lm.steps, desc=label, unit="step", disable=lm.no_progress) as bar:
        for done in range(0, lm.steps, lm.eval_every):
            model, opt_state, loss = chunk(
                model, opt_state, data["train"], data_key, jnp.asarray(done)
            )
            step = done + lm.eval_every
            out["steps"].append(step)
            out["train_loss"].append(float(loss))
            out["val_loss"].append(float(char_lm.evaluate(model, data["val"])))
            if step % args.forget_every == 0:
                out["forget_steps"].append(step)
                for k, windows in batches.items():
                    out[f"{k}_loss"].append(float(char_lm.evaluate(model, windows)))
            bar.update(lm.eval_every)
            bar.set_postfix_str(f"val {out['val_loss'][-1]:.3f}")
    out["final_val_loss"] = float(char_lm.evaluate(model, data["val_final"]))
    out["seconds"] = time.perf_counter() - start
    return out


def save(path: pathlib.Path, results: dict):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    args, lm = parse_args(argv)
    wanted = settings(args, lm)
    results = {"settings": wanted, "sessions": [], "runs": {}, "best_lr": {}}
    if args.json.exists():
        results = json.loads(args.json.read_text())
        if results["settings"] != wanted:
            raise ValueError(
                f"{args.json} holds a study with other settings; use another --json."
            )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    train_np, val_np, info = char_lm.load_corpus(lm.max_corpus_mb)
    val = jnp.asarray(val_np)
    val_windows = lambda n: jax.vmap(  # noqa: E731  (fixed for every run, as char_lm)
        lambda k: char_lm.sample_windows(val, k, lm.batch_size, lm.seq_len)
    )(jr.split(jr.key(12345), n))
    data = {
        "train": jnp.asarray(train_np),
        "val": val_windows(lm.eval_batches),
        "val_final": val_windows(args.final_eval_batches),
    }
    params = eqx.filter(
        char_lm.ByteTransformer(lm.width, lm.depth, lm.heads, lm.seq_len, jr.key(0)),
        eqx.is_inexact_array,
    )
    session = {
        "command": " ".join(
            ["python examples/lr_study.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "load_average_before": load_average(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "runs": [],
    }
    results["sessions"].append(session)
    results |= {
        "corpus": info,
        "parameters": sum(x.size for x in jax.tree.leaves(params)),
        "versions": {"python": sys.version.split()[0], "jax": jax.__version__},
    }
    names = wanted["optimizers"]
    total = len(names) * (len(args.lrs) + len(args.seeds))

    def ensure(name, lr, seed, phase):
        key = run_key(name, lr, seed)
        if key not in results["runs"]:
            label = f"[{len(results['runs']) + 1}/{total}] {key}"
            results["runs"][key] = train_one(name, lr, seed, args, lm, data, label)
            results["runs"][key]["phase"] = phase
            session["runs"].append(key)
            session["load_average_after"] = load_average()
            session["ended"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            save(args.json, results)
        return results["runs"][key]

    for lr in args.lrs:
        for name in names:
            ensure(name, lr, args.sweep_seed, "sweep")
    for name in names:
        finals = {lr: ensure(name, lr, args.sweep_seed, "sweep") for lr in args.lrs}
        best = min(args.lrs, key=lambda lr: finals[lr]["final_val_loss"])
        results["best_lr"][name] = best
    for seed in args.seeds:
        for name in names:
            ensure(name, results["best_lr"][name], seed, "seeds")
    session["load_average_after"] = load_average()
    save(args.json, results)
    print(f"best learning rates: {results['best_lr']}; results in {args.json}")
    return results


if __name__ == "__main__":
    main()
