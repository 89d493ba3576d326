"""Typed tree helpers: the original implementation's five functions, fixed so
that dtypes never drift.

Each public helper maps a per-leaf function over a tree. The per-leaf functions
(`ema`, `ema_of_norm`, `bias_correction`, `compute_dtype`) are also what the
optimizer's update rule in `_ademamix.py` is written with, so every formula here
exists exactly once.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Inexact, Int, PyTree, Real

from ._misc import is_concrete


def is_none(x: Any) -> bool:
    """Whether `x` is `None` (the `is_leaf` that keeps `None` leaves)."""
    return x is None


def tree_map_none(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:
    """`jax.tree.map` that keeps `None` leaves (as `eqx.filter` makes) as `None`."""
    return jax.tree.map(
        lambda x, *xs: None if x is None else fn(x, *xs), tree, *rest, is_leaf=is_none
    )


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype arithmetic on a leaf of `dtype` happens in: at least float32."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return dtype if dtype.itemsize > 8 else jnp.dtype(jnp.complex64)
    return dtype if dtype.itemsize > 4 else jnp.dtype(jnp.float32)


def wider_dtype(a: Any, b: Any) -> jnp.dtype:
    """The more precise of two floating dtypes (by size; complex wins over real of the
    same precision). Independent of JAX's promotion mode."""
    a, b = jnp.dtype(a), jnp.dtype(b)
    real_a, real_b = jnp.finfo(a).bits, jnp.finfo(b).bits
    out = a if real_a >= real_b else b
    if jnp.issubdtype(a, jnp.complexfloating) or jnp.issubdtype(b, jnp.complexfloating):
        return jnp.dtype(jnp.complex128 if jnp.finfo(out).bits > 32 else jnp.complex64)
    return out


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of the same precision (float32 for complex64, etc.)."""
    return jnp.finfo(dtype).dtype


def complement(decay: Real[ArrayLike, ""], residual: float, dtype: Any) -> Array:
    """`1 - decay` in `dtype`, where the decay the user asked for is `decay +
    residual` (`residual`: what rounding the decay to its stored dtype cut off).

    `1 - decay` is exact in floating point for decay in [0.5, 1] (Sterbenz), so this
    is the correctly rounded `1 - (decay + residual)`: with b3 = 0.9999 stored in
    float32, plain `1 - b3` is 1.00017e-4, 1.7e-4 away from the intended 1e-4.
    """
    dtype = real_dtype(dtype)
    if is_concrete(decay) and jnp.ndim(decay) == 0:
        # Known now: in float64 on the host, `(1 - decay) - residual` rounds once,
        # to the same value, and XLA sees a plain constant.
        stored = np.float64(np.asarray(decay).astype(dtype))
        return jnp.asarray(np.asarray((1 - stored) - residual, dtype))
    exact = 1 - jnp.asarray(decay).astype(dtype)
    if residual == 0:
        return exact
    # The barrier keeps XLA from reassociating `(1 - b) - r` into `(1 - r) - b`,
    # which folds the constants to `1 - b` and loses the residual (it did, on CPU,
    # whenever `decay` was a run-time value, e.g. an optimizer passed through
    # `eqx.filter_jit`).
    return lax.optimization_barrier(exact) - jnp.asarray(residual, dtype)


def ema_coefficients(
    decay: Real[ArrayLike, ""], residual: float, dtype: Any
) -> tuple[Inexact[Array, ""], Inexact[Array, ""]]:
    """`(decay, 1 - decay)` as `dtype` scalars, `1 - decay` exact (see
    `complement`). The update rule computes them once per dtype and step, not once
    per leaf: fewer operations to trace and compile."""
    one_minus = complement(decay, residual, dtype).astype(dtype)
    return jnp.asarray(decay).astype(dtype), one_minus


def ema(
    g: Inexact[Array, "*shape"],
    m: Inexact[Array, "*shape"],
    decay: Real[ArrayLike, ""] | None,
    residual: float = 0.0,
    coefficients: tuple[Inexact[Array, ""], Inexact[Array, ""]] | None = None,
) -> Inexact[Array, "*shape"]:
    """`decay * m + (1 - decay) * g`, computed in `g`'s dtype (callers promote).

    `residual` is the part of the decay that its stored dtype cut off (see
    `complement`); `coefficients`, if given, are `ema_coefficients(decay, residual,
    g.dtype)` computed beforehand (then `decay` is not read and may be None)."""
    if coefficients is None:
        coefficients = ema_coefficients(decay, residual, g.dtype)
    decay, weight = coefficients
    # lax, not jnp operators: the same operations, without the per-call
    # dispatch that made tracing a 300-leaf step slower than optax's.
    return lax.add(lax.mul(decay, m.astype(g.dtype)), lax.mul(weight, g))


def abs_sq(g: Inexact[Array, "*shape"]) -> Real[Array, "*shape"]:
    """`|g|^2`, real for complex `g`."""
    if jnp.iscomplexobj(g):
        re, im = lax.real(g), lax.imag(g)
        return lax.add(lax.mul(re, re), lax.mul(im, im))
    return lax.mul(g, g)


def ema_of_norm(
    g: Inexact[Array, "*shape"],
    m: Real[Array, "*shape"],
    decay: Real[ArrayLike, ""],
    order: int = 2,
    residual: float = 0.0,
    coefficients: tuple[Real[Array, ""], Real[Array, ""]] | None = None,
) -> Real[Array, "*shape"]:
    """`decay * m + (1 - decay) * |g|^order`, real for complex `g`."""
    norm = abs_sq(g) if order == 2 else jnp.abs(g) ** order
    return ema(norm, m, decay, residual, coefficients)


def bias_correction(
    decay: Real[ArrayLike, ""], count: Int[ArrayLike, ""], dtype: Any
) -> Inexact[Array, ""]:
    """`1 - decay**count` as a `dtype` scalar, computed in its real counterpart.

    This is the formula of the paper and of `optax.contrib.ademamix`, evaluated on
    the stored decay, as optax does."""
    real = real_dtype(dtype)
    decay = jnp.asarray(decay).astype(real)
    return (1 - decay ** jnp.asarray(count).astype(real)).astype(dtype)


def inverse_bias_correction(
    decay: Real[ArrayLike, ""], count: Int[ArrayLike, ""], dtype: Any
) -> Inexact[Array, ""]:
    """`1 / (1 - decay**count)` as a `dtype` scalar: the update rule multiplies by
    it rather than dividing by `bias_correction` (one division per step instead of
    one per element; the result differs by at most an ulp)."""
    real = real_dtype(dtype)
    return (1 / bias_correction(decay, count, real)).astype(dtype)


def adam_direction(
    numerator: Inexact[Array, "*shape"],
    nu: Real[Array, "*shape"],
    inverse_correction: Real[Array, ""],
    eps_root: Real[Array, ""] | None,
    eps: Real[Array, ""],
    floor: Real[Array, ""] | None = None,
) -> Inexact[Array, "*shape"]:
    """`numerator / (sqrt(nu * inverse_correction + eps_root) + eps)`: Adam's
    normalisation by the bias-corrected second moment, in `numerator`'s dtype.
    `nu` is cast to the real dtype of the scalars; `eps_root=None` means 0; a
    `floor` bounds the denominator from below (so that 0/0 is 0, not NaN)."""
    nu_hat = lax.mul(nu.astype(inverse_correction.dtype), inverse_correction)
    if eps_root is not None:
        nu_hat = lax.add(nu_hat, eps_root)
    denom = lax.add(lax.sqrt(nu_hat), eps)
    if floor is not None:
        denom = lax.max(denom, floor)
    return lax.div(numerator, denom.astype(numerator.dtype))


def tree_cast(tree: PyTree, dtype: Any | None) -> PyTree:
    """Cast every array leaf of `tree` to `dtype` (`None`: leave the tree as it is).

    **Arguments:**

    - `tree`: a PyTree of arrays; `None` leaves stay `None`.
    - `dtype`: the target dtype, or `None`.

    **Returns:** the cast tree.
    """
    if dtype is None:
        return tree
    return tree_map_none(lambda x: jnp.asarray(x).astype(dtype), tree)


def tree_zeros_like(tree: PyTree, dtype: Any | None = None) -> PyTree:
    """Zeros shaped like every leaf of `tree`, in `dtype` (default: the leaf's own).

    **Arguments:**

    - `tree`: a PyTree of arrays; `None` leaves stay `None`.
    - `dtype`: the dtype of the zeros, or `None` for each leaf's own dtype.

    **Returns:** a tree of zeros with the structure of `tree`.
    """
    return tree_map_none(lambda x: jnp.zeros_like(x, dtype=dtype), tree)


def tree_update_moment(
    updates: PyTree, moments: PyTree, decay: Real[ArrayLike, ""], order: int
) -> PyTree:
    """The EMA `decay * m + (1 - decay) * g**order` of every leaf.

    Arithmetic happens in at least float32 and the result is cast back to the
    moment's dtype, so a bfloat16 moment stays bfloat16 (the original
    implementation let it drift to float32). The cast rounds to nearest; the
    optimizers themselves write reduced-precision state with stochastic
    rounding instead (see
    `eqx_ademamix.ScaleByAdemamix`).

    **Arguments:**

    - `updates`: the gradients `g`.
    - `moments`: the moments `m`, with the structure of `updates`.
    - `decay`: the decay rate, a scalar.
    - `order`: the power of `g`.

    **Returns:** the new moments, in the dtypes of `moments`.
    """

    def leaf(g, m):
        dtype = compute_dtype(wider_dtype(g.dtype, m.dtype))
        g = g.astype(dtype)
        return ema(g**order if order != 1 else g, m, decay).astype(m.dtype)

    return tree_map_none(leaf, updates, moments)


def tree_update_moment_per_elem_norm(
    updates: PyTree, moments: PyTree, decay: Real[ArrayLike, ""], order: int
) -> PyTree:
    """The EMA `decay * m + (1 - decay) * |g|**order` of every leaf (real for
    complex `g`).

    Computed in at least float32 and cast back to the moment's dtype.

    **Arguments:**

    - `updates`: the gradients `g` (real or complex).
    - `moments`: the moments `m` (real), with the structure of `updates`.
    - `decay`: the decay rate, a scalar.
    - `order`: the power of `|g|`.

    **Returns:** the new moments, in the dtypes of `moments`.
    """

    def leaf(g, m):
        g = g.astype(compute_dtype(g.dtype))
        m32 = m.astype(compute_dtype(real_dtype(g.dtype)))
        return ema_of_norm(g, m32, decay, order).astype(m.dtype)

    return tree_map_none(leaf, updates, moments)


def tree_bias_correction(
    moment: PyTree, decay: Real[ArrayLike, ""], count: Int[ArrayLike, ""]
) -> PyTree:
    """Adam's bias correction `m / (1 - decay**count)` of every leaf.

    **Arguments:**

    - `moment`: the moments `m`.
    - `decay`: the moment's decay rate, a scalar.
    - `count`: the number of updates the moment has seen (at least 1).

    **Returns:** the corrected moments, in the dtypes of `moment`.
    """

    def leaf(m):
        dtype = compute_dtype(m.dtype)
        return (m.astype(dtype) / bias_correction(decay, count, dtype)).astype(m.dtype)

    return tree_map_none(leaf, moment)
