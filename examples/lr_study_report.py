"""Plots and tables of `lr_study.py`'s results, made from its JSON alone.

Writes `val_loss.png`, `lr_sweep.png` and `forgetting.png` next to the JSON, and
replaces the text between `<!-- TAG:begin -->` and `<!-- TAG:end -->` in the
results page (tables and numbers) and between `<!-- TAG:guide:begin -->` and
`<!-- TAG:guide:end -->` in the hyperparameter guide (the learning rates and the
pay-off), TAG being the name of the JSON's folder. Every JSON given (by default:
the 5,000-step study and the 1,200-step one) is done in turn. Nothing in those
blocks is typed by hand.

    python examples/lr_study_report.py
"""

import argparse
import json
import math
import os
import pathlib
import sys

import numpy as np


sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from char_lm import ALPHA, B3, steps_to_reach  # noqa: E402
from lr_study import DEFAULT_JSON  # noqa: E402


COLORS = {"AdamW": "C0", "AdEMAMix": "C3", "Simplified AdEMAMix": "C2"}
SIMPLIFIED_LR_FACTOR = ALPHA * (1 - B3)  # its step size per AdamW-equivalent lr


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Plots and tables of lr_study.py's JSON.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--json",
        type=pathlib.Path,
        nargs="+",
        default=[
            DEFAULT_JSON,
            DEFAULT_JSON.parent.with_name("lr_study_1200") / "lr_study.json",
        ],
        help="lr_study.py's results (missing ones are skipped); the plots go next to "
        "each; its folder's name is the tag of its blocks in the pages",
    )
    parser.add_argument(
        "--results-md", type=pathlib.Path, default=pathlib.Path("docs/results.md")
    )
    parser.add_argument(
        "--guide-md",
        type=pathlib.Path,
        default=pathlib.Path("docs/guides/hyperparameters.md"),
    )
    return parser.parse_args(argv)


# -------------------------------------------------------------------------- numbers


def seed_runs(results: dict, name: str) -> list[dict]:
    """The runs of `name` at its best learning rate on the fresh seeds that every
    optimizer has finished (so that each has the same number of runs)."""
    at_best = {
        n: {
            r["seed"]: r
            for r in results["runs"].values()
            if r["name"] == n
            and r["phase"] == "seeds"
            and r["lr"] == results["best_lr"].get(n)
        }
        for n in results["settings"]["optimizers"]
    }
    common = set.intersection(*(set(runs) for runs in at_best.values()))
    return [at_best[name][seed] for seed in sorted(common)]


def summarise(results: dict) -> dict:
    """Per optimizer: best lr, final losses over seeds, steps to AdamW's loss,
    forgetting; only for optimizers whose seed runs have started."""
    names = [n for n in results["settings"]["optimizers"] if seed_runs(results, n)]
    if "AdamW" not in names:
        return {}
    adamw = seed_runs(results, "AdamW")
    # Target: AdamW's final loss on the curves' validation sample, mean over seeds.
    target = float(np.mean([r["val_loss"][-1] for r in adamw]))
    horizon = results["settings"]["model"]["steps"]
    lrs = results["settings"]["lrs"]
    out = {}
    for name in names:
        runs = seed_runs(results, name)
        finals = np.array([r["final_val_loss"] for r in runs])
        reach = [steps_to_reach(r["steps"], r["val_loss"], target) for r in runs]
        out[name] = {
            "lr": results["best_lr"][name],
            "lr_ratio": results["best_lr"][name] / results["best_lr"]["AdamW"],
            "edge": results["best_lr"][name] in (min(lrs), max(lrs)),
            "runner_up": runner_up(results, name),
            "seeds": [r["seed"] for r in runs],
            "finals": finals.tolist(),
            "mean": float(finals.mean()),
            "std": float(finals.std(ddof=1)) if len(finals) > 1 else math.nan,
            "reach": reach,
            "ahead_from": ahead_from(runs, adamw),
            "forget": forgetting(runs, results["settings"]["forget_sets"]),
        }
    base = out["AdamW"]
    for entry in out.values():
        entry["diff"] = entry["mean"] - base["mean"]
        apart = max(entry["finals"]) < min(base["finals"]) or min(
            entry["finals"]
        ) > max(base["finals"])
        entry["separated"] = bool(apart)
    return {"target": target, "horizon": horizon, "optimizers": out}


