"""The optimizer: a direction, a learning rate and decoupled weight decay."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PyTree

from ._base import AbstractGradientTransformation
from ._direction import (
    AbstractDirection,
    leaves_with_paths,
    path_str,
    scalar_or_schedule,
    ScalarOrSchedule,
    value_at,
)
from ._misc import as_float_scalar, check_nonnegative, is_concrete, show
from ._tree import is_none


def full_mask(mask: Any, params: PyTree) -> list:
    """A weight-decay mask (a tree of booleans that is a prefix of `params`, or a
    callable returning one) as one boolean per parameter leaf (`None` leaves
    included); errors name the offending path."""
    paths, leaves, treedef = leaves_with_paths(params)
    if mask is None:
        return [True] * len(leaves)
    if callable(mask):
        mask = mask(params)
    try:
        full = jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub, is_leaf=is_none),
            mask,
            params,
            is_leaf=is_none,
        )
        flat = treedef.flatten_up_to(full)
    except (ValueError, TypeError) as e:
        raise ValueError(
            "the weight-decay `mask` must be a tree of booleans whose structure is "
            "a prefix of the parameters' (or a callable returning one); got "
            f"{jax.tree.structure(mask)} for parameters {treedef}."
        ) from e
    for path, m, leaf in zip(paths, flat, leaves):
        if leaf is None:
            continue
        ok = isinstance(m, (bool, np.bool_)) or (
            hasattr(m, "dtype") and jnp.dtype(m.dtype) == jnp.bool_ and m.shape == ()
        )
        if not ok:
            raise TypeError(
                f"the weight-decay `mask` at {path_str(path)} is {show(m)}; a mask "
                "holds True (decay) or False (do not decay) for each parameter."
            )
    return flat


def _decays(weight_decay: Float[Array, ""], params: PyTree | None) -> bool:
    """Whether the weight-decay term is present (params are then required)."""
    if is_concrete(weight_decay) and float(weight_decay) == 0:
        return False
    if params is None:
        if is_concrete(weight_decay):
            raise ValueError(
                f"weight_decay={float(weight_decay):.6g} needs the parameters: call "
                "`update(grads, state, params)`."
            )
        return False
    return True


def descend(
    direction: PyTree,
    grads: PyTree,
    params: PyTree | None,
    lr: Float[Array, ""],
    weight_decay: Float[Array, ""],
    mask: Any,
) -> PyTree:
    """`-lr * (direction + weight_decay * mask * params)` for every leaf, in the
    parameters' dtypes (the gradients' when `params` is None). `direction` has the
    gradients' structure, in compute precision."""
    if params is None and not is_concrete(weight_decay):
        # Traced weight decay (e.g. an optimizer passed through filter_jit) with
        # no params: fail loudly at run time rather than skip a nonzero decay.
        lr = eqx.error_if(
            jnp.asarray(lr),
            weight_decay != 0,
            "weight_decay is not 0, so update() needs the parameters.",
        )
    decays = _decays(weight_decay, params)
    paths, grad_leaves, treedef = leaves_with_paths(grads)
    directions = treedef.flatten_up_to(direction)
    if params is None:
        param_leaves = [None] * len(grad_leaves)
        mask_leaves = [False] * len(grad_leaves)
    else:
        try:
            param_leaves = treedef.flatten_up_to(params)
        except (ValueError, TypeError) as e:
            raise ValueError(
                "`params` must have the structure of the gradients; got "
                f"{jax.tree.structure(params, is_leaf=is_none)} for gradients "
                f"{treedef}."
            ) from e
        for path, g, p in zip(paths, grad_leaves, param_leaves):
            if g is not None and (p is None or tuple(p.shape) != tuple(g.shape)):
                have = "None" if p is None else f"shape {tuple(p.shape)}"
                raise ValueError(
                    f"the parameter at {path_str(path)} has {have}, but its gradient "
                    f"has shape {tuple(g.shape)}: pass the parameters the gradients "
                    "were taken of."
                )
        mask_leaves = full_mask(mask, params) if decays else [False] * len(paths)
    # -lr and weight_decay cast once per dtype, not once per leaf (trace time).
    scalars: dict[Any, tuple[Array, Array]] = {}
    out = []
    for d, g, p, m in zip(directions, grad_leaves, param_leaves, mask_leaves):
        if d is None:
            out.append(None)
            continue
        if d.dtype not in scalars:
            neg_lr = lax.neg(jnp.asarray(lr).astype(d.dtype))
            scalars[d.dtype] = (neg_lr, jnp.asarray(weight_decay).astype(d.dtype))
        neg_lr, wd = scalars[d.dtype]
        static = isinstance(m, (bool, np.bool_))
        if decays and not (static and not m):
            decay = lax.mul(wd, p.astype(d.dtype))
            d = lax.add(d, decay if static else jnp.where(m, decay, 0))
        step = lax.mul(neg_lr, d)
        out.append(step.astype(g.dtype if p is None else p.dtype))
    return treedef.unflatten(out)


def replace_scalar(old: Any, new: Any, name: str) -> Any:
    """`new` in place of the hyperparameter `old`: a scalar keeps `old`'s dtype and
    weak type (so a step it is passed to does not recompile); a schedule replaces a
    schedule."""
    if callable(new):
        return new
    if callable(old):
        raise TypeError(
            f"`{name}` is a schedule ({type(old).__name__}); pass a new schedule "
            f"(e.g. `{name}=eqx_ademamix.alpha_scheduler(...)`), not {show(new)}."
        )
    value = as_float_scalar(new, name)
    if not isinstance(old, jax.Array) or not is_concrete(value):
        return value
    number = float(value)
    if getattr(old, "weak_type", False):
        weak = jnp.asarray(number)
        if weak.dtype == old.dtype:
            return weak
    return jnp.asarray(number, dtype=old.dtype)


