"""Stochastic rounding and reduced-precision moments.

`stochastic_round` is checked against properties that define it (two bracketing
neighbours, expectation equal to the input, non-finite pass-through); the bf16
optimizer path is checked against float64 over 20,000 steps of a constant
gradient, against a float32 run on noisy gradients, and against the NumPy
formula applied to the moments it stored. Round-to-nearest storage is run
through the same checks to show that they can fail.
"""

import functools

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import pytest
from eqx_ademamix.internal import hash_bits, mix_seed, stochastic_round


B1, B2, B3, ALPHA, EPS = 0.9, 0.999, 0.9999, 5.0, 1e-8


class _NearestStorage(eam.CastStorage):
    """Plain round-to-nearest casts: the biased baseline stochastic rounding fixes."""

    def write(self, stored, value, seed):
        del seed
        return value.astype(stored.dtype)


def _with_storage(opt, storage):
    return eqx.tree_at(lambda o: o.storage, opt, storage)


# --------------------------------------------------------------------------------
# stochastic_round itself


def _draws(x, dtype, n):
    """`n` independent stochastic roundings of every element of `x`, as float64."""
    xs = jnp.broadcast_to(x, (n, *x.shape))
    bits = hash_bits(xs.shape, mix_seed(12345))
    out = stochastic_round(xs, dtype, bits)
    assert out.dtype == jnp.dtype(dtype)
    return np.asarray(out.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_is_unbiased_between_neighbours(getkey, dtype):
    x = jax.random.uniform(getkey(), (256,), jnp.float32, 0.5, 4.0)
    x = x * jnp.where(jnp.arange(256) % 2 == 0, 1.0, -1.0)  # both signs
    n = 4000
    draws = _draws(x, dtype, n)
    x64 = np.asarray(x, np.float64)
    lo, hi = draws.min(axis=0), draws.max(axis=0)
    # Every draw is one of the two representable neighbours that bracket x.
    assert np.all(lo <= x64) and np.all(x64 <= hi)
    for column, low, high in zip(draws.T, lo, hi):
        assert set(np.unique(column)) <= {low, high}
    # ... and those two are adjacent in `dtype` (or equal, if x is representable).
    lo_d = jnp.asarray(lo, jnp.float32).astype(dtype)
    next_up = np.asarray(
        jnp.nextafter(lo_d, jnp.asarray(jnp.inf, dtype)).astype(jnp.float32), np.float64
    )
    assert np.all((hi == lo) | (hi == next_up))
    spacing = next_up - lo
    # The mean is x: a Bernoulli mean has standard error <= spacing / (2 sqrt(n)).
    err = np.abs(draws.mean(axis=0) - x64)
    assert np.all(err < 5 * spacing / (2 * np.sqrt(n)))
    # ...and not a coincidence of one seed: over all elements the errors are small
    # relative to the spacing on average too.
    assert np.mean(err / spacing) < 0.02


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_keeps_representable_values(dtype):
    x = jnp.asarray([0.0, -0.0, 1.0, -2.5, 0.375, 1024.0], jnp.float32)
    draws = _draws(x, dtype, 64)
    np.testing.assert_array_equal(draws, np.broadcast_to(np.asarray(x), draws.shape))
    assert np.signbit(draws[:, 1]).all()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_passes_inf_and_nan(dtype):
    words = jnp.asarray(
        [0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFFFFFFF],
        jnp.uint32,
    )  # +inf, -inf, nan, -nan, nan with a low payload, nan that would wrap around
    x = lax.bitcast_convert_type(words, jnp.float32)
    for bits in (0, 0x7FFFFFFF, 0xFFFFFFFF):
        out = stochastic_round(x, dtype, jnp.full(x.shape, bits, jnp.uint32))
        out = np.asarray(out.astype(jnp.float32))
        assert out[0] == np.inf and out[1] == -np.inf
        assert np.isnan(out[2:]).all()


def test_stochastic_round_bf16_is_symmetric(getkey):
    x = jax.random.normal(getkey(), (1000,), jnp.float32)
    bits = hash_bits(x.shape, mix_seed(7))
    up = stochastic_round(x, jnp.bfloat16, bits)
    down = stochastic_round(-x, jnp.bfloat16, bits)
    np.testing.assert_array_equal(
        np.asarray(up, np.float32), -np.asarray(down, np.float32)
    )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cast_storage_rounds_each_element_without_bias_across_steps(getkey, dtype):
    """What an EMA needs of the optimizer's storage: for a fixed element, the writes
    of successive steps (seeds from the step counter, as the update rule makes
    them) average to the value written. Checked on equal values in every element,
    where nothing but the element index varies the bits, and on random values."""
    same = jnp.full((64,), 0.7001, jnp.float32)
    mixed = jax.random.uniform(getkey(), (64,), jnp.float32, -3.0, 3.0)
    x = jnp.concatenate([same, mixed]).reshape(8, 16)  # a 2-D leaf
    stored = jnp.zeros(x.shape, dtype)
    n = 4000
    seeds = jax.vmap(lambda t: mix_seed(t, 2))(jnp.arange(n))
    draws = jax.vmap(lambda s: eam.CastStorage().write(stored, x, s))(seeds)
    assert draws.dtype == jnp.dtype(dtype)
    draws = np.asarray(draws.astype(jnp.float32), np.float64).reshape(n, -1)
    x64 = np.asarray(x, np.float64).reshape(-1)
    spacing = np.maximum(draws.max(axis=0) - draws.min(axis=0), 1e-30)
    err = np.abs(draws.mean(axis=0) - x64)
    assert np.all(err < 5 * spacing / (2 * np.sqrt(n))), (err / spacing).max()
    # Every element does round both ways (x is not representable in `dtype`).
    assert np.all(draws.max(axis=0) > draws.min(axis=0))


# --------------------------------------------------------------------------------
# The bf16 optimizer path over long runs


def _direction_after(opt, grad_fn, params, steps):
    """The direction at step `steps` (1-based) and the final state, in one scan."""

    def body(state, t):
        _, state = opt.update(grad_fn(t), state)
        return state, None

    @jax.jit
    def run(opt):
        state = opt.init(params)
        state, _ = lax.scan(body, state, jnp.arange(steps - 1))
        return opt.update(grad_fn(jnp.asarray(steps - 1)), state)

    return run(opt)


def _constant_gradient_run(opt, n=2048, steps=20_000, equal=False):
    g = jnp.linspace(0.5, 1.5, n, dtype=jnp.float32)
    if equal:
        g = jnp.full((n,), 0.7, jnp.float32)
    direction, state = _direction_after(opt, lambda t: g, jnp.zeros(n), steps)
    # Algorithm 1 in float64 with a constant gradient g > 0: m1_hat = g, nu_hat = g^2,
    # m2 = (1 - b3^T) g, so the direction is 1 + alpha (1 - b3^T) (up to eps).
    g64 = np.asarray(g, np.float64)
    m2 = (1 - B3**steps) * g64
    expected = (g64 + ALPHA * m2) / (np.abs(g64) + EPS)
    return np.asarray(direction, np.float64) / expected, state


@pytest.mark.parametrize("equal", [False, True], ids=["spread", "equal"])
def test_bf16_constant_gradient_20k_steps_matches_float64(equal):
    """`equal`: the same gradient in every element, so the element index is all
    that varies the rounding bits; the mean over elements must still be right."""
    opt = eam.ScaleByAdemamix(B1, B2, B3, ALPHA, eps=EPS, mu_dtype=jnp.bfloat16)
    ratio, state = _constant_gradient_run(opt, equal=equal)
    assert state.m1.dtype == state.m2.dtype == jnp.bfloat16
    assert state.nu.dtype == jnp.float32
    assert abs(ratio.mean() - 1) < 0.01, ratio.mean()
    assert ratio.std() < 0.05, ratio.std()


def test_round_to_nearest_fails_the_constant_gradient_check():
    """The same check on round-to-nearest bf16 storage: the slow EMA stalls."""
    opt = eam.ScaleByAdemamix(B1, B2, B3, ALPHA, eps=EPS, mu_dtype=jnp.bfloat16)
    ratio, state = _constant_gradient_run(_with_storage(opt, _NearestStorage()))
    assert abs(ratio.mean() - 1) > 0.1


def _noisy_m2(opt, key, n=2048, steps=20_000):
    def grad(t):
        return 0.1 + jax.random.normal(jax.random.fold_in(key, t), (n,), jnp.float32)

    _, state = _direction_after(opt, grad, jnp.zeros(n), steps)
    return state


def test_bf16_noisy_gradients_match_float32_run(getkey):
    key = getkey()
    f32 = eam.ScaleByAdemamix(B1, B2, B3, ALPHA, eps=EPS)
    bf16 = eam.ScaleByAdemamix(B1, B2, B3, ALPHA, eps=EPS, mu_dtype=jnp.bfloat16)
    ref = _noisy_m2(f32, key)
    got = _noisy_m2(bf16, key)
    nearest = _noisy_m2(_with_storage(bf16, _NearestStorage()), key)

    def mean(x):
        return float(np.mean(np.asarray(x, np.float64)))

    for name in ("m1", "m2", "nu"):
        r, g = getattr(ref, name), getattr(got, name)
        assert abs(mean(g) / mean(r) - 1) < 0.1, (name, mean(g), mean(r))
    # Round-to-nearest storage is biased well outside that tolerance.
    assert abs(mean(nearest.m2) / mean(ref.m2) - 1) > 0.1


def test_bf16_direction_is_computed_from_the_stored_moments(getkey):
    """The fast path: the direction uses the rounded bf16 values that were stored
    (NumPy float64 formula on the returned state), so what is stored is what is
    used."""
    params = jax.random.normal(getkey(), (64, 33))
    opt = eam.ScaleByAdemamix(B1, B2, B3, ALPHA, eps=EPS, mu_dtype=jnp.bfloat16)
    state = opt.init(params)
    step = jax.jit(lambda g, s: opt.update(g, s))
    for t in range(1, 6):
        g = jax.random.normal(getkey(), params.shape)
        direction, state = step(g, state)
        m1, m2, nu = (np.asarray(x, np.float64) for x in (state.m1, state.m2, state.nu))
        expected = (m1 / (1 - B1**t) + ALPHA * m2) / (np.sqrt(nu / (1 - B2**t)) + EPS)
        np.testing.assert_allclose(
            np.asarray(direction), expected, rtol=2e-5, atol=1e-6
        )


# --------------------------------------------------------------------------------
# The compiled step: no copies of donated state


def _state_copies(opt, params):
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    hlo = step.lower(params, opt.init(params), params).compile().as_text()
    entry = hlo[hlo.index("ENTRY") :]
    big = [line for line in entry.splitlines() if " copy(" in line and "[]" not in line]
    return big


@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_donated_state_is_updated_in_place(mu_dtype, packed):
    """The compiled step copies no (non-scalar) buffer: every moment is read and
    written in place. A version of the bf16 rounding that XLA recomputed inside
    the direction's kernel made it copy every donated moment first (2x slower)."""
    params = {"a": jnp.zeros((64, 32)), "b": jnp.zeros((5000,)), "c": jnp.zeros(7)}
    opt = eam.AdEMAMix(1e-3, weight_decay=0.1, mu_dtype=mu_dtype, packed=packed)
    assert _state_copies(opt, params) == []
