"""Properties that must hold for any input (hypothesis)."""

import equinox as eqx
import eqx_ademamix as eam
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings


SHAPE = (6,)
STEPS = 4
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
nonzero = st.one_of(
    st.floats(0.0009765625, 1024.0, width=32),
    st.floats(-1024.0, -0.0009765625, width=32),
)
grad_seqs = hnp.arrays(np.float32, (STEPS, *SHAPE), elements=finite)
hyper = st.fixed_dictionaries(
    {
        "b1": st.sampled_from([0.0, 0.5, 0.9]),
        "b2": st.sampled_from([0.9, 0.999]),
        "b3": st.sampled_from([0.99, 0.9999]),
        "alpha": st.floats(0.0, 10.0),
    }
)


@eqx.filter_jit
def run(opt, params, grads):
    def body(carry, g):
        p, s = carry
        u, s = opt.update(g, s, p)
        return (p, s), u

    (_, state), updates = jax.lax.scan(body, (params, opt.init(params)), grads)
    return updates, state


settings.register_profile("fast", max_examples=40, deadline=None)
settings.load_profile("fast")


@given(hyper)
def test_zero_gradients_give_zero_updates(h):
    params = jnp.linspace(-1.0, 1.0, SHAPE[0])
    updates, state = run(eam.AdEMAMix(0.1, **h), params, jnp.zeros((STEPS, *SHAPE)))
    assert np.all(np.asarray(updates) == 0)
    for leaf in jax.tree.leaves((state.m1, state.m2, state.nu)):
        assert np.all(np.asarray(leaf) == 0)


@given(hyper, grad_seqs)
def test_finite_gradients_give_finite_updates_and_state(h, grads):
    params = jnp.linspace(-1.0, 1.0, SHAPE[0])
    updates, state = run(eam.AdEMAMix(0.1, weight_decay=0.01, **h), params, grads)
    assert np.all(np.isfinite(np.asarray(updates)))
    for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf)))


@given(
    hyper,
    hnp.arrays(np.float32, (STEPS, *SHAPE), elements=nonzero),
    st.floats(1e-2, 1e2),
)
def test_direction_is_scale_invariant_without_eps(h, grads, scale):
    """With eps = eps_root = 0, scaling every gradient by c > 0 leaves the
    direction unchanged: numerator and sqrt(nu) both scale by c."""
    opt = eam.ScaleByAdemamix(eps=0.0, **h)
    params = jnp.zeros(SHAPE)
    grads = jnp.asarray(grads)
    d1, _ = run(opt, params, grads)
    d2, _ = run(opt, params, grads * jnp.float32(scale))
    np.testing.assert_allclose(d1, d2, rtol=1e-4, atol=1e-5)


@given(hyper, hnp.arrays(np.float32, SHAPE, elements=nonzero))
def test_constant_gradient_moves_against_it(h, g):
    """A constant gradient makes every EMA point along it: the update's sign is
    minus the gradient's, and its first-step size is lr * (1 + alpha (1 - b3))."""
    params = jnp.zeros(SHAPE)
    grads = jnp.broadcast_to(jnp.asarray(g), (STEPS, *SHAPE))
    updates, _ = run(eam.AdEMAMix(0.1, eps=0.0, **h), params, grads)
    assert np.all(np.sign(np.asarray(updates)) == -np.sign(g))
    expected_first = 0.1 * (1 + h["alpha"] * (1 - h["b3"]))
    np.testing.assert_allclose(np.abs(updates[0]), expected_first, rtol=1e-5)
