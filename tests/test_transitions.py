"""reset_slow_ema and switching from Adam/AdamW to AdEMAMix mid-run, checked
against a float64 NumPy continuation of the paper's Algorithm 1 and against
optax.adam itself."""

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from .reference import alpha_at, beta3_at


def _continue(theta, m1, m2, nu, count, count_m2, grads, *, lr, b1, b2, b3, alpha,
              t_alpha, t_b3, eps=1e-8):  # fmt: skip
    """Algorithm 1 from a given state, in float64: the schedules at count_m2, bias
    correction at count."""
    theta, m1, m2, nu = (np.asarray(x, np.float64).copy() for x in (theta, m1, m2, nu))
    history = []
    for g in grads:
        g = np.asarray(g, np.float64)
        a = alpha_at(count_m2, alpha, 0.0, t_alpha)
        b3_t = beta3_at(count_m2, b3, b1, t_b3)
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3_t * m2 + (1 - b3_t) * g
        nu = b2 * nu + (1 - b2) * g * g
        count, count_m2 = count + 1, count_m2 + 1
        m1_hat = m1 / (1 - b1**count)
        nu_hat = nu / (1 - b2**count)
        theta = theta - lr * (m1_hat + a * m2) / (np.sqrt(nu_hat) + eps)
        history.append(theta.copy())
    return history


HYPER = dict(lr=1e-2, b1=0.9, b2=0.999, b3=0.999, alpha=8.0, t_alpha=30, t_b3=30)


def _ademamix(dtype=None):
    h = HYPER
    return eam.AdEMAMix(
        learning_rate=h["lr"],
        b1=h["b1"],
        b2=h["b2"],
        alpha=eam.alpha_scheduler(h["alpha"], warmup=h["t_alpha"]),
        b3=eam.beta3_scheduler(h["b3"], beta_start=h["b1"], warmup=h["t_b3"]),
        mu_dtype=dtype,
    )


def _grads(n, shape=(5, 3), seed=0):
    return [np.asarray(jr.normal(jr.key(seed * 1000 + i), shape)) for i in range(n)]


def _steps(update, params, state, grads, dtype):
    history = []
    for g in grads:
        updates, state = update(jnp.asarray(g, dtype), state, params)
        params = eqx.apply_updates(params, updates)
        history.append(np.asarray(params))
    return params, state, history


