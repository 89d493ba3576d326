"""Simplified AdEMAMix (Morwani et al., 2025): one momentum buffer that accumulates
gradients without the `(1 - b1)` factor, mixed with the current gradient.

Its state, its per-unit rule and its constructors; everything else (init,
validation, storage, layout, learning rate and weight decay) is the framework's,
shared with AdEMAMix (`_direction.py`, `_optimizer.py`)."""

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PyTree, Real

from ._direction import (
    AbstractAdamDirection,
    check_decay,
    denominator_floor,
    MomentSpec,
    saturating_increment,
    scalar_or_schedule,
    ScalarOrSchedule,
    value_at,
    zero_to_none,
)
from ._layout import AbstractLayout
from ._misc import (
    check_finite,
    is_concrete,
    rounding_residual,
)
from ._optimizer import AbstractOptimizer
from ._storage import AbstractMomentStorage, LinearUpdate
from ._tree import (
    adam_direction,
    ema_coefficients,
    inverse_bias_correction,
    real_dtype,
)


class ScaleBySimplifiedAdemamixState(NamedTuple):
    """The state of Simplified AdEMAMix.

    - `count`: the number of updates so far; drives the bias correction of `nu` and
      the schedules of the learning rate, `b1` and `alpha`. Saturates at the int32
      maximum instead of wrapping.
    - `m`: the momentum `b1 * m + g`; `None` when `b1 == 0` (then `m = g`, nothing
      is stored).
    - `nu`: the EMA of the squared gradients.

    With the per-leaf layout the moment trees have the parameters' structure
    (`None` parameters stay `None`); with `eqx_ademamix.Packed` they are
    `eqx_ademamix.PackedBuffers`. A typed `NamedTuple`, like optax's states.
    """

    count: Int[Array, ""]
    m: PyTree | None
    nu: PyTree


