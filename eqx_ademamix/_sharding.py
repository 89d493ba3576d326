"""Shardings of an optimizer state, derived from the shardings of the parameters."""

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec, Sharding
from jaxtyping import PyTree

from ._base import AbstractGradientTransformation
from ._direction import leaves_with_paths
from ._layout import PackedBuffers, PerLeafPlan, Unit
from ._storage import AbstractEncodedArray, moment_shape, moment_shardings
from ._tree import is_none


def _init_fn(optimizer: Any) -> Callable:
    if isinstance(
        optimizer, (AbstractGradientTransformation, optax.GradientTransformation)
    ):
        return optimizer.init
    if callable(optimizer):
        return optimizer
    raise TypeError(
        "`optimizer` must be an eqx_ademamix optimizer, an optax "
        f"GradientTransformation or an init function, got {optimizer!r:.80}."
    )


def _leaf_sharding(path, leaf: Any, sharding: Any) -> Sharding:
    if sharding is None:
        sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, Sharding):
        raise ValueError(
            f"no sharding for the parameter at {jax.tree_util.keystr(path)}: pass "
            "`shardings`, or parameters that are jax.Arrays or "
            "jax.ShapeDtypeStructs with a sharding."
        )
    return sharding


def _replicated(shardings: list[Sharding]) -> Sharding:
    """A sharding that replicates a scalar over the devices the parameters use."""
    for sharding in shardings:
        if isinstance(sharding, NamedSharding):
            return NamedSharding(sharding.mesh, PartitionSpec())
    for sharding in shardings:
        if sharding.is_fully_replicated:
            return sharding
    raise ValueError(
        "cannot derive a replicated sharding for the optimizer's counters from "
        f"{shardings[0]}; use jax.sharding.NamedSharding for the parameters."
    )


def _axes_in(spec: PartitionSpec) -> set[str]:
    used = set()
    for entry in spec:
        if entry is None:
            continue
        used.update((entry,) if isinstance(entry, str) else entry)
    return used


def _zero_shard(
    sharding: Sharding, shape: tuple[int, ...], axes: tuple[str, ...]
) -> Sharding:
    """Add the mesh `axes` to the first dimension of `shape` that is not sharded
    yet and is divisible by their size; failing that, to the first sharded
    dimension that stays divisible; unchanged when there is none."""
    if not isinstance(sharding, NamedSharding):
        raise ValueError(
            "sharding optimizer state over `zero_axes` needs parameters with a "
            f"jax.sharding.NamedSharding, got {sharding}."
        )
    for axis in axes:
        if axis not in sharding.mesh.axis_names:
            raise ValueError(
                f"`zero_axes` names the mesh axis {axis!r}, but the mesh has axes "
                f"{sharding.mesh.axis_names}."
            )
    spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
    free = tuple(a for a in axes if a not in _axes_in(sharding.spec))
    if not free:
        return sharding
    size = math.prod(sharding.mesh.shape[a] for a in free)
    new = list(spec)
    for dim, (entry, n) in enumerate(zip(spec, shape)):
        if entry is None and n % size == 0 and n >= size:
            new[dim] = free[0] if len(free) == 1 else free
            return NamedSharding(sharding.mesh, PartitionSpec(*new))
    # No free dimension: shard an already sharded one further, if it divides.
    for dim, (entry, n) in enumerate(zip(spec, shape)):
        if entry is None:
            continue
        have = (entry,) if isinstance(entry, str) else tuple(entry)
        if n % (size * math.prod(sharding.mesh.shape[a] for a in have)) == 0:
            new[dim] = have + free
            return NamedSharding(sharding.mesh, PartitionSpec(*new))
    return sharding


