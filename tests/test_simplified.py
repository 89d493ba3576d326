"""Simplified AdEMAMix against a NumPy float64 transcription of Morwani et al. (2025)
and against optax.contrib.simplified_ademamix."""

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from .conftest import random_grads, run_module, tree_allclose, tree_dtypes
from .reference import alpha_at, beta3_at


def simplified_run(
    theta0,
    grads,
    lr=1e-3,
    b1=0.99,
    b2=0.95,
    alpha=0.0,
    eps=1e-8,
    weight_decay=0.0,
    b1_start=None,
    t_b1=0,
    t_alpha=0,
):
    """Simplified AdEMAMix in NumPy float64, from the paper (arXiv:2502.02431):
    m = b1 m + g; nu = b2 nu + (1-b2)|g|^2; nu_hat = nu / (1 - b2^t);
    theta -= lr ((m + alpha g) / (sqrt(nu_hat) + eps) + wd theta).
    `b1` warms up from `b1_start` over `t_b1` steps, linearly in half-life (the
    AdEMAMix paper's Eq. 5); `alpha` linearly from 0 over `t_alpha` steps."""
    theta = np.asarray(theta0).astype(np.result_type(theta0, np.float64))
    m = np.zeros_like(theta)
    nu = np.zeros(theta.shape, np.float64)
    history = []
    for t, g in enumerate(grads):
        g = np.asarray(g).astype(theta.dtype)
        b1_t = beta3_at(t, b1, b1_start, t_b1) if t_b1 else b1
        a = alpha_at(t, alpha, 0.0, t_alpha)
        m = b1_t * m + g
        nu = b2 * nu + (1 - b2) * np.abs(g) ** 2
        nu_hat = nu / (1 - b2 ** (t + 1))
        theta = theta - lr * (
            (m + a * g) / (np.sqrt(nu_hat) + eps) + weight_decay * theta
        )
        history.append(theta.copy())
    return history, (m, nu)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(alpha=3.0, weight_decay=0.1, b2=0.999),
        dict(b1=0.0, alpha=1.0),
        dict(b1=0.999, b1_start=0.9, t_b1=100, alpha=2.0, t_alpha=50),
        dict(b1=0.99, b1_start=0.0, t_b1=40),
    ],
)
def test_matches_float64_reference(getkey, kwargs):
    """150 steps against the paper's rule in float64 (x64 on, so round-off is not
    the question), with and without the b1 and alpha warm-ups."""
    kwargs = dict(lr=1e-3, **kwargs)
    grads = random_grads(getkey, (4, 3), 150)
    theta0 = np.asarray(jr.normal(getkey(), (4, 3)))
    expected, (m, nu) = simplified_run(theta0, grads, **kwargs)
    b1_start, t_b1 = kwargs.pop("b1_start", None), kwargs.pop("t_b1", 0)
    t_alpha = kwargs.pop("t_alpha", 0)
    with jax.enable_x64(True):
        b1, alpha = kwargs.pop("b1", 0.99), kwargs.pop("alpha", 0.0)
        opt = eam.SimplifiedAdEMAMix(
            learning_rate=kwargs.pop("lr"),
            b1=eam.beta3_scheduler(b1, b1_start, t_b1) if t_b1 else b1,
            alpha=eam.alpha_scheduler(alpha, warmup=t_alpha) if t_alpha else alpha,
            **kwargs,
        )
        got, state = run_module(opt, jnp.asarray(theta0, jnp.float64), grads)
        np.testing.assert_allclose(
            np.stack(got), np.stack(expected), rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(state.nu, nu, rtol=1e-10, atol=1e-14)
        if b1 == 0:
            assert state.m is None
        else:
            np.testing.assert_allclose(state.m, m, rtol=1e-10, atol=1e-12)


def test_float32_close_to_float64_reference(getkey):
    grads = random_grads(getkey, (16,), 200)
    theta0 = np.asarray(jr.normal(getkey(), (16,)))
    expected, _ = simplified_run(theta0, grads, lr=1e-3, alpha=5.0)
    got, _ = run_module(
        eam.SimplifiedAdEMAMix(1e-3, alpha=5.0), jnp.asarray(theta0, jnp.float32), grads
    )
    np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "b1,b2,alpha,weight_decay", [(0.99, 0.95, 0.0, 0.0), (0.9, 0.999, 4.0, 0.05)]
)
def test_matches_optax_contrib(getkey, b1, b2, alpha, weight_decay):
    """With constant hyperparameters and float32 state the optax function agrees
    with optax.contrib.simplified_ademamix over 150 steps, to float32 round-off."""
    params = {"w": jr.normal(getkey(), (8, 5)), "b": jr.normal(getkey(), (5,))}
    kwargs = dict(b1=b1, b2=b2, alpha=alpha, weight_decay=weight_decay)
    ours = eam.simplified_ademamix(1e-3, **kwargs)
    with jax.numpy_dtype_promotion("standard"):  # optax itself needs it
        theirs = optax.contrib.simplified_ademamix(1e-3, **kwargs)
        s_ours, s_theirs = ours.init(params), theirs.init(params)
        up_ours, up_theirs = jax.jit(ours.update), jax.jit(theirs.update)
        p = params
        for _ in range(150):
            g = jax.tree.map(lambda x: jr.normal(getkey(), x.shape), params)
            u1, s_ours = up_ours(g, s_ours, p)
            u2, s_theirs = up_theirs(g, s_theirs, p)
            scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u2))
            # Both are float32 round-off away from the float64 rule (measured: a
            # median relative error of 1.6e-5 each, on different elements).
            assert tree_allclose(u1, u2, rtol=1e-4, atol=1e-4 * scale)
            p = optax.apply_updates(p, u2)
    s_theirs = s_theirs[0]  # optax chains scale_by_simplified_ademamix first
    assert tree_allclose(s_ours.m, s_theirs.m, rtol=1e-4, atol=1e-5)
    assert tree_allclose(s_ours.nu, s_theirs.n, rtol=1e-4, atol=1e-6)
    assert int(s_ours.count) == int(s_theirs.t) == 150


