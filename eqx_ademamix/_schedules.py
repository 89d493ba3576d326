"""The warm-up schedules of AdEMAMix for `alpha` and `b3`, as callable modules."""

import abc
import math

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, Real

from ._misc import (
    as_float_scalar,
    as_int_scalar,
    check_nonnegative,
    check_unit_interval,
    rounding_residual,
)
from ._tree import complement


class AbstractWarmupSchedule(eqx.Module):
    """A schedule that moves from a start value to an end value over `warmup` steps
    and stays at the end value afterwards.

    `warmup = 0` means no warm-up: the schedule returns its end value at every step.
    """

    warmup: eqx.AbstractVar[Int[Array, ""]]

    @abc.abstractmethod
    def _interpolate(self, fraction: Float[Array, ""]) -> Float[Array, ""]:
        """The value a `fraction` in [0, 1] of the way through the warm-up."""

    @abc.abstractmethod
    def _end(self) -> Float[Array, ""]:
        """The value after the warm-up."""

    def __call__(self, step: Real[ArrayLike, ""]) -> Float[Array, ""]:
        """The schedule's value at `step` (a scalar, 0 before the first update;
        optimizers pass an int32 counter, plotting code may pass floats)."""
        dtype = self._end().dtype
        step = jnp.asarray(step).astype(dtype)
        warmup = self.warmup.astype(dtype)
        fraction = jnp.clip(step / jnp.maximum(warmup, 1), 0, 1)
        return jnp.where(step < warmup, self._interpolate(fraction), self._end())


class AlphaSchedule(AbstractWarmupSchedule):
    """Linear warm-up of the mixing weight `alpha` (the paper's Eq. 4):

    `alpha_t = (1 - t/T) * alpha_start + (t/T) * alpha` for `t < T`, then `alpha`.

    Build it with `eqx_ademamix.alpha_scheduler`.
    """

    alpha: Float[Array, ""]
    alpha_start: Float[Array, ""]
    warmup: Int[Array, ""]

    def __init__(
        self, alpha: Real[ArrayLike, ""], alpha_start: Real[ArrayLike, ""], warmup
    ):
        """**Arguments:**

        - `alpha`: the final value.
        - `alpha_start`: the value at step 0.
        - `warmup`: the number of warm-up steps `T`; 0 for none.
        """
        self.alpha = as_float_scalar(alpha)
        self.alpha_start = as_float_scalar(alpha_start)
        self.warmup = as_int_scalar(warmup)

    def __check_init__(self):
        check_nonnegative("warmup", self.warmup)

    def _interpolate(self, fraction):
        return (1 - fraction) * self.alpha_start + fraction * self.alpha

    def _end(self):
        return self.alpha


def _half_life(beta: Float[Array, ""], residual: float) -> Float[Array, ""]:
    """`log(0.5) / log(beta)`: the number of steps after which an EMA with decay
    `beta` has halved a gradient's weight; 0 for `beta = 0`.

    Computed as `log1p(-(1 - beta))` from the exact complement, so that betas close
    to 1 keep their half-life in float32 (`log(0.9999)` evaluated on float32's
    0.9999 is off by 2e-4)."""
    positive = beta > 0
    log_beta = jnp.log1p(-complement(beta, residual, beta.dtype))
    safe = jnp.where(positive, log_beta, -1)
    return jnp.where(positive, math.log(0.5) / safe, 0)


def _from_half_life(half_life: Float[Array, ""]) -> Float[Array, ""]:
    """The decay whose half-life is `half_life`: `0.5 ** (1 / half_life)`."""
    positive = half_life > 0
    safe = jnp.where(positive, half_life, 1)
    return jnp.where(positive, jnp.exp(math.log(0.5) / safe), 0)


