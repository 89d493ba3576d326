"""AdEMAMix: the state, the direction (`ScaleByAdemamix`) and the optimizer
(`AdEMAMix`). The update rule is written once, in `ScaleByAdemamix._step`."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Inexact, Int, PyTree, Real

from ._base import AbstractGradientTransformation
from ._misc import (
    as_float_scalar,
    check_finite,
    check_nonnegative,
    check_unit_interval,
    is_concrete,
    rounding_residual,
)
from ._packed import packed_init, packed_step
from ._storage import AbstractMomentStorage, CastStorage, mix_seed
from ._tree import (
    _is_none,
    adam_direction,
    compute_dtype,
    ema,
    ema_coefficients,
    ema_of_norm,
    inverse_bias_correction,
    real_dtype,
    wider_dtype,
)


Schedule = Callable[[Int[Array, ""]], Float[Array, ""]]
ScalarOrSchedule = Real[ArrayLike, ""] | Schedule

_INT32_MAX = jnp.iinfo(jnp.int32).max
# Salts that keep the rounding noise of the three moments of one element apart.
_M1, _M2, _NU = 1, 2, 3


class ScaleByAdemamixState(eqx.Module):
    """The state of AdEMAMix.

    - `count`: the number of updates so far; drives bias correction and the
      learning-rate schedule.
    - `count_m2`: the number of updates of the slow EMA; drives the `b3` and `alpha`
      schedules (it differs from `count` only after the slow EMA is reset).
    - `m1`: the fast EMA of the gradients; `None` when `b1 == 0` (no memory spent).
    - `m2`: the slow EMA of the gradients.
    - `nu`: the EMA of the squared gradients.

    The moment trees have the parameters' structure; `None` parameters (as
    `eqx.filter` leaves them) are `None` here too. Counters saturate at the int32
    maximum instead of wrapping.
    """

    count: Int[Array, ""]
    count_m2: Int[Array, ""]
    m1: PyTree | None
    m2: PyTree
    nu: PyTree


def moment_seeds(count: Int[Array, ""]) -> Callable[[int], Array]:
    """`seed(salt)`: the stochastic-rounding seed of the moment `salt` at step `count`.

    A hash of the step and the moment, so that the seeds of different moments and
    steps are independent uniform words (the rounding bits are a Weyl sequence
    offset by the seed, see `_storage.index_bits`). Each seed is computed once per
    step, on first use. Deliberately not per leaf: a per-leaf constant makes every
    leaf's kernel distinct, and XLA then compiles each one separately (about 15 ms
    per leaf on CPU; seconds for a few hundred leaves), while leaves of equal shape
    share kernels. Equal indices of equal-shaped leaves thus draw equal bits within
    a step; each element's rounding stays unbiased, which is what EMAs need. Shared
    by the update rules of every optimizer of the package."""
    seeds: dict[int, Array] = {}

    def seed(salt: int) -> Array:
        if salt not in seeds:
            seeds[salt] = mix_seed(count, salt)
        return seeds[salt]

    return seed


def _zero_to_none(x: Float[Array, ""], dtype: Any) -> Array | None:
    """`x` as a `dtype` scalar, or None if it is a concrete 0 (a term to skip)."""
    if is_concrete(x) and float(x) == 0:
        return None
    return x.astype(dtype)


def _saturating_increment(count: Int[Array, ""]) -> Int[Array, ""]:
    return jnp.where(count < _INT32_MAX, count + 1, count)


def _at(
    value: ScalarOrSchedule, step: Int[Array, ""], name: str = "a hyperparameter"
) -> Float[Array, ""]:
    """A hyperparameter's value at `step`: schedules are called, scalars returned."""
    if callable(value):
        out = jnp.asarray(value(step))
        if out.shape != ():
            raise ValueError(
                f"the schedule for `{name}` must return a scalar, but {value} "
                f"returned shape {out.shape}"
            )
        return out
    return value


def _named_scalar(name: str, value: Any) -> Float[Array, ""]:
    """`as_float_scalar`, with an error that names the argument."""
    try:
        return as_float_scalar(value)
    except ValueError as e:
        raise ValueError(f"`{name}`: {e}.") from None


