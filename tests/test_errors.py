"""Bad input is an error that names the argument and the value."""

import eqx_ademamix as eam
import jax.numpy as jnp
import optax
import pytest


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(b1=1.0), r"b1.*1\.0"),
        (dict(b1=-0.1), r"b1.*-0\.1"),
        (dict(b2=1.5), r"b2.*1\.5"),
        (dict(b3=1.0), r"b3.*1\.0"),
        (dict(b2=float("nan")), r"b2.*nan"),
        (dict(learning_rate=-1e-3), r"learning_rate.*-0\.001"),
        (dict(eps=-1e-8), r"eps.*-1e-08"),
        (dict(eps_root=-1.0), r"eps_root.*-1\.0"),
        (dict(weight_decay=-0.1), r"weight_decay.*-0\.1"),
        (dict(alpha=float("inf")), r"alpha.*inf"),
        (dict(mu_dtype=jnp.int8), r"mu_dtype.*int8"),
    ],
)
def test_bad_hyperparameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        eam.AdEMAMix(**kwargs)
    functional = {("lr" if k == "learning_rate" else k): v for k, v in kwargs.items()}
    functional.setdefault("lr", 1e-3)
    with pytest.raises(ValueError, match=pattern):
        eam.ademamix(**functional)


def test_both_schedule_and_scheduler():
    for name in ("b3", "alpha"):
        with pytest.raises(ValueError, match=f"{name}_scheduler"):
            eam.AdEMAMix(
                **{
                    name: optax.constant_schedule(0.5),
                    f"{name}_scheduler": optax.constant_schedule(0.5),
                }
            )
    with pytest.raises(ValueError, match="b3_scheduler"):
        eam.scale_by_ademamix(
            0.9, 0.999, eam.beta3_scheduler(0.99), 5.0, eam.beta3_scheduler(0.99), None
        )


def test_scheduler_with_default_float_is_fine():
    opt = eam.AdEMAMix(b3_scheduler=eam.beta3_scheduler(0.999, 0.9, 10))
    assert isinstance(opt.scale.b3, eam.Beta3Schedule)


@pytest.mark.parametrize(
    "params,pattern",
    [
        ({"w": jnp.ones(3, jnp.int32)}, r"\['w'\].*int32"),
        ({"w": jnp.ones(3), "n": jnp.zeros(2, bool)}, r"\['n'\].*bool"),
        ({"w": jnp.ones(3), "s": "hello"}, r"\['s'\]"),
    ],
)
def test_non_float_params(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        eam.AdEMAMix().init(params)


def test_grads_structure_mismatch_names_expected():
    opt = eam.AdEMAMix()
    state = opt.init({"a": jnp.ones(2), "b": jnp.ones(3)})
    with pytest.raises(
        ValueError, match=r"(?s)does not match.*\['b'\]: in the state, not in the grad"
    ):
        opt.update({"a": jnp.ones(2)}, state)


def test_grads_shape_mismatch():
    opt = eam.AdEMAMix()
    state = opt.init({"a": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"\['a'\].*shape \(3,\).*\(2,\)"):
        opt.update({"a": jnp.ones(3)}, state)


def test_state_from_another_optimizer():
    params = jnp.ones(2)
    with pytest.raises(TypeError, match="ScaleByAdemamixState"):
        eam.AdEMAMix().update(params, optax.adam(1e-3).init(params))


def test_schedule_must_return_scalar():
    opt = eam.AdEMAMix(alpha=lambda step: jnp.ones(3))
    state = opt.init(jnp.ones(2))
    with pytest.raises(ValueError, match="scalar"):
        opt.update(jnp.ones(2), state)


def test_complex_params_with_real_mu_dtype():
    z = jnp.ones(2, jnp.complex64)
    with pytest.raises(ValueError, match="complex"):
        eam.AdEMAMix(mu_dtype=jnp.bfloat16).init(z)


def test_construction_under_jit_skips_value_checks():
    """Traced hyperparameters (e.g. optax.inject_hyperparams) are not checked."""
    import jax

    @jax.jit
    def f(lr):
        opt = eam.AdEMAMix(lr)
        return opt.update(jnp.ones(2), opt.init(jnp.ones(2)), jnp.ones(2))[0]

    assert f(jnp.asarray(0.1)).shape == (2,)