def ahead_from(runs: list[dict], adamw: list[dict]) -> int | None:
    """The first evaluation step from which the seed-mean validation curve stays
    below AdamW's to the end of the run; None if it ends above."""
    mine = np.mean([r["val_loss"] for r in runs], axis=0)
    base = np.mean([r["val_loss"] for r in adamw], axis=0)
    behind = np.flatnonzero(mine >= base)
    if len(behind) and behind[-1] == len(mine) - 1:
        return None
    return runs[0]["steps"][behind[-1] + 1 if len(behind) else 0]


def runner_up(results: dict, name: str) -> tuple[float, float] | None:
    """The sweep's second-best learning rate and how much worse it ended."""
    st = results["settings"]
    finals = sorted(
        (r["final_val_loss"], r["lr"])
        for r in results["runs"].values()
        if r["name"] == name and r["phase"] == "sweep" and r["seed"] == st["sweep_seed"]
    )
    return (finals[1][1], finals[1][0] - finals[0][0]) if len(finals) > 1 else None


def forgetting(runs: list[dict], sets: dict) -> dict:
    """Gap = loss on never-seen batches minus loss on a trained-on set, per seed, at
    each forgetting evaluation: how much better the model does on batches it trained
    on. The two sets differ in content, so a gap is not 0 even for a model that saw
    neither; the middle set's gap is measured relative to its value at the last
    evaluation before it is trained on, which removes that offset."""
    steps = runs[0]["forget_steps"]
    gap = lambda r, k: np.subtract(r["unseen_loss"], r[f"{k}_loss"])  # noqa: E731
    before = [i for i, s in enumerate(steps) if s <= sets["middle"][0]]
    middle = np.array([gap(r, "middle") for r in runs])
    middle = (middle - (middle[:, before[-1:]] if before else 0.0)).tolist()
    first = [gap(r, "first") for r in runs]
    return {"steps": steps, "first": np.array(first).tolist(), "middle": middle,
            "middle_before": steps[before[-1]] if before else None}  # fmt: skip


def machine_time(results: dict) -> dict:
    seconds = [r["seconds"] for r in results["runs"].values()]
    loads = [
        (s["load_average_before"], s.get("load_average_after"))
        for s in results["sessions"]
    ]
    return {"minutes": sum(seconds) / 60, "runs": len(seconds), "loads": loads}


# -------------------------------------------------------------------------- plots