def _hyperparameter(value: Any, scheduler: Any, name: str) -> ScalarOrSchedule:
    """Merge the optax.contrib style (`b3` may be a schedule) and the seed style
    (`b3_scheduler`) into one field."""
    if scheduler is not None:
        if callable(value):
            raise ValueError(
                f"got both a schedule for `{name}` ({value}) and "
                f"`{name}_scheduler` ({scheduler}); pass one of them."
            )
        if not callable(scheduler):
            raise ValueError(f"`{name}_scheduler` must be callable, got {scheduler}.")
        return scheduler
    return value if callable(value) else _named_scalar(name, value)


def _path_str(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _check_params(params: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_none):
        if leaf is None:
            continue
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
            raise ValueError(
                f"AdEMAMix optimizes floating-point (or complex) arrays, but the "
                f"parameter at {_path_str(path)} is {leaf!r:.80} with dtype {dtype}. "
                "Select the trainable arrays first, e.g. "
                "`eqx.filter(model, eqx.is_inexact_array)`."
            )


def flatten_moments(
    grads: PyTree,
    state: Any,
    state_type: type,
    names: tuple[str, ...],
    storage: AbstractMomentStorage,
) -> tuple[list, Any, dict[str, list]]:
    """The leaves of `grads` and of each moment tree `getattr(state, name)`, checked
    against each other: a clear error for a state of the wrong type, a gradient tree
    of another structure, mismatched `None` leaves or shapes. A moment that is `None`
    (e.g. `m1` when `b1 == 0`) gives a list of `None`s. The last name must be a
    moment that always exists."""
    if not isinstance(state, state_type):
        raise TypeError(
            f"expected a {state_type.__name__}, got {type(state).__name__}; was the "
            "state made by another optimizer?"
        )
    leaves, treedef = jax.tree.flatten(grads, is_leaf=_is_none)
    moments = {}
    for name in names:
        tree = getattr(state, name)
        if tree is None:
            moments[name] = [None] * len(leaves)
            continue
        try:
            moments[name] = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"the gradient tree does not match the optimizer state.\n"
                f"gradients have structure {treedef},\nbut the state's `{name}` "
                f"expects {jax.tree.structure(tree, is_leaf=_is_none)}."
            ) from e
    for i, (path, g) in enumerate(
        jax.tree_util.tree_leaves_with_path(grads, is_leaf=_is_none)
    ):
        stored = moments[names[-1]][i]
        if (g is None) != (stored is None):
            raise ValueError(
                f"the gradient at {_path_str(path)} is {g!r:.40} but the state "
                f"holds {stored!r:.40} there; None leaves must match."
            )
        if g is not None and tuple(g.shape) != storage.shape(stored):
            raise ValueError(
                f"the gradient at {_path_str(path)} has shape {tuple(g.shape)}, "
                f"but the optimizer state was made for shape "
                f"{storage.shape(stored)}."
            )
    return leaves, treedef, moments


def check_mu_dtype(mu_dtype: Any) -> None:
    """Raise a `ValueError` unless `mu_dtype` is None or a floating dtype."""
    if mu_dtype is not None and not jnp.issubdtype(mu_dtype, jnp.inexact):
        raise ValueError(f"`mu_dtype` must be a floating dtype, got {mu_dtype}.")


def moment_dtype(mu_dtype: Any, param: Inexact[Array, "..."], path) -> Any:
    """The dtype of a first moment of `param`: `mu_dtype`, or the parameter's own.
    Complex parameters need a complex `mu_dtype` (an error names the path)."""
    if mu_dtype is None:
        return param.dtype
    if jnp.iscomplexobj(param) and not jnp.issubdtype(mu_dtype, jnp.complexfloating):
        raise ValueError(
            f"the parameter at {_path_str(path)} is complex ({param.dtype}), so "
            f"its moments cannot be stored in mu_dtype={mu_dtype}; use a "
            "complex mu_dtype or None."
        )
    return mu_dtype


