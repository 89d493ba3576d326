"""Directions: the protocol between an update rule and the optimizer that applies
the learning rate and weight decay, and the Adam-family framework that writes
`init`, validation and the leaf loop once for every algorithm.

The protocol (`eqx_ademamix.AbstractDirection`) is tree-shaped:
`init(params) -> state` and `step(grads, state) -> (direction, new_state)`, where
`direction` has the gradients' structure (`None` leaves included) and its leaves
are in compute precision (at least float32). The optimizer
(`eqx_ademamix.AbstractOptimizer`) scales it by `-lr`, adds decoupled weight
decay and casts to the parameters' dtypes, in one fused expression per leaf.

An Adam-family algorithm (`eqx_ademamix.AbstractAdamDirection`) is then its
fields, its `__init__`, its counters and its per-leaf rule. The framework brings
every storage (plain, bf16 with stochastic rounding, 8-bit) and every layout
(per leaf, packed) to it.
"""

import abc
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PyTree, Real

from ._base import AbstractGradientTransformation
from ._layout import AbstractLayout, AbstractPlan, as_layout, PackedBuffers, PerLeaf
from ._misc import (
    as_dtype,
    as_float_scalar,
    check_nonnegative,
    check_unit_interval,
    is_concrete,
)
from ._storage import (
    AbstractEncodedArray,
    AbstractMomentStorage,
    as_storage,
    CastStorage,
    describe_spec,
    mix_seed,
    moment_for_direction,
    moment_shape,
    moment_spec,
    takes_update,
)
from ._tree import compute_dtype, is_none, real_dtype, wider_dtype


Schedule = Callable[[Int[Array, ""]], Float[Array, ""]]
ScalarOrSchedule = Real[ArrayLike, ""] | Schedule

_INT32_MAX = 2**31 - 1


def saturating_increment(count: Int[Array, ""]) -> Int[Array, ""]:
    """`count + 1`, staying at the int32 maximum instead of wrapping."""
    return jnp.where(count < _INT32_MAX, count + 1, count)


def value_at(
    value: ScalarOrSchedule, step: Int[Array, ""], name: str = "a hyperparameter"
) -> Float[Array, ""]:
    """A hyperparameter's value at `step`: schedules are called, scalars returned."""
    if callable(value):
        out = jnp.asarray(value(step))
        if out.shape != ():
            raise ValueError(
                f"the schedule for `{name}` must return a scalar, but {value} "
                f"returned shape {out.shape}."
            )
        return out
    return value


def scalar_or_schedule(value: Any, scheduler: Any, name: str) -> ScalarOrSchedule:
    """One field from the optax.contrib style (`b3` may be a schedule) and the
    original style (`b3_scheduler`)."""
    if scheduler is not None:
        if callable(value):
            raise ValueError(
                f"got both a schedule for `{name}` ({value}) and "
                f"`{name}_scheduler` ({scheduler}); pass one of them."
            )
        if not callable(scheduler):
            raise TypeError(
                f"`{name}_scheduler` must be callable (step -> value), got "
                f"{scheduler!r:.80}."
            )
        return scheduler
    return value if callable(value) else as_float_scalar(value, name)


def check_decay(name: str, value: Any, residual: float) -> None:
    """`check_unit_interval` of a stored decay, reporting the value the user gave
    (`stored + residual`) when storing rounded it."""
    given = None
    if residual and is_concrete(value):
        given = float(value) + residual
    check_unit_interval(name, value, given)


def path_str(path) -> str:
    """A tree path as `jax.tree_util.keystr` writes it (`<root>` for the root)."""
    return jax.tree_util.keystr(path) or "<root>"


def _placeholder_type() -> type | None:
    # optax.tree.map_params calls `init` on this object to find the parameter-
    # shaped parts of a state.
    from optax.tree_utils import _state_utils

    return getattr(_state_utils, "_ParamsPlaceholder", None)


def is_params_placeholder(params: Any) -> bool:
    """Whether `params` is the placeholder `optax.tree.map_params` passes to
    `init`."""
    placeholder = _placeholder_type()
    return placeholder is not None and isinstance(params, placeholder)


def is_array_wrapper(x: Any) -> bool:
    """Whether `x` wraps one array as a pytree node (e.g. a Flax NNX `Variable`):
    it has a shape and a dtype and converts to an array, but is not one."""
    return (
        hasattr(x, "__jax_array__")
        and hasattr(x, "shape")
        and hasattr(x, "dtype")
        and not isinstance(x, (jax.Array, jax.ShapeDtypeStruct))
    )