class ScaleBySimplifiedAdemamix(AbstractAdamDirection):
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
    linearly in half-life space: that is `eqx_ademamix.beta3_scheduler`, e.g.
    `b1=eam.beta3_scheduler(0.999, beta_start=0.9, warmup=num_steps)`.

    Arithmetic happens in at least float32; moments keep their dtype (16-bit
    moments are written with stochastic rounding). Every storage and layout of
    the package applies (`storage=`/`quantized=`, `layout=`/`packed=`).

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
    layout: AbstractLayout
    # What storing b2 as a JAX scalar rounded off its Python value, so that
    # `1 - b2` is exact (see `_tree.complement`). `m` has no `1 - b1` term.
    residual_b2: float = eqx.field(static=True, repr=False)

    state_type: ClassVar[type] = ScaleBySimplifiedAdemamixState
    moment_specs: ClassVar[tuple[MomentSpec, ...]] = (
        MomentSpec("m", True, 1),
        MomentSpec("nu", False, 3),
    )

    def __init__(
        self,
        b1: ScalarOrSchedule = 0.99,
        b2: Real[ArrayLike, ""] = 0.95,
        alpha: ScalarOrSchedule = 0.0,
        eps: Real[ArrayLike, ""] = 1e-8,
        eps_root: Real[ArrayLike, ""] = 0.0,
        mu_dtype: Any | None = None,
        packed: bool | None = None,
        quantized: AbstractMomentStorage | None = None,
        *,
        layout: AbstractLayout | None = None,
        storage: AbstractMomentStorage | None = None,
    ):
        """**Arguments:**

        - `b1`: decay of the momentum `m`, in [0, 1), or a schedule `step -> b1`
          (e.g. `eqx_ademamix.beta3_scheduler`). `0` stores no `m`.
        - `b2`: decay of the second moment `nu`, in [0, 1).
        - `alpha`: weight of the current gradient, a float or a schedule
          `step -> alpha`.
        - `eps`: added to the denominator outside the square root, >= 0.
        - `eps_root`: added inside the square root, >= 0 (`eps + eps_root > 0`).
        - `mu_dtype`: dtype of `m`; default: each parameter's dtype. `nu` always has
          the parameter's (real) dtype.
        - `layout`, `packed`, `storage`, `quantized`: as in
          `eqx_ademamix.ScaleByAdemamix`.
        """
        self._set_common(
            b2, eps, eps_root, mu_dtype, packed, quantized, layout, storage
        )
        self.b1 = scalar_or_schedule(b1, None, "b1")
        self.alpha = scalar_or_schedule(alpha, None, "alpha")
        self.use_m = callable(self.b1) or not (
            is_concrete(self.b1) and float(self.b1) == 0
        )
        self.residual_b2 = rounding_residual(b2, self.b2)

    def __check_init__(self):
        if not callable(self.b1):
            check_decay("b1", self.b1, 0.0)
        check_decay("b2", self.b2, self.residual_b2)
        if not callable(self.alpha):
            check_finite("alpha", self.alpha)

    def _uses(self, name: str) -> bool:
        return self.use_m or name != "m"

    def _why_missing(self, name: str) -> str:
        return "b1 = 0 stores no `m`" if name == "m" else super()._why_missing(name)

    def _counters(self, state: PyTree | None) -> dict[str, Int[Array, ""]]:
        if state is None:
            return {"count": jnp.zeros((), jnp.int32)}
        return {"count": state.count}

    def _advance(self, state: PyTree) -> dict[str, Int[Array, ""]]:
        return {"count": saturating_increment(state.count)}

    def _coefficients(self, state: PyTree, dtype: Any) -> tuple:
        real = real_dtype(dtype)
        count = saturating_increment(state.count)
        return (
            inverse_bias_correction(self.b2, count, real),
            zero_to_none(self.eps_root, real),
            self.eps.astype(real),
            jnp.asarray(value_at(self.alpha, state.count, "alpha")).astype(dtype),
            jnp.asarray(value_at(self.b1, state.count, "b1")).astype(dtype),
            ema_coefficients(self.b2, self.residual_b2, real),
            denominator_floor(self.eps, self.eps_root, real),
        )

    def _moments(self, g: Array, moments: dict, c: tuple) -> dict:
        *_, b1, c2, _ = c
        m = moments["m"]
        return {
            "m": None if m is None else LinearUpdate(m, b1, None, g),
            "nu": LinearUpdate(moments["nu"], *c2, g, squared=True),
        }

    def _direction(self, g: Array, moments: dict, c: tuple) -> Array:
        inv2, eps_root, eps, alpha, *_, floor = c
        momentum = g if moments["m"] is None else moments["m"].astype(g.dtype)
        mixed = lax.add(momentum, lax.mul(alpha, g))
        return adam_direction(mixed, moments["nu"], inv2, eps_root, eps, floor)


class SimplifiedAdEMAMix(AbstractOptimizer):
    r"""Simplified AdEMAMix: `eqx_ademamix.ScaleBySimplifiedAdemamix` with
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
    direction: ScaleBySimplifiedAdemamix

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
        packed: bool | None = None,
        quantized: AbstractMomentStorage | None = None,
        *,
        layout: AbstractLayout | None = None,
        storage: AbstractMomentStorage | None = None,
    ):
        """**Arguments:**

        - `learning_rate`: a float >= 0, or a schedule `step -> lr` (any optax
          schedule).
        - `b1`, `b2`, `alpha`, `eps`, `eps_root`, `mu_dtype`, `layout`, `packed`,
          `storage`, `quantized`: as in `eqx_ademamix.ScaleBySimplifiedAdemamix`.
        - `weight_decay`: decoupled weight decay $\\lambda \\geq 0$, multiplied by the
          learning rate (as in optax and PyTorch).
        - `mask`: which parameters are decayed: a tree of booleans whose structure
          is a prefix of the parameters', or a callable `params -> such a tree`.
          Default: all.
        """
        direction = ScaleBySimplifiedAdemamix(
            b1=b1,
            b2=b2,
            alpha=alpha,
            eps=eps,
            eps_root=eps_root,
            mu_dtype=mu_dtype,
            packed=packed,
            quantized=quantized,
            layout=layout,
            storage=storage,
        )
        self._set_common(learning_rate, weight_decay, mask, direction)