class AbstractDirection(AbstractGradientTransformation):
    """A direction (no learning rate, no weight decay) computed by an update rule
    `_step(grads, state) -> (direction leaves in compute precision, treedef,
    new_state)`. `update` is written here once: it casts the direction to the
    gradients' dtypes. [`eqx_ademamix.ScaleByAdemamix`][] and
    [`eqx_ademamix.ScaleBySimplifiedAdemamix`][] are its final subclasses."""

    @abc.abstractmethod
    def _step(self, grads: PyTree, state: PyTree) -> tuple[list, Any, PyTree]:
        """The update rule."""

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
        leaves = jax.tree.leaves(updates, is_leaf=_is_none)
        directions, treedef, state = self._step(updates, state)
        out = [
            None if d is None else d.astype(g.dtype) for d, g in zip(directions, leaves)
        ]
        return treedef.unflatten(out), state


class ScaleByAdemamix(AbstractDirection):
    r"""The AdEMAMix direction, before learning rate and weight decay.

    With $g$ the gradient and $t$ the step (counting from 1):

    $$
    \begin{aligned}
    m_1 &\leftarrow \beta_1 m_1 + (1-\beta_1) g, \qquad
    m_2 \leftarrow \beta_3(t) m_2 + (1-\beta_3(t)) g, \qquad
    \nu \leftarrow \beta_2 \nu + (1-\beta_2) |g|^2, \\
    \hat m_1 &= m_1 / (1-\beta_1^t), \qquad \hat\nu = \nu / (1-\beta_2^t), \qquad
    d = \frac{\hat m_1 + \alpha(t)\, m_2}{\sqrt{\hat\nu + \epsilon_{root}} + \epsilon}.
    \end{aligned}
    $$

    The slow EMA $m_2$ is not bias-corrected (the paper's Algorithm 1). With
    $\beta_1 = 0$ no $m_1$ is stored and $\hat m_1 = g$. The schedules
    $\beta_3(t)$, $\alpha(t)$ are evaluated at `count_m2` before the increment.

    Arithmetic happens in at least float32; moments are stored in their own dtype
    and never change it (16-bit moments are written with stochastic rounding, so
    the slow EMAs stay unbiased).

    Reference: Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer: Better,
    Faster, Older*, 2024, [arXiv:2409.03137](https://arxiv.org/abs/2409.03137).
    """

    b1: Float[Array, ""]
    b2: Float[Array, ""]
    b3: Float[Array, ""] | Callable
    alpha: Float[Array, ""] | Callable
    eps: Float[Array, ""]
    eps_root: Float[Array, ""]
    mu_dtype: Any = eqx.field(static=True)
    use_m1: bool = eqx.field(static=True)
    storage: AbstractMomentStorage
    packed: bool = eqx.field(static=True)
    # What storing b1, b2, b3 as JAX scalars rounded off their Python values, so
    # that `1 - b` is exact (see `_tree.complement`). Static: changing a beta with
    # `eqx.tree_at` keeps a stale residual, which is below that beta's rounding
    # error and so never worse than not having it.
    residuals: tuple[float, float, float] = eqx.field(static=True, repr=False)

    def __init__(
        self,
        b1: Real[ArrayLike, ""] = 0.9,
        b2: Real[ArrayLike, ""] = 0.999,
        b3: ScalarOrSchedule = 0.9999,
        alpha: ScalarOrSchedule = 5.0,
        b3_scheduler: Schedule | None = None,
        alpha_scheduler: Schedule | None = None,
        eps: Real[ArrayLike, ""] = 1e-8,
        eps_root: Real[ArrayLike, ""] = 0.0,
        mu_dtype: Any | None = None,
        packed: bool = False,
        quantized: AbstractMomentStorage | None = None,
    ):
        """**Arguments:**

        - `b1`: decay of the fast EMA `m1`, in [0, 1). `0` stores no `m1`.
        - `b2`: decay of the second moment `nu`, in [0, 1).
        - `b3`: decay of the slow EMA `m2`, in [0, 1), or a schedule
          `step -> b3` (e.g. [`eqx_ademamix.beta3_scheduler`][]).
        - `alpha`: weight of the slow EMA, a float or a schedule `step -> alpha`
          (e.g. [`eqx_ademamix.alpha_scheduler`][]).
        - `b3_scheduler`, `alpha_scheduler`: the seed code's way to pass those
          schedules; an error if `b3` (or `alpha`) is a schedule too.
        - `eps`: added to the denominator outside the square root, >= 0.
        - `eps_root`: added inside the square root, >= 0.
        - `mu_dtype`: dtype of `m1` and `m2`; default: each parameter's dtype.
          `nu` always has the parameter's (real) dtype.
        - `packed`: store each moment as one flat buffer per parameter dtype
          instead of one array per parameter (see [`eqx_ademamix.PackedLayout`][]):
          much less per-step overhead for models of many small arrays, for a
          somewhat slower first compile (one kernel per small array; see the
          performance guide).
        - `quantized`: how the moments are stored, e.g.
          [`eqx_ademamix.Blockwise8Bit`][]`()` for 8-bit state (a quarter of the
          memory). Default `None`: plain arrays ([`eqx_ademamix.CastStorage`][]).
        """
        self.b1 = _named_scalar("b1", b1)
        self.b2 = _named_scalar("b2", b2)
        self.b3 = _hyperparameter(b3, b3_scheduler, "b3")
        self.alpha = _hyperparameter(alpha, alpha_scheduler, "alpha")
        self.eps = _named_scalar("eps", eps)
        self.eps_root = _named_scalar("eps_root", eps_root)
        self.mu_dtype = (
            None if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)
        )
        self.use_m1 = not (is_concrete(self.b1) and float(self.b1) == 0)
        self.storage = CastStorage() if quantized is None else quantized
        self.packed = bool(packed)
        self.residuals = (
            rounding_residual(b1, self.b1),
            rounding_residual(b2, self.b2),
            0.0 if callable(self.b3) else rounding_residual(b3, self.b3),
        )

    def __check_init__(self):
        check_unit_interval("b1", self.b1)
        check_unit_interval("b2", self.b2)
        if not callable(self.b3):
            check_unit_interval("b3", self.b3)
        if not callable(self.alpha):
            check_finite("alpha", self.alpha)
        check_nonnegative("eps", self.eps)
        check_nonnegative("eps_root", self.eps_root)
        if not isinstance(self.storage, AbstractMomentStorage):
            raise ValueError(
                "`quantized` must be a storage such as `eqx_ademamix.Blockwise8Bit()` "
                f"or None, got quantized={self.storage!r}."
            )
        check_mu_dtype(self.mu_dtype)

    def _moment_dtype(self, param: Inexact[Array, "..."], path) -> Any:
        return moment_dtype(self.mu_dtype, param, path)

    def init(self, params: PyTree) -> ScaleByAdemamixState:
        """The initial state: zero moments shaped like `params`, counters at 0.

        **Arguments:**

        - `params`: a PyTree of floating or complex arrays (`None` leaves allowed).

        **Returns:** an [`eqx_ademamix.ScaleByAdemamixState`][].
        """
        _check_params(params)
        if self.packed:
            jax.tree_util.tree_map_with_path(
                lambda path, p: None if p is None else self._moment_dtype(p, path),
                params,
                is_leaf=_is_none,
            )
            return packed_init(self._init, params)
        return self._init(params)

    def _init(self, params: PyTree) -> ScaleByAdemamixState:
        def moments(signed: bool, dtype_of: Callable) -> PyTree:
            return jax.tree_util.tree_map_with_path(
                lambda path, p: (
                    None
                    if p is None
                    else self.storage.init(p, dtype_of(p, path), signed)
                ),
                params,
                is_leaf=_is_none,
            )

        # Two separate buffers: a state whose leaves share one buffer cannot be
        # donated (XLA refuses to donate the same buffer twice).
        return ScaleByAdemamixState(
            count=jnp.zeros((), jnp.int32),
            count_m2=jnp.zeros((), jnp.int32),
            m1=moments(True, self._moment_dtype) if self.use_m1 else None,
            m2=moments(True, self._moment_dtype),
            nu=moments(False, lambda p, _: real_dtype(p.dtype)),
        )

    def _flatten_state(self, grads: PyTree, state: ScaleByAdemamixState):
        """The leaves of grads and of each moment, checked against each other."""
        if isinstance(state, ScaleByAdemamixState) and self.use_m1 != (
            state.m1 is not None
        ):
            have = "has no fast EMA (m1=None)" if state.m1 is None else "has an m1"
            b1 = f"{float(self.b1):.6g}" if is_concrete(self.b1) else self.b1
            raise ValueError(
                f"this optimizer has b1={b1}, but the state {have}: it "
                "was made by an optimizer with "
                f"{'b1 = 0' if state.m1 is None else 'b1 > 0'}."
            )
        return flatten_moments(
            grads, state, ScaleByAdemamixState, ("m1", "m2", "nu"), self.storage
        )

    def _step(
        self, grads: PyTree, state: ScaleByAdemamixState
    ) -> tuple[list, Any, ScaleByAdemamixState]:
        """`_rule` on the gradients, packed into flat buffers if `self.packed`."""
        if self.packed:
            return packed_step(self._rule, grads, state)
        return self._rule(grads, state)

    def _rule(
        self, grads: PyTree, state: ScaleByAdemamixState
    ) -> tuple[list, Any, ScaleByAdemamixState]:
        """The update rule. Returns the direction's leaves in compute precision,
        their treedef, and the new state."""
        leaves, treedef, moments = self._flatten_state(grads, state)
        read, write = self.storage.read, self.storage.write
        b3 = _at(self.b3, state.count_m2, "b3")
        alpha = _at(self.alpha, state.count_m2, "alpha")
        count = _saturating_increment(state.count)
        count_m2 = _saturating_increment(state.count_m2)
        r1, r2, r3 = self.residuals
        if callable(self.b3):
            r3 = 0.0
        new = {"m1": [], "m2": [], "nu": []}
        directions = []
        seed = moment_seeds(state.count)

        # Scalars cast once per compute dtype, not once per leaf (trace time), and
        # the bias corrections as reciprocals: a multiply per element instead of a
        # division (a division costs several multiplies on CPU and GPU alike).
        scalars = {}
        for i, g in enumerate(leaves):
            m1, m2, nu = moments["m1"][i], moments["m2"][i], moments["nu"][i]
            if g is None:
                for name in new:
                    new[name].append(None)
                directions.append(None)
                continue
            wide = g.dtype if self.mu_dtype is None else self.mu_dtype
            dtype = compute_dtype(wider_dtype(g.dtype, wide))
            real = real_dtype(dtype)
            g = g.astype(dtype)
            if dtype not in scalars:
                scalars[dtype] = (
                    inverse_bias_correction(self.b2, count, real),
                    inverse_bias_correction(self.b1, count, dtype),
                    _zero_to_none(self.eps_root, real),
                    self.eps.astype(real),
                    jnp.asarray(alpha).astype(dtype),
                    ema_coefficients(self.b1, r1, dtype),
                    ema_coefficients(self.b2, r2, real),
                    ema_coefficients(b3, r3, dtype),
                )
            inv2, inv1, eps_root, eps, alpha_t, c1, c2, c3 = scalars[dtype]

            nu_new = ema_of_norm(g, read(nu), self.b2, coefficients=c2)
            nu = write(nu, nu_new, seed(_NU))
            m2 = write(m2, ema(g, read(m2), b3, coefficients=c3), seed(_M2))
            if m1 is None:
                m1_hat = g
            else:
                m1 = write(m1, ema(g, read(m1), self.b1, coefficients=c1), seed(_M1))
                m1_hat = lax.mul(read(m1).astype(dtype), inv1)
            mixed = lax.add(m1_hat, lax.mul(alpha_t, read(m2).astype(dtype)))
            directions.append(adam_direction(mixed, read(nu), inv2, eps_root, eps))
            new["m1"].append(m1)
            new["m2"].append(m2)
            new["nu"].append(nu)
        state = ScaleByAdemamixState(
            count=count,
            count_m2=count_m2,
            m1=treedef.unflatten(new["m1"]) if state.m1 is not None else None,
            m2=treedef.unflatten(new["m2"]),
            nu=treedef.unflatten(new["nu"]),
        )
        return directions, treedef, state


