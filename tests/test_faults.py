"""Faults: non-finite gradients skip a step (module API and optax), every bad input
in the docs' table gives the error the table shows, long runs stay finite and the
counters saturate; and the Python blocks of this issue's guides run as written."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest


ROOT = pathlib.Path(__file__).resolve().parent.parent
GUIDES = ROOT / "docs" / "guides"
INT32_MAX = int(jnp.iinfo(jnp.int32).max)


# ----------------------------------------------------------- non-finite steps


def _batches(n, bad_at=None, bad_value=math.nan):
    key = jr.key(0)
    out = []
    for i in range(n):
        g = {"w": jr.normal(jr.fold_in(key, i), (4, 3)), "b": jnp.ones(3) * 0.1}
        if i == bad_at:
            g["w"] = g["w"].at[1, 2].set(bad_value)
        out.append(g)
    return out


def _run(opt_update, state, params, grads):
    for g in grads:
        updates, state = opt_update(g, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    return params, state


def _params():
    return {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}


def _same_run(a, b):
    """Equal up to float32 round-off (the wrapped step is another XLA program, so
    fusion may round differently); integer leaves (counters) exactly equal."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype
        if np.issubdtype(x.dtype, np.integer):
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _ademamix():
    return eam.AdEMAMix(1e-2, b3=0.999, alpha=5.0, weight_decay=0.01)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
def test_skip_non_finite_module_equals_run_without_the_batch(bad_value):
    opt = eam.SkipNonFinite(_ademamix())
    update = eqx.filter_jit(lambda g, s, p: opt.update(g, s, p))
    grads = _batches(30, bad_at=10, bad_value=bad_value)
    params, state = _run(update, opt.init(_params()), _params(), grads)
    clean = grads[:10] + grads[11:]
    inner = _ademamix()
    want_params, want_state = _run(
        eqx.filter_jit(lambda g, s, p: inner.update(g, s, p)),
        inner.init(_params()),
        _params(),
        clean,
    )
    _same_run(params, want_params)
    _same_run(state.inner_state, want_state)
    assert int(state.inner_state.count) == 29
    assert int(state.total_notfinite) == 1
    assert int(state.notfinite_count) == 0 and bool(state.last_finite)


def test_skip_non_finite_through_to_optax_and_in_a_chain():
    tx = optax.chain(
        optax.clip_by_global_norm(10.0), eam.SkipNonFinite(_ademamix()).to_optax()
    )
    grads = _batches(20, bad_at=5)
    with jax.numpy_dtype_promotion("standard"):
        params, state = _run(jax.jit(tx.update), tx.init(_params()), _params(), grads)
    assert int(state[1].total_notfinite) == 1
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("route", ["apply_if_finite", "multisteps_skip_not_finite"])
def test_optax_wrappers_equal_run_without_the_batch(route):
    inner = _ademamix()
    if route == "apply_if_finite":
        tx = optax.apply_if_finite(inner.to_optax(), max_consecutive_errors=5)
    else:
        tx = optax.MultiSteps(
            inner.to_optax(),
            every_k_schedule=1,
            should_skip_update_fn=optax.skip_not_finite,
        )
    grads = _batches(30, bad_at=10)
    with jax.numpy_dtype_promotion("standard"):
        params, state = _run(jax.jit(tx.update), tx.init(_params()), _params(), grads)
    want_params, want_state = _run(
        eqx.filter_jit(lambda g, s, p: inner.update(g, s, p)),
        inner.init(_params()),
        _params(),
        grads[:10] + grads[11:],
    )
    _same_run(params, want_params)
    inner_state = (
        state.inner_state if route == "apply_if_finite" else state.inner_opt_state
    )
    _same_run(inner_state, want_state)


def test_unprotected_nan_poisons_the_slow_ema_for_good():
    """Why the wrappers matter: one NaN batch, then 200 good ones."""
    opt = _ademamix()
    update = eqx.filter_jit(lambda g, s, p: opt.update(g, s, p))
    params, state = _run(update, opt.init(_params()), _params(), _batches(201, 0))
    assert bool(jnp.isnan(state.m2["w"][1, 2]))
    assert bool(jnp.isnan(params["w"][1, 2]))


def test_max_consecutive_errors_lets_a_persistent_failure_through():
    opt = eam.SkipNonFinite(_ademamix(), max_consecutive_errors=2)
    update = eqx.filter_jit(lambda g, s, p: opt.update(g, s, p))
    state = opt.init(_params())
    bad = _batches(1, bad_at=0)[0]
    for expected_count in (0, 0, 1):  # skipped, skipped, applied
        _, state = update(bad, state, _params())
        assert int(state.inner_state.count) == expected_count
    assert int(state.notfinite_count) == 3
    assert bool(jnp.isnan(state.inner_state.m2["w"][1, 2]))


