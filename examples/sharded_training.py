"""Train an MLP with AdEMAMix on a 2-D device mesh (data x model), with sharded,
resumable orbax checkpoints.

The batch is split over the `data` axis; the hidden layers are split over the
`model` axis (the first layer by output features, the second by input features,
Megatron style); XLA inserts the collectives. The optimizer state takes the
parameters' shardings (`eqx_ademamix.state_shardings`), or with `--zero1` is
additionally split over the `data` axis while the parameters stay replicated
there.

On one CPU, simulate 8 devices (the flag must be set before JAX starts):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/sharded_training.py --mesh 2,4
    python examples/sharded_training.py --help

The same script runs unchanged on 8 GPUs or TPU cores, and on several hosts:
start it on every host with `--distributed` (which calls
`jax.distributed.initialize()`; on Cloud TPU and SLURM it needs no arguments), and
each host feeds only the rows of each global batch that its devices hold. The
`--checkpoint-dir` must then be on storage all hosts share. Two processes on one
machine, two CPU devices each (gloo collectives), as the tests run it:

    python examples/sharded_training.py --mesh 2,2 --distributed \\
        --coordinator-address 127.0.0.1:12345 --num-processes 2 --process-id 0 \\
        --local-devices 2 &
    python examples/sharded_training.py --mesh 2,2 --distributed \\
        --coordinator-address 127.0.0.1:12345 --num-processes 2 --process-id 1 \\
        --local-devices 2

It needs the `examples` and `checkpoint` extras:
`pip install "eqx_ademamix[examples,checkpoint]"`.
"""

import argparse
import json
import math
import os
import time

import equinox as eqx
import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Train an MLP on scikit-learn's digits with AdEMAMix on a data x model "
            "device mesh, with sharded orbax checkpoints."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--mesh",
        default="2,4",
        help="DATA,MODEL: mesh shape; the product must be the number of devices",
    )
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--width", type=int, default=512, help="hidden width")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    parser.add_argument(
        "--warmup",
        type=int,
        default=300,
        help="steps of the alpha and b3 warm-ups (not tied to --steps, so that a "
        "run extended with a larger --steps resumes the same optimizer)",
    )
    parser.add_argument(
        "--mu-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the first moments m1 and m2",
    )
    parser.add_argument(
        "--zero1",
        action="store_true",
        help="also shard the optimizer state over the data axis (ZeRO-1)",
    )
    parser.add_argument(
        "--checkpoint-dir",
        default=None,
        help="save here every --checkpoint-every steps; resume from the newest",
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between saves"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of init and batches")
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host runs)",
    )
    parser.add_argument(
        "--coordinator-address",
        default=None,
        help="with --distributed: HOST:PORT of process 0 (default: detected, e.g. "
        "on Cloud TPU or SLURM)",
    )
    parser.add_argument(
        "--num-processes", type=int, default=None, help="with --distributed"
    )
    parser.add_argument(
        "--process-id", type=int, default=None, help="with --distributed"
    )
    parser.add_argument(
        "--local-devices",
        type=int,
        default=None,
        help="number of CPU devices of this process (simulated devices on CPU)",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (e.g. in CI)"
    )
    parser.add_argument(
        "--out", default=None, help="write a JSON summary of the run to this file"
    )
    return parser.parse_args(argv)


def make_mesh(spec: str) -> jax.sharding.Mesh:
    try:
        data, model = (int(n) for n in spec.split(","))
    except ValueError:
        raise SystemExit(f"--mesh must look like DATA,MODEL, got {spec!r}") from None
    if data * model != jax.device_count():
        raise SystemExit(
            f"--mesh {spec} needs {data * model} devices, but JAX sees "
            f"{jax.device_count()}. On CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting."
        )
    # Auto axes: XLA decides where the collectives go (recent JAX makes meshes
    # with explicit axes by default, which asks for out_sharding on every matmul
    # whose contracted dimension is sharded).
    kwargs = {}
    if hasattr(jax.sharding, "AxisType"):
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, model), ("data", "model"), **kwargs)


def parameter_specs(params):
    """Megatron-style partition of the MLP: hidden features over `model`."""
    specs = jax.tree.map(lambda _: P(), params)
    return eqx.tree_at(
        lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[1].weight),
        specs,
        (P("model", None), P("model"), P(None, "model")),
    )


def load_data():
    digits = load_digits()
    x = StandardScaler().fit_transform(digits.data).astype(np.float32)
    return x, digits.target.astype(np.int32)