def _full_mask(mask: Any, params: PyTree) -> PyTree:
    """Broadcast a weight-decay mask (a bool tree that is a prefix of `params`, or a
    callable returning one) to one entry per parameter leaf."""
    if mask is None:
        return jax.tree.map(lambda _: True, params, is_leaf=_is_none)
    if callable(mask):
        mask = mask(params)
    try:
        return jax.tree.map(
            lambda m, sub: jax.tree.map(lambda _: m, sub, is_leaf=_is_none),
            mask,
            params,
            is_leaf=_is_none,
        )
    except ValueError as e:
        raise ValueError(
            "the weight-decay `mask` must be a tree of booleans whose structure is a "
            f"prefix of the parameters'; got {jax.tree.structure(mask)} for "
            f"parameters {jax.tree.structure(params)}."
        ) from e


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
    directions: list,
    treedef: Any,
    updates: PyTree,
    params: PyTree | None,
    lr: Real[ArrayLike, ""],
    weight_decay: Float[Array, ""],
    mask: Any,
) -> PyTree:
    """`-lr * (direction + weight_decay * mask * params)` for every leaf, in the
    parameters' dtypes (the gradients' when `params` is None). `directions` are the
    leaves (in compute precision) that a `_step` returned with `treedef`. Shared by
    every optimizer of the package, so decoupled weight decay is written once."""
    if params is None and not is_concrete(weight_decay):
        # Traced weight decay (e.g. an optimizer passed through filter_jit) with
        # no params: fail loudly at run time rather than skip a nonzero decay.
        lr = eqx.error_if(
            jnp.asarray(lr),
            weight_decay != 0,
            "weight_decay is not 0, so update() needs the parameters.",
        )
    decays = _decays(weight_decay, params)
    grads = jax.tree.leaves(updates, is_leaf=_is_none)
    if params is None:
        params_leaves = [None] * len(grads)
        mask_leaves = [False] * len(grads)
    else:
        params_leaves = treedef.flatten_up_to(params)
        mask_leaves = treedef.flatten_up_to(_full_mask(mask, params))
    # -lr and weight_decay cast once per dtype, not once per leaf (trace time).
    scalars: dict[Any, tuple[Array, Array]] = {}
    out = []
    for d, g, p, m in zip(directions, grads, params_leaves, mask_leaves):
        if d is None:
            out.append(None)
            continue
        if d.dtype not in scalars:
            neg_lr = lax.neg(jnp.asarray(lr).astype(d.dtype))
            scalars[d.dtype] = (neg_lr, weight_decay.astype(d.dtype))
        neg_lr, wd = scalars[d.dtype]
        static = isinstance(m, (bool, np.bool_))
        if decays and not (static and not m):
            decay = lax.mul(wd, p.astype(d.dtype))
            d = lax.add(d, decay if static else jnp.where(m, decay, 0))
        step = lax.mul(neg_lr, d)
        out.append(step.astype(g.dtype if p is None else p.dtype))
    return treedef.unflatten(out)


