"""Conversion and validation of hyperparameters."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def default_float() -> Any:
    """float64 when `jax_enable_x64` is on, float32 otherwise."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def as_float_scalar(x: Any) -> Float[Array, ""]:
    """A hyperparameter as a JAX float scalar, so that changing it with `eqx.tree_at`
    does not recompile a step it is passed to.

    Python numbers become weakly typed scalars, exactly as `jnp.asarray(0.1)` makes
    them, so replacing one with `jnp.asarray(new_value)` keeps the compiled step.
    The update rule casts every hyperparameter explicitly, so weak typing never
    changes the precision of the arithmetic."""
    if isinstance(x, (bool, int, float)):
        return jnp.asarray(float(x))
    x = jnp.asarray(x)
    if x.shape != ():
        raise ValueError(f"expected a scalar hyperparameter, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(default_float())
    return x


def as_int_scalar(x: Any) -> Int[Array, ""]:
    """A step count as an int32 JAX scalar."""
    x = jnp.asarray(x)
    if x.shape != ():
        raise ValueError(f"expected an integer scalar, got shape {x.shape}")
    if jnp.issubdtype(x.dtype, jnp.floating) and is_concrete(x):
        if not float(x).is_integer():
            raise ValueError(f"expected a whole number of steps, got {float(x)}")
    return x.astype(jnp.int32)


def is_concrete(x: Any) -> bool:
    """Whether `x` has a value now: a Python number or a concrete array, not a
    tracer."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (int, float, np.ndarray, np.generic, jax.Array))


def _value(x: Any) -> float | None:
    return float(np.asarray(x)) if is_concrete(x) else None


def _show(value: float) -> str:
    """A stored (possibly float32) value as the user likely wrote it."""
    return repr(float(f"{value:.7g}"))


def check_unit_interval(name: str, x: Any) -> None:
    """Raise a `ValueError` naming `name` unless a concrete `x` lies in [0, 1)."""
    value = _value(x)
    if value is not None and not 0 <= value < 1:
        raise ValueError(f"`{name}` must be in [0, 1), got {name}={_show(value)}.")


def check_nonnegative(name: str, x: Any) -> None:
    """Raise a `ValueError` naming `name` unless a concrete `x` is finite and >= 0."""
    value = _value(x)
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"`{name}` must be a finite number >= 0, got {name}={_show(value)}."
        )


def check_finite(name: str, x: Any) -> None:
    """Raise a `ValueError` naming `name` unless a concrete `x` is finite."""
    value = _value(x)
    if value is not None and not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {name}={_show(value)}.")


def rounding_residual(value: Any, stored: Array) -> float:
    """What storing the concrete Python/NumPy number `value` as `stored` cut off
    (`value - stored`, exact in float64); 0.0 for JAX arrays and tracers, whose
    value is what it is."""
    if isinstance(value, (jax.Array, jax.core.Tracer)) or not is_concrete(stored):
        return 0.0
    return float(np.float64(value) - np.float64(stored))
