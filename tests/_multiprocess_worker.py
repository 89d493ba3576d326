"""One process of a JAX distributed run on CPU (gloo collectives), or the
single-process reference, for `tests/test_multiprocess.py`.

For float32, bfloat16, 8-bit and packed state, train a few steps
on a global mesh, save `(params, opt, state)` with `eqx_ademamix.save_checkpoint`,
train on (the uninterrupted run), restore into freshly built targets (sharded
arrays; `jax.ShapeDtypeStruct`s without a sharding; NumPy arrays) and train the
same steps from the restored objects. Every array is written, gathered, to
`OUT/<variant>.<process>.npz`.

Then, with several processes, restore into targets placed on `jax.devices()[0]`,
which process 1 cannot address; each process writes the error it got to
`OUT/bad-target.<process>.json`.

Results go through files; the exit code is 0 when everything ran (errors are
written to `OUT/error.<process>.txt`).
"""

import argparse
import json
import os
import sys
import traceback


VARIANTS = ("f32", "bf16", "8bit", "packed")
STEPS_BEFORE, STEPS_AFTER = 3, 2


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--devices", type=int, default=2, help="CPU devices here")
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints", required=True)
    return parser.parse_args(argv)


def start_jax(args):
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    return jax


def run(args):
    jax = start_jax(args)
    # Imported after `jax.distributed.initialize()`: importing eqx_ademamix can
    # start JAX's backend (module-level arrays), after which initialize fails.
    import equinox as eqx
    import eqx_ademamix as eam
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh(
        (jax.device_count(),), ("x",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    param_sh = {
        "w": NamedSharding(mesh, P("x", None)),  # 8192 elements: own buffer
        "v": NamedSharding(mesh, P("x")),
        "b": NamedSharding(mesh, P()),
    }
    shapes = {"w": (128, 64), "v": (48,), "b": (16,)}

    def make_params():
        rng = np.random.default_rng(0)
        values = {k: rng.normal(size=shapes[k]).astype(np.float32) for k in shapes}
        return {
            k: jax.make_array_from_callback(
                shapes[k], param_sh[k], lambda index, v=values[k]: v[index]
            )
            for k in shapes
        }

    def make_opt(variant):
        common = dict(
            learning_rate=1e-2,
            b3=0.999,
            alpha=eam.alpha_scheduler(5.0, warmup=10),
            weight_decay=1e-3,
        )
        if variant == "bf16":
            return eam.AdEMAMix(**common, mu_dtype=jnp.bfloat16)
        if variant == "8bit":
            return eam.AdEMAMix(**common, quantized=eam.Blockwise8Bit(min_size=256))
        if variant == "packed":
            return eam.AdEMAMix(**common, packed=True)
        return eam.AdEMAMix(**common)

    def gather(tree):
        """Every array of `tree` as a NumPy array of its global value."""
        out = []
        for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array)):
            if isinstance(x, np.ndarray):
                out.append(x)
            elif x.is_fully_addressable or x.is_fully_replicated:
                out.append(np.asarray(x))
            else:
                out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
        return out

    def train_step(params, opt, state, i):
        def target(p):
            grid = jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)
            return jnp.sin(grid * 0.37 + i.astype(jnp.float32))

        # Elementwise: no cross-device sum, so one process and two agree bitwise.
        grads = jax.tree.map(lambda p: 2.0 * (p - target(p)), params)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state

    for variant in VARIANTS:
        opt = make_opt(variant)
        params = make_params()
        state_sh = eam.state_shardings(opt, params)
        state = jax.jit(opt.init, out_shardings=state_sh)(params)
        step = jax.jit(train_step, out_shardings=(param_sh, state_sh))
        for i in range(STEPS_BEFORE):
            params, state = step(params, opt, state, jnp.asarray(i))
        directory = os.path.join(args.checkpoints, variant)
        eam.save_checkpoint(directory, STEPS_BEFORE, (params, opt, state))
        saved = gather((params, opt, state))
        for i in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
            params, state = step(params, opt, state, jnp.asarray(i))
        uninterrupted = gather((params, state))

        # A fresh start, as after a restart: build, then restore.
        fresh_opt = make_opt(variant)
        fresh_params = make_params()
        fresh_state = jax.jit(fresh_opt.init, out_shardings=state_sh)(fresh_params)
        p2, opt2, s2 = eam.restore_checkpoint(
            directory, (fresh_params, fresh_opt, fresh_state)
        )
        restored = gather((p2, opt2, s2))
        for i in range(STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER):
            p2, s2 = step(p2, opt2, s2, jnp.asarray(i))
        resumed = gather((p2, s2))

        like = (fresh_params, fresh_opt, fresh_state)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
        from_abstract = gather(eam.restore_checkpoint(directory, abstract))
        zeros = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like)
        from_numpy = gather(eam.restore_checkpoint(directory, zeros))

        arrays = {}
        for name, values in [
            ("saved", saved),
            ("uninterrupted", uninterrupted),
            ("restored", restored),
            ("resumed", resumed),
            ("abstract", from_abstract),
            ("numpy", from_numpy),
        ]:
            for i, value in enumerate(values):
                flat = np.ascontiguousarray(value).reshape(-1)
                arrays[f"{name}/{i:03d}"] = flat.view(np.uint8)
                arrays[f"{name}/{i:03d}/type"] = np.asarray(
                    f"{value.dtype}{list(value.shape)}"
                )
        np.savez(os.path.join(args.out, f"{variant}.{args.process_id}.npz"), **arrays)

    if jax.process_count() > 1:
        opt = make_opt("f32")
        params = make_params()
        state = opt.init(params)
        directory = os.path.join(args.checkpoints, "bad-target")
        eam.save_checkpoint(directory, 1, (params, state))
        device0 = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        like = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device0),
            (params, state),
        )
        try:
            eam.restore_checkpoint(directory, like)
            result = {"error": None}
        except Exception as e:
            result = {"error": type(e).__name__, "message": str(e)}
        with open(
            os.path.join(args.out, f"bad-target.{args.process_id}.json"), "w"
        ) as f:
            json.dump(result, f)


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except BaseException:
        with open(os.path.join(args.out, f"error.{args.process_id}.txt"), "w") as f:
            f.write(traceback.format_exc())
        sys.stdout.flush()
        os._exit(1)  # do not wait for the other process in JAX's shutdown


if __name__ == "__main__":
    main()
