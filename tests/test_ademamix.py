import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest

from .conftest import random_grads, run_module, tree_allclose, tree_dtypes
from .reference import ademamix_run


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(b1=0.0),
        dict(weight_decay=0.1, alpha=8.0, b3=0.999),
        dict(t_alpha=60, t_b3=60, b3=0.999, alpha=8.0),
        dict(t_alpha=30, t_b3=80, b1=0.0, b3=0.9999),
    ],
)
def test_matches_float64_algorithm_1(getkey, kwargs):
    """150 steps against the paper's Algorithm 1 in NumPy float64 (with x64 on, so
    the package also computes in float64 and round-off is not the question)."""
    kwargs = dict(lr=1e-2, **kwargs)
    grads = random_grads(getkey, (4, 3), 150)
    theta0 = np.asarray(jr.normal(getkey(), (4, 3)))
    expected, (m1, m2, nu) = ademamix_run(theta0, grads, **kwargs)
    t_alpha, t_b3 = kwargs.pop("t_alpha", 0), kwargs.pop("t_b3", 0)
    b1, alpha, b3 = (
        kwargs.get("b1", 0.9),
        kwargs.get("alpha", 5.0),
        kwargs.get("b3", 0.9999),
    )
    with jax.enable_x64(True):
        opt = eam.AdEMAMix(
            learning_rate=kwargs.pop("lr"),
            **{k: v for k, v in kwargs.items() if k not in ("alpha", "b3")},
            alpha=eam.alpha_scheduler(alpha, warmup=t_alpha) if t_alpha else alpha,
            b3=eam.beta3_scheduler(b3, beta_start=b1, warmup=t_b3) if t_b3 else b3,
        )
        got, state = run_module(opt, jnp.asarray(theta0, jnp.float64), grads)
        np.testing.assert_allclose(
            np.stack(got), np.stack(expected), rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(state.m2, m2, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(state.nu, nu, rtol=1e-10, atol=1e-14)
        if b1 == 0:
            assert state.m1 is None
        else:
            np.testing.assert_allclose(state.m1, m1, rtol=1e-10, atol=1e-14)


def test_float32_close_to_float64_reference(getkey):
    grads = random_grads(getkey, (16,), 200)
    theta0 = np.asarray(jr.normal(getkey(), (16,)))
    expected, _ = ademamix_run(theta0, grads, lr=1e-2, alpha=8.0, b3=0.999)
    got, _ = run_module(
        eam.AdEMAMix(1e-2, alpha=8.0, b3=0.999), jnp.asarray(theta0, jnp.float32), grads
    )
    np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=0, atol=2e-5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("b3,alpha", [(0.9999, 5.0), (0.999, 8.0)])
def test_matches_optax_contrib(getkey, weight_decay, b3, alpha):
    """Without schedules the module and optax APIs agree with
    optax.contrib.ademamix over 150 steps, to float32 round-off."""
    params = {"w": jr.normal(getkey(), (8, 5)), "b": jr.normal(getkey(), (5,))}
    with jax.numpy_dtype_promotion("standard"):  # optax itself needs it
        _compare_with_optax(getkey, params, b3, alpha, weight_decay)


def _compare_with_optax(getkey, params, b3, alpha, weight_decay):
    ours = eam.ademamix(3e-3, b3=b3, alpha=alpha, weight_decay=weight_decay)
    theirs = optax.contrib.ademamix(3e-3, b3=b3, alpha=alpha, weight_decay=weight_decay)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    up_ours, up_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    p = params
    for _ in range(150):
        g = jax.tree.map(lambda x: jr.normal(getkey(), x.shape), params)
        u1, s_ours = up_ours(g, s_ours, p)
        u2, s_theirs = up_theirs(g, s_theirs, p)
        scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(u2))
        assert tree_allclose(u1, u2, rtol=1e-5, atol=1e-6 * scale)
        p = optax.apply_updates(p, u2)
    s_theirs = s_theirs[0]  # optax chains scale_by_ademamix first
    for name in ("m1", "m2", "nu"):
        assert tree_allclose(
            getattr(s_ours, name), getattr(s_theirs, name), rtol=1e-5, atol=1e-7
        )
    assert int(s_ours.count) == int(s_theirs.count) == 150


def test_scale_by_ademamix_chain_equals_ademamix(getkey):
    params = jr.normal(getkey(), (6,))
    chained = optax.chain(
        eam.scale_by_ademamix(0.9, 0.999, 0.999, 6.0, None, None),
        optax.add_decayed_weights(0.02),
        optax.scale_by_learning_rate(1e-2),
    )
    direct = eam.ademamix(1e-2, b3=0.999, alpha=6.0, weight_decay=0.02)
    s1, s2 = chained.init(params), direct.init(params)
    for _ in range(20):
        g = jr.normal(getkey(), (6,))
        u1, s1 = chained.update(g, s1, params)
        u2, s2 = direct.update(g, s2, params)
        np.testing.assert_allclose(u1, u2, rtol=1e-6, atol=1e-9)


def test_learning_rate_schedule_uses_count_before_increment(getkey):
    params = jnp.ones(3)
    sched = optax.linear_schedule(1.0, 0.0, 4)
    opt = eam.AdEMAMix(sched)
    base = eam.AdEMAMix(1.0)
    s, sb = opt.init(params), base.init(params)
    for t in range(4):
        g = jr.normal(getkey(), (3,))
        u, s = opt.update(g, s, params)
        ub, sb = base.update(g, sb, params)
        np.testing.assert_allclose(u, ub * float(sched(t)), rtol=1e-6)


def test_constant_schedule_equals_float(getkey):
    params = jr.normal(getkey(), (5,))
    a, b = eam.ademamix(0.1), eam.ademamix(optax.constant_schedule(0.1))
    sa, sb = a.init(params), b.init(params)
    for _ in range(5):
        g = jr.normal(getkey(), (5,))
        ua, sa = a.update(g, sa, params)
        ub, sb = b.update(g, sb, params)
        np.testing.assert_allclose(ua, ub, rtol=1e-7)


def test_weight_decay_mask(getkey):
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    grads = jax.tree.map(jnp.zeros_like, params)
    for mask in ({"w": True, "b": False}, lambda p: {"w": True, "b": False}):
        opt = eam.AdEMAMix(0.1, weight_decay=0.5, mask=mask)
        updates, _ = opt.update(grads, opt.init(params), params)
        np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)
        np.testing.assert_array_equal(updates["b"], np.zeros(2))