def leaves_with_paths(tree: PyTree) -> tuple[list, list, Any]:
    """`(paths, leaves, treedef)` of `tree`, `None` leaves kept.

    Array wrappers (Flax NNX passes `init` the parameters as `Variable`s and
    `update` plain arrays) count as leaves and are unwrapped, so the state's
    moment trees hold moments where the parameters hold arrays, never wrappers
    around them."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None or is_array_wrapper(x)
    )
    leaves = [jnp.asarray(x) if is_array_wrapper(x) else x for _, x in flat]
    return [p for p, _ in flat], leaves, treedef


def check_floating(leaves: list, paths: list, what: str) -> None:
    """A `ValueError` naming the path of the first leaf that is not a floating
    (or complex) array."""
    for path, leaf in zip(paths, leaves):
        if leaf is None:
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not hasattr(leaf, "shape"):
            raise ValueError(
                f"the {what} at {path_str(path)} is {leaf!r:.80}, not an array. "
                "Select the trainable arrays first, e.g. "
                "`eqx.filter(model, eqx.is_inexact_array)`."
            )
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(
                f"the {what} at {path_str(path)} has dtype {jnp.dtype(dtype)}; "
                "AdEMAMix optimizes floating-point (or complex) arrays. Select the "
                "trainable arrays first, e.g. `eqx.filter(model, "
                "eqx.is_inexact_array)`, or cast them to a float dtype."
            )


def describe_tree_difference(
    grads: PyTree, stored: PyTree, limit: int = 8
) -> list[str]:
    """The paths where a gradient tree and a stored moment tree differ: leaves
    one has and the other has not, and `None` against an array."""

    def paths(tree, leaf):
        flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=leaf)
        return {path_str(p): x for p, x in flat}

    g = paths(grads, is_none)
    s = paths(stored, lambda x: x is None or isinstance(x, (AbstractEncodedArray,)))
    lines = []
    for key in g:
        if key not in s:
            lines.append(f"{key}: in the gradients, not in the state")
        elif (g[key] is None) != (s[key] is None):
            have = "None" if g[key] is None else "an array"
            other = "None" if s[key] is None else "a moment"
            lines.append(f"{key}: the gradients have {have}, the state {other}")
    lines += [f"{key}: in the state, not in the gradients" for key in s if key not in g]
    if len(lines) > limit:
        lines = lines[:limit] + [f"... and {len(lines) - limit} more"]
    return lines


class _NotParameterShaped:
    """Marks, for `optax.tree.map_params`, a moment tree that is not a tree of
    parameter-shaped arrays (packed buffers, 8-bit blocks)."""

    def __repr__(self) -> str:
        return "NOT_PARAMETER_SHAPED"


NOT_PARAMETER_SHAPED = _NotParameterShaped()


class MomentSpec(NamedTuple):
    """One moment an algorithm stores: its state field, whether it is a first
    moment (signed; stored in `mu_dtype`) or a second moment (non-negative; stored
    in the parameter's real dtype), and the salt that keeps its rounding noise
    apart from the other moments'."""

    name: str
    signed: bool
    salt: int


class AbstractDirection(AbstractGradientTransformation):
    """The protocol between an update rule and the optimizer that applies the
    learning rate and weight decay (as in optimistix, where a solver composes a
    descent and a search).

    - `init(params) -> state`.
    - `step(grads, state) -> (direction, new_state)`: `direction` has the
      structure of `grads`, `None` leaves included, and its leaves are in compute
      precision (at least float32): the optimizer applies `-lr(t) * (direction +
      weight_decay * mask * params)` in that precision and casts once, to the
      parameters' dtypes.
    - `step_count(state)`: the number of steps taken so far (the learning-rate
      schedule is evaluated there, before the increment).

    `update` (the optax-style entry point: the direction alone, cast to the
    gradients' dtypes) is written here once. Any subclass can be given to
    `eqx_ademamix.AbstractOptimizer`-based optimizers, or used alone, e.g. in
    an `optax.chain` through `to_optax()`.
    """

    @abc.abstractmethod
    def step(self, grads: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        """One step: `(direction in compute precision, new_state)`."""

    @abc.abstractmethod
    def step_count(self, state: PyTree) -> Int[Array, ""]:
        """The number of steps `state` has taken."""

    def update(
        self,
        updates: PyTree,
        state: PyTree,
        params: PyTree | None = None,
        **extra_args,
    ) -> tuple[PyTree, PyTree]:
        """One step of the direction.

        **Arguments:**

        - `updates`: the gradients, with the structure `init` was called with.
        - `state`: the current state (from `init` or a previous `update`).
        - `params`: unused (accepted for optax compatibility).
        - `**extra_args`: ignored (optax's `GradientTransformationExtraArgs`).

        **Returns:** `(direction, new_state)`; the direction has the gradients'
        structure and dtypes.
        """
        del params, extra_args
        direction, state = self.step(updates, state)
        out = jax.tree.map(
            lambda d, g: None if d is None else d.astype(g.dtype),
            direction,
            updates,
            is_leaf=is_none,
        )
        return out, state


class AbstractAdamDirection(AbstractDirection):
    """An Adam-family direction: EMAs of the gradients, normalised by an EMA of
    their squares. `init`, validation and the loop over the layout's units are
    written here once; an algorithm declares

    - its fields (`b2`, `eps`, `eps_root`, `mu_dtype`, `storage`, `layout` are
      declared here as abstract; plus its own),
    - `state_type` (a `NamedTuple` of integer counters and moment trees) and
      `moment_specs` (the moments it stores),
    - `_uses(name)`: whether a moment is stored (e.g. no `m1` when `b1 == 0`),
    - `_counters(state)` / `_advance(state)`: its step counters now and after
      this step,
    - `_coefficients(state, dtype)`: the step's scalars in a compute dtype,
    - `_moments(g, moments, c)`: the new moments of one unit (compute precision),
    - `_direction(g, moments, c)`: the unit's direction from the moments as they
      were stored.

    The direction is computed from the moments *as stored* (after rounding to
    their storage), so the stored state and the step agree exactly, and XLA never
    has to keep the unrounded values alive next to a donated state.
    """

    b2: eqx.AbstractVar[Float[Array, ""]]
    eps: eqx.AbstractVar[Float[Array, ""]]
    eps_root: eqx.AbstractVar[Float[Array, ""]]
    mu_dtype: eqx.AbstractVar[Any]
    storage: eqx.AbstractVar[AbstractMomentStorage]
    layout: eqx.AbstractVar[AbstractLayout]

    state_type: eqx.AbstractClassVar[type]
    moment_specs: eqx.AbstractClassVar[tuple[MomentSpec, ...]]

    def __check_init__(self):
        check_nonnegative("eps", self.eps)
        check_nonnegative("eps_root", self.eps_root)
        if self.mu_dtype is not None and not jnp.issubdtype(self.mu_dtype, jnp.inexact):
            raise ValueError(
                f"`mu_dtype` must be a floating dtype or None, got {self.mu_dtype}."
            )
        if not isinstance(self.storage, AbstractMomentStorage):
            raise TypeError(
                "`storage` (or `quantized`) must be an eqx_ademamix storage such as "
                f"eqx_ademamix.Blockwise8Bit(), got {self.storage!r:.80}."
            )

    def _set_common(
        self,
        b2: Any,
        eps: Any,
        eps_root: Any,
        mu_dtype: Any,
        packed: Any,
        quantized: Any,
        layout: Any,
        storage: Any,
    ) -> None:
        """Set the fields every Adam-family direction has, from the constructor
        arguments every one of them takes (called from a final class's
        `__init__`)."""
        self.b2 = as_float_scalar(b2, "b2")
        self.eps = as_float_scalar(eps, "eps")
        self.eps_root = as_float_scalar(eps_root, "eps_root")
        self.mu_dtype = as_dtype(mu_dtype)
        self.storage = as_storage(storage, quantized)
        self.layout = as_layout(layout, packed)

    # ------------------------------------------------------------ per algorithm

    @abc.abstractmethod
    def _uses(self, name: str) -> bool:
        """Whether the moment `name` is stored (static)."""

    @abc.abstractmethod
    def _counters(self, state: PyTree | None) -> dict[str, Int[Array, ""]]:
        """The counters of `state` (`None`: the initial counters, all 0)."""

    @abc.abstractmethod
    def _advance(self, state: PyTree) -> dict[str, Int[Array, ""]]:
        """The counters after this step."""

    @abc.abstractmethod
    def _coefficients(self, state: PyTree, dtype: Any) -> Any:
        """This step's scalars in the compute dtype `dtype` (computed once per
        dtype and step, not per unit)."""

    @abc.abstractmethod
    def _moments(self, g: Array, moments: dict, c: Any) -> dict:
        """How each moment of one unit changes: `{name: LinearUpdate or None}`
        from the gradient `g` and the moments `{name: value or None}` read from
        storage (each new moment is `decay * old + weight * x`, in compute
        precision)."""

    @abc.abstractmethod
    def _direction(self, g: Array, moments: dict, c: Any) -> Array:
        """One unit's direction, from this step's new moments (see
        `moment_for_direction`: as stored for plain arrays, before encoding
        for encoded ones)."""

    # ------------------------------------------------------------ written once

    def step_count(self, state: PyTree) -> Int[Array, ""]:
        return state.count

    def _moment_dtype(self, name: str, signed: bool, dtype: Any, path: Any) -> Any:
        if not signed:
            return real_dtype(dtype)
        if self.mu_dtype is None:
            return jnp.dtype(dtype)
        if jnp.issubdtype(dtype, jnp.complexfloating) and not jnp.issubdtype(
            self.mu_dtype, jnp.complexfloating
        ):
            raise ValueError(
                f"the parameter at {path_str(path)} is complex ({jnp.dtype(dtype)}), "
                f"so its moment `{name}` cannot be stored in "
                f"mu_dtype={jnp.dtype(self.mu_dtype)}; use a complex mu_dtype or None."
            )
        return self.mu_dtype

    def init(self, params: PyTree) -> PyTree:
        """The initial state: zero moments for `params`, counters at 0.

        **Arguments:**

        - `params`: a PyTree of floating or complex arrays (`None` leaves allowed,
          as `eqx.filter` makes them). Only shapes, dtypes and shardings are read.

        **Returns:** a `state_type` (e.g. an `eqx_ademamix.ScaleByAdemamixState`).
        """
        counters = self._counters(None)
        if is_params_placeholder(params):
            # optax.tree.map_params: mark the parts of the state that are trees of
            # parameter-shaped arrays. Only the per-leaf layout with plain arrays
            # stores such trees; packed buffers and 8-bit blocks are not
            # parameter-shaped, and are left to `transform_non_params`.
            return self._placeholder_state(params, counters)
        paths, leaves, treedef = leaves_with_paths(params)
        check_floating(leaves, paths, "parameter")
        plan = self.layout.plan(leaves)
        moments = {}
        for spec in self.moment_specs:
            if not self._uses(spec.name):
                moments[spec.name] = None
                continue
            for path, leaf in zip(paths, leaves):
                if leaf is not None:
                    self._moment_dtype(spec.name, spec.signed, leaf.dtype, path)
            units = plan.pack(leaves)
            stored = [
                self.storage.init(
                    u,
                    self._moment_dtype(spec.name, spec.signed, u.dtype, ()),
                    spec.signed,
                )
                for u in units
            ]
            moments[spec.name] = plan.wrap(stored, treedef)
        self._notice_storage(plan)
        return self.state_type(**counters, **moments)

    def _notice_storage(self, plan: AbstractPlan) -> None:
        self.storage.notice([u.shape for u in plan.units])

    def _placeholder_state(self, placeholder: Any, counters: dict) -> PyTree:
        params_shaped = isinstance(self.layout, PerLeaf) and isinstance(
            self.storage, CastStorage
        )
        moments = {
            spec.name: (placeholder if params_shaped else NOT_PARAMETER_SHAPED)
            if self._uses(spec.name)
            else None
            for spec in self.moment_specs
        }
        return self.state_type(**counters, **moments)

    def _check_state(self, state: PyTree) -> None:
        if not isinstance(state, self.state_type):
            hint = ""
            inner = getattr(state, "inner_state", None)
            if isinstance(inner, self.state_type):
                hint = (
                    " It holds one in `inner_state`: give it to the optimizer it "
                    "came from (e.g. eqx_ademamix.SkipNonFinite)."
                )
            raise TypeError(
                f"{type(self).__name__}.update expects a "
                f"{self.state_type.__name__}, got a {type(state).__name__}; the state "
                "was made by another optimizer." + hint
            )

    def _unwrap(
        self,
        name: str,
        signed: bool,
        stored: PyTree,
        plan: AbstractPlan,
        paths: list,
        leaves: list,
        grads: PyTree,
        treedef: Any,
        second: list | None,
    ) -> list:
        """The per-unit stored values of the moment `name`, checked against the
        gradients and this optimizer's configuration: an error says what differs.
        `second` holds the second moment's stored units (for a first moment with
        `mu_dtype=None`, whose dtype must then be the parameter's, as `nu`'s)."""
        if stored is None:
            raise ValueError(
                f"this optimizer stores `{name}`, but the state has {name}=None: it "
                f"was made by an optimizer that does not ({self._why_missing(name)})."
            )
        units = plan.unwrap(stored, treedef)
        if units is None:
            raise ValueError(self._layout_mismatch(name, stored, plan, grads))
        for i, (unit, value) in enumerate(zip(plan.units, units)):
            path = paths[unit.members[0]]
            where = path_str(path) if len(unit.members) == 1 else f"buffer {unit.key!r}"
            if moment_shape(value) != tuple(unit.shape):
                raise ValueError(
                    f"the gradient at {where} has shape {tuple(unit.shape)}, but the "
                    f"optimizer state's `{name}` was made for shape "
                    f"{moment_shape(value)}: the gradients must have the structure "
                    "and shapes of the parameters given to `init`."
                )
            dtype = self._moment_dtype(name, signed, unit.dtype, path)
            check_dtype = signed and self.mu_dtype is not None
            if signed and self.mu_dtype is None and second is not None:
                # The parameter's dtype: `nu` holds its real counterpart.
                reference = jnp.dtype(moment_spec(second[i])[2])
                if jnp.issubdtype(unit.dtype, jnp.complexfloating):
                    # (not `result_type`: strict dtype promotion refuses it)
                    reference = jnp.dtype(
                        jnp.complex128 if reference.itemsize > 4 else jnp.complex64
                    )
                dtype, check_dtype = reference, True
            like = jax.ShapeDtypeStruct(unit.shape, unit.dtype)
            want = self.storage.spec(like, dtype, signed)
            have = moment_spec(value)
            if (
                have[0] != want[0]
                or have[1] != want[1]
                or have[3:] != want[3:]
                or (check_dtype and have[2] != want[2])
            ):
                raise ValueError(
                    f"the optimizer state's `{name}` at {where} is stored as "
                    f"{describe_spec(have)}, but this optimizer stores "
                    f"{describe_spec(want)} (storage {self.storage}, mu_dtype="
                    f"{None if self.mu_dtype is None else jnp.dtype(self.mu_dtype)}): "
                    "the state was made by a differently configured optimizer."
                )
        return units

    def _why_missing(self, name: str) -> str:
        return f"`{name}` is not used"

    def _layout_mismatch(
        self, name: str, stored: PyTree, plan: AbstractPlan, grads: PyTree
    ) -> str:
        ours = type(self.layout).__name__
        if isinstance(stored, PackedBuffers) != (type(plan).__name__ == "PackedLayout"):
            theirs = "packed" if isinstance(stored, PackedBuffers) else "per-leaf"
            return (
                f"the optimizer state's `{name}` has the {theirs} layout, but this "
                f"optimizer's layout is {self.layout}: the state was made by an "
                f"optimizer with another layout (packed=...)."
            )
        if isinstance(stored, PackedBuffers):

            def show(entry):
                return "None" if entry is None else f"{entry[1]}{list(entry[0])}"

            lines = [
                f"leaf {i}: {show(have)} in the state, {show(want)} in the gradients"
                for i, (have, want) in enumerate(
                    zip(stored.layout.entries, plan.entries)
                )
                if have != want
            ]
            if len(stored.layout.entries) != len(plan.entries):
                lines.append(
                    f"{len(stored.layout.entries)} leaves in the state, "
                    f"{len(plan.entries)} in the gradients"
                )
            detail = "\n".join(f"  - {line}" for line in lines[:8])
            return (
                f"the gradient tree does not match the optimizer state's `{name}` "
                f"(layout {ours}); the leaves that differ:\n{detail}"
            )
        lines = describe_tree_difference(grads, stored)
        detail = "\n".join(f"  - {line}" for line in lines) or (
            "  - the trees have the same paths but different node types"
        )
        return (
            f"the gradient tree does not match the optimizer state's `{name}`:\n"
            f"{detail}"
        )

    def step(self, grads: PyTree, state: PyTree) -> tuple[PyTree, PyTree]:
        """One step of the rule on every unit of the layout.

        **Returns:** `(direction, new_state)`; the direction has the gradients'
        structure, in compute precision.
        """
        self._check_state(state)
        paths, leaves, treedef = leaves_with_paths(grads)
        check_floating(leaves, paths, "gradient")
        plan = self.layout.plan(leaves)
        stored: dict[str, list] = {}
        second = None
        # Second moments first: they tell the parameters' dtypes.
        for spec in sorted(self.moment_specs, key=lambda s: s.signed):
            value = getattr(state, spec.name)
            if not self._uses(spec.name):
                if value is not None:
                    raise ValueError(
                        f"this optimizer stores no `{spec.name}` "
                        f"({self._why_missing(spec.name)}), but the state has one: "
                        "it was made by a differently configured optimizer."
                    )
                continue
            stored[spec.name] = self._unwrap(
                spec.name,
                spec.signed,
                value,
                plan,
                paths,
                leaves,
                grads,
                treedef,
                second,
            )
            if not spec.signed:
                second = stored[spec.name]
        units = plan.pack(leaves)
        seeds: dict[int, Array] = {}
        # Per step and moment, not per unit: a per-unit constant makes every
        # unit's kernel distinct, and XLA then compiles each one separately
        # (about 15 ms per leaf on CPU), while units of equal shape share kernels.
        # Equal indices of equal-shaped units thus draw equal rounding bits within
        # a step; each element's rounding stays unbiased, which is what EMAs need.
        coefficients: dict[Any, Any] = {}
        write_takes_update = takes_update(type(self.storage).write)
        new: dict[str, list] = {name: [] for name in stored}
        directions = []
        for i, g in enumerate(units):
            wide = g.dtype if self.mu_dtype is None else self.mu_dtype
            dtype = compute_dtype(wider_dtype(g.dtype, wide))
            if dtype not in coefficients:
                coefficients[dtype] = self._coefficients(state, dtype)
            c = coefficients[dtype]
            g = g.astype(dtype)
            old = {
                name: self.storage.read(values[i]) for name, values in stored.items()
            }
            for spec in self.moment_specs:
                old.setdefault(spec.name, None)
            updates = self._moments(g, old, c)
            values = {}
            for spec in self.moment_specs:
                if spec.name not in stored:
                    values[spec.name] = None
                    continue
                if spec.salt not in seeds:
                    seeds[spec.salt] = mix_seed(state.count, spec.salt)
                update = updates[spec.name]
                value = update.new()
                extra = (update,) if write_takes_update else ()
                written = self.storage.write(
                    stored[spec.name][i], value, seeds[spec.salt], *extra
                )
                new[spec.name].append(written)
                values[spec.name] = moment_for_direction(written, value)
            directions.append(self._direction(g, values, c))
        moments = {
            spec.name: (
                plan.wrap(new[spec.name], treedef) if spec.name in stored else None
            )
            for spec in self.moment_specs
        }
        new_state = self.state_type(**self._advance(state), **moments)
        return treedef.unflatten(plan.unpack(directions)), new_state


def zero_to_none(x: Float[Array, ""], dtype: Any) -> Array | None:
    """`x` as a `dtype` scalar, or None if it is a concrete 0 (a term to skip)."""
    if is_concrete(x) and float(x) == 0:
        return None
    return x.astype(dtype)


def denominator_floor(
    eps: Float[Array, ""], eps_root: Float[Array, ""], dtype: Any
) -> Array | None:
    """The smallest normal number of `dtype` if Adam's denominator
    `sqrt(nu_hat + eps_root) + eps` can be exactly 0 (both epsilons 0, or not known
    now), else None.

    Flooring the denominator at it turns the update of an element whose gradients
    have all been 0 (numerator 0, denominator 0) into 0 instead of NaN. Nothing
    else changes in practice: the square root of any normal number is far above
    the floor (only second moments that underflow, i.e. gradients below about
    1e-19 in float32, reach it, and give a huge finite step instead of inf)."""
    if any(is_concrete(x) and float(x) > 0 for x in (eps, eps_root)):
        return None
    return jnp.asarray(jnp.finfo(dtype).tiny, dtype)
