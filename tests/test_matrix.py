"""Generic properties of every optimizer in the matrix (algorithm x storage x
layout, and `SkipNonFinite` around them), in every place users take an
optimizer: the module API, `to_optax`, the functional API, optax's wrappers and
tree tools, Flax NNX, `eqx.filter_jit`, donation, checkpoints and lowering for
GPU/TPU. Sharded runs are in `tests/multidevice/`. The paper-reference tests of
each algorithm are in `test_ademamix.py` and `test_simplified.py`."""

import dataclasses

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from .variants import grads, IDS, params, VARIANTS


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(request):
    return request.param


def _is_none(x):
    return x is None


def _structure(tree):
    """Structure, shapes and dtypes: what a `lax.scan` carry must keep."""
    shapes = jax.tree.map(
        lambda x: None if x is None else (x.shape, jnp.dtype(x.dtype)),
        tree,
        is_leaf=_is_none,
    )
    return shapes, jax.tree.structure(tree, is_leaf=_is_none)


def _run(update, state, p, n=3):
    for i in range(n):
        updates, state = update(grads(i, p), state, p)
        p = eqx.apply_updates(p, updates)
    return p, state


def _close(a, b, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(a, is_leaf=_is_none) == jax.tree.structure(
        b, is_leaf=_is_none
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        wide = np.complex128 if jnp.iscomplexobj(x) else np.float64
        np.testing.assert_allclose(
            np.asarray(x).astype(wide), np.asarray(y).astype(wide), rtol=rtol, atol=atol
        )


def test_module_to_optax_and_functional_agree(variant):
    opt = variant.make()
    p = params()
    module = _run(opt.update, opt.init(p), p)
    tx = opt.to_optax()
    via_optax = _run(tx.update, tx.init(p), p)
    _close(module, via_optax, rtol=0, atol=0)
    factory, kwargs = variant.functional()
    ftx = factory(**kwargs)
    _close(module, _run(ftx.update, ftx.init(p), p), rtol=0, atol=0)


def test_state_is_stable_through_scan_and_cond(variant):
    opt = variant.make()
    p = params()
    state = opt.init(p)

    @jax.jit
    def many(state):
        def body(carry, i):
            updates, new = opt.update(grads(0, p), carry, p)
            new = lax.cond(i % 2 == 0, lambda: new, lambda: carry)
            return new, updates

        return lax.scan(body, state, jnp.arange(4))

    new_state, updates = many(state)
    assert _structure(new_state) == _structure(state)
    assert jax.tree.map(lambda u: u.dtype, updates["w"]) == jnp.float32


def test_filter_jit_never_recompiles(variant):
    opt = variant.make()
    p = params()
    state = opt.init(p)
    traces = []

    @eqx.filter_jit
    def step(opt, g, state, p):
        traces.append(1)
        return opt.update(g, state, p)

    for i in range(3):
        updates, state = step(opt, grads(i, p), state, p)
        p = eqx.apply_updates(p, updates)
    inner = opt.inner if variant.skip_nonfinite else opt
    changed = inner.with_hyperparameters(learning_rate=5e-3, b2=0.99, alpha=4.0)
    if variant.skip_nonfinite:
        changed = eqx.tree_at(lambda o: o.inner, opt, changed)
    step(changed, grads(3, p), state, p)
    assert len(traces) == 1


def test_none_leaves_and_parameter_dtypes(variant):
    opt = variant.make()
    for dtype in (jnp.float32, jnp.bfloat16):
        p = params(dtype)
        state = opt.init(p)
        updates, new_state = jax.jit(opt.update)(grads(0, p), state, p)
        assert updates["frozen"] is None
        assert jax.tree.map(lambda u: u.dtype, updates) == jax.tree.map(
            lambda x: x.dtype, p
        )
        assert _structure(new_state) == _structure(state)


def test_complex_parameters(variant):
    z = jnp.arange(512.0).astype(jnp.complex64) * jnp.asarray(1 + 0.5j, jnp.complex64)
    p = {"z": z.reshape(32, 16)}
    g = {"z": jnp.full((32, 16), 0.1 - 0.2j, jnp.complex64)}
    if variant.storage == "bf16":
        with pytest.raises(ValueError, match="complex"):
            variant.make().init(p)
        return
    opt = variant.make()
    # Complex moments stay in full precision in every storage, so the variant
    # agrees with the plain per-leaf optimizer.
    base = dataclasses.replace(variant, storage="f32", layout="leaf").make()
    u, _ = opt.update(g, opt.init(p), p)
    u_base, _ = base.update(g, base.init(p), p)
    assert u["z"].dtype == jnp.complex64
    _close(u, u_base)


def test_donated_state(variant):
    opt = variant.make()
    p = params()
    step = jax.jit(lambda g, s, p: opt.update(g, s, p), donate_argnums=1)
    state = opt.init(p)
    for i in range(2):
        updates, state = step(grads(i, p), state, p)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))