class Beta3Schedule(AbstractWarmupSchedule):
    """Warm-up of the slow EMA's decay `b3`, linear in half-life space (the paper's
    Eq. 5):

    `f(b) = log(0.5)/log(b) - 1`,
    `b3_t = f^-1((1 - t/T) * f(beta_start) + (t/T) * f(beta_end))` for `t < T`,
    then `beta_end`.

    A linear schedule on `b3` itself would spend almost all of the warm-up at
    short memories; interpolating the half-life grows the memory steadily.
    `beta_start = 0` is allowed (an EMA that holds only the last gradient).

    Build it with `eqx_ademamix.beta3_scheduler`.
    """

    beta_end: Float[Array, ""]
    beta_start: Float[Array, ""]
    warmup: Int[Array, ""]
    # What storing the betas as JAX scalars rounded off (see `_tree.complement`).
    residuals: tuple[float, float] = eqx.field(static=True, repr=False)

    def __init__(
        self, beta_end: Real[ArrayLike, ""], beta_start: Real[ArrayLike, ""], warmup
    ):
        """**Arguments:**

        - `beta_end`: the final value, in [0, 1).
        - `beta_start`: the value at step 0, in [0, 1).
        - `warmup`: the number of warm-up steps `T`; 0 for none.
        """
        self.beta_end = as_float_scalar(beta_end)
        self.beta_start = as_float_scalar(beta_start)
        self.warmup = as_int_scalar(warmup)
        self.residuals = (
            rounding_residual(beta_end, self.beta_end),
            rounding_residual(beta_start, self.beta_start),
        )

    def __check_init__(self):
        check_unit_interval("beta_end", self.beta_end)
        check_unit_interval("beta_start", self.beta_start)
        check_nonnegative("warmup", self.warmup)

    def _interpolate(self, fraction):
        # f(b) + 1 is the half-life; interpolating f or f + 1 is the same.
        end_residual, start_residual = self.residuals
        start = _half_life(self.beta_start, start_residual)
        end = _half_life(self.beta_end, end_residual)
        return _from_half_life((1 - fraction) * start + fraction * end)

    def _end(self):
        return self.beta_end


def alpha_scheduler(
    alpha: Real[ArrayLike, ""],
    alpha_start: Real[ArrayLike, ""] = 0.0,
    warmup: int | Real[ArrayLike, ""] = 0,
) -> AlphaSchedule:
    """The linear warm-up schedule for `alpha` of the AdEMAMix paper.

    **Arguments:**

    - `alpha`: the final value of `alpha`.
    - `alpha_start`: its value at step 0.
    - `warmup`: the number of warm-up steps; 0 (the default) means no warm-up,
      the schedule returns `alpha` at every step (the original implementation
      returned NaN).

    **Returns:** an `eqx_ademamix.AlphaSchedule`, callable as `schedule(step)`.

    !!! example

        ```python
        schedule = eam.alpha_scheduler(8.0, warmup=10_000)
        schedule(5_000)  # 4.0
        ```
    """
    return AlphaSchedule(alpha, alpha_start, warmup)


def beta3_scheduler(
    beta_end: Real[ArrayLike, ""],
    beta_start: Real[ArrayLike, ""] = 0.0,
    warmup: int | Real[ArrayLike, ""] = 0,
) -> Beta3Schedule:
    """The half-life warm-up schedule for `b3` of the AdEMAMix paper.

    **Arguments:**

    - `beta_end`: the final value of `b3`, in [0, 1).
    - `beta_start`: its value at step 0, in [0, 1); 0 is allowed.
    - `warmup`: the number of warm-up steps; 0 (the default) means no warm-up,
      the schedule returns `beta_end` at every step (the original
      implementation returned NaN).

    **Returns:** a `eqx_ademamix.Beta3Schedule`, callable as `schedule(step)`.

    !!! example

        ```python
        schedule = eam.beta3_scheduler(0.9999, beta_start=0.9, warmup=10_000)
        schedule(0)  # 0.9
        ```
    """
    return Beta3Schedule(beta_end, beta_start, warmup)
