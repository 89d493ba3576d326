"""Smoke runs of the examples with tiny settings: they run, write their outputs, and
a run interrupted and resumed from its checkpoints ends where an uninterrupted one
does."""

import importlib.util
import json
import pathlib

import eqx_ademamix as eam
import jax
import numpy as np
import pytest


EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    path = EXAMPLES / f"{name}.py"
    if not path.exists():
        pytest.skip(f"{path.name} does not exist")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def standard_promotion():
    # The examples are user code: they run under JAX's default promotion rules,
    # not the strict ones the package's own tests use.
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_quickstart():
    quickstart = _load("quickstart")
    quickstart.main(["--steps", "50"])


def test_rosenbrock(tmp_path):
    rosenbrock = _load("rosenbrock")
    result = rosenbrock.main(
        ["--steps", "300", "--lr", "0.01", "--out-dir", str(tmp_path), "--no-progress"]
    )
    assert (tmp_path / "rosenbrock.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "rosenbrock.json").read_text())
    assert set(saved["summary"]) == set(result["summary"])
    assert len(saved["summary"]) == 5
    start = np.hypot(-3 - 1, 5 - 1)
    for name, distances in saved["distances"].items():
        assert distances[0] == pytest.approx(start)
        x, y = result["summary"][name]["final_point"]
        assert (1 - x) ** 2 + 100 * (y - x**2) ** 2 < 1616 / 10, name  # f(-3, 5)


TINY = [
    "--steps", "20", "--eval-every", "10", "--width", "16", "--depth", "1",
    "--heads", "2", "--seq-len", "16", "--batch-size", "4", "--eval-batches", "1",
    "--max-corpus-mb", "0.3", "--no-progress",
]  # fmt: skip


def test_char_lm_runs_and_resumes(tmp_path):
    """AdamW and AdEMAMix (each compiles a training step, the slow part); then the
    same run stopped in the middle of AdEMAMix's run and resumed from the
    checkpoints ends with the same curves."""
    char_lm = _load("char_lm")
    args = TINY + ["--seeds", "0", "--optimizers", "AdamW", "AdEMAMix"]
    whole = char_lm.main(args + ["--out-dir", str(tmp_path / "a")])
    assert (tmp_path / "a" / "char_lm.png").stat().st_size > 10_000
    saved = json.loads((tmp_path / "a" / "char_lm.json").read_text())
    assert set(saved["summary"]) == {"AdamW", "AdEMAMix"}
    assert len(saved["runs"]) == 2
    for run in saved["runs"]:
        assert run["steps"] == [10, 20]
        # From uniform bytes (ln 256 = 5.55 nats) the loss must have come down.
        assert np.all(np.isfinite(run["val_loss"]))
        assert run["val_loss"][-1] < np.log(256)
    adamw = [r for r in saved["runs"] if r["name"] == "AdamW"][0]
    summary = whole["summary"]["AdamW"]
    assert summary["final_val_loss_per_seed"] == [adamw["val_loss"][-1]]

    out = str(tmp_path / "b")
    # AdamW has 2 intervals, so this stops after AdEMAMix's first one.
    assert char_lm.main(args + ["--out-dir", out, "--stop-after", "3"]) == {}
    resumed = char_lm.main(args + ["--out-dir", out, "--resume"])
    for a, b in zip(whole["runs"], resumed["runs"], strict=True):
        assert a["name"] == b["name"] and a["steps"] == b["steps"]
        np.testing.assert_allclose(a["val_loss"], b["val_loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="other settings"):
        char_lm.main(args + ["--out-dir", out, "--resume", "--lr", "1e-2"])


def test_char_lm_optimizer_settings():
    """The three optimizers of char_lm on a constant gradient, without compiling the
    model. The first step is 0 (the learning-rate warm-up starts at 0); at the
    second, Adam's step is lr, AdEMAMix's is lr (1 + alpha_1 m2) with alpha_1 =
    8/100, and Simplified AdEMAMix's is 8e-3 lr (m + 125 g) with m = (1 + b1_1) g,
    b1_1 a little above 0.9: 8e-3 * (126.9...) = 1.015 lr."""
    char_lm = _load("char_lm")
    args = char_lm.parse_args(["--steps", "100", "--warmup", "0.0"])
    params = {"b": jax.numpy.zeros(2)}  # 1-D: no weight decay
    grads = {"b": jax.numpy.full(2, 0.01)}  # norm below the clipping threshold
    second = {}
    for name in char_lm.OPTIMIZERS:
        tx = char_lm.make_optimizer(name, args)
        update = jax.jit(tx.update)
        state = tx.init(params)
        first, state = update(grads, state, params)
        np.testing.assert_array_equal(first["b"], 0.0)
        second[name] = float(update(grads, state, params)[0]["b"][0])
    assert second["AdamW"] < 0
    assert 1.0 < second["AdEMAMix"] / second["AdamW"] < 1.08
    assert 1.014 < second["Simplified AdEMAMix"] / second["AdamW"] < 1.016


@pytest.mark.parametrize(
    "state, kind",
    [
        ("bf16", "bfloat16"),
        ("float8", "BlockwiseFloat8Array"),
        ("tree", "Blockwise8BitArray"),
    ],
)
def test_char_lm_state_option(state, kind):
    """`--state` gives both AdEMAMix optimizers that state storage (AdamW stays
    float32) and is part of the settings a checkpoint must match."""
    char_lm = _load("char_lm")
    args = char_lm.parse_args(["--state", state])
    assert char_lm.config(args)["state"] == state
    params = {"w": jax.numpy.zeros((64, 96))}
    for name in ("AdEMAMix", "Simplified AdEMAMix"):
        leaves = jax.tree.leaves(
            char_lm.make_optimizer(name, args).init(params),
            is_leaf=lambda x: isinstance(x, eam.AbstractEncodedArray),
        )
        kinds = {type(x).__name__ for x in leaves} | {
            str(x.dtype) for x in leaves if getattr(x, "shape", ()) == (64, 96)
        }
        assert kind in kinds, (name, kinds)


def test_steps_to_reach():
    char_lm = _load("char_lm")
    steps, losses = [10, 20, 30], [3.0, 2.0, 1.0]
    assert char_lm.steps_to_reach(steps, losses, 2.5) == pytest.approx(15.0)
    assert char_lm.steps_to_reach(steps, losses, 3.5) == 10.0
    assert char_lm.steps_to_reach(steps, losses, 0.5) == float("inf")


def test_lr_study_and_report(tmp_path):
    """The study in quick mode (AdamW only: two learning rates, then one seed at the
    better one), a rerun that finds every run done, and the report from its JSON."""
    lr_study = _load("lr_study")
    study = TINY + ["--optimizers", "AdamW", "--lrs", "1e-3", "2e-3", "--seeds", "1"]
    study += ["--forget-batches", "2", "--forget-every", "10"]
    study += [
        "--final-eval-batches",
        "2",
        "--json",
        str(tmp_path / "lr_study" / "s.json"),
    ]
    results = lr_study.main(study)
    assert set(results["runs"]) == {
        "AdamW lr=0.001 seed=0",
        "AdamW lr=0.002 seed=0",
        f"AdamW lr={results['best_lr']['AdamW']:g} seed=1",
    }
    run = results["runs"][f"AdamW lr={results['best_lr']['AdamW']:g} seed=1"]
    assert run["forget_steps"] == [10, 20] and len(run["middle_loss"]) == 2
    assert np.all(np.isfinite(run["val_loss"])) and run["final_val_loss"] < 6
    again = lr_study.main(study)  # every run is in the JSON: nothing is trained
    assert again["runs"] == results["runs"] and len(again["sessions"]) == 2
    with pytest.raises(ValueError, match="other settings"):
        lr_study.main(study + ["--seeds", "2"])

    report = _load("lr_study_report")
    pages = {}
    for tag in ("lr_study", "lr_study:guide"):
        pages[tag] = tmp_path / f"{tag.replace(':', '_')}.md"
        pages[tag].write_text(
            f"before\n<!-- {tag}:begin -->\nOLD TEXT\n<!-- {tag}:end -->\n"
        )
    summary = report.main(
        ["--json", str(tmp_path / "lr_study" / "s.json")]
        + ["--results-md", str(pages["lr_study"])]
        + ["--guide-md", str(pages["lr_study:guide"])]
    )["lr_study"]
    assert summary["optimizers"]["AdamW"]["lr_ratio"] == 1
    text = pages["lr_study"].read_text()
    assert (
        text.startswith("before\n") and "OLD TEXT" not in text and "| 0.002 |" in text
    )
    for png in ("val_loss", "lr_sweep", "forgetting"):
        assert (tmp_path / "lr_study" / f"{png}.png").stat().st_size > 10_000
