"""Block-scaled 8-bit floats (`eqx_ademamix.BlockwiseFloat8`): the codes against
ml_dtypes' float8_e4m3fn and a NumPy definition of e5m3, round trips against
NumPy float64, unbiasedness, non-finite blocks, and AdEMAMix with float8 state
against float64 and float32 references."""

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import ml_dtypes
import numpy as np
import pytest
from eqx_ademamix.internal import (
    dequantize_float8,
    hash_bits,
    index_bits,
    mix_seed,
    quantize_float8,
)


def _e5m3(code: int) -> float:
    """The unsigned e5m3 code's value, read off its bits (1.0 at exponent 30)."""
    e, f = code >> 3, code & 7
    if e == 0:
        return f / 8 * 2.0**-29
    return (1 + f / 8) * 2.0 ** (e - 30)


def _grid(signed: bool) -> np.ndarray:
    """Every value a magnitude code may hold (sorted), from an independent
    definition: ml_dtypes' float8_e4m3fn / 256, or the e5m3 formula."""
    if signed:
        codes = np.arange(0x79, dtype=np.uint8)
        return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64) / 256
    return np.array([_e5m3(c) for c in range(0xF1)])


_quantize = jax.jit(quantize_float8, static_argnums=(1,))
_dequantize = jax.jit(dequantize_float8, static_argnums=(2,))


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_decodes_to_its_definition(signed):
    grid = _grid(signed)
    n = len(grid)
    codes = np.zeros((2, 256), np.uint8)
    if signed:
        # The magnitude shifted up by one, the sign in bit 0.
        codes[0, :n] = np.arange(n) << 1
        codes[1, :n] = (np.arange(n) << 1) | 1
    else:
        codes[0, :n] = np.arange(n)
    y = np.asarray(_dequantize(jnp.asarray(codes), jnp.ones(2), signed))
    np.testing.assert_array_equal(y[0, :n], grid)
    if signed:
        np.testing.assert_array_equal(y[1, :n], -grid)
    assert np.all(np.diff(grid) > 0) and grid[-1] == 1.0


def _blocks(getkey, n_blocks=64, block_size=256):
    """Normal values with per-block scales from 1e-30 to 1e30 and spread within
    blocks over four decades."""
    scales = 10.0 ** np.linspace(-30, 30, n_blocks)[:, None]
    spread = 10.0 ** np.asarray(jr.uniform(getkey(), (n_blocks, block_size), minval=-4))
    x = np.asarray(jr.normal(getkey(), (n_blocks, block_size)), np.float64)
    return (x * spread * scales).astype(np.float32)


def _bracket(x: np.ndarray, signed: bool):
    """Float64: absmax, and the grid values below and above |x| / absmax."""
    grid = _grid(signed)
    absmax = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    m = np.abs(x) / absmax
    lo = np.clip(np.searchsorted(grid, m, side="right") - 1, 0, len(grid) - 1)
    hi = np.minimum(lo + 1, len(grid) - 1)
    return absmax, grid[lo] * absmax, grid[hi] * absmax


@pytest.mark.parametrize("signed", [True, False])
def test_round_to_nearest_round_trip(getkey, signed):
    x = _blocks(getkey)
    if not signed:
        x = np.abs(x)
    codes, absmax = _quantize(jnp.asarray(x), signed, None)
    assert codes.dtype == jnp.uint8 and absmax.dtype == jnp.float32
    np.testing.assert_array_equal(absmax, np.abs(x).max(axis=1))
    y = np.asarray(_dequantize(codes, absmax, signed), np.float64)
    amax, low, high = _bracket(x, signed)
    err = np.abs(np.abs(y) - np.abs(x))
    # the nearer neighbour, up to float32 round-off of the scaled value
    assert np.all(err <= 0.5 * (high - low) + 1e-6 * amax)
    assert np.all(np.sign(y) * np.sign(x) >= 0)
    idx = np.abs(x).argmax(axis=1)
    rows = np.arange(len(x))
    np.testing.assert_array_equal(y[rows, idx], x[rows, idx])


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits_fn", [index_bits, hash_bits])
def test_stochastic_rounding_is_unbiased(getkey, signed, bits_fn):
    x = _blocks(getkey, n_blocks=8)
    if not signed:
        x = np.abs(x)
    amax, low, high = _bracket(x, signed)

    @jax.jit
    def draw(seed):
        codes, absmax = quantize_float8(
            jnp.asarray(x), signed, bits_fn(x.shape, mix_seed(seed))
        )
        return dequantize_float8(codes, absmax, signed)

    draws = np.abs(np.stack([np.asarray(draw(s), np.float64) for s in range(400)]))
    tol = 1e-6 * amax
    assert np.all((draws >= low - tol) & (draws <= high + tol))
    # Each element is low or high; its mean is within 5 standard errors of |x|.
    mean_err = np.abs(draws.mean(axis=0) - np.abs(x))
    ok = np.abs(x) >= (_grid(signed)[1] * amax)  # above the smallest code
    bound = 5 * ((high - low) / 2) / np.sqrt(400) + tol
    assert np.all(mean_err[ok] <= np.broadcast_to(bound, x.shape)[ok])