def test_scale_by_matches_optax_contrib(getkey):
    params = jr.normal(getkey(), (7,))
    ours = eam.scale_by_simplified_ademamix(alpha=2.0, eps_root=1e-8)
    theirs = optax.contrib.scale_by_simplified_ademamix(alpha=2.0, eps_root=1e-8)
    s1, s2 = ours.init(params), theirs.init(params)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(20):
            g = jr.normal(getkey(), (7,))
            u1, s1 = ours.update(g, s1)
            u2, s2 = theirs.update(g, s2)
            np.testing.assert_allclose(u1, u2, rtol=1e-5)


def test_scale_chain_equals_optimizer(getkey):
    params = jr.normal(getkey(), (6,))
    chained = optax.chain(
        eam.scale_by_simplified_ademamix(alpha=1.0),
        optax.add_decayed_weights(0.1),
        optax.scale_by_learning_rate(1e-3),
    )
    whole = eam.simplified_ademamix(1e-3, alpha=1.0, weight_decay=0.1)
    s1, s2 = chained.init(params), whole.init(params)
    with jax.numpy_dtype_promotion("standard"):
        for _ in range(5):
            g = jr.normal(getkey(), (6,))
            u1, s1 = chained.update(g, s1, params)
            u2, s2 = whole.update(g, s2, params)
            np.testing.assert_allclose(u1, u2, rtol=1e-6)


def test_schedules_use_count_before_increment():
    """At step 0 (count 0) a b1 schedule gives its start value; the first update is
    then (g + alpha_0 g) / (|g| + eps) with m = g whatever b1 is, and the second
    uses b1(1) = the schedule at 1."""
    b1 = eam.beta3_scheduler(0.99, beta_start=0.5, warmup=2)
    alpha = eam.alpha_scheduler(4.0, warmup=2)
    opt = eam.SimplifiedAdEMAMix(1.0, b1=b1, alpha=alpha, eps=0.0, b2=0.5)
    state = opt.init(jnp.zeros(1))
    u, state = opt.update(jnp.ones(1), state)
    np.testing.assert_allclose(u, [-1.0])  # alpha(0) = 0
    u, state = opt.update(jnp.ones(1), state)
    b1_at_1 = float(b1(1))
    assert 0.5 < b1_at_1 < 0.99
    np.testing.assert_allclose(state.m, [b1_at_1 + 1], rtol=1e-6)
    np.testing.assert_allclose(u, [-(b1_at_1 + 1 + 2.0)], rtol=1e-6)


def test_b1_zero_allocates_no_momentum():
    params = {"a": jnp.ones((5, 5))}
    opt = eam.SimplifiedAdEMAMix(b1=0.0, alpha=1.0)
    state = opt.init(params)
    assert state.m is None
    assert sum(x.size for x in jax.tree.leaves(state)) == 25 + 1
    u, state = opt.update({"a": jnp.ones((5, 5))}, state)
    assert state.m is None
    np.testing.assert_allclose(u["a"], -1e-4 * 2 / (1 + 1e-8), rtol=1e-6)