def test_reset_slow_ema_restarts_warmups_float64():
    with jax.enable_x64(True):
        opt = _ademamix()
        update = eqx.filter_jit(lambda g, s, p: opt.update(g, s, p))
        params = jnp.asarray(np.linspace(-1, 1, 15).reshape(5, 3))
        params, state, _ = _steps(
            update, params, opt.init(params), _grads(40), jnp.float64
        )
        reset = eam.reset_slow_ema(state)
        assert int(reset.count) == 40 and int(reset.count_m2) == 0
        assert not np.any(np.asarray(reset.m2))
        np.testing.assert_array_equal(reset.m1, state.m1)
        np.testing.assert_array_equal(reset.nu, state.nu)
        after = _grads(35, seed=1)
        _, _, got = _steps(update, params, reset, after, jnp.float64)
        want = _continue(
            params, state.m1, 0.0 * state.m2, state.nu, 40, 0, after, **HYPER
        )
        np.testing.assert_allclose(
            np.stack(got), np.stack(want), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_reset_slow_ema_keeps_types_and_finds_nested_states(dtype):
    opt = eam.SkipNonFinite(_ademamix(dtype))
    tx = optax.chain(optax.clip(1.0), opt.to_optax())
    params = {"w": jnp.ones((4, 3)), "skip": None}
    state = tx.init(params)
    with jax.numpy_dtype_promotion("standard"):
        for g in _grads(5, (4, 3)):
            _, state = tx.update({"w": jnp.asarray(g), "skip": None}, state, params)
    reset = eam.reset_slow_ema(state)
    assert jax.tree.structure(reset) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(reset), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape
    inner = reset[1].inner_state
    assert int(inner.count_m2) == 0 and int(inner.count) == 5
    assert not np.any(np.asarray(inner.m2["w"], np.float32))
    with pytest.raises(ValueError, match="found no ScaleByAdemamixState"):
        eam.reset_slow_ema(optax.adam(1e-3).init(params))


def test_state_from_adam_carries_moments_and_count():
    params = {"w": jnp.ones((5, 3)), "b": jnp.zeros(3)}
    adam = optax.adamw(1e-2, weight_decay=1e-3)
    state = adam.init(params)
    with jax.numpy_dtype_promotion("standard"):
        for g in _grads(7, (5, 3)):
            _, state = adam.update(
                {"w": jnp.asarray(g), "b": jnp.ones(3)}, state, params
            )
    mu, nu = state[0].mu, state[0].nu
    new = eam.state_from_adam(_ademamix(), state)
    assert int(new.count) == 7 and int(new.count_m2) == 0
    _bitwise = np.testing.assert_array_equal
    jax.tree.map(_bitwise, new.m1, mu)
    jax.tree.map(_bitwise, new.nu, nu)
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(new.m2))
    assert (
        int(eam.state_from_adam(_ademamix(), state, restart_warmup=False).count_m2) == 7
    )

    bf16 = eam.state_from_adam(_ademamix(jnp.bfloat16), state)
    assert bf16.m1["w"].dtype == jnp.bfloat16 and bf16.nu["w"].dtype == jnp.float32
    np.testing.assert_allclose(
        np.asarray(bf16.m1["w"], np.float32), mu["w"], rtol=2**-7, atol=0
    )
    assert eam.state_from_adam(eam.AdEMAMix(b1=0.0), state).m1 is None


def test_state_from_adam_finds_the_adam_state():
    params = jnp.ones(3)
    injected = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    with jax.numpy_dtype_promotion("standard"):
        state = injected.init(params)
    assert eam.state_from_adam(_ademamix(), state).m1.shape == (3,)
    two = optax.chain(optax.adam(1e-3), optax.adam(1e-3)).init(params)
    with pytest.raises(ValueError, match="found 2"):
        eam.state_from_adam(_ademamix(), two)
    with pytest.raises(ValueError, match="found 0"):
        eam.state_from_adam(_ademamix(), optax.sgd(1e-3).init(params))


