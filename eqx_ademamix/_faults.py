"""Skip steps whose gradients, updates or new state are not finite, so that one
bad batch cannot poison the slow EMA for the next ten thousand steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PyTree

from ._base import AbstractGradientTransformation
from ._direction import saturating_increment as _saturating_increment


class SkipNonFiniteState(eqx.Module):
    """The state of `eqx_ademamix.SkipNonFinite`.

    - `inner_state`: the wrapped optimizer's state, as of the last applied step.
    - `notfinite_count`: consecutive steps skipped so far (0 after a good step).
    - `total_notfinite`: steps skipped since the start (saturates at int32 max).
    - `last_finite`: whether the last step was finite: its gradients, and the
      updates and state the wrapped optimizer computed from them.
    """

    inner_state: PyTree
    notfinite_count: Int[Array, ""]
    total_notfinite: Int[Array, ""]
    last_finite: Bool[Array, ""]


def _all_finite(tree: PyTree) -> Bool[Array, ""]:
    """Whether every floating-point element of `tree` is finite (integer leaves,
    such as counters and 8-bit codes, always are)."""
    ok = jnp.asarray(True)
    for leaf in jax.tree.leaves(eqx.filter(tree, eqx.is_inexact_array)):
        ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def _select(pred: Bool[Array, ""], on_true: PyTree, on_false: PyTree) -> PyTree:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


class SkipNonFinite(AbstractGradientTransformation):
    """Wrap an optimizer so that a non-finite step changes nothing: the updates are
    zeros and the wrapped state (moments and counters) stays as it was.

    A step is non-finite when its gradients hold a NaN or an infinity, or when the
    updates or the new state the wrapped optimizer computes from finite gradients
    do (a gradient above about 1.8e19 squares to infinity in the second moment
    `nu`; in 8-bit state such a write marks the block NaN).

    This is the module-API counterpart of `optax.apply_if_finite` (which checks
    the gradients only, and works with `opt.to_optax()` just as well). It matters
    more for AdEMAMix than for Adam: one NaN written into the slow EMA `m2`
    (b3 = 0.9999) would otherwise stay in the direction for good. A huge gradient
    whose square is finite is applied, and comes back as a huge step tens of
    thousands of steps later (`m2` outlives `nu`): clip gradients for that (see
    the faults guide).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ademamix as eam

        opt = eam.SkipNonFinite(eam.AdEMAMix(learning_rate=1e-3))
        params = {"w": jnp.ones(3)}
        state = opt.init(params)
        bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
        updates, state = opt.update(bad, state, params)  # zeros; state unchanged
        assert int(state.total_notfinite) == 1
        ```
    """

    inner: AbstractGradientTransformation
    max_consecutive_errors: int | None = eqx.field(static=True)

    def __init__(
        self,
        inner: AbstractGradientTransformation,
        max_consecutive_errors: int | None = None,
    ):
        """**Arguments:**

        - `inner`: the optimizer to protect, e.g. an `eqx_ademamix.AdEMAMix`.
        - `max_consecutive_errors`: after this many non-finite steps in a row, the
          next non-finite step is applied (and poisons the state), so that a run
          that has diverged for good fails visibly instead of idling. `None`
          (default): always skip.
        """
        self.inner = inner
        self.max_consecutive_errors = max_consecutive_errors

    def __check_init__(self):
        if not isinstance(self.inner, AbstractGradientTransformation):
            raise ValueError(
                "`inner` must be an eqx_ademamix optimizer (an "
                f"AbstractGradientTransformation), got {self.inner!r:.80}; for an "
                "optax transformation use optax.apply_if_finite."
            )
        n = self.max_consecutive_errors
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(
                f"`max_consecutive_errors` must be None or an int >= 0, got "
                f"max_consecutive_errors={n!r}."
            )

    def init(self, params: PyTree) -> SkipNonFiniteState:
        """The wrapped optimizer's initial state, with zeroed skip counters."""
        return SkipNonFiniteState(
            inner_state=self.inner.init(params),
            notfinite_count=jnp.zeros((), jnp.int32),
            total_notfinite=jnp.zeros((), jnp.int32),
            last_finite=jnp.asarray(True),
        )

    def update(
        self,
        updates: PyTree,
        state: SkipNonFiniteState,
        params: PyTree | None = None,
        **extra_args,
    ) -> tuple[PyTree, SkipNonFiniteState]:
        """One step of the wrapped optimizer if all of `updates` (the gradients),
        and the updates and state it computes from them, are finite; otherwise zero
        updates and the previous state.

        **Arguments:** as the wrapped optimizer's `update`.

        **Returns:** `(updates, new_state)`.
        """
        if not isinstance(state, SkipNonFiniteState):
            raise TypeError(
                f"expected a SkipNonFiniteState, got {type(state).__name__}; was the "
                "state made by another optimizer?"
            )
        new_updates, new_inner = self.inner.update(
            updates, state.inner_state, params, **extra_args
        )
        # Checking the result too catches finite gradients whose square
        # overflows: nu = inf would freeze that element for good (its update is
        # 0 from then on), and 8-bit state would turn the block NaN.
        finite = (
            _all_finite(updates) & _all_finite(new_updates) & _all_finite(new_inner)
        )
        consecutive = jnp.where(
            finite, 0, _saturating_increment(state.notfinite_count)
        ).astype(jnp.int32)
        apply = finite
        if self.max_consecutive_errors is not None:
            apply = apply | (consecutive > self.max_consecutive_errors)
        zeros = jax.tree.map(jnp.zeros_like, new_updates)
        total = jnp.where(
            finite, state.total_notfinite, _saturating_increment(state.total_notfinite)
        )
        return _select(apply, new_updates, zeros), SkipNonFiniteState(
            inner_state=_select(apply, new_inner, state.inner_state),
            notfinite_count=consecutive,
            total_notfinite=total.astype(jnp.int32),
            last_finite=finite,
        )