def _overflow_setup(storage):
    """An optimizer for 4096 parameters (one 8-bit block is 256 of them) and the
    gradient 0.5 everywhere, except 2e19 on element 0 at step 3: finite, but its
    square (4e38) overflows float32 in the second moment."""
    if storage == "f32":
        opt, dtype = eam.AdEMAMix(1e-3), jnp.float32
    elif storage == "bf16":  # bf16 parameters: m1, m2 and nu in bfloat16
        opt, dtype = eam.AdEMAMix(1e-2), jnp.bfloat16
    else:
        opt = eam.AdEMAMix(1e-3, quantized=eam.Blockwise8Bit(min_size=256))
        dtype = jnp.float32
    grads = [jnp.full(4096, 0.5, dtype) for _ in range(40)]
    grads[3] = grads[3].at[0].set(2e19)
    assert bool(jnp.all(jnp.isfinite(grads[3])))
    return opt, jnp.ones(4096, dtype), grads


def _train(opt, params, grads):
    step = eqx.filter_jit(lambda g, s, p: opt.update(g, s, p))
    state, history = opt.init(params), []
    for g in grads:
        updates, state = step(g, state, params)
        params = eqx.apply_updates(params, updates)
        history.append(params)
    return history, state


@pytest.mark.parametrize("storage", ["f32", "bf16", "8bit"])
def test_skip_non_finite_skips_a_finite_gradient_that_overflows(storage):
    """`SkipNonFinite` skips the step (the gradient is finite, the new `nu` is not);
    element 0 then trains exactly like element 1, which never saw the gradient.
    Without it, element 0 stops for good (nu = inf), or 8-bit state turns NaN."""
    opt, params, grads = _overflow_setup(storage)
    history, state = _train(eam.SkipNonFinite(opt), params, grads)
    assert int(state.total_notfinite) == 1 and bool(state.last_finite)
    assert int(state.inner_state.count) == len(grads) - 1
    assert _all_finite_tree(state.inner_state)
    last = np.asarray(history[-1], np.float32)
    assert last[0] == last[1] and last[0] < np.asarray(history[3], np.float32)[0]
    np.testing.assert_array_equal(history[3], history[2])  # the skipped step

    bare, bare_state = _train(opt, params, grads)
    if storage == "8bit":
        assert bool(jnp.all(jnp.isnan(bare[-1][:256])))  # the whole block
        assert bool(jnp.all(jnp.isfinite(bare[-1][256:])))
    else:
        assert not bool(jnp.all(jnp.isfinite(bare_state.nu)))
        frozen = np.asarray([np.float32(p[0]) for p in bare[3:]])
        assert np.all(frozen == frozen[0])  # element 0 never moves again
        assert float(bare[-1][1]) < float(bare[3][1])  # the others train


def _all_finite_tree(tree):
    leaves = jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array))
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def test_skip_non_finite_rejects_a_foreign_state():
    opt = eam.SkipNonFinite(_ademamix())
    with pytest.raises(TypeError, match="SkipNonFiniteState"):
        opt.update(_params(), _ademamix().init(_params()), _params())
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        eam.SkipNonFinite(_ademamix(), max_consecutive_errors=-1)


# ----------------------------------------------------------- the docs' table