@pytest.mark.parametrize(
    "param_dtype,mu_dtype",
    [
        (jnp.float32, None),
        (jnp.bfloat16, None),
        (jnp.float32, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32),
    ],
)
def test_state_dtypes_never_change(getkey, param_dtype, mu_dtype):
    params = {"w": jr.normal(getkey(), (4, 3)).astype(param_dtype)}
    opt = eam.SimplifiedAdEMAMix(1e-3, mu_dtype=mu_dtype, weight_decay=0.1)
    state = opt.init(params)
    assert state.m["w"].dtype == jnp.dtype(mu_dtype or param_dtype)
    assert state.nu["w"].dtype == jnp.dtype(param_dtype)
    before = tree_dtypes(state)

    def body(carry, g):
        p, s = carry
        u, s = opt.update({"w": g}, s, p)
        assert u["w"].dtype == jnp.dtype(param_dtype)
        return (eqx.apply_updates(p, u), s), None

    grads = jr.normal(getkey(), (5, 4, 3)).astype(param_dtype)
    (_, state), _ = jax.lax.scan(body, (params, state), grads)
    assert tree_dtypes(state) == before
    assert int(state.count) == 5


def test_complex_parameters(getkey):
    """nu tracks |g|^2 (real) for complex gradients; the reference is the same
    formula in complex128."""

    def normal():
        return np.asarray(jr.normal(getkey(), (3,)))

    theta0 = normal() + 1j * normal()
    grads = [normal() + 1j * normal() for _ in range(30)]
    expected, (_, nu) = simplified_run(theta0, grads, lr=1e-3, alpha=1.0)
    with jax.enable_x64(True):
        got, state = run_module(
            eam.SimplifiedAdEMAMix(1e-3, alpha=1.0),
            jnp.asarray(theta0, jnp.complex128),
            grads,
        )
    assert state.nu.dtype == jnp.float64
    np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=1e-10)
    np.testing.assert_allclose(state.nu, nu, rtol=1e-10)


def test_counter_saturates():
    opt = eam.SimplifiedAdEMAMix(1e-3)
    state = opt.init(jnp.zeros(2))
    top = jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32)
    state = eqx.tree_at(lambda s: s.count, state, top)
    _, state = opt.update(jnp.ones(2), state)
    assert int(state.count) == int(top)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(b1=1.0), "b1"),
        (dict(b1=-0.1), "b1"),
        (dict(b2=1.5), "b2"),
        (dict(eps=-1.0), "eps"),
        (dict(eps_root=float("nan")), "eps_root"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(mu_dtype=jnp.int32), "mu_dtype"),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        eam.SimplifiedAdEMAMix(**kwargs)


def test_bad_inputs():
    opt = eam.SimplifiedAdEMAMix(1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="floating"):
        opt.init({"i": jnp.arange(3)})
    state = opt.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="weight_decay"):
        opt.update({"w": jnp.ones(3)}, state)
    with pytest.raises(ValueError, match="shape"):
        opt.update({"w": jnp.ones(4)}, state, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match="does not match"):
        opt.update({"v": jnp.ones(3)}, state, {"v": jnp.ones(3)})
    with pytest.raises(TypeError, match="ScaleBySimplifiedAdemamixState"):
        opt.update({"w": jnp.ones(3)}, eam.AdEMAMix().init({"w": jnp.ones(3)}))
    bad = eam.SimplifiedAdEMAMix(1e-3, b1=lambda step: jnp.ones(2) * 0.9)
    with pytest.raises(ValueError, match="`b1` must return a scalar"):
        bad.update(jnp.ones(2), bad.init(jnp.ones(2)))
    no_m = eam.SimplifiedAdEMAMix(b1=0.0).init(jnp.ones(2))
    with pytest.raises(ValueError, match="b1 = 0"):
        eam.SimplifiedAdEMAMix().update(jnp.ones(2), no_m)


def test_converges_on_rosenbrock_in_scan():
    b1 = eam.beta3_scheduler(0.99, beta_start=0.9, warmup=2000)
    tx = eam.simplified_ademamix(1e-3, b1=b1, alpha=2.0)

    def rosenbrock(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    def body(carry, _):
        x, s = carry
        u, s = tx.update(jax.grad(rosenbrock)(x), s, x)
        return (optax.apply_updates(x, u), s), None

    x0 = jnp.array([-1.0, 1.0])
    (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), length=5000)
    assert rosenbrock(x) < 1e-2  # from 4.0 at the start