def plot_all(results: dict, summary: dict, out_dir: pathlib.Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_sweep(results, out_dir, plt)
    if summary:
        plot_seeds(results, summary, out_dir, plt)


def plot_seeds(results: dict, summary: dict, out_dir: pathlib.Path, plt):
    opts = summary["optimizers"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, zoom in zip(axes, (False, True)):
        for name, s in opts.items():
            runs = seed_runs(results, name)
            steps = np.array(runs[0]["steps"])
            curves = np.array([r["val_loss"] for r in runs])
            label = f"{name} (lr {s['lr']:g})"
            ax.plot(steps, curves.mean(0), color=COLORS[name], label=label)
            ax.fill_between(
                steps, curves.min(0), curves.max(0), color=COLORS[name], alpha=0.2
            )
        ax.axhline(summary["target"], color="C0", ls=":", lw=1)
        ax.set(xlabel="step", ylabel="validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        if zoom:
            half = summary["horizon"] // 2
            runs = [r for n in opts for r in seed_runs(results, n)]
            tail = [
                v for r in runs for s, v in zip(r["steps"], r["val_loss"]) if s >= half
            ]
            ax.set_xlim(half, summary["horizon"])
            ax.set_ylim(min(tail) - 0.01, max(tail) + 0.01)
            ax.set_title("second half (dotted: AdamW's final loss)")
        else:
            ax.set_title("each at its best lr: mean and range over seeds")
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "val_loss.png", dpi=80)
    plt.close(fig)
    plot_forgetting(results, summary, out_dir, plt)


def plot_sweep(results: dict, out_dir: pathlib.Path, plt):
    fig, ax = plt.subplots(figsize=(6, 4.2))
    seed = results["settings"]["sweep_seed"]
    for name in results["settings"]["optimizers"]:
        pts = sorted(
            (r["lr"], r["final_val_loss"])
            for r in results["runs"].values()
            if r["name"] == name and r["seed"] == seed and r["phase"] == "sweep"
        )
        if pts:
            ax.plot(*zip(*pts), "o-", color=COLORS[name], label=name)
    ax.set_xscale("log", base=2)
    lrs = results["settings"]["lrs"]
    ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
    ax.minorticks_off()
    ax.set(xlabel="peak learning rate (Simplified: AdamW-equivalent, see text)")
    ax.set(ylabel="final validation loss (nats/byte)", title=f"sweep, seed {seed}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "lr_sweep.png", dpi=80)
    plt.close(fig)


def plot_forgetting(results: dict, summary: dict, out_dir: pathlib.Path, plt):
    opts = summary["optimizers"]
    sets = results["settings"]["forget_sets"]
    before = next(iter(opts.values()))["forget"]["middle_before"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, k in zip(axes, ("first", "middle")):
        for name, s in opts.items():
            gaps = np.array(s["forget"][k])
            steps = s["forget"]["steps"]
            ax.plot(steps, gaps.mean(0), "o-", color=COLORS[name], label=name)
            ax.fill_between(
                steps, gaps.min(0), gaps.max(0), color=COLORS[name], alpha=0.2
            )
        lo, hi = sets[k]
        ax.axvspan(lo, hi, color="0.8", label="trained on here")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="step", title=f"batches of steps {lo} to {hi - 1}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("loss on unseen batches - loss on these (nats/byte)")
    axes[1].set_ylabel(f"the same, minus its value at step {before}")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "forgetting.png", dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------- markdown


def fmt_steps(steps: list[float], horizon: int) -> str:
    if not all(map(math.isfinite, steps)):
        hit = sum(map(math.isfinite, steps))
        return f"never in {len(steps) - hit} of {len(steps)} seeds"
    mean = float(np.mean(steps))
    each = ", ".join(f"{s:,.0f}" for s in steps)
    return f"{mean:,.0f} ({mean / horizon:.0%}; {each})"


def tables(results: dict, summary: dict, img: str) -> str:
    """The results page's block; `img`: the plots' folder relative to the page."""
    st = results["settings"]
    lines = []
    t = machine_time(results)
    loads = "; ".join(
        f"{b[0]:.2f} before, {a[0]:.2f} after" if a else f"{b[0]:.2f} before"
        for b, a in t["loads"]
    )
    model = st["model"]
    lines += [f"![Learning-rate sweep]({img}/lr_sweep.png)", ""]
    if summary:
        lines += [
            "![Validation loss at each optimizer's best learning rate]"
            f"({img}/val_loss.png)",
            "",
            f"![Forgetting]({img}/forgetting.png)",
            "",
        ]
    lines += [
        f"Model: {results['parameters']:,} parameters (width {model['width']}, "
        f"{model['depth']} blocks, {model['heads']} heads, context "
        f"{model['seq_len']} bytes), batches of {model['batch_size']}, "
        f"{model['steps']:,} steps, Python {results['versions']['python']}, "
        f"JAX {results['versions']['jax']}. Runs so far: {t['runs']} of "
        f"{len(st['optimizers']) * (len(st['lrs']) + len(st['seeds']))}, "
        f"{t['minutes']:.0f} minutes of one CPU core (compilation included); "
        f"1-minute load average of the 2-core machine per session: {loads}.",
        "",
        f"**Sweep** (seed {st['sweep_seed']}): final validation loss "
        f"({st['final_eval_batches']} batches) at each peak learning rate; the best "
        "of each optimizer in bold.",
        "",
        "| peak lr | " + " | ".join(st["optimizers"]) + " |",
        "| ---: |" + " ---: |" * len(st["optimizers"]),
    ]
    for lr in st["lrs"]:
        cells = []
        for name in st["optimizers"]:
            r = results["runs"].get(f"{name} lr={lr:g} seed={st['sweep_seed']}")
            cell = "—" if r is None else f"{r['final_val_loss']:.4f}"
            cells.append(f"**{cell}**" if results["best_lr"].get(name) == lr else cell)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    if not summary:
        return "\n".join(
            lines
            + [
                "",
                "(No seed at the best learning rates is done for every optimizer yet.)",
            ]
        )
    h = summary["horizon"]
    lines += [
        "",
        f"**Each at its best learning rate**, seeds {', '.join(map(str, st['seeds']))}"
        " (not used by the sweep): final validation loss, mean ± standard "
        "deviation over seeds [range]; the difference to AdamW and whether the seed "
        "ranges are apart; the first step at which the validation curve reaches "
        f"AdamW's final loss ({summary['target']:.4f} on the curves' "
        f"{model['eval_batches']}-batch sample, mean over seeds; interpolated "
        "between evaluations) as mean (fraction of the run; per seed).",
        "",
        "| optimizer | best peak lr | vs AdamW's | final loss | − AdamW | seeds apart? "
        "| steps to AdamW's final loss |",
        "| --- | ---: | ---: | --- | ---: | --- | --- |",
    ]
    for name, s in summary["optimizers"].items():
        lr = f"{s['lr']:g}"
        if name == "Simplified AdEMAMix":
            lr += f" (step: {s['lr'] * SIMPLIFIED_LR_FACTOR:.2g})"
        rng = f"[{min(s['finals']):.4f}, {max(s['finals']):.4f}]"
        apart = "—" if name == "AdamW" else ("yes" if s["separated"] else "no")
        reach = "(the target)" if name == "AdamW" else fmt_steps(s["reach"], h)
        lines.append(
            f"| {name} | {lr} | {s['lr_ratio']:g}x | {s['mean']:.4f} ± "
            f"{s['std']:.4f} {rng} | {s['diff']:+.4f} | {apart} | {reach} |"
        )
    sets = st["forget_sets"]
    fsteps = next(iter(summary["optimizers"].values()))["forget"]["steps"]
    after = [i for i, x in enumerate(fsteps) if x >= sets["middle"][1]]
    fsteps_before = next(iter(summary["optimizers"].values()))["forget"][
        "middle_before"
    ]
    lines += [
        "",
        "**Forgetting**: loss on batches never trained on minus loss on a set of "
        "training batches, mean over seeds (positive: the model still does better "
        f"on the batches it trained on). First set: the batches of steps "
        f"{sets['first'][0]} to {sets['first'][1] - 1}; middle set: steps "
        f"{sets['middle'][0]} to {sets['middle'][1] - 1}, its gap minus the gap at "
        f"step {fsteps_before}, the last evaluation before it was trained on (the "
        "sets differ in content, so the raw gap of a set never seen is not 0; the "
        "first set has no such reference).",
        "",
        "| optimizer | first set, at the end | middle set, "
        + (f"step {fsteps[after[0]]:,}" if after else "after")
        + " | middle set, at the end | middle: kept at the end |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in summary["optimizers"].items():
        first = np.mean(s["forget"]["first"], axis=0)
        mid = np.mean(s["forget"]["middle"], axis=0)
        if after:
            kept = mid[-1] / mid[after[0]] if mid[after[0]] else math.nan
            lines.append(
                f"| {name} | {first[-1]:+.4f} | {mid[after[0]]:+.4f} | "
                f"{mid[-1]:+.4f} | {kept:.0%} |"
            )
    return "\n".join(lines + ["", "In short:", "", *findings(summary)])


def findings(summary: dict) -> list[str]:
    """One sentence per optimizer, from the numbers."""
    opts, h = summary["optimizers"], summary["horizon"]
    out = []
    for name, s in opts.items():
        text = f"- **{name}**: best peak learning rate {s['lr']:g}"
        if name != "AdamW":
            text += f", {s['lr_ratio']:g}x AdamW's"
        if s["edge"]:
            text += " (at the edge of the grid: the optimum may lie beyond it)"
        if s["runner_up"]:
            lr, gap = s["runner_up"]
            text += f"; the second best, {lr:g}, ended {gap:.4f} nats/byte behind"
        if name != "AdamW":
            text += "; " + comparison(s, opts["AdamW"]["std"], h)
            if s["ahead_from"] is not None:
                text += (
                    f"; its seed-mean validation loss is below AdamW's from step "
                    f"{s['ahead_from']:,} to the end"
                )
        out.append(text + ".")
    return out


def comparison(s: dict, adamw_std: float, horizon: int) -> str:
    side = "below" if s["diff"] < 0 else "above"
    spread = max(s["std"], adamw_std)
    verdict = (
        "every seed on the same side of every AdamW seed"
        if s["separated"]
        else "the seed ranges overlap"
    )
    text = (
        f"on the fresh seeds it ends {abs(s['diff']):.4f} nats/byte {side} AdamW "
        f"({abs(s['diff']) / spread:.1f} times the larger seed standard deviation; "
        f"{verdict}); "
    )
    reach = s["reach"]
    if all(map(math.isfinite, reach)):
        mean = float(np.mean(reach))
        return text + (
            f"reaches AdamW's final loss after {mean:,.0f} of {horizon:,} steps "
            f"({mean / horizon:.0%})"
        )
    missed = sum(not math.isfinite(x) for x in reach)
    return text + f"does not reach AdamW's final loss in {missed} of {len(reach)} seeds"


def sweep_only_block(results: dict) -> str:
    """Before any seed is done: the sweep's best of each optimizer (one seed)."""
    st = results["settings"]
    best = {}
    for r in results["runs"].values():
        if r["phase"] == "sweep" and r["seed"] == st["sweep_seed"]:
            best[r["name"]] = min(
                best.get(r["name"], (math.inf,)), (r["final_val_loss"], r["lr"])
            )
    if "AdamW" not in best:
        return "(No run has finished yet.)"
    lines = [
        f"Only the sweep (seed {st['sweep_seed']}) has run so far: no seed "
        "spread, no steps to AdamW's loss.",
        "",
        "| optimizer | best peak lr so far / AdamW's | its final loss − AdamW's best |",
        "| --- | ---: | ---: |",
    ]
    base_loss, base_lr = best["AdamW"]
    for name, (loss, lr) in best.items():
        if name != "AdamW":
            lines.append(f"| {name} | {lr / base_lr:g}x | {loss - base_loss:+.4f} |")
    return "\n".join(lines)


def guide_block(summary: dict, results: dict) -> str:
    if not summary:
        return sweep_only_block(results)
    opts, h = summary["optimizers"], summary["horizon"]
    lines = [
        "| optimizer | best peak lr / AdamW's | final loss − AdamW's "
        f"| steps to AdamW's final loss ({h:,}-step run) "
        "| below AdamW from step (seed means, to the end) |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for name, s in opts.items():
        if name != "AdamW":
            diff = f"{s['diff']:+.4f}" + ("" if s["separated"] else " (within seeds)")
            ahead = "never" if s["ahead_from"] is None else f"{s['ahead_from']:,}"
            lines.append(
                f"| {name} | {s['lr_ratio']:g}x | {diff} | {fmt_steps(s['reach'], h)} "
                f"| {ahead} |"
            )
    return "\n".join(lines)


def inject(path: pathlib.Path, tag: str, block: str):
    begin, end = f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"
    text = path.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{path} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{block}\n{end}{tail}")


def main(argv: list[str] | None = None) -> dict:
    """Returns the summary of each study, by tag."""
    args = parse_args(argv)
    summaries = {}
    for path in args.json:
        if not path.exists():
            print(f"{path} does not exist: skipped")
            continue
        results = json.loads(path.read_text())
        summary = summarise(results)
        plot_all(results, summary, path.parent)
        img = os.path.relpath(path.parent, args.results_md.parent)
        tag = path.parent.name
        inject(args.results_md, tag, tables(results, summary, img))
        inject(args.guide_md, f"{tag}:guide", guide_block(summary, results))
        print(f"{path}: plots next to it, tables in {args.results_md} ({tag})")
        summaries[tag] = summary
    return summaries


if __name__ == "__main__":
    main()
