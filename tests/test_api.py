"""The architecture's promises that are not per-variant properties: importing
has no side effects on JAX, states of another configuration are refused with
the reason, `with_hyperparameters` keeps compiled steps, old spellings keep
working, and every algorithm gets every storage and layout."""

import subprocess
import sys

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from .variants import grads, params, Variant


def test_import_does_not_start_the_backend():
    """Configuring devices (or `jax.distributed.initialize()`) after the import
    must still work: the package creates no arrays at import."""
    code = (
        "import eqx_ademamix, jax\n"
        "jax.config.update('jax_num_cpu_devices', 4)\n"
        "assert jax.device_count() == 4, jax.devices()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


CONFIGS = [
    Variant(a, s, layout)
    for a in ("ademamix", "simplified")
    for s in ("f32", "bf16", "8bit", "fp8")
    for layout in ("leaf", "packed")
]


@pytest.mark.parametrize("algorithm", ["ademamix", "simplified"])
def test_state_of_another_configuration_is_refused(algorithm):
    """Every pair of (storage, layout) configurations: a state made by one and
    given to the other is an error at `update` that names what differs, never a
    silent run and never the gradients blamed."""
    p = params()
    g = grads(0, p)
    configs = [v for v in CONFIGS if v.algorithm == algorithm]
    for made in configs:
        state = made.make().init(p)
        for used in configs:
            if used == made:
                continue
            with pytest.raises(ValueError) as info:
                used.make().update(g, state, p)
            message = str(info.value)
            if made.layout != used.layout:
                assert "layout" in message, message
            else:
                assert "differently configured optimizer" in message, message
                assert (
                    "stored as" in message and "gradient" not in message.split(":")[0]
                ), message


def test_with_hyperparameters_keeps_dtype_weak_type_and_validates():
    opt = eam.AdEMAMix(learning_rate=1e-3, alpha=eam.alpha_scheduler(5.0, warmup=10))
    new = opt.with_hyperparameters(learning_rate=1e-4, b1=0.8, eps=1e-6)
    for name, value in (("learning_rate", 1e-4), ("b1", 0.8), ("eps", 1e-6)):
        old_leaf = getattr(opt, name, None)
        old_leaf = getattr(opt.direction, name) if old_leaf is None else old_leaf
        new_leaf = getattr(new, name, None)
        new_leaf = getattr(new.direction, name) if new_leaf is None else new_leaf
        assert new_leaf.dtype == old_leaf.dtype
        assert new_leaf.weak_type == old_leaf.weak_type
        assert float(new_leaf) == pytest.approx(value, rel=1e-6)
    assert jax.tree.structure(new) == jax.tree.structure(opt)
    strong = eam.AdEMAMix(learning_rate=jnp.float32(1e-3))
    assert not strong.with_hyperparameters(learning_rate=0.5).learning_rate.weak_type
    with pytest.raises(ValueError, match="b1.*2.0"):
        opt.with_hyperparameters(b1=2.0)
    with pytest.raises(TypeError, match="schedule"):
        opt.with_hyperparameters(alpha=4.0)
    with pytest.raises(TypeError, match="no hyperparameter `lr`"):
        opt.with_hyperparameters(lr=1.0)
    swapped = opt.with_hyperparameters(alpha=eam.alpha_scheduler(8.0, warmup=20))
    assert float(swapped.direction.alpha(20)) == 8.0


def test_tree_at_with_a_strong_float32_recompiles_but_with_hyperparameters_not():
    """The rule the docs state: the weak type decides whether filter_jit
    recompiles."""
    opt = eam.AdEMAMix(learning_rate=1e-3)
    p = {"w": jnp.ones(3)}
    state = opt.init(p)
    traces = []

    @eqx.filter_jit
    def step(opt, state):
        traces.append(1)
        return opt.update(p, state, p)

    step(opt, state)
    step(opt.with_hyperparameters(learning_rate=1e-4), state)
    assert len(traces) == 1
    step(eqx.tree_at(lambda o: o.learning_rate, opt, jnp.float32(1e-4)), state)
    assert len(traces) == 2


def test_old_spellings_and_every_option_in_the_functional_api():
    p = params()
    g = grads(0, p)
    ref = eam.AdEMAMix(learning_rate=1e-2, layout=eam.Packed())
    via_packed = eam.ademamix(1e-2, packed=True)
    via_learning_rate = eam.ademamix(learning_rate=1e-2, layout=eam.Packed())
    expected, _ = ref.update(g, ref.init(p), p)
    for tx in (via_packed, via_learning_rate):
        got, _ = tx.update(g, tx.init(p), p)
        assert eqx.tree_equal(got, expected)
    eight = eam.Blockwise8Bit(min_size=256, block_size=64)
    a = eam.SimplifiedAdEMAMix(packed=True, quantized=eight)
    b = eam.SimplifiedAdEMAMix(layout=eam.Packed(), storage=eight)
    assert eqx.tree_equal(a.update(g, a.init(p), p), b.update(g, b.init(p), p))
    assert opt_scale_is_direction(eam.AdEMAMix())
    with pytest.raises(ValueError, match="pass one of them"):
        eam.AdEMAMix(quantized=eight, storage=eight)
    with pytest.raises(ValueError, match="pass one of them"):
        eam.AdEMAMix(packed=False, layout=eam.Packed())
    with pytest.raises(TypeError, match="packed"):
        eam.AdEMAMix(packed="no")


def opt_scale_is_direction(opt):
    return opt.scale is opt.direction


def test_blockwise_8bit_that_quantizes_nothing_warns():
    with pytest.warns(UserWarning, match=r"min_size=512"):
        eam.AdEMAMix(storage=eam.Blockwise8Bit()).init(params())


def test_zero_gradients_with_zero_eps_give_zero_not_nan():
    for opt in (eam.AdEMAMix(eps=0.0), eam.SimplifiedAdEMAMix(eps=0.0)):
        p = {"w": jnp.ones(3)}
        updates, _ = opt.update({"w": jnp.zeros(3)}, opt.init(p), p)
        np.testing.assert_array_equal(updates["w"], 0.0)
        # and a non-zero gradient is unchanged by the floor: g / |g| = sign(g)
        updates, _ = eam.ScaleByAdemamix(eps=0.0, b1=0.0, alpha=0.0).update(
            {"w": jnp.array([1e-10, -3.0, 2.0])},
            eam.ScaleByAdemamix(eps=0.0, b1=0.0, alpha=0.0).init(p),
        )
        np.testing.assert_allclose(updates["w"], [1.0, -1.0, 1.0], rtol=1e-4)


def test_mismatched_gradient_tree_names_the_paths_of_an_equinox_model():
    model = eqx.nn.MLP(2, 2, 4, 3, key=jax.random.key(0))
    p = eqx.filter(model, eqx.is_inexact_array)
    opt = eam.AdEMAMix()
    state = opt.init(p)
    g = eqx.tree_at(lambda m: m.layers[3].bias, p, None)
    with pytest.raises(ValueError, match=r"layers\[3\]\.bias") as info:
        opt.update(g, state, p)
    assert "PyTreeDef" not in str(info.value)


def test_weight_decay_without_params_under_filter_jit_is_a_runtime_error():
    """What the faults guide says: a traced weight decay is checked on the
    device."""
    opt = eam.AdEMAMix(weight_decay=0.1)
    p = {"w": jnp.ones(3)}
    step = eqx.filter_jit(lambda o, g, s: o.update(g, s))
    with pytest.raises(eqx.EquinoxRuntimeError, match="needs the parameters"):
        jax.block_until_ready(step(opt, p, opt.init(p)))
