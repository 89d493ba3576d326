import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest


# Catch silent dtype drift (e.g. bfloat16 state promoted to float32) and
# accidental broadcasting.
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """A fresh PRNG key at every call, reproducible across runs."""
    keys = iter(jr.split(jr.key(0), 10_000))
    return lambda: next(keys)


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8):
    return bool(eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol))


def tree_dtypes(tree):
    return jax.tree.map(lambda x: jnp.dtype(x.dtype), tree)


def random_grads(getkey, shape, n):
    """`n` standard-normal gradients of `shape`, as NumPy arrays."""
    return [np.asarray(jr.normal(getkey(), shape)) for _ in range(n)]


def run_module(opt, params, grads):
    """Train `params` with the module optimizer `opt` on the gradients `grads` in
    an `eqx.filter_jit` step; returns the parameters after each step and the final
    state."""
    state = opt.init(params)
    step = eqx.filter_jit(lambda o, g, s, p: o.update(g, s, p))
    history = []
    for g in grads:
        updates, state = step(opt, jnp.asarray(g, params.dtype), state, params)
        params = eqx.apply_updates(params, updates)
        history.append(np.asarray(params))
    return history, state