def test_weight_decay_needs_params():
    opt = eam.AdEMAMix(0.1, weight_decay=0.5)
    state = opt.init(jnp.ones(2))
    with pytest.raises(ValueError, match="weight_decay"):
        opt.update(jnp.ones(2), state)
    # Without decay, params are optional.
    eam.AdEMAMix(0.1).update(jnp.ones(2), state)


def test_b1_zero_allocates_no_m1(getkey):
    params = {"a": jnp.ones((5, 5))}
    state = eam.AdEMAMix(b1=0.0).init(params)
    assert state.m1 is None
    leaves = jax.tree.leaves(state)
    assert sum(x.size for x in leaves) == 2 * 25 + 2
    _, state = eam.AdEMAMix(b1=0.0).update({"a": jnp.ones((5, 5))}, state)
    assert state.m1 is None


@pytest.mark.parametrize(
    "param_dtype,mu_dtype",
    [
        (jnp.float32, None),
        (jnp.bfloat16, None),
        (jnp.float16, None),
        (jnp.float32, jnp.bfloat16),
        (jnp.float32, jnp.float16),
        (jnp.bfloat16, jnp.float32),
    ],
)
def test_state_dtypes_never_change(getkey, param_dtype, mu_dtype):
    params = {"w": jr.normal(getkey(), (4, 3)).astype(param_dtype)}
    opt = eam.AdEMAMix(1e-2, mu_dtype=mu_dtype, weight_decay=0.1)
    state = opt.init(params)
    expected_mu = jnp.dtype(mu_dtype or param_dtype)
    assert state.m1["w"].dtype == expected_mu
    assert state.m2["w"].dtype == expected_mu
    assert state.nu["w"].dtype == jnp.dtype(param_dtype)
    before = tree_dtypes(state)
    for _ in range(3):
        g = {"w": jr.normal(getkey(), (4, 3)).astype(param_dtype)}
        updates, state = opt.update(g, state, params)
        assert updates["w"].dtype == jnp.dtype(param_dtype)
        assert tree_dtypes(state) == before


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_state_stable_through_cond(getkey, dtype):
    params = jr.normal(getkey(), (3,)).astype(dtype)
    opt = eam.AdEMAMix(1e-2)
    state = opt.init(params)
    g = jnp.ones(3, dtype)
    out = jax.lax.cond(True, lambda s: opt.update(g, s, params)[1], lambda s: s, state)
    assert tree_dtypes(out) == tree_dtypes(state)