def _table_rows():
    text = (GUIDES / "faults.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[1].startswith("`"):
            continue
        example = cells[1].strip("`")
        match = re.fullmatch(r"``(\w+): (.*?)``", cells[2])
        rows.append((cells[0], example, match.groups() if match else None))
    return rows


ROWS = _table_rows()


def test_table_covers_the_issue():
    kinds = " ".join(r[0] for r in ROWS)
    for needed in (
        "outside",  # invalid hyperparameters
        "NaN `b1`",  # NaN hyperparameters
        "integer parameters",
        "gradients of another structure",
        "gradients of another shape",
        "a state from optax",
        "schedule returning an array",
    ):
        assert needed in kinds, needed
    assert len(ROWS) >= 25


_TABLE_RUNNER = """
import json, math, sys
import equinox as eqx
import jax.numpy as jnp
import optax
import eqx_ademamix as eam

out = []
for example in json.loads(sys.stdin.read()):
    opt = eam.AdEMAMix(learning_rate=1e-3)
    p = {"w": jnp.ones((2, 3))}
    namespace = dict(math=math, eqx=eqx, jnp=jnp, optax=optax, eam=eam, opt=opt,
                     p=p, g={"w": jnp.ones((2, 3))}, state=opt.init(p))
    try:
        eval(example, namespace)
        out.append(None)
    except Exception as e:
        out.append([type(e).__name__, str(e)])
print("RESULTS " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def table_results():
    """The examples run as a user runs them: in a plain interpreter, without the
    test suite's runtime type checker (whose own errors would come first)."""
    proc = subprocess.run(
        [sys.executable, "-c", _TABLE_RUNNER],
        input=json.dumps([r[1] for r in ROWS]),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULTS ") :])


@pytest.mark.parametrize("index", range(len(ROWS)), ids=[r[0] for r in ROWS])
def test_bad_input_table(table_results, index):
    _, example, expected = ROWS[index]
    got = table_results[index]
    if expected is None:  # documented as "no error"
        assert got is None, got
        return
    assert got is not None, f"{example} raised nothing"
    kind, message = expected
    assert got[0] == kind, got
    assert message.rstrip(".") in got[1], got[1]


# ------------------------------------------------------------------ long runs


def test_100k_steps_in_scan_stay_finite_and_learn():
    """A noisy 2-d quadratic: 100,000 steps of AdEMAMix (with the paper's
    warm-ups) inside one lax.scan."""
    opt = eam.AdEMAMix(
        learning_rate=1e-3,
        alpha=eam.alpha_scheduler(5.0, warmup=20_000),
        b3=eam.beta3_scheduler(0.9999, beta_start=0.9, warmup=20_000),
        weight_decay=1e-4,
    )
    target = jnp.array([1.0, -2.0])
    params = jnp.array([4.0, 3.0])

    def loss(p):
        return 0.5 * jnp.sum((p - target) ** 2)

    def body(carry, i):
        p, s = carry
        noise = jr.normal(jr.fold_in(jr.key(0), i), (2,))
        g = jax.grad(loss)(p) + 0.1 * noise
        u, s = opt.update(g, s, p)
        return (p + u, s), loss(p)

    n = 100_000
    (p, s), losses = jax.jit(
        lambda p, s: lax.scan(body, (p, s), jnp.arange(n, dtype=jnp.uint32))
    )(params, opt.init(params))
    losses = np.asarray(losses)
    assert np.all(np.isfinite(losses))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((p, s)))
    assert int(s.count) == n and int(s.count_m2) == n
    assert losses[-1000:].mean() < 1e-2 * losses[0]


def test_counters_saturate_at_int32_max():
    opt = eam.AdEMAMix(
        learning_rate=1e-2,
        alpha=eam.alpha_scheduler(5.0, warmup=1000),
        b3=eam.beta3_scheduler(0.999, warmup=1000),
    )
    params = jnp.array([1.0, -1.0])
    state = opt.init(params)
    state = eqx.tree_at(
        lambda s: (s.count, s.count_m2),
        state,
        (jnp.asarray(INT32_MAX - 5, jnp.int32), jnp.asarray(INT32_MAX - 3, jnp.int32)),
    )

    def body(carry, _):
        p, s = carry
        u, s = opt.update(p, s, p)
        return (p + u, s), (s.count, s.count_m2, u)

    (p, s), (counts, counts_m2, updates) = lax.scan(
        body, (params, state), None, length=20
    )
    expected = np.minimum(np.arange(1, 21) + INT32_MAX - 5, INT32_MAX)
    np.testing.assert_array_equal(np.asarray(counts), expected)
    expected_m2 = np.minimum(np.arange(1, 21) + INT32_MAX - 3, INT32_MAX)
    np.testing.assert_array_equal(np.asarray(counts_m2), expected_m2)
    assert np.all(np.isfinite(np.asarray(updates)))
    assert np.all(np.asarray(updates) != 0)


# ---------------------------------------------------------- the guides' code


def _python_blocks(page):
    text = (GUIDES / page).read_text()
    blocks, skip = [], False
    for match in re.finditer(
        r"(<!-- skip-test -->\s*)?```python\n(.*?)```", text, re.S
    ):
        skip = match.group(1) is not None
        if not skip:
            blocks.append(match.group(2))
    return blocks


@pytest.mark.parametrize("page", ["sharding.md"])
def test_guide_code_blocks_run(page, tmp_path):
    """The sharding guide's Python blocks, in order, in a fresh interpreter with 8
    simulated devices (tests/test_docs.py runs every page on this process's one
    device), in an empty directory."""
    if not (GUIDES / page).exists():
        pytest.skip(f"{page} not written yet")
    code = "\n\n".join(_python_blocks(page))
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
