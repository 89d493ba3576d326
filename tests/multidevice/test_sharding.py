"""AdEMAMix on a device mesh (8 devices, auto and explicit meshes): the state
follows the parameters' sharding, updates need no communication, sharded runs
agree with unsharded ones, ZeRO-1, optax chains, checkpoints of sharded state and
the sharded training example."""

import importlib.util
import os
import tempfile

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


if jax.device_count() < 8:
    pytest.skip(
        "needs 8 devices; run by tests/test_multidevice.py", allow_module_level=True
    )
auto = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
specs = {"w1": P(None, "model"), "b1": P("model"), "w2": P("model", None)}
specs["b2"] = P()


def make_params(key):
    k1, k2 = jr.split(key)
    return {
        "w1": jr.normal(k1, (16, 32)) / 4,
        "b1": jnp.zeros(32),
        "w2": jr.normal(k2, (32, 4)) / 6,
        "b2": jnp.zeros(4),
    }


def shard(tree, mesh, spec_tree):
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, spec_tree
    )


def loss_fn(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"][None, :])
    return jnp.mean((h @ params["w2"] + params["b2"][None, :] - y) ** 2)


key = jr.key(0)
params0 = make_params(key)
x = jr.normal(jr.fold_in(key, 1), (64, 16))
y = jnp.sin(x[:, :4] * 2.0)


def same_sharding(a, b, ndim):
    return a.is_equivalent_to(b, ndim)


def check_follows(state, params, what):
    for name in ("m1", "m2", "nu"):
        tree = getattr(state, name)
        if tree is None:
            continue
        for k in params:
            got, want = tree[k].sharding, params[k].sharding
            assert same_sharding(got, want, params[k].ndim), (
                f"{what}: {name}[{k!r}] has {got}, the parameter {want}"
            )


optimizers = {
    "float32": eam.AdEMAMix(1e-2, weight_decay=0.01),
    "bfloat16": eam.AdEMAMix(1e-2, mu_dtype=jnp.bfloat16),
    "b1=0": eam.AdEMAMix(1e-2, b1=0.0),
}


def test_eager_init_follows_params():
    for mesh in (auto, explicit):
        with jax.set_mesh(mesh):
            params = shard(params0, mesh, specs)
            for opt in optimizers.values():
                check_follows(opt.init(params), params, f"eager, {mesh.axis_types}")


def test_jit_init_follows_params():
    for mesh in (auto, explicit):
        with jax.set_mesh(mesh):
            params = shard(params0, mesh, specs)
            for opt in optimizers.values():
                state = jax.jit(opt.init)(params)
                check_follows(state, params, f"jax.jit(init), {mesh.axis_types}")
                state = eqx.filter_jit(opt.init)(params)
                check_follows(state, params, "eqx.filter_jit(init)")


def test_jit_init_with_state_shardings_auto_mesh():
    with jax.set_mesh(auto):
        params = shard(params0, auto, specs)
        for opt in optimizers.values():
            out = eam.state_shardings(opt, params)
            state = jax.jit(lambda p: opt.init(p), out_shardings=out)(params)
            check_follows(state, params, "jit(init, out_shardings)")
            assert state.count.sharding.is_fully_replicated


def test_optax_init_follows_params():
    for mesh in (auto, explicit):
        with jax.set_mesh(mesh):
            params = shard(params0, mesh, specs)
            tx = eam.ademamix(1e-2, mu_dtype=jnp.bfloat16)
            state = jax.jit(tx.init)(params)
            check_follows(state, params, "jit(to_optax().init)")


def test_update_has_no_collectives():
    for mesh in (auto, explicit):
        with jax.set_mesh(mesh):
            params = shard(params0, mesh, specs)
            for name in ("float32", "bfloat16"):
                opt = optimizers[name]
                state = opt.init(params)
                step = jax.jit(lambda g, s, p: opt.update(g, s, p))
                compiled = step.lower(params, state, params).compile()
                text = compiled.as_text()
                for op in ("all-gather", "all-reduce", "all-to-all", "collective-"):
                    assert op not in text, f"{name}, {mesh.axis_types}: {op} in HLO"
                updates_sh, state_sh = compiled.output_shardings
                for k in params:
                    assert same_sharding(
                        updates_sh[k], params[k].sharding, params[k].ndim
                    ), (name, k, updates_sh[k])
                    for moment in ("m1", "m2", "nu"):
                        tree = getattr(state_sh, moment)
                        if tree is not None:
                            assert same_sharding(
                                tree[k], params[k].sharding, params[k].ndim
                            ), (name, moment, k, tree[k])


def train(opt, params, xs, ys, steps, out_shardings=None):
    """`steps` steps of full-batch training; returns params, state, and the
    state's shardings after every step."""

    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    kwargs = {} if out_shardings is None else {"out_shardings": out_shardings}
    step = jax.jit(step, **kwargs)
    if out_shardings is None:
        state = opt.init(params)
    else:
        state = jax.jit(lambda p: opt.init(p), out_shardings=out_shardings[1])(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state, xs, ys)
        history.append(jax.tree.map(lambda a: a.sharding, state))
    return params, state, history


def sharded_vs_unsharded(opt, atol):
    single = jax.devices()[0]
    p_ref, s_ref, _ = train(
        opt,
        jax.device_put(params0, single),
        jax.device_put(x, single),
        jax.device_put(y, single),
        20,
    )
    with jax.set_mesh(auto):
        params = shard(params0, auto, specs)
        xs = jax.device_put(x, NamedSharding(auto, P("data", None)))
        ys = jax.device_put(y, NamedSharding(auto, P("data", None)))
        p, s, history = train(opt, params, xs, ys, 20)
    check_follows(s, params, "after 20 steps")
    for h in history[1:]:
        assert eqx.tree_equal(h, history[0]), "state sharding changed over steps"
    diffs = {k: np.abs(np.asarray(p[k]) - np.asarray(p_ref[k])) for k in p}
    for k in params0:
        np.testing.assert_allclose(p[k], p_ref[k], rtol=0, atol=atol, err_msg=k)
        assert jnp.dtype(s.m2[k].dtype) == jnp.dtype(s_ref.m2[k].dtype)
    worst = max(float(d.max()) for d in diffs.values())
    off = sum(int((d > 1e-5).sum()) for d in diffs.values())
    total = sum(d.size for d in diffs.values())
    return f"max |param diff| = {worst:.2e}; {off}/{total} elements > 1e-5"


def test_sharded_matches_unsharded_float32():
    # The data-parallel gradient sum adds in another order: float32 round-off.
    sharded_vs_unsharded(optimizers["float32"], atol=1e-5)


def test_sharded_matches_unsharded_bfloat16():
    # Gradients differ by float32 round-off, which now and then flips a
    # stochastic rounding of m1/m2: one bfloat16 ulp (2**-8 relative) in that
    # element's direction for that step, at most ~lr * 2**-8 * (1 + alpha) =
    # 2.3e-4 per step. Bit-exactness of the rounding itself is checked below.
    sharded_vs_unsharded(optimizers["bfloat16"], atol=2e-3)


def test_bfloat16_rounding_uses_global_indices():
    """Same gradients bit for bit -> the same bfloat16 state bit for bit,
    sharded or not: the stochastic-rounding hash must see global indices."""
    opt = optimizers["bfloat16"]
    grads = [make_params(jr.fold_in(key, 10 + i)) for i in range(10)]
    single = jax.devices()[0]
    step = jax.jit(lambda g, s: opt.update(g, s))
    state_ref = opt.init(jax.device_put(params0, single))
    for g in grads:
        _, state_ref = step(jax.device_put(g, single), state_ref)
    for mesh in (auto, explicit):
        with jax.set_mesh(mesh):
            state = opt.init(shard(params0, mesh, specs))
            for g in grads:
                _, state = step(shard(g, mesh, specs), state)
        for k in params0:
            for moment in ("m1", "m2"):
                a = np.asarray(getattr(state, moment)[k]).view(np.uint16)
                b = np.asarray(getattr(state_ref, moment)[k]).view(np.uint16)
                assert (a == b).all(), (
                    f"{mesh.axis_types}: {moment}[{k!r}] differs in "
                    f"{(a != b).sum()} of {a.size} elements"
                )


def test_zero1_state_sharded_params_replicated():
    opt = optimizers["float32"]
    replicated = jax.tree.map(lambda _: P(), specs)
    with jax.set_mesh(auto):
        params = shard(params0, auto, replicated)
        param_sh = jax.tree.map(lambda a: a.sharding, params)
        state_sh = eam.state_shardings(opt, params, zero_axes="data")
        for k in params:
            for moment in ("m1", "m2", "nu"):
                spec = getattr(state_sh, moment)[k].spec
                assert "data" in jax.tree.leaves(tuple(spec)), (moment, k, spec)
        xs = jax.device_put(x, NamedSharding(auto, P("data", None)))
        ys = jax.device_put(y, NamedSharding(auto, P("data", None)))
        p, s, history = train(opt, params, xs, ys, 20, (param_sh, state_sh))
    for h in history:
        assert eqx.tree_equal(h, state_sh), "state sharding changed over steps"
    for k in params:
        assert p[k].sharding.is_fully_replicated, k
        shard_shape = s.m2[k].addressable_shards[0].data.shape
        assert np.prod(shard_shape) * 2 == s.m2[k].size, (k, shard_shape)
    single = jax.devices()[0]
    p_ref, _, _ = train(
        opt,
        jax.device_put(params0, single),
        jax.device_put(x, single),
        jax.device_put(y, single),
        20,
    )
    for k in params0:
        np.testing.assert_allclose(p[k], p_ref[k], rtol=0, atol=1e-5, err_msg=k)


def test_state_shardings_for_optax_chains():
    with jax.set_mesh(auto):
        params = shard(params0, auto, specs)
        tx = optax.chain(optax.clip_by_global_norm(1.0), eam.ademamix(1e-2))
        sh = eam.state_shardings(tx, params)
        state = jax.jit(tx.init, out_shardings=sh)(params)
        check_follows(state[1], params, "chain")
        adam_sh = eam.state_shardings(optax.adamw(1e-2), params)
        for k in params:
            assert same_sharding(adam_sh[0].mu[k], params[k].sharding, 2)


def test_checkpoints_of_sharded_state():
    """orbax and save_leaves round trips of sharded arrays: restored with the
    target's shardings, and the run continues bit for bit."""

    opt = optimizers["bfloat16"]

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    def run(params, state, n):
        for _ in range(n):
            params, state = step(params, state, xs, ys)
        return params, state

    def abstract(a, sharding):
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)

    with jax.set_mesh(auto):
        params = shard(params0, auto, specs)
        xs = jax.device_put(x, NamedSharding(auto, P("data", None)))
        ys = jax.device_put(y, NamedSharding(auto, P("data", None)))
        p, s = run(params, opt.init(params), 5)
        want = run(p, s, 5)
        p_like = jax.tree.map(lambda a: abstract(a, a.sharding), p)
        s_like = jax.tree.map(
            abstract,
            eqx.filter_eval_shape(opt.init, p_like),
            eam.state_shardings(opt, p_like),
        )
        with tempfile.TemporaryDirectory() as tmp:
            eam.save_checkpoint(os.path.join(tmp, "orbax"), 5, (p, s))
            eam.save_leaves(os.path.join(tmp, "leaves.eqx"), (p, s))
            restored = {
                "orbax": eam.restore_checkpoint(
                    os.path.join(tmp, "orbax"), (p_like, s_like)
                ),
                "eqx": eam.load_leaves(
                    os.path.join(tmp, "leaves.eqx"), (p_like, s_like)
                ),
            }
        for fmt, (p2, s2) in restored.items():
            for a, b in zip(jax.tree.leaves((p2, s2)), jax.tree.leaves((p, s))):
                assert a.sharding.is_equivalent_to(b.sharding, a.ndim), fmt
            got = run(p2, s2, 5)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
                assert np.array_equal(np.asarray(a), np.asarray(b)), fmt


