"""Changing course mid-run: restart the slow EMA after a distribution shift, and
switch from Adam/AdamW to AdEMAMix without losing the moments Adam built up."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from ._ademamix import AdEMAMix, ScaleByAdemamix, ScaleByAdemamixState
from ._direction import leaves_with_paths
from ._storage import mix_seed, write_moment
from ._tree import compute_dtype


def _is_state(x: Any) -> bool:
    return isinstance(x, ScaleByAdemamixState)


def reset_slow_ema(state: PyTree) -> PyTree:
    """Forget the slow EMA: `m2` becomes zero and `count_m2` restarts at 0, so the
    `alpha` and `b3` warm-ups (see `eqx_ademamix.alpha_scheduler`,
    `eqx_ademamix.beta3_scheduler`) run again from their start.

    Use it after a known distribution shift (a new data mixture, a new task): the
    old slow EMA remembers ~1/(1 - b3) steps of gradients of the old data. `m1`,
    `nu` and `count` (bias correction, learning-rate schedule) are kept.

    **Arguments:**

    - `state`: an `eqx_ademamix.ScaleByAdemamixState`, or any PyTree holding
      some (an `optax.chain` state, a
      `eqx_ademamix.SkipNonFiniteState`); every one is reset.

    **Returns:** the state with the slow EMA reset; shapes, dtypes and shardings
    unchanged (the moment storages read all-zero buffers as zero moments).
    """
    found = []

    def reset(x: Any) -> Any:
        if not _is_state(x):
            return x
        found.append(x)
        return x._replace(
            count_m2=jnp.zeros_like(x.count_m2),
            m2=jax.tree.map(jnp.zeros_like, x.m2),
        )

    out = jax.tree.map(reset, state, is_leaf=_is_state)
    if not found:
        raise ValueError(
            "reset_slow_ema found no ScaleByAdemamixState in the state it was given "
            f"(a {type(state).__name__})."
        )
    return out


def _find_adam_state(state: PyTree) -> optax.ScaleByAdamState:
    found = [
        x
        for x in jax.tree.leaves(
            state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)
        )
        if isinstance(x, optax.ScaleByAdamState)
    ]
    if len(found) != 1:
        raise ValueError(
            "expected the state of optax.adam / optax.adamw (exactly one "
            f"optax.ScaleByAdamState, possibly inside a chain), found {len(found)} "
            f"in a {type(state).__name__}."
        )
    return found[0]


def state_from_adam(
    optimizer: AdEMAMix | ScaleByAdemamix,
    adam_state: PyTree,
    *,
    restart_warmup: bool = True,
) -> ScaleByAdemamixState:
    """An AdEMAMix state that continues an Adam/AdamW run.

    The fast EMA `m1` is Adam's `mu`, `nu` is Adam's `nu`, `count` is Adam's
    count (so bias correction and the learning-rate schedule continue where they
    were), and the slow EMA `m2` starts at zero. With the paper's warm-ups
    (`alpha` from 0, `b3` from `b1`) the first AdEMAMix steps are then Adam's
    steps, and the slow EMA blends in gradually: switching keeps the loss smooth.

    **Arguments:**

    - `optimizer`: the `eqx_ademamix.AdEMAMix` (or
      `eqx_ademamix.ScaleByAdemamix`) to continue with. Use the same `b1`,
      `b2`, `eps` as the Adam run for a seamless switch. With `b1 = 0` Adam's
      `mu` is dropped.
    - `adam_state`: the state of `optax.adam`, `optax.adamw`, or any chain (or
      `optax.inject_hyperparams` state) holding exactly one
      `optax.ScaleByAdamState`.
    - `restart_warmup`: `True` (default): `count_m2 = 0`, so the `alpha` and `b3`
      schedules start at the switch, as the empty slow EMA does. `False`:
      `count_m2 = count`.

    **Returns:** an `eqx_ademamix.ScaleByAdemamixState` for `optimizer`, with
    its dtypes (`mu_dtype`), its storage and layout (packed and 8-bit states
    included), and the shardings of Adam's moments.
    """
    adam = _find_adam_state(adam_state)
    direction = optimizer.direction if isinstance(optimizer, AdEMAMix) else optimizer
    if not isinstance(direction, ScaleByAdemamix):
        raise TypeError(
            "`optimizer` must be an eqx_ademamix.AdEMAMix or ScaleByAdemamix, got "
            f"{optimizer!r:.80}."
        )
    # Adam's nu has the parameters' structure, shapes and dtypes.
    template = direction.init(adam.nu)
    count = jnp.asarray(adam.count).astype(jnp.int32)
    _, leaves, treedef = leaves_with_paths(adam.nu)
    plan = direction.layout.plan(leaves)

    def fill(name: str, source: PyTree, salt: int) -> PyTree:
        """Adam's moment `source` written into the storage and layout of the
        template's moment `name`."""
        stored = plan.unwrap(getattr(template, name), treedef)
        values = plan.pack(treedef.flatten_up_to(source))
        return plan.wrap(
            [
                write_moment(
                    s,
                    jnp.asarray(v).astype(compute_dtype(jnp.asarray(v).dtype)),
                    mix_seed(count, i, salt, 7),
                )
                for i, (s, v) in enumerate(zip(stored, values))
            ],
            treedef,
        )

    return ScaleByAdemamixState(
        count=count,
        count_m2=jnp.zeros_like(count) if restart_warmup else count,
        m1=None if template.m1 is None else fill("m1", adam.mu, 1),
        m2=template.m2,
        nu=fill("nu", adam.nu, 3),
    )
