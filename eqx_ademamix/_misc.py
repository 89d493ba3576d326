"""Conversion and validation of hyperparameters: every error names the argument,
the value the user passed, and what would be accepted."""

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int


def default_float() -> Any:
    """float64 when `jax_enable_x64` is on, float32 otherwise."""
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def is_concrete(x: Any) -> bool:
    """Whether `x` has a value now: a Python number or a concrete array, not a
    tracer."""
    if isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (int, float, np.ndarray, np.generic, jax.Array))


def show(value: Any) -> str:
    """A value as the user likely wrote it (short)."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and is_concrete(value):
        if np.ndim(value) == 0:
            value = np.asarray(value).item()
    if isinstance(value, float):
        return repr(float(f"{value:.7g}"))
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if isinstance(value, (jax.Array, np.ndarray)):
        return f"an array of dtype {value.dtype} and shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def as_float_scalar(x: Any, name: str = "a hyperparameter") -> Float[Array, ""]:
    """A real hyperparameter as a JAX float scalar, so that changing it with
    `eqx.tree_at` does not recompile a step it is passed to.

    Python numbers become weakly typed scalars, exactly as `jnp.asarray(0.1)` makes
    them, so replacing one with `jnp.asarray(new_value)` (or with
    `opt.with_hyperparameters`) keeps the compiled step. The update rule casts every
    hyperparameter explicitly, so weak typing never changes the precision of the
    arithmetic.

    Raises a `TypeError` naming `name` for strings, booleans, complex numbers and
    other non-real values, and a `ValueError` for non-scalars."""
    if isinstance(x, bool) or isinstance(x, np.bool_):
        raise TypeError(
            f"`{name}` must be a real number, got the bool {x!r}; pass a float."
        )
    if isinstance(x, numbers.Real) and not isinstance(x, (np.ndarray, jax.Array)):
        if isinstance(x, np.generic):
            x = x.item()
        return jnp.asarray(float(x))
    if isinstance(x, numbers.Complex) and not isinstance(x, (np.ndarray, jax.Array)):
        raise TypeError(
            f"`{name}` must be real, got the complex number {x!r}; the optimizer's "
            "hyperparameters are real even for complex parameters."
        )
    if not isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer)):
        hint = ""
        if isinstance(x, str):
            hint = f" (from a config file? convert it with float({x!r}))"
        raise TypeError(
            f"`{name}` must be a real number or a scalar array, got {_kind(x)} "
            f"{show(x)}{hint}."
        )
    if x.shape != ():
        raise ValueError(
            f"`{name}` must be a scalar, got {_kind(x)}; pass a float or a "
            "0-dimensional array."
        )
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"`{name}` must be real, got a complex {dtype} scalar {show(x)}; the "
            "optimizer's hyperparameters are real even for complex parameters."
        )
    if dtype == jnp.bool_ or not jnp.issubdtype(dtype, jnp.number):
        raise TypeError(
            f"`{name}` must be a real number, got a {dtype} scalar {show(x)}."
        )
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(default_float())
    return x


def as_int_scalar(x: Any, name: str = "a step count") -> Int[Array, ""]:
    """A step count as an int32 JAX scalar (whole numbers only)."""
    if isinstance(x, bool) or isinstance(x, str):
        raise TypeError(f"`{name}` must be a whole number, got {show(x)}.")
    x = jnp.asarray(x)
    if x.shape != ():
        raise ValueError(f"`{name}` must be a scalar, got shape {x.shape}.")
    if jnp.issubdtype(x.dtype, jnp.floating) and is_concrete(x):
        if not float(x).is_integer():
            raise ValueError(
                f"`{name}` must be a whole number, got {name}={float(x)!r}."
            )
    return x.astype(jnp.int32)


def as_bool(x: Any, name: str) -> bool:
    """A structural on/off choice: only `True` or `False` (a string such as `"no"`
    would otherwise count as true)."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    raise TypeError(f"`{name}` must be True or False, got {show(x)}.")


def value_of(x: Any) -> float | None:
    """The value of a concrete real scalar, or None for tracers."""
    return float(np.asarray(x)) if is_concrete(x) else None


def check_unit_interval(name: str, x: Any, given: Any = None) -> None:
    """Raise a `ValueError` naming `name` unless a concrete `x` lies in [0, 1).

    `given` is what the user passed, when `x` is its stored (rounded) form: a
    decay below 1 that rounds to 1 in the stored dtype is reported as such."""
    value = value_of(x)
    if value is None or 0 <= value < 1:
        return
    asked = value_of(given) if given is not None and is_concrete(given) else None
    if asked is not None and 0 <= asked < 1:
        raise ValueError(
            f"`{name}`={float(given)!r} rounds to {value!r} in "
            f"{jnp.dtype(x.dtype)}, the precision hyperparameters are stored in; "
            f"use a `{name}` at most "
            f"{float(np.nextafter(np.asarray(1, x.dtype), 0))!r}, or enable "
            "`jax_enable_x64`."
        )
    shown = given if given is not None and is_concrete(given) else value
    raise ValueError(f"`{name}` must be in [0, 1), got {name}={show(shown)}.")


def check_nonnegative(name: str, x: Any) -> None:
    """Raise a `ValueError` naming `name` unless a concrete `x` is finite and >= 0."""
    value = value_of(x)
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"`{name}` must be a finite number >= 0, got {name}={show(value)}."
        )


def check_finite(name: str, x: Any) -> None:
    """Raise a `ValueError` naming `name` unless a concrete `x` is finite."""
    value = value_of(x)
    if value is not None and not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {name}={show(value)}.")


def rounding_residual(value: Any, stored: Array) -> float:
    """What storing the concrete Python/NumPy number `value` as `stored` cut off
    (`value - stored`, exact in float64); 0.0 for JAX arrays and tracers, whose
    value is what it is."""
    if isinstance(value, (jax.Array, jax.core.Tracer)) or not is_concrete(stored):
        return 0.0
    return float(np.float64(value) - np.float64(stored))


def as_dtype(x: Any, name: str = "mu_dtype") -> Any:
    """A dtype argument as a NumPy dtype (None stays None).

    A scalar array stands for its dtype: `optax.inject_hyperparams` takes a dtype
    such as `jnp.bfloat16` for a schedule (it is callable) and passes the array
    `jnp.bfloat16(step)` instead."""
    if x is None:
        return None
    if isinstance(x, (jax.Array, np.ndarray, np.generic)):
        return jnp.dtype(x.dtype)
    try:
        return jnp.dtype(x)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a dtype such as jnp.bfloat16, or None; got {show(x)}."
        ) from None