class AbstractOptimizer(AbstractGradientTransformation):
    """An optimizer made of a direction (`eqx_ademamix.AbstractDirection`),
    decoupled weight decay and a learning rate:
    `-lr(t) * (direction + weight_decay * mask * params)`, computed in the
    direction's precision and cast once to the parameters' dtypes.

    `eqx_ademamix.AdEMAMix` and `eqx_ademamix.SimplifiedAdEMAMix` are its
    final subclasses: each declares its fields and constructor; `init`, `update`,
    `with_hyperparameters` and the validation of the learning rate and weight
    decay are written here, once.
    """

    learning_rate: eqx.AbstractVar[Float[Array, ""] | Callable]
    weight_decay: eqx.AbstractVar[Float[Array, ""]]
    mask: eqx.AbstractVar[Any]
    direction: eqx.AbstractVar[AbstractDirection]

    def __check_init__(self):
        if not callable(self.learning_rate):
            check_nonnegative("learning_rate", self.learning_rate)
        check_nonnegative("weight_decay", self.weight_decay)

    def _set_common(
        self, learning_rate: Any, weight_decay: Any, mask: Any, direction: Any
    ) -> None:
        """Set the fields every optimizer has (called from a final class's
        `__init__`)."""
        self.learning_rate = scalar_or_schedule(learning_rate, None, "learning_rate")
        self.weight_decay = as_float_scalar(weight_decay, "weight_decay")
        self.mask = mask
        self.direction = direction

    @property
    def scale(self) -> AbstractDirection:
        """The direction (the older name of `direction`)."""
        return self.direction

    def init(self, params: PyTree) -> PyTree:
        """The initial state of the direction (e.g. an
        `eqx_ademamix.ScaleByAdemamixState`) for `params`."""
        return self.direction.init(params)

    def update(
        self,
        updates: PyTree,
        state: PyTree,
        params: PyTree | None = None,
        **extra_args,
    ) -> tuple[PyTree, PyTree]:
        """One optimizer step.

        **Arguments:**

        - `updates`: the gradients.
        - `state`: the current state (from `init` or a previous `update`).
        - `params`: the current parameters; required when `weight_decay` is not 0.
        - `**extra_args`: ignored (optax's `GradientTransformationExtraArgs`).

        **Returns:** `(updates, new_state)`; add the updates to the parameters with
        `eqx.apply_updates`. Updates have the parameters' dtypes. The learning rate
        is evaluated at the state's step count before the increment.
        """
        del extra_args
        # The direction first: it checks that `state` is the right kind of state.
        direction, new_state = self.direction.step(updates, state)
        lr = value_at(
            self.learning_rate, self.direction.step_count(state), "learning_rate"
        )
        out = descend(direction, updates, params, lr, self.weight_decay, self.mask)
        return out, new_state

    def with_hyperparameters(self, **values: ScalarOrSchedule) -> "AbstractOptimizer":
        """A copy with some hyperparameters changed, without recompiling a jitted
        step that takes the optimizer as an argument.

        Each name is a field of the optimizer (`learning_rate`, `weight_decay`)
        or of its direction (`b1`, `b2`, `b3`, `alpha`, `eps`, `eps_root`). A
        scalar keeps the old value's dtype and weak type, which is what decides
        whether `eqx.filter_jit` recompiles (`eqx.tree_at` with
        `jnp.float32(1e-4)` in place of a weakly typed `1e-3` recompiles; this
        does not). A schedule replaces a schedule. The new values are validated
        as the constructor validates them.

        **Arguments:**

        - `**values`: `name=value` pairs, e.g. `learning_rate=1e-4, alpha=4.0`.

        **Returns:** the new optimizer.

        !!! example

            ```python
            import eqx_ademamix as eam

            opt = eam.AdEMAMix(learning_rate=1e-3)
            opt = opt.with_hyperparameters(learning_rate=1e-4, alpha=4.0)
            ```
        """
        new = self
        for name, value in values.items():
            for owner, get in (
                (self, lambda o: o),
                (self.direction, lambda o: o.direction),
            ):
                fields = {f.name for f in dataclasses.fields(owner)}
                if name in fields and not _is_static(owner, name):
                    where = lambda o, get=get, name=name: getattr(get(o), name)
                    replacement = replace_scalar(getattr(owner, name), value, name)
                    new = eqx.tree_at(where, new, replacement, is_leaf=is_none)
                    break
            else:
                names = [
                    f.name
                    for owner in (self, self.direction)
                    for f in dataclasses.fields(owner)
                    if not _is_static(owner, f.name)
                    and f.name not in ("direction", "storage", "layout", "mask")
                ]
                raise TypeError(
                    f"{type(self).__name__} has no hyperparameter `{name}`; the "
                    f"ones that can change are {', '.join(dict.fromkeys(names))}."
                )
        _validate(new)
        return new


def _is_static(module: eqx.Module, name: str) -> bool:
    for f in dataclasses.fields(module):
        if f.name == name:
            return bool(f.metadata.get("static", False))
    return False


def _validate(module: eqx.Module) -> None:
    """Run every `__check_init__` of `module` and of the modules it holds (as the
    constructor did)."""
    for node in jax.tree.leaves(
        module, is_leaf=lambda x: isinstance(x, eqx.Module) and x is not module
    ):
        if isinstance(node, eqx.Module):
            _validate(node)
    for cls in type(module).__mro__:
        check = cls.__dict__.get("__check_init__")
        if check is not None:
            check(module)