def state_shardings(
    optimizer: Any,
    params: PyTree,
    shardings: PyTree | None = None,
    *,
    zero_axes: str | tuple[str, ...] | None = None,
) -> PyTree:
    """The shardings of an optimizer state, derived from the parameters' shardings.

    Every part of the state that holds moments of the parameters (AdEMAMix's `m1`,
    `m2`, `nu`; Adam's `mu`, `nu`; the moments inside `optax.chain`s) gets the
    parameters' shardings, leaf by leaf, in every layout and storage: a moment in
    its parameter's shape takes the parameter's sharding; 8-bit codes and scales
    are sharded along their block axis over the mesh axes the parameter uses;
    the packed buffer of small parameters is replicated (it is small), while a
    large parameter of a packed state keeps its own sharding. Everything else
    (step counters, scalars) is replicated. Use the result as `out_shardings`
    of a jitted `init` or step, as the target shardings when restoring a
    checkpoint, or with `jax.lax.with_sharding_constraint`.

    **Arguments:**

    - `optimizer`: an `eqx_ademamix.AdEMAMix` (or any
      `eqx_ademamix.AbstractGradientTransformation`), an
      `optax.GradientTransformation`, or an init function `params -> state`.
    - `params`: the parameters: arrays, or `jax.ShapeDtypeStruct`s (e.g. from
      `jax.eval_shape`). Nothing is computed or allocated.
    - `shardings`: the parameters' shardings, a tree of `jax.sharding.Sharding`s
      with the structure of `params`. Default: each leaf's own `.sharding`.
    - `zero_axes`: ZeRO-1. Mesh axis name(s) (usually the data-parallel axis)
      over which the moments are sharded *in addition* to the parameters'
      sharding: each moment gets those axes on its first dimension that is not
      sharded yet and is divisible by their size, failing that on a sharded
      dimension that stays divisible (moments with no such dimension, e.g.
      scalars, keep the parameters' sharding). Parameters can then stay
      replicated over the data axis while each device holds only its slice of
      the optimizer state.

    **Returns:** a tree of `jax.sharding.Sharding`s with the structure of
    `optimizer.init(params)` (`None` where the state has `None`).
    """
    if isinstance(zero_axes, str):
        zero_axes = (zero_axes,)
    init = _init_fn(optimizer)
    paths, leaves, treedef = leaves_with_paths(params)
    if shardings is None:
        sharding_leaves = [None] * len(leaves)
    else:
        try:
            sharding_leaves = treedef.flatten_up_to(shardings)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "`shardings` must have the structure of `params`: got "
                f"{jax.tree.structure(shardings)} for parameters {treedef}."
            ) from e
    param_shardings = [
        None if leaf is None else _leaf_sharding(path, leaf, sharding)
        for path, leaf, sharding in zip(paths, leaves, sharding_leaves)
    ]
    present = [s for s in param_shardings if s is not None]
    if not present:
        raise ValueError("`params` has no array leaves.")
    replicated = _replicated(present)
    abstract = jax.tree.map(
        lambda x: None if x is None else jax.ShapeDtypeStruct(x.shape, x.dtype),
        params,
        is_leaf=is_none,
    )
    state = eqx.filter_eval_shape(init, abstract)
    shapes = [None if x is None else tuple(x.shape) for x in leaves]
    per_leaf = PerLeafPlan(leaves)

    def unit_sharding(unit: Unit, members: list) -> Sharding:
        # A unit of one parameter in its own shape keeps the parameter's
        # sharding; a packed buffer of small parameters is replicated.
        if len(unit.members) == 1 and tuple(unit.shape) == shapes[unit.members[0]]:
            return members[0]
        return replicated

    def moments(x: Any) -> Any:
        """The shardings of `x` if it is a moment tree of these parameters (in any
        layout and storage), else None."""
        plan = x.layout if isinstance(x, PackedBuffers) else per_leaf
        if plan.entries != per_leaf.entries:
            return None
        units = plan.unwrap(x, treedef)
        if units is None or any(
            not isinstance(u, (jax.ShapeDtypeStruct, jax.Array, AbstractEncodedArray))
            or moment_shape(u) != tuple(unit.shape)
            for u, unit in zip(units, plan.units)
        ):
            return None
        out = [
            moment_shardings(u, s)
            for u, s in zip(units, plan.map_units(unit_sharding, param_shardings))
        ]
        if zero_axes:
            out = [
                jax.tree.map(
                    lambda s, a: _zero_shard(s, tuple(a.shape), zero_axes), o, u
                )
                for o, u in zip(out, units)
            ]
        return plan.wrap(out, treedef)

    def is_moments(x: Any) -> bool:
        return x is None or moments(x) is not None

    def assign(x: Any) -> Any:
        if x is None:
            return None
        found = moments(x)
        return replicated if found is None else found

    return jax.tree.map(assign, state, is_leaf=is_moments)