@pytest.mark.parametrize(
    "options",
    [
        dict(packed=True),
        dict(storage=eam.Blockwise8Bit(min_size=8, block_size=4)),
        dict(packed=True, storage=eam.Blockwise8Bit(min_size=8, block_size=4)),
    ],
    ids=["packed", "8-bit", "packed-8-bit"],
)
def test_state_from_adam_in_every_layout_and_storage(options):
    """Adam's moments land in the target optimizer's layout and storage: its
    per-leaf plain state, read back, holds Adam's moments (8-bit within its
    resolution)."""
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(3)}
    adam = optax.adam(1e-3)
    state = adam.init(params)
    grads = jax.tree.map(lambda p: 0.3 * p + 0.1, params)
    with jax.numpy_dtype_promotion("standard"):  # optax's own arithmetic
        for _ in range(3):
            _, state = adam.update(grads, state, params)
    opt = eam.AdEMAMix(**options)
    converted = eam.state_from_adam(opt, state)
    assert jax.tree.structure(converted) == jax.tree.structure(opt.init(params))
    plain = eam.state_from_adam(eam.AdEMAMix(), state)
    # One step of both from the converted states gives nearly the same update.
    u1, _ = opt.update(grads, converted, params)
    u2, _ = eam.AdEMAMix().update(grads, plain, params)
    rtol = 0.15 if "storage" in options else 1e-5  # 8-bit: a few code steps
    np.testing.assert_allclose(u1["w"], u2["w"], rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(u1["b"], u2["b"], rtol=rtol, atol=1e-6)


def test_switch_from_adam_continues_algorithm_1_float64():
    """N Adam steps, then AdEMAMix from the carried state: the first step is
    optax.adam's next step (alpha starts at 0), and the whole continuation is
    Algorithm 1 started from (mu, 0, nu, N, 0)."""
    with jax.enable_x64(True):
        adam = optax.adam(HYPER["lr"], b1=HYPER["b1"], b2=HYPER["b2"])
        params = jnp.asarray(np.linspace(-1, 1, 15).reshape(5, 3))
        state = adam.init(params)
        with jax.numpy_dtype_promotion("standard"):
            for g in _grads(50):
                updates, state = adam.update(jnp.asarray(g), state, params)
                params = params + updates
            after = _grads(40, seed=2)
            adam_next, _ = adam.update(jnp.asarray(after[0]), state, params)
        opt = _ademamix()
        update = eqx.filter_jit(lambda g, s, p: opt.update(g, s, p))
        switched = eam.state_from_adam(opt, state)
        _, _, got = _steps(update, params, switched, after, jnp.float64)
        np.testing.assert_allclose(got[0], params + adam_next, rtol=1e-12, atol=1e-14)
        mu, nu = state[0].mu, state[0].nu
        want = _continue(params, mu, 0.0 * mu, nu, 50, 0, after, **HYPER)
        np.testing.assert_allclose(
            np.stack(got), np.stack(want), rtol=1e-10, atol=1e-12
        )


def _regression(seed=0):
    key = jr.key(seed)
    x = jr.normal(key, (256, 20))
    w_true = jr.normal(jr.fold_in(key, 1), (20,))
    y = x @ w_true + 0.1 * jr.normal(jr.fold_in(key, 2), (256,))
    return x, y


def _loss(w, x, y):
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def test_switch_at_step_n_keeps_the_loss_smooth():
    """AdamW for 300 minibatch steps, then AdEMAMix with the paper's warm-ups.
    Carrying Adam's moments over keeps the loss on its course; a cold switch (a
    fresh AdEMAMix state) makes it jump, which shows the check can fail."""
    x, y = _regression()
    lr, n = 3e-2, 300
    adamw = optax.adamw(lr, weight_decay=1e-4)
    target = eam.AdEMAMix(
        learning_rate=lr,
        weight_decay=1e-4,
        alpha=eam.alpha_scheduler(5.0, warmup=300),
        b3=eam.beta3_scheduler(0.999, beta_start=0.9, warmup=300),
    )

    def grad(w, i):
        idx = jr.choice(jr.fold_in(jr.key(1), i), 256, (32,), replace=False)
        return jax.grad(_loss)(w, x[idx], y[idx])

    def adam_body(carry, i):
        w, s = carry
        with jax.numpy_dtype_promotion("standard"):
            u, s = adamw.update(grad(w, i), s, w)
        return (w + u, s), _loss(w + u, x, y)

    def ademamix_body(carry, i):
        w, s = carry
        u, s = target.update(grad(w, i), s, w)
        return (w + u, s), _loss(w + u, x, y)

    @jax.jit
    def run():
        w = jnp.zeros(20)
        (w, s), before = jax.lax.scan(adam_body, (w, adamw.init(w)), jnp.arange(n))
        steps = jnp.arange(n, n + 100)
        warm_state = eam.state_from_adam(target, s)
        _, warm = jax.lax.scan(ademamix_body, (w, warm_state), steps)
        _, cold = jax.lax.scan(ademamix_body, (w, target.init(w)), steps)
        return before, warm, cold

    before, warm, cold = (np.asarray(v) for v in run())
    assert np.all(np.isfinite(warm))
    level = before[-50:].mean()
    assert warm[:50].max() < 1.5 * level, (warm[:50].max(), level)
    assert warm[-20:].mean() < 1.2 * level
    assert cold[:50].max() > 2 * warm[:50].max(), (cold[:50].max(), warm[:50].max())
