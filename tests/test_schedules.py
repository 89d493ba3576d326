import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .reference import alpha_at, beta3_at


@pytest.mark.parametrize("warmup", [1, 7, 1000])
def test_alpha_schedule_matches_paper(warmup):
    sched = eam.alpha_scheduler(8.0, alpha_start=1.0, warmup=warmup)
    for t in [0, 1, warmup // 2, warmup - 1, warmup, warmup + 5, 10 * warmup]:
        np.testing.assert_allclose(
            sched(jnp.asarray(t)), alpha_at(t, 8.0, 1.0, warmup), rtol=1e-6
        )


@pytest.mark.parametrize("beta_start", [0.0, 0.9])
@pytest.mark.parametrize("warmup", [1, 10, 5000])
def test_beta3_schedule_matches_paper(beta_start, warmup):
    sched = eam.beta3_scheduler(0.9999, beta_start=beta_start, warmup=warmup)
    for t in [0, 1, 2, warmup // 3, warmup - 1, warmup, warmup + 1]:
        expected = beta3_at(t, 0.9999, beta_start, warmup)
        got = float(sched(jnp.asarray(t)))
        # Within two float32 ulps of 1 (a float32 beta cannot do better).
        np.testing.assert_allclose(got, expected, rtol=0, atol=1.2e-7)


def test_beta3_schedule_is_monotone_and_finite():
    sched = eam.beta3_scheduler(0.9999, beta_start=0.0, warmup=100)
    values = jax.vmap(sched)(jnp.arange(200))
    assert np.all(np.isfinite(values))
    assert np.all(np.diff(np.asarray(values)) >= 0)
    assert float(values[0]) == 0.0


@pytest.mark.parametrize(
    "sched,final",
    [
        (eam.alpha_scheduler(5.0), 5.0),
        (eam.alpha_scheduler(5.0, alpha_start=2.0, warmup=0), 5.0),
        (eam.beta3_scheduler(0.9999), 0.9999),
        (eam.beta3_scheduler(0.999, beta_start=0.5, warmup=0), 0.999),
    ],
)
def test_warmup_zero_returns_final_value(sched, final):
    """The seed code returns NaN here (0 * (step / 0))."""
    for t in [0, 1, 10, 2**31 - 1]:
        value = sched(jnp.asarray(t, jnp.int32))
        assert np.isfinite(value)
        np.testing.assert_allclose(value, final, rtol=1e-7)


def test_schedules_jit_and_accept_python_ints():
    sched = eam.beta3_scheduler(0.999, beta_start=0.9, warmup=50)
    np.testing.assert_allclose(eqx.filter_jit(sched)(10), sched(10))
    assert isinstance(sched, eqx.Module)


def test_schedule_is_usable_by_optax():
    tx = eam.ademamix(1e-3, b3=eam.beta3_scheduler(0.999, 0.9, 10))
    state = tx.init(jnp.ones(2))
    tx.update(jnp.ones(2), state)


def test_changing_warmup_does_not_recompile():
    traces = []

    @eqx.filter_jit
    def f(s, t):
        traces.append(None)
        return s(t)

    a = eam.alpha_scheduler(5.0, warmup=10)
    b = eqx.tree_at(lambda s: s.warmup, a, jnp.asarray(20, jnp.int32))
    np.testing.assert_allclose(f(a, jnp.asarray(5)), 2.5)
    np.testing.assert_allclose(f(b, jnp.asarray(5)), 1.25)
    assert len(traces) == 1


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: eam.beta3_scheduler(1.0), "beta_end"),
        (lambda: eam.beta3_scheduler(0.99, beta_start=-0.1), "beta_start"),
        (lambda: eam.beta3_scheduler(0.99, warmup=-1), "warmup"),
        (lambda: eam.alpha_scheduler(5.0, warmup=-3), "warmup"),
        (lambda: eam.alpha_scheduler(5.0, warmup=2.5), "whole number"),
    ],
)
def test_schedule_validation(make, name):
    # ValueError from the package; TypeError from beartype where the annotation
    # already rules the value out (pytest runs the jaxtyping import hook).
    with pytest.raises((ValueError, TypeError), match=name):
        make()


def test_schedules_accept_float_steps():
    sched = eam.alpha_scheduler(8.0, warmup=10)
    np.testing.assert_allclose(sched(5.0), 4.0)
    np.testing.assert_allclose(sched(jnp.float32(20.0)), 8.0)
    np.testing.assert_allclose(jax.vmap(sched)(jnp.arange(3.0)), [0.0, 0.8, 1.6])