def global_batch(x, y, step, batch_size, seed, sharding):
    """The rows of the batch of `step` (the same on every host), as global arrays
    of which each host builds only its own shards."""
    rng = np.random.default_rng([seed, step])
    rows = rng.choice(len(x), batch_size, replace=False)
    xb, yb = x[rows], y[rows]
    make = jax.make_array_from_callback
    return (
        make(xb.shape, sharding, lambda index: xb[index]),
        make(yb.shape, sharding, lambda index: yb[index]),
    )


def state_bytes_per_device(state) -> int:
    return sum(
        leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(state)
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.local_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.local_devices)
    if args.distributed:
        # CPU devices of several processes talk through gloo (GPUs and TPUs
        # ignore this setting).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    mesh = make_mesh(args.mesh)
    lead = jax.process_index() == 0
    data_size = mesh.shape["data"]
    if args.batch_size % data_size:
        raise SystemExit(
            f"--batch-size {args.batch_size} must divide by the data axis size "
            f"{data_size}"
        )
    x, y = load_data()

    model = eqx.nn.MLP(64, 10, args.width, 2, key=jr.key(args.seed))
    params, static = eqx.partition(model, eqx.is_array)
    specs = parameter_specs(params)
    if args.zero1:
        # ZeRO-1: parameters replicated over `data` *and* `model`, state sharded.
        specs = jax.tree.map(lambda _: P(), params)
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
    batch_sh = NamedSharding(mesh, P("data"))

    opt = eam.AdEMAMix(
        learning_rate=args.lr,
        alpha=eam.alpha_scheduler(5.0, warmup=args.warmup),
        b3=eam.beta3_scheduler(0.999, beta_start=0.9, warmup=args.warmup),
        weight_decay=1e-4,
        mu_dtype=jnp.dtype(args.mu_dtype),
    )
    state_sh = eam.state_shardings(
        opt, params, param_sh, zero_axes=("data", "model") if args.zero1 else None
    )

    def loss_fn(params, xb, yb):
        model = eqx.combine(params, static)
        logits = jax.vmap(model)(xb)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, yb[:, None], axis=1))

    init = jax.jit(lambda p: opt.init(p), out_shardings=state_sh)

    @jax.jit
    def accuracy(params, xb, yb):
        model = eqx.combine(params, static)
        return jnp.mean(jnp.argmax(jax.vmap(model)(xb), axis=1) == yb)

    def train_step(params, state, xb, yb):
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        updates, state = opt.update(grads, state, params)
        return eqx.apply_updates(params, updates), state, loss

    step_fn = jax.jit(
        train_step,
        in_shardings=(param_sh, state_sh, batch_sh, batch_sh),
        out_shardings=(param_sh, state_sh, NamedSharding(mesh, P())),
        donate_argnums=(0, 1),
    )

    params = jax.device_put(params, param_sh)
    state = init(params)
    start = 0
    if args.checkpoint_dir is not None:
        latest = eam.latest_step(args.checkpoint_dir)
        if latest is not None:
            like = (params, state)  # shapes, dtypes and shardings of the target
            params, state = eam.restore_checkpoint(args.checkpoint_dir, like, latest)
            start = latest
            if lead:
                print(f"resumed from step {start} in {args.checkpoint_dir}")

    losses = []
    t0 = time.perf_counter()
    bar = tqdm(
        range(start, args.steps),
        initial=start,
        total=args.steps,
        disable=args.no_progress or not lead,
        desc="AdEMAMix",
    )
    for step in bar:
        xb, yb = global_batch(x, y, step, args.batch_size, args.seed, batch_sh)
        params, state, loss = step_fn(params, state, xb, yb)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if args.checkpoint_dir is not None and (
            done % args.checkpoint_every == 0 or done == args.steps
        ):
            eam.save_checkpoint(
                args.checkpoint_dir, done, (params, state), max_to_keep=2
            )
    elapsed = time.perf_counter() - t0

    full_x = jax.device_put(x[: len(x) // data_size * data_size], batch_sh)
    full_y = jax.device_put(y[: len(y) // data_size * data_size], batch_sh)
    summary = {
        "mesh": dict(mesh.shape),
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "zero1": args.zero1,
        "mu_dtype": args.mu_dtype,
        "start_step": start,
        "steps": args.steps,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "train_accuracy": float(accuracy(params, full_x, full_y)),
        "state_bytes_per_device": state_bytes_per_device(state),
        "state_bytes_total": sum(leaf.nbytes for leaf in jax.tree.leaves(state)),
        "m2_first_layer_sharding": str(state.m2.layers[0].weight.sharding.spec),
        "param_first_layer_sharding": str(params.layers[0].weight.sharding.spec),
        "seconds": elapsed,
    }
    if lead:
        print(json.dumps(summary, indent=2))
        if args.out is not None:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(summary, f, indent=2)
    summary["losses"] = losses
    summary["params"] = params
    return summary


if __name__ == "__main__":
    main()