def test_example_sharded_training():
    """examples/sharded_training.py with tiny settings: it learns, its state
    follows the parameters (or, with --zero1, is split over all devices), and
    a run resumed from its checkpoint ends where a straight run does."""
    import tempfile

    for module in ("sklearn", "tqdm"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the example needs {module} (the examples extra)")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples")
    spec = importlib.util.spec_from_file_location(
        "sharded_training", os.path.join(path, "sharded_training.py")
    )
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with jax.numpy_dtype_promotion("standard"):
        tiny = ["--no-progress", "--width", "64", "--batch-size", "32"]
        straight = example.main(tiny + ["--steps", "30"])
        assert straight["last_loss"] < 0.8 * straight["first_loss"], straight
        assert straight["m2_first_layer_sharding"] == "P('model', None)"
        # Interrupted at step 20 and resumed, with ZeRO-1 (the same algorithm
        # on other shardings, so it must also end where the straight run does).
        with tempfile.TemporaryDirectory() as tmp:
            more = ["--zero1", "--checkpoint-dir", tmp, "--checkpoint-every", "10"]
            example.main(tiny + more + ["--steps", "20"])
            resumed = example.main(tiny + more + ["--steps", "30"])
    assert resumed["start_step"] == 20
    assert resumed["param_first_layer_sharding"] == "P()"
    assert "data" in resumed["m2_first_layer_sharding"]
    assert resumed["state_bytes_per_device"] < resumed["state_bytes_total"] / 4
    for a, b in zip(
        jax.tree.leaves(resumed["params"]), jax.tree.leaves(straight["params"])
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    np.testing.assert_allclose(resumed["losses"], straight["losses"][20:], rtol=1e-5)