class AbstractDescent(AbstractGradientTransformation):
    """An optimizer made of a direction (`scale`, whose `_step` runs the update
    rule), decoupled weight decay and a learning rate:
    `-lr(t) * (direction + weight_decay * mask * params)`.

    [`eqx_ademamix.AdEMAMix`][] and [`eqx_ademamix.SimplifiedAdEMAMix`][] are its
    final subclasses: each declares its fields and constructor; `init`, `update`
    and the validation of the learning rate and weight decay are written here,
    once.
    """

    learning_rate: eqx.AbstractVar[Float[Array, ""] | Callable]
    weight_decay: eqx.AbstractVar[Float[Array, ""]]
    mask: eqx.AbstractVar[Any]
    scale: eqx.AbstractVar[AbstractDirection]

    def __check_init__(self):
        if not callable(self.learning_rate):
            check_nonnegative("learning_rate", self.learning_rate)
        check_nonnegative("weight_decay", self.weight_decay)

    def init(self, params: PyTree) -> PyTree:
        """The initial state of the direction `scale` (e.g. an
        [`eqx_ademamix.ScaleByAdemamixState`][]) for `params`."""
        return self.scale.init(params)

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
        is evaluated at `state.count` before the increment.
        """
        del extra_args
        # The rule first: it checks that `state` is the right kind of state.
        directions, treedef, new_state = self.scale._step(updates, state)
        lr = _at(self.learning_rate, state.count, "learning_rate")
        out = descend(
            directions, treedef, updates, params, lr, self.weight_decay, self.mask
        )
        return out, new_state


class AdEMAMix(AbstractDescent):
    r"""The AdEMAMix optimizer: [`eqx_ademamix.ScaleByAdemamix`][] with decoupled
    weight decay and a learning rate,

    $$
    \Delta\theta = -\eta(t)\left(
    \frac{\hat m_1 + \alpha(t)\, m_2}{\sqrt{\hat\nu + \epsilon_{root}} + \epsilon}
    + \lambda\, \text{mask} \odot \theta\right),
    $$

    with $\eta(t)$ evaluated at `count` before the increment.

    AdEMAMix adds to Adam a second, slow EMA of the gradients ($\beta_3 \approx
    0.9999$, a memory of about 10,000 steps) mixed in with weight $\alpha$. The
    paper's 1.3B-parameter language model trained on 101B tokens matches an AdamW
    model trained on 197B tokens.

    !!! example

        ```python
        import equinox as eqx, jax, jax.numpy as jnp
        import eqx_ademamix as eam

        params = {"w": jnp.ones(3)}
        opt = eam.AdEMAMix(learning_rate=1e-2, alpha=5.0, b3=0.9999)
        state = opt.init(params)
        grads = {"w": jnp.array([0.1, -0.2, 0.3])}
        updates, state = opt.update(grads, state, params)
        params = eqx.apply_updates(params, updates)
        ```

    Reference: Pagliardini, Ablin, Grangier, *The AdEMAMix Optimizer: Better,
    Faster, Older*, 2024, [arXiv:2409.03137](https://arxiv.org/abs/2409.03137).
    """

    learning_rate: Float[Array, ""] | Callable
    weight_decay: Float[Array, ""]
    mask: Any
    scale: ScaleByAdemamix

    def __init__(
        self,
        learning_rate: ScalarOrSchedule = 1e-3,
        b1: Real[ArrayLike, ""] = 0.9,
        b2: Real[ArrayLike, ""] = 0.999,
        b3: ScalarOrSchedule = 0.9999,
        alpha: ScalarOrSchedule = 5.0,
        b3_scheduler: Schedule | None = None,
        alpha_scheduler: Schedule | None = None,
        eps: Real[ArrayLike, ""] = 1e-8,
        eps_root: Real[ArrayLike, ""] = 0.0,
        weight_decay: Real[ArrayLike, ""] = 0.0,
        mask: Any = None,
        mu_dtype: Any | None = None,
        packed: bool = False,
        quantized: AbstractMomentStorage | None = None,
    ):
        """**Arguments:**

        - `learning_rate`: a float >= 0, or a schedule `step -> lr` (any optax
          schedule).
        - `b1`, `b2`, `b3`, `alpha`, `b3_scheduler`, `alpha_scheduler`, `eps`,
          `eps_root`, `mu_dtype`, `packed`, `quantized`: as in
          [`eqx_ademamix.ScaleByAdemamix`][].
        - `weight_decay`: decoupled weight decay $\\lambda \\geq 0$, multiplied by the
          learning rate (as in optax and PyTorch).
        - `mask`: which parameters are decayed: a tree of booleans whose structure
          is a prefix of the parameters', or a callable `params -> such a tree`.
          Default: all.
        """
        self.learning_rate = (
            learning_rate
            if callable(learning_rate)
            else _named_scalar("learning_rate", learning_rate)
        )
        self.weight_decay = _named_scalar("weight_decay", weight_decay)
        self.mask = mask
        self.scale = ScaleByAdemamix(
            b1=b1,
            b2=b2,
            b3=b3,
            alpha=alpha,
            b3_scheduler=b3_scheduler,
            alpha_scheduler=alpha_scheduler,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            packed=packed,
            quantized=quantized,
        )