def test_inject_hyperparams(variant):
    factory, kwargs = variant.functional()
    p = params()
    plain = factory(**kwargs)
    lr = kwargs.pop("learning_rate")
    injected = optax.inject_hyperparams(factory)(learning_rate=lr, **kwargs)
    scheduled = optax.inject_hyperparams(factory)(
        learning_rate=optax.constant_schedule(lr), **kwargs
    )
    with jax.numpy_dtype_promotion("standard"):
        expected = _run(plain.update, plain.init(p), p)[0]
        for tx in (injected, scheduled):
            state = tx.init(p)
            got = _run(tx.update, state, p)[0]
            # inject_hyperparams passes the betas as float32 arrays, so `1 - b`
            # is float32's, not the exact complement of the Python float.
            _close(got, expected, rtol=1e-5, atol=1e-6)
        state = injected.init(p)
        state.hyperparams["learning_rate"] = jnp.asarray(0.0)
        assert optax.tree.get(state, "learning_rate") == 0.0
        updates, _ = injected.update(grads(0, p), state, p)
    assert float(jnp.abs(updates["w"]).max()) == 0.0


def test_multisteps_averages_micro_batches(variant):
    tx = variant.make().to_optax()
    p = params()
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    with jax.numpy_dtype_promotion("standard"):
        state = multi.init(p)
        u0, state = multi.update(grads(0, p), state, p)
        u1, state = multi.update(grads(1, p), state, p)
    assert float(jnp.abs(u0["w"]).max()) == 0.0
    mean = jax.tree.map(lambda a, b: (a + b) / 2, grads(0, p), grads(1, p))
    expected, _ = tx.update(mean, tx.init(p), p)
    _close(u1, expected, rtol=1e-5, atol=1e-7)


def test_optax_wrappers(variant):
    tx = variant.make().to_optax()
    p = params()
    mask = {"w": True, "layers": [False, True], "scale": False, "frozen": None}
    labels = {"w": "a", "layers": ["a", "b"], "scale": "b", "frozen": None}
    wrapped = {
        "chain": optax.chain(optax.clip_by_global_norm(1.0), tx),
        "masked": optax.masked(tx, mask),
        "multi_transform": optax.multi_transform(
            {"a": tx, "b": optax.sgd(0.1)}, labels
        ),
        "apply_if_finite": optax.apply_if_finite(tx, 3),
    }
    for name, w in wrapped.items():
        with jax.numpy_dtype_promotion("standard"):
            state = w.init(p)
            updates, new_state = _run(w.update, state, p, n=2)
        assert _structure(new_state) == _structure(state), name
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))


def test_optax_tree_get_set_and_map_params(variant):
    opt = variant.make()
    tx = opt.to_optax()
    p = params()
    state = tx.init(p)
    _, state = tx.update(grads(0, p), state, p)
    assert int(optax.tree.get(state, "count")) == 1
    state = optax.tree.set(state, count=jnp.asarray(7, jnp.int32))
    assert int(optax.tree.get(state, "count")) == 7
    mapped = optax.tree.map_params(tx, lambda x: jnp.zeros_like(x), state)
    assert jax.tree.structure(mapped) == jax.tree.structure(state)
    inner = state.inner_state if variant.skip_nonfinite else state
    inner_mapped = mapped.inner_state if variant.skip_nonfinite else mapped
    parameter_shaped = (
        variant.storage not in ("8bit", "fp8") and variant.layout == "leaf"
    )
    for old, new in zip(jax.tree.leaves(inner.nu), jax.tree.leaves(inner_mapped.nu)):
        if parameter_shaped:
            assert float(jnp.abs(new).max()) == 0.0
        else:  # 8-bit blocks and packed buffers are not parameter-shaped: kept
            assert bool(jnp.all(new == old))


def test_flax_nnx_optimizer(variant):
    nnx = pytest.importorskip("flax.nnx")

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.Linear(16, 32, rngs=rngs)
            self.second = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.second(jax.nn.relu(self.first(x)))

    model = Model(nnx.Rngs(0))
    x = jnp.linspace(-1, 1, 64 * 16).reshape(64, 16)
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    optimizer = nnx.Optimizer(model, variant.make().to_optax(), wrt=nnx.Param)

    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def train_step(model, optimizer):
        loss, g = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, g)
        return loss

    with jax.numpy_dtype_promotion("standard"):
        losses = [float(train_step(model, optimizer)) for _ in range(30)]
        final = float(loss_fn(model))
    assert np.all(np.isfinite(losses))
    assert final < losses[0]


def test_checkpoint_round_trip(variant, tmp_path):
    opt = variant.make()
    p = params()
    _, state = _run(opt.update, opt.init(p), p)
    tree = (opt, state)
    eam.save_leaves(tmp_path / "leaves.eqx", tree)
    like = (variant.make(), opt.init(p))
    assert eqx.tree_equal(eam.load_leaves(tmp_path / "leaves.eqx", like), tree)
    eam.save_checkpoint(tmp_path / "orbax", 1, tree)
    assert eqx.tree_equal(eam.restore_checkpoint(tmp_path / "orbax", like), tree)


def test_lowers_for_gpu_and_tpu(variant):
    opt = variant.make()
    p = params()
    state = opt.init(p)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p), donate_argnums=1)
    exported = jax.export.export(step, platforms=["cuda", "tpu"])(grads(0, p), state, p)
    assert set(exported.platforms) == {"cuda", "tpu"}
    assert "stablehlo" in exported.mlir_module()
