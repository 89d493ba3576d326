"""Simplified AdEMAMix (Morwani et al., 2025): one momentum buffer that accumulates
gradients without the `(1 - b1)` factor, mixed with the current gradient.

It shares everything but its two-line rule with AdEMAMix: hyperparameter handling
and validation (`_misc.py`, `_ademamix.py`), the EMA of the squared gradients and
its bias correction (`_tree.py`), moment storage with stochastic rounding
(`_storage.py`), and the learning rate with decoupled weight decay
(`_ademamix.descend`)."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, ArrayLike, Float, Inexact, Int, PyTree, Real

from ._ademamix import (
    _at,
    _check_params,
    _hyperparameter,
    _saturating_increment,
    _zero_to_none,
    AbstractDescent,
    AbstractDirection,
    check_mu_dtype,
    flatten_moments,
    moment_dtype,
    moment_seeds,
    ScalarOrSchedule,
)
from ._misc import (
    as_float_scalar,
    check_finite,
    check_nonnegative,
    check_unit_interval,
    is_concrete,
    rounding_residual,
)
from ._storage import AbstractMomentStorage, CastStorage
from ._tree import (
    _is_none,
    adam_direction,
    compute_dtype,
    ema_of_norm,
    inverse_bias_correction,
    real_dtype,
    wider_dtype,
)


# Salts that keep the rounding noise of the two moments of one element apart.
_M, _NU = 1, 3


def accumulate(
    g: Inexact[Array, "*shape"], m: Inexact[Array, "*shape"], decay: Real[ArrayLike, ""]
) -> Inexact[Array, "*shape"]:
    """`decay * m + g`, in `g`'s dtype: a momentum that sums, rather than averages,
    the gradients (its steady state under a constant `g` is `g / (1 - decay)`)."""
    return jnp.asarray(decay).astype(g.dtype) * m.astype(g.dtype) + g


class ScaleBySimplifiedAdemamixState(eqx.Module):
    """The state of Simplified AdEMAMix.

    - `count`: the number of updates so far; drives the bias correction of `nu` and
      the schedules of the learning rate, `b1` and `alpha`. Saturates at the int32
      maximum instead of wrapping.
    - `m`: the momentum `b1 * m + g`; `None` when `b1 == 0` (then `m = g`, nothing
      is stored).
    - `nu`: the EMA of the squared gradients.

    The moment trees have the parameters' structure; `None` parameters stay `None`.
    """

    count: Int[Array, ""]
    m: PyTree | None
    nu: PyTree


class ScaleBySimplifiedAdemamix(AbstractDirection):
    r"""The Simplified AdEMAMix direction, before learning rate and weight decay.

    With $g$ the gradient and $t$ the step (counting from 1):

    $$
    \begin{aligned}
    m &\leftarrow \beta_1(t)\, m + g, \qquad
    \nu \leftarrow \beta_2 \nu + (1-\beta_2) |g|^2, \qquad
    \hat\nu = \nu / (1-\beta_2^t), \\
    d &= \frac{m + \alpha(t)\, g}{\sqrt{\hat\nu + \epsilon_{root}} + \epsilon}.
    \end{aligned}
    $$

    The momentum has no $(1-\beta_1)$ factor and no bias correction: it sums about
    $1/(1-\beta_1)$ gradients, so under a constant gradient the direction is
    $1/(1-\beta_1) + \alpha$ times Adam's, and the learning rate must be that much
    smaller (about 100 times for $\beta_1 = 0.99$, $\alpha = 0$). With
    $\alpha = 0$ this is Adam without bias correction of the momentum. With
    $\beta_1 = \beta_3$ it is AdEMAMix with $\beta_1 = 0$ (fast EMA = gradient),
    since $m_2 = (1-\beta_3)\, m$: AdEMAMix's $(\eta, \alpha)$ correspond to
    $(\eta\alpha(1-\beta_3),\ 1/(\alpha(1-\beta_3)))$ here.

    $\beta_1(t)$ and $\alpha(t)$ may be schedules, evaluated at `count` before the
    increment. Morwani et al. warm $\beta_1$ up from a smaller value over the run,
    linearly in half-life space: that is [`eqx_ademamix.beta3_scheduler`][], e.g.
    `b1=eam.beta3_scheduler(0.999, beta_start=0.9, warmup=num_steps)`.

    Arithmetic happens in at least float32; moments keep their dtype (16-bit
    moments are written with stochastic rounding).

    Reference: Morwani, Vyas, Zhang, Kakade, *Connections between Schedule-Free
    Optimizers, AdEMAMix, and Accelerated SGD Variants*, 2025,
    [arXiv:2502.02431](https://arxiv.org/abs/2502.02431).
    """

    b1: Float[Array, ""] | Callable
    b2: Float[Array, ""]
    alpha: Float[Array, ""] | Callable
    eps: Float[Array, ""]
    eps_root: Float[Array, ""]
    mu_dtype: Any = eqx.field(static=True)
    use_m: bool = eqx.field(static=True)
    storage: AbstractMomentStorage
    # What storing b2 as a JAX scalar rounded off its Python value, so that
    # `1 - b2` is exact (see `_tree.complement`). `m` has no `1 - b1` term.
    residual_b2: float = eqx.field(static=True, repr=False)

    def __init__(
        self,
        b1: ScalarOrSchedule = 0.99,
        b2: Real[ArrayLike, ""] = 0.95,
        alpha: ScalarOrSchedule = 0.0,
        eps: Real[ArrayLike, ""] = 1e-8,
        eps_root: Real[ArrayLike, ""] = 0.0,
        mu_dtype: Any | None = None,
    ):
        """**Arguments:**

        - `b1`: decay of the momentum `m`, in [0, 1), or a schedule `step -> b1`
          (e.g. [`eqx_ademamix.beta3_scheduler`][]). `0` stores no `m`.
        - `b2`: decay of the second moment `nu`, in [0, 1).
        - `alpha`: weight of the current gradient, a float or a schedule
          `step -> alpha`.
        - `eps`: added to the denominator outside the square root, >= 0.
        - `eps_root`: added inside the square root, >= 0.
        - `mu_dtype`: dtype of `m`; default: each parameter's dtype. `nu` always has
          the parameter's (real) dtype.
        """
        self.b1 = _hyperparameter(b1, None, "b1")
        self.b2 = as_float_scalar(b2)
        self.alpha = _hyperparameter(alpha, None, "alpha")
        self.eps = as_float_scalar(eps)
        self.eps_root = as_float_scalar(eps_root)
        self.mu_dtype = (
            None if mu_dtype is None else jax.dtypes.canonicalize_dtype(mu_dtype)
        )
        self.use_m = not (
            not callable(self.b1) and is_concrete(self.b1) and float(self.b1) == 0
        )
        self.storage = CastStorage()
        self.residual_b2 = rounding_residual(b2, self.b2)

    def __check_init__(self):
        if not callable(self.b1):
            check_unit_interval("b1", self.b1)
        check_unit_interval("b2", self.b2)
        if not callable(self.alpha):
            check_finite("alpha", self.alpha)
        check_nonnegative("eps", self.eps)
        check_nonnegative("eps_root", self.eps_root)
        check_mu_dtype(self.mu_dtype)

    def _moment_dtype(self, param: Inexact[Array, "..."], path) -> Any:
        return moment_dtype(self.mu_dtype, param, path)

    def init(self, params: PyTree) -> ScaleBySimplifiedAdemamixState:
        """The initial state: zero moments shaped like `params`, count at 0.

        **Arguments:**

        - `params`: a PyTree of floating or complex arrays (`None` leaves allowed).

        **Returns:** an [`eqx_ademamix.ScaleBySimplifiedAdemamixState`][].
        """
        _check_params(params)

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

        return ScaleBySimplifiedAdemamixState(
            count=jnp.zeros((), jnp.int32),
            m=moments(True, self._moment_dtype) if self.use_m else None,
            nu=moments(False, lambda p, _: real_dtype(p.dtype)),
        )

    def _step(
        self, grads: PyTree, state: ScaleBySimplifiedAdemamixState
    ) -> tuple[list, Any, ScaleBySimplifiedAdemamixState]:
        """The update rule. Returns the direction's leaves in compute precision,
        their treedef, and the new state."""
        if isinstance(state, ScaleBySimplifiedAdemamixState) and self.use_m != (
            state.m is not None
        ):
            b1 = float(self.b1) if is_concrete(self.b1) else self.b1
            raise ValueError(
                f"this optimizer has b1={b1}, but the state "
                f"{'has no momentum (m=None)' if state.m is None else 'has one'}: "
                f"it was made by an optimizer with "
                f"{'b1 = 0' if state.m is None else 'b1 > 0'}."
            )
        leaves, treedef, moments = flatten_moments(
            grads, state, ScaleBySimplifiedAdemamixState, ("m", "nu"), self.storage
        )
        read, write = self.storage.read, self.storage.write
        b1 = _at(self.b1, state.count, "b1")
        alpha = _at(self.alpha, state.count, "alpha")
        count = _saturating_increment(state.count)
        seed = moment_seeds(state.count)  # per moment and step, not per leaf
        new_m, new_nu, directions = [], [], []
        for i, g in enumerate(leaves):
            m, nu = moments["m"][i], moments["nu"][i]
            if g is None:
                new_m.append(None)
                new_nu.append(None)
                directions.append(None)
                continue
            wide = g.dtype if self.mu_dtype is None else self.mu_dtype
            dtype = compute_dtype(wider_dtype(g.dtype, wide))
            real = real_dtype(dtype)
            g = g.astype(dtype)

            nu_new = ema_of_norm(g, read(nu), self.b2, residual=self.residual_b2)
            nu = write(nu, nu_new, seed(_NU))
            if m is None:
                momentum = g
            else:
                m = write(m, accumulate(g, read(m).astype(dtype), b1), seed(_M))
                momentum = read(m).astype(dtype)
            mixed = momentum + jnp.asarray(alpha).astype(dtype) * g
            inverse = inverse_bias_correction(self.b2, count, real)
            eps_root = _zero_to_none(self.eps_root, real)
            directions.append(
                adam_direction(
                    mixed, read(nu), inverse, eps_root, self.eps.astype(real)
                )
            )
            new_m.append(m)
            new_nu.append(nu)
        state = ScaleBySimplifiedAdemamixState(
            count=count,
            m=treedef.unflatten(new_m) if state.m is not None else None,
            nu=treedef.unflatten(new_nu),
        )
        return directions, treedef, state


class SimplifiedAdEMAMix(AbstractDescent):
    r"""Simplified AdEMAMix: [`eqx_ademamix.ScaleBySimplifiedAdemamix`][] with
    decoupled weight decay and a learning rate,

    $$
    m \leftarrow \beta_1(t)\, m + g, \qquad
    \Delta\theta = -\eta(t)\left(
    \frac{m + \alpha(t)\, g}{\sqrt{\hat\nu + \epsilon_{root}} + \epsilon}
    + \lambda\, \text{mask} \odot \theta\right),
    $$

    with $\hat\nu$ Adam's bias-corrected second moment and $\eta(t)$, $\beta_1(t)$,
    $\alpha(t)$ evaluated at `count` before the increment.

    Morwani et al. show that AdEMAMix's two EMAs can be replaced by one momentum
    without the $(1-\beta_1)$ factor plus $\alpha$ times the current gradient,
    which saves AdEMAMix's third buffer (the same memory as Adam) and needs no
    schedule for $\alpha$. Because the momentum sums about $1/(1-\beta_1)$
    gradients, start from Adam's learning rate divided by $1/(1-\beta_1) + \alpha$.

    Defaults are the paper's: $\beta_1 = 0.99$, $\beta_2 = 0.95$, $\alpha = 0$.
    With a constant $\beta_1$ and float32 state this agrees with
    `optax.contrib.simplified_ademamix`; on top of it $\beta_1$ may be a schedule
    (the paper's warm-up), state dtypes are kept (`mu_dtype`), complex
    parameters use $|g|^2$, and $\beta_1 = 0$ stores no momentum.

    !!! example

        ```python
        import equinox as eqx, jax.numpy as jnp
        import eqx_ademamix as eam

        params = {"w": jnp.ones(3)}
        b1 = eam.beta3_scheduler(0.99, beta_start=0.9, warmup=1000)
        opt = eam.SimplifiedAdEMAMix(learning_rate=1e-4, b1=b1, alpha=2.0)
        state = opt.init(params)
        grads = {"w": jnp.array([0.1, -0.2, 0.3])}
        updates, state = opt.update(grads, state, params)
        params = eqx.apply_updates(params, updates)
        ```

    Reference: Morwani, Vyas, Zhang, Kakade, *Connections between Schedule-Free
    Optimizers, AdEMAMix, and Accelerated SGD Variants*, 2025,
    [arXiv:2502.02431](https://arxiv.org/abs/2502.02431).
    """

    learning_rate: Float[Array, ""] | Callable
    weight_decay: Float[Array, ""]
    mask: Any
    scale: ScaleBySimplifiedAdemamix

    def __init__(
        self,
        learning_rate: ScalarOrSchedule = 1e-4,
        b1: ScalarOrSchedule = 0.99,
        b2: Real[ArrayLike, ""] = 0.95,
        alpha: ScalarOrSchedule = 0.0,
        eps: Real[ArrayLike, ""] = 1e-8,
        eps_root: Real[ArrayLike, ""] = 0.0,
        weight_decay: Real[ArrayLike, ""] = 0.0,
        mask: Any = None,
        mu_dtype: Any | None = None,
    ):
        """**Arguments:**

        - `learning_rate`: a float >= 0, or a schedule `step -> lr` (any optax
          schedule).
        - `b1`, `b2`, `alpha`, `eps`, `eps_root`, `mu_dtype`: as in
          [`eqx_ademamix.ScaleBySimplifiedAdemamix`][].
        - `weight_decay`: decoupled weight decay $\\lambda \\geq 0$, multiplied by the
          learning rate (as in optax and PyTorch).
        - `mask`: which parameters are decayed: a tree of booleans whose structure
          is a prefix of the parameters', or a callable `params -> such a tree`.
          Default: all.
        """
        self.learning_rate = (
            learning_rate if callable(learning_rate) else as_float_scalar(learning_rate)
        )
        self.weight_decay = as_float_scalar(weight_decay)
        self.mask = mask
        self.scale = ScaleBySimplifiedAdemamix(
            b1=b1, b2=b2, alpha=alpha, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype
        )


def simplified_ademamix(
    learning_rate: ScalarOrSchedule,
    b1: ScalarOrSchedule = 0.99,
    b2: Real[ArrayLike, ""] = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: Real[ArrayLike, ""] = 1e-8,
    eps_root: Real[ArrayLike, ""] = 0.0,
    weight_decay: Real[ArrayLike, ""] = 0.0,
    mask: Any = None,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Simplified AdEMAMix as an optax transformation, with the arguments of
    `optax.contrib.simplified_ademamix` (plus `mu_dtype`; `b1` may be a schedule).

    Equivalent to `eqx_ademamix.SimplifiedAdEMAMix(learning_rate, ...).to_optax()`;
    see [`eqx_ademamix.SimplifiedAdEMAMix`][] for the algorithm and the arguments.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    [`eqx_ademamix.ScaleBySimplifiedAdemamixState`][].
    """
    return SimplifiedAdEMAMix(
        learning_rate=learning_rate,
        b1=b1,
        b2=b2,
        alpha=alpha,
        eps=eps,
        eps_root=eps_root,
        weight_decay=weight_decay,
        mask=mask,
        mu_dtype=mu_dtype,
    ).to_optax()


def scale_by_simplified_ademamix(
    b1: ScalarOrSchedule = 0.99,
    b2: Real[ArrayLike, ""] = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: Real[ArrayLike, ""] = 1e-8,
    eps_root: Real[ArrayLike, ""] = 0.0,
    mu_dtype: Any | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Simplified AdEMAMix direction (no learning rate, no weight decay) as an
    optax transformation, with the arguments of
    `optax.contrib.scale_by_simplified_ademamix` (plus `mu_dtype`).

    Equivalent to `eqx_ademamix.ScaleBySimplifiedAdemamix(...).to_optax()`.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    [`eqx_ademamix.ScaleBySimplifiedAdemamixState`][].
    """
    return ScaleBySimplifiedAdemamix(
        b1=b1, b2=b2, alpha=alpha, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype
    ).to_optax()
