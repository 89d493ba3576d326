"""The packed state layout (`packed=True`): the same optimizer, fewer buffers."""

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from eqx_ademamix import PackedBuffers
from eqx_ademamix.internal import PACK_MAX_SIZE

from .conftest import tree_allclose, tree_dtypes
from .reference import ademamix_run


def _params(getkey, dtype=jnp.float32):
    """Small leaves of several shapes, a None, a scalar, and one large leaf."""
    return {
        "blocks": [
            {
                "w": jr.normal(getkey(), (4, 3), dtype),
                "b": jr.normal(getkey(), (3,), dtype),
            }
            for _ in range(5)
        ],
        "frozen": None,
        "scale": jr.normal(getkey(), (), dtype),
        "embed": jr.normal(getkey(), (PACK_MAX_SIZE + 8,), dtype),
    }


def _run(opt, params, grads):
    state = opt.init(params)
    step = eqx.filter_jit(lambda o, g, s, p: o.update(g, s, p))
    history = []
    for g in grads:
        updates, state = step(opt, g, state, params)
        params = eqx.apply_updates(params, updates)
        history.append(params)
    return history, state


def _grads(getkey, params, n):
    return [
        jax.tree.map(lambda p: jr.normal(getkey(), p.shape, p.dtype), params)
        for _ in range(n)
    ]


def test_packed_matches_float64_algorithm_1(getkey):
    """Per leaf, 60 steps of the packed optimizer equal the paper's Algorithm 1 in
    NumPy float64 (x64 on, so round-off is not the question)."""
    with jax.enable_x64(True):
        params = _params(getkey, jnp.float64)
        grads = _grads(getkey, params, 60)
        opt = eam.AdEMAMix(1e-2, b3=0.999, alpha=8.0, weight_decay=0.1, packed=True)
        history, _ = _run(opt, params, grads)
        flat_p, treedef = jax.tree.flatten(params)
        flat_g = [treedef.flatten_up_to(g) for g in grads]
        for i, p0 in enumerate(flat_p):
            expected, _ = ademamix_run(
                np.asarray(p0),
                [np.asarray(g[i]) for g in flat_g],
                lr=1e-2,
                b3=0.999,
                alpha=8.0,
                weight_decay=0.1,
            )
            got = [np.asarray(jax.tree.leaves(h)[i]) for h in history]
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mu_dtype", [None, jnp.bfloat16])
def test_packed_equals_per_leaf_layout(getkey, mu_dtype):
    """Same float32 updates as the per-leaf layout (bf16 moments: same up to the
    rounding noise, which draws other bits in the packed layout)."""
    params = _params(getkey)
    grads = _grads(getkey, params, 30)
    mask = jax.tree.map(lambda p: p.ndim > 1, params)
    kwargs = dict(weight_decay=0.05, mask=mask, mu_dtype=mu_dtype)
    packed, state = _run(eam.AdEMAMix(1e-2, packed=True, **kwargs), params, grads)
    plain, _ = _run(eam.AdEMAMix(1e-2, **kwargs), params, grads)
    tol = dict(rtol=1e-6, atol=1e-6) if mu_dtype is None else dict(rtol=0, atol=3e-3)
    for a, b in zip(packed, plain):
        assert tree_allclose(a, b, **tol)
    assert isinstance(state.m1, PackedBuffers)
    expected_m = jnp.float32 if mu_dtype is None else mu_dtype
    for name in ("m1", "m2"):
        for key, buf in getattr(state, name).buffers.items():
            assert buf.dtype == expected_m, (name, key)


def test_layout_packs_small_leaves_and_keeps_large_ones(getkey):
    params = _params(getkey)
    state = eam.AdEMAMix(packed=True).init(params)
    buffers = state.m2.buffers
    n_small = sum(x.size for x in jax.tree.leaves(params) if x.size <= PACK_MAX_SIZE)
    assert buffers["float32"].shape == (n_small,)
    large = [b for k, b in buffers.items() if k != "float32"]
    assert [b.shape for b in large] == [params["embed"].shape]
    # Three moments, each: one packed buffer + one large leaf; plus two counters.
    assert len(jax.tree.leaves(state)) == 3 * 2 + 2


def test_packed_groups_by_dtype(getkey):
    params = {
        "a": jnp.ones(3, jnp.float32),
        "b": jnp.ones(4, jnp.bfloat16),
        "c": jnp.ones(2, jnp.float32),
    }
    state = eam.AdEMAMix(packed=True, mu_dtype=jnp.float32).init(params)
    assert {k: v.shape for k, v in state.nu.buffers.items()} == {
        "bfloat16": (4,),
        "float32": (5,),
    }
    assert state.nu.buffers["bfloat16"].dtype == jnp.bfloat16
    assert state.m1.buffers["bfloat16"].dtype == jnp.float32
    updates, state2 = eam.AdEMAMix(packed=True, mu_dtype=jnp.float32).update(
        params, state, params
    )
    assert tree_dtypes(updates) == tree_dtypes(params)
    assert tree_dtypes(state2) == tree_dtypes(state)


def test_packed_state_rejects_another_tree(getkey):
    params = _params(getkey)
    opt = eam.AdEMAMix(packed=True)
    state = opt.init(params)
    # Same number of elements, different structure: must not silently misalign.
    other = dict(params, scale=None, extra=params["scale"])
    with pytest.raises(ValueError, match="does not match the optimizer state"):
        opt.update(other, state, other)
