"""Every optimizer of the matrix on 8 devices: the state follows the parameters'
sharding in every layout and storage (`state_shardings` and `jax.jit(opt.init)`),
sharded steps equal unsharded ones, and ZeRO-1 shards the state over the data
axis."""

import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ..variants import grads, IDS, params, VARIANTS


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("data",))


def _put(tree, shardings):
    """`tree` placed with `shardings` (`None` leaves stay `None`)."""
    return jax.tree.map(
        lambda x, s: jax.device_put(x, s), tree, shardings, is_leaf=lambda x: x is None
    )


def _shard_params(mesh):
    """The variants' parameters, their shardings (the large leaf `w` split by rows
    over the 8 devices, the rest replicated) and the parameters placed so."""
    p = params()
    shardings = {
        key: None
        if leaf is None
        else jax.tree.map(
            lambda _: NamedSharding(mesh, P("data", None) if key == "w" else P()), leaf
        )
        for key, leaf in p.items()
    }
    return p, shardings, _put(p, shardings)


def _moment_arrays(state):
    """(path, array) of every moment array of an AdEMAMix or Simplified state."""
    inner = getattr(state, "inner_state", state)
    out = []
    for name in ("m1", "m2", "m", "nu"):
        tree = getattr(inner, name, None)
        if tree is not None:
            out += jax.tree_util.tree_leaves_with_path(tree)
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_state_follows_params_and_steps_match(mesh, variant):
    p, shardings, sharded = _shard_params(mesh)
    opt = variant.make()
    expected = eam.state_shardings(opt, sharded)
    state = jax.jit(opt.init, out_shardings=expected)(sharded)
    eager = opt.init(sharded)
    traced = jax.jit(opt.init)(sharded)
    # The large leaf's moments (or 8-bit codes) are sharded 8 ways, never
    # replicated; the same from state_shardings, jit(init) and eager init.
    for tree in (state, eager, traced):
        big = [x for path, x in _moment_arrays(tree) if x.size >= 512]
        assert big, "the large leaf has no moment"
        for x in big:
            shard = x.addressable_shards[0].data
            assert shard.size * 8 == x.size, (variant.id, x.sharding)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    plain_state = opt.init(p)
    for i in range(3):
        g = grads(i, p)
        g_sharded = _put(g, shardings)
        u, state = step(g_sharded, state, sharded)
        u_plain, plain_state = step(g, plain_state, p)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(u_plain)):
            np.testing.assert_allclose(
                np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7
            )
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(plain_state)):
        np.testing.assert_allclose(
            np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-6, atol=1e-7
        )


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_shardings_are_stable_through_scan_and_cond(mesh, variant):
    p, shardings, sharded = _shard_params(mesh)
    opt = variant.make()
    state = jax.jit(opt.init, out_shardings=eam.state_shardings(opt, sharded))(sharded)
    g = grads(0, p)

    @jax.jit
    def many(state):
        def body(carry, i):
            _, new = opt.update(g, carry, sharded)
            return jax.lax.cond(i % 2 == 0, lambda: new, lambda: carry), None

        return jax.lax.scan(body, state, jnp.arange(3))[0]

    after = many(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(after)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (variant.id, a, b)


@pytest.mark.parametrize("variant", VARIANTS, ids=IDS)
def test_zero1_shards_state_of_replicated_params(mesh, variant):
    p = params()
    replicated = NamedSharding(mesh, P())
    p = jax.tree.map(lambda x: jax.device_put(x, replicated), p)
    opt = variant.make()
    shardings = eam.state_shardings(opt, p, zero_axes="data")
    state = jax.jit(opt.init, out_shardings=shardings)(p)
    big = [x for path, x in _moment_arrays(state) if x.size >= 512]
    for x in big:
        assert x.addressable_shards[0].data.size * 8 == x.size, variant.id
    step = jax.jit(lambda g, s, p: opt.update(g, s, p), out_shardings=(None, shardings))
    u, state = step(grads(0, p), state, p)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))