def test_float64_state_through_cond():
    with jax.enable_x64(True):
        params = jnp.ones(3, jnp.float64)
        opt = eam.AdEMAMix(1e-2)
        state = opt.init(params)
        out = jax.lax.cond(
            True, lambda s: opt.update(params, s, params)[1], lambda s: s, state
        )
        assert out.nu.dtype == jnp.float64 and out.m1.dtype == jnp.float64


def test_second_jitted_update_does_not_recompile(getkey):
    tx = eam.ademamix(1e-2)
    params = jnp.ones(5)
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update(params, state, params)
    _, state = update(params, state, params)
    assert update._cache_size() == 1


def test_update_accepts_extra_args():
    tx = eam.ademamix(1e-2)
    state = tx.init(jnp.ones(2))
    tx.update(jnp.ones(2), state, jnp.ones(2), loss=1.0, other="x")


def test_complex_parameters(getkey):
    """Complex parameters: nu holds |g|^2 (real), m1/m2 are complex; the real and
    imaginary parts of a complex parameter behave like a pair of real ones would
    in the numerators, with a shared |g|^2 denominator."""
    z = jax.lax.complex(jr.normal(getkey(), (4,)), jr.normal(getkey(), (4,)))
    opt = eam.AdEMAMix(1e-2)
    state = opt.init(z)
    assert state.m1.dtype == jnp.complex64 and state.nu.dtype == jnp.float32
    grads = [
        np.asarray(z) * 0 + np.asarray(jr.normal(getkey(), (8,))).view(np.complex64)
        for _ in range(30)
    ]
    p = z
    m1 = m2 = np.zeros(4, np.complex128)
    nu = np.zeros(4)
    expected = np.asarray(z, np.complex128)
    for t, g in enumerate(grads, start=1):
        u, state = opt.update(jnp.asarray(g, jnp.complex64), state, p)
        p = eqx.apply_updates(p, u)
        m1 = 0.9 * m1 + 0.1 * g
        m2 = 0.9999 * m2 + 1e-4 * g
        nu = 0.999 * nu + 0.001 * np.abs(g) ** 2
        expected = expected - 1e-2 * (m1 / (1 - 0.9**t) + 5 * m2) / (
            np.sqrt(nu / (1 - 0.999**t)) + 1e-8
        )
    assert state.nu.dtype == jnp.float32
    np.testing.assert_allclose(p, expected, rtol=1e-5, atol=1e-5)


def test_counters_saturate():
    opt = eam.AdEMAMix(1e-3)
    state = opt.init(jnp.ones(2))
    top = jnp.iinfo(jnp.int32).max
    state = eqx.tree_at(
        lambda s: (s.count, s.count_m2), state, (jnp.int32(top - 1),) * 2
    )
    for _ in range(3):
        updates, state = opt.update(jnp.ones(2), state)
        assert np.all(np.isfinite(updates))
    assert int(state.count) == top and int(state.count_m2) == top


def _multisteps(getkey):
    params = jr.normal(getkey(), (4,))
    ms = optax.MultiSteps(eam.ademamix(0.1), every_k_schedule=3)
    plain = eam.ademamix(0.1)
    s, sp = ms.init(params), plain.init(params)
    gs = [jr.normal(getkey(), (4,)) for _ in range(3)]
    for g in gs[:2]:
        u, s = ms.update(g, s, params)
        np.testing.assert_array_equal(u, np.zeros(4))
    u, s = ms.update(gs[2], s, params)
    expected, _ = plain.update(sum(gs) / 3, sp, params)
    np.testing.assert_allclose(u, expected, rtol=1e-5)


@pytest.mark.parametrize(
    "make",
    [lambda: eam.ademamix(0.05), lambda: eam.AdEMAMix(0.05, b3=0.999).to_optax()],
)
def test_converges_on_rosenbrock_in_scan(make):
    tx = make()

    def rosenbrock(x):
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    def body(carry, _):
        x, s = carry
        u, s = tx.update(jax.grad(rosenbrock)(x), s, x)
        return (optax.apply_updates(x, u), s), None

    x0 = jnp.array([-1.0, 1.0])
    (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), length=5000)
    assert rosenbrock(x) < 1e-2  # from 4.0 at the start