def test_second_moment_never_rounds_a_positive_value_to_zero():
    x = np.zeros((1, 256), np.float32)
    x[0, 0] = 1.0
    x[0, 1:] = np.float32(1e-30)  # far below the smallest code, 2**-32
    for bits in (None, index_bits(x.shape, mix_seed(3))):
        y = np.asarray(_dequantize(*_quantize(jnp.asarray(x), False, bits), False))
        assert np.all(y[0, 1:] == np.float32(2.0**-32))
    y = np.asarray(_dequantize(*_quantize(jnp.asarray(x), True, None), True))
    assert np.all(y[0, 1:] == 0)  # a first moment that small is 0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_marks_the_block_and_zero_blocks_stay_zero(getkey, bad):
    x = np.array(jr.normal(getkey(), (4, 256)), np.float32)
    x[1, 5] = bad
    x[2] = 0.0
    for signed in (True, False):
        xs = x if signed else np.abs(x)
        codes, absmax = _quantize(jnp.asarray(xs), signed, None)
        y = np.asarray(_dequantize(codes, absmax, signed))
        assert np.isnan(absmax[1]) and np.all(np.isnan(y[1]))
        assert absmax[2] == 0 and np.all(y[2] == 0)
        assert np.all(np.isfinite(y[[0, 2, 3]]))


def test_largest_and_smallest_finite_scales():
    big = np.finfo(np.float32).max
    tiny = np.finfo(np.float32).tiny
    x = np.array([[big, -big, big / 3, 1.0] * 64, [tiny, -tiny, 0.0, tiny] * 64])
    codes, absmax = _quantize(jnp.asarray(x, jnp.float32), True, None)
    y = np.asarray(_dequantize(codes, absmax, True))
    assert np.all(np.isfinite(y)) and y[0, 0] == big and y[0, 1] == -big
    assert y[1, 0] == np.float32(tiny) and y[1, 1] == -np.float32(tiny)


def test_state_layout_and_bytes_per_parameter():
    params = {"w": jnp.zeros((1024, 1024)), "b": jnp.zeros(96), "none": None}
    opt = eam.AdEMAMix(1e-3, storage=eam.BlockwiseFloat8())
    state = opt.init(params)
    for name in ("m1", "m2", "nu"):
        w = getattr(state, name)["w"]
        assert isinstance(w, eam.BlockwiseFloat8Array)
        assert w.codes.shape == (4096, 256) and w.codes.dtype == jnp.uint8
        assert w.signed == (name != "nu")
        assert getattr(state, name)["b"].dtype == jnp.float32
    size = sum(x.nbytes for x in jax.tree.leaves(state)) - 8 - 3 * 96 * 4
    assert size / 2**20 == pytest.approx(3 + 3 * 4 / 256)


@pytest.mark.parametrize(
    "storage", [eam.BlockwiseFloat8(), eam.Blockwise8Bit()], ids=["float8", "tree"]
)
def test_direction_uses_the_new_moments_before_rounding(getkey, storage):
    """As in optax (`mu_dtype`) and bitsandbytes, the update comes from the new
    moments before they are rounded for storage: here, step 2's update equals
    float64 AdEMAMix applied to the 8-bit state read back after step 1."""
    params = {"w": jr.normal(getkey(), (64, 64))}
    g1 = {"w": jr.normal(getkey(), (64, 64))}
    g2 = {"w": jr.normal(getkey(), (64, 64))}
    opt8 = eam.AdEMAMix(1e-2, b3=0.99, storage=storage)
    step = eqx.filter_jit(opt8.update)
    _, s1 = step(g1, opt8.init(params), params)
    u, _ = step(g2, s1, params)
    old = {
        k: np.asarray(getattr(s1, k)["w"].decode(), np.float64)
        for k in ("m1", "m2", "nu")
    }
    g = np.asarray(g2["w"], np.float64)
    m1 = 0.9 * old["m1"] + 0.1 * g
    m2 = 0.99 * old["m2"] + 0.01 * g
    nu = 0.999 * old["nu"] + 0.001 * g**2
    c1, c2 = 1 - 0.9**2, 1 - 0.999**2
    expected = -1e-2 * (m1 / c1 + 5.0 * m2) / (np.sqrt(nu / c2) + 1e-8)
    np.testing.assert_allclose(np.asarray(u["w"]), expected, rtol=2e-5, atol=1e-7)