def test_converges_on_parabola():
    tx = eam.ademamix(0.1)
    x = jnp.array([3.0, -2.0])
    s = tx.init(x)
    for _ in range(300):
        u, s = tx.update(2 * x, s, x)
        x = optax.apply_updates(x, u)
    assert float(jnp.sum(x**2)) < 1e-2


def test_bf16_updates_have_param_dtype(getkey):
    params = jr.normal(getkey(), (6,)).astype(jnp.bfloat16)
    tx = eam.ademamix(1e-2, weight_decay=0.1)
    u, _ = tx.update(params, tx.init(params), params)
    assert u.dtype == jnp.bfloat16


def test_jax_jit_of_bound_methods(getkey):
    """`jax.jit(opt.init)` and `jax.jit(opt.update)` work (the module is hashed by
    identity) and agree with the eager calls."""
    params = {"w": jr.normal(getkey(), (3,))}
    opt = eam.AdEMAMix(1e-2, weight_decay=0.1)
    state = jax.jit(opt.init)(params)
    assert bool(eqx.tree_equal(state, opt.init(params)))
    g = {"w": jr.normal(getkey(), (3,))}
    jitted = jax.jit(opt.update)
    u1, s1 = jitted(g, state, params)
    u2, s2 = opt.update(g, state, params)
    assert tree_allclose(u1, u2, rtol=1e-6, atol=0)
    jitted(g, s1, params)
    assert jitted._cache_size() == 1


@pytest.mark.parametrize("how", ["eager", "jax.jit", "filter_jit argument"])
def test_slow_ema_increment_is_exact_everywhere(how):
    """After one step from zero, m2 = (1 - b3) g with 1 - b3 = 1e-4 to float32
    round-off, however the update is compiled (float32's 0.9999 would give
    1.00017e-4; XLA once reassociated the correction away under filter_jit)."""
    opt = eam.AdEMAMix(1.0, b3=0.9999, b2=0.999)
    p = jnp.ones(2)
    s = opt.init(p)
    if how == "eager":
        s = opt.update(p, s, p)[1]
    elif how == "jax.jit":
        s = jax.jit(opt.update)(p, s, p)[1]
    else:
        s = eqx.filter_jit(lambda o, g, s, p: o.update(g, s, p))(opt, p, s, p)[1]
    np.testing.assert_allclose(s.m2, 1e-4, rtol=2e-7)
    np.testing.assert_allclose(s.nu, 1e-3, rtol=2e-7)


def test_integer_and_numpy_hyperparameters_are_accepted():
    """`alpha=8`, `b1=0`, `weight_decay=0` are what people write: the annotations
    (checked by beartype under pytest) must accept ints and NumPy scalars."""
    opt = eam.AdEMAMix(learning_rate=1, b1=0, alpha=8, weight_decay=0, eps=0)
    eam.ademamix(1, b1=0, alpha=8, weight_decay=0)
    eam.scale_by_ademamix(0, 0.999, 0.999, 5, None, None, eps=0)
    eam.alpha_scheduler(8, alpha_start=0, warmup=10)
    eam.beta3_scheduler(0.999, beta_start=0, warmup=10)
    eam.SimplifiedAdEMAMix(learning_rate=1, alpha=2)
    opt = eam.AdEMAMix(np.float32(1e-3), b1=np.float64(0.9), alpha=np.int64(5))
    updates, _ = opt.update(jnp.ones(2), opt.init(jnp.ones(2)), jnp.ones(2))
    assert np.all(np.isfinite(updates))


def test_ademamix_accepts_optax_contrib_learning_rate_name():
    params = jnp.ones(3)
    a, b = eam.ademamix(0.1), eam.ademamix(learning_rate=0.1)
    ua, _ = a.update(params, a.init(params), params)
    ub, _ = b.update(params, b.init(params), params)
    np.testing.assert_array_equal(ua, ub)
    with jax.numpy_dtype_promotion("standard"):  # optax itself needs it
        injected = optax.inject_hyperparams(eam.ademamix)(learning_rate=0.1)
        uc, _ = injected.update(params, injected.init(params), params)
    np.testing.assert_allclose(uc, ua, rtol=3e-5)  # float32 betas, see above
    for kwargs in (dict(), dict(lr=0.1, learning_rate=0.1)):
        with pytest.raises(ValueError, match="learning rate once"):
            eam.ademamix(**kwargs)
