"""AdEMAMix: its state, its direction (`ScaleByAdemamix`, the per-unit rule) and
the optimizer (`AdEMAMix`). Everything else (init, validation, storage, layout,
learning rate and weight decay) is the framework's, in `_direction.py` and
`_optimizer.py`."""

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
    Schedule,
    value_at,
    zero_to_none,
)
from ._layout import AbstractLayout
from ._misc import (
    as_float_scalar,
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


class ScaleByAdemamixState(NamedTuple):
    """The state of AdEMAMix.

    - `count`: the number of updates so far; drives bias correction and the
      learning-rate schedule.
    - `count_m2`: the number of updates of the slow EMA; drives the `b3` and `alpha`
      schedules (it differs from `count` only after the slow EMA is reset).
    - `m1`: the fast EMA of the gradients; `None` when `b1 == 0` (no memory spent).
    - `m2`: the slow EMA of the gradients.
    - `nu`: the EMA of the squared gradients.

    With the default per-leaf layout the moment trees have the parameters'
    structure (`None` parameters, as `eqx.filter` leaves them, are `None` here
    too); with `eqx_ademamix.Packed` they are
    `eqx_ademamix.PackedBuffers`. Counters saturate at the int32 maximum
    instead of wrapping.

    A typed `NamedTuple`, like optax's states, so that optax's tree tools see its
    fields: `optax.tree.get(state, "count")`, `optax.tree.set(state, count=...)`.
    """

    count: Int[Array, ""]
    count_m2: Int[Array, ""]
    m1: PyTree | None
    m2: PyTree
    nu: PyTree


class ScaleByAdemamix(AbstractAdamDirection):
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
    the slow EMAs stay unbiased). Every storage and layout of the package applies.

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
    layout: AbstractLayout
    # What storing b1, b2, b3 as JAX scalars rounded off their Python values, so
    # that `1 - b` is exact (see `_tree.complement`). Static: changing a beta with
    # `eqx.tree_at` keeps a stale residual, which is below that beta's rounding
    # error and so never worse than not having it.
    residuals: tuple[float, float, float] = eqx.field(static=True, repr=False)

    state_type: ClassVar[type] = ScaleByAdemamixState
    moment_specs: ClassVar[tuple[MomentSpec, ...]] = (
        MomentSpec("m1", True, 1),
        MomentSpec("m2", True, 2),
        MomentSpec("nu", False, 3),
    )

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
        packed: bool | None = None,
        quantized: AbstractMomentStorage | None = None,
        *,
        layout: AbstractLayout | None = None,
        storage: AbstractMomentStorage | None = None,
    ):
        """**Arguments:**

        - `b1`: decay of the fast EMA `m1`, in [0, 1). `0` stores no `m1`.
        - `b2`: decay of the second moment `nu`, in [0, 1).
        - `b3`: decay of the slow EMA `m2`, in [0, 1), or a schedule
          `step -> b3` (e.g. `eqx_ademamix.beta3_scheduler`).
        - `alpha`: weight of the slow EMA, a float or a schedule `step -> alpha`
          (e.g. `eqx_ademamix.alpha_scheduler`).
        - `b3_scheduler`, `alpha_scheduler`: the original implementation's way to
          pass those schedules; an error if `b3` (or `alpha`) is a schedule too.
        - `eps`: added to the denominator outside the square root, >= 0.
        - `eps_root`: added inside the square root, >= 0 (`eps + eps_root > 0`).
        - `mu_dtype`: dtype of `m1` and `m2`; default: each parameter's dtype.
          `nu` always has the parameter's (real) dtype.
        - `layout`: how the moments are laid out: `eqx_ademamix.PerLeaf()` (the
          default: one array per parameter) or `eqx_ademamix.Packed()` (small
          parameters in one flat buffer per dtype: much less per-step overhead
          for models of many small arrays).
        - `packed`: `True` is `layout=eqx_ademamix.Packed()` (the older spelling).
        - `storage`: how the moments are stored: `eqx_ademamix.CastStorage()` (the
          default: plain arrays) or `eqx_ademamix.Blockwise8Bit()` (8-bit blocks,
          a quarter of the memory).
        - `quantized`: the older name of `storage`.
        """
        self._set_common(
            b2, eps, eps_root, mu_dtype, packed, quantized, layout, storage
        )
        self.b1 = as_float_scalar(b1, "b1")
        self.b3 = scalar_or_schedule(b3, b3_scheduler, "b3")
        self.alpha = scalar_or_schedule(alpha, alpha_scheduler, "alpha")
        self.use_m1 = not (is_concrete(self.b1) and float(self.b1) == 0)
        self.residuals = (
            rounding_residual(b1, self.b1),
            rounding_residual(b2, self.b2),
            0.0 if callable(self.b3) else rounding_residual(b3, self.b3),
        )

    def __check_init__(self):
        check_decay("b1", self.b1, self.residuals[0])
        check_decay("b2", self.b2, self.residuals[1])
        if not callable(self.b3):
            check_decay("b3", self.b3, self.residuals[2])
        if not callable(self.alpha):
            check_finite("alpha", self.alpha)

    def _uses(self, name: str) -> bool:
        return self.use_m1 or name != "m1"

    def _why_missing(self, name: str) -> str:
        return "b1 = 0 stores no `m1`" if name == "m1" else super()._why_missing(name)

    def _counters(self, state: PyTree | None) -> dict[str, Int[Array, ""]]:
        if state is None:
            zero = jnp.zeros((), jnp.int32)
            # Two buffers: a state whose leaves share one buffer cannot be donated.
            return {"count": zero, "count_m2": jnp.zeros((), jnp.int32)}
        return {"count": state.count, "count_m2": state.count_m2}

    def _advance(self, state: PyTree) -> dict[str, Int[Array, ""]]:
        return {
            "count": saturating_increment(state.count),
            "count_m2": saturating_increment(state.count_m2),
        }

    def _coefficients(self, state: PyTree, dtype: Any) -> tuple:
        real = real_dtype(dtype)
        count = saturating_increment(state.count)
        b3 = value_at(self.b3, state.count_m2, "b3")
        alpha = value_at(self.alpha, state.count_m2, "alpha")
        r1, r2, r3 = self.residuals
        # Bias corrections as reciprocals: a multiply per element instead of a
        # division (a division costs several multiplies on CPU and GPU alike).
        return (
            inverse_bias_correction(self.b2, count, real),
            inverse_bias_correction(self.b1, count, dtype),
            zero_to_none(self.eps_root, real),
            self.eps.astype(real),
            jnp.asarray(alpha).astype(dtype),
            ema_coefficients(self.b1, r1, dtype),
            ema_coefficients(self.b2, r2, real),
            ema_coefficients(b3, 0.0 if callable(self.b3) else r3, dtype),
            denominator_floor(self.eps, self.eps_root, real),
        )

    def _moments(self, g: Array, moments: dict, c: tuple) -> dict:
        *_, c1, c2, c3, _ = c
        return {
            "m1": None
            if moments["m1"] is None
            else LinearUpdate(moments["m1"], *c1, g),
            "m2": LinearUpdate(moments["m2"], *c3, g),
            "nu": LinearUpdate(moments["nu"], *c2, g, squared=True),
        }

    def _direction(self, g: Array, moments: dict, c: tuple) -> Array:
        inv2, inv1, eps_root, eps, alpha, *_, floor = c
        m1 = moments["m1"]
        m1_hat = g if m1 is None else lax.mul(m1.astype(g.dtype), inv1)
        mixed = lax.add(m1_hat, lax.mul(alpha, moments["m2"].astype(g.dtype)))
        return adam_direction(mixed, moments["nu"], inv2, eps_root, eps, floor)


class AdEMAMix(AbstractOptimizer):
    r"""The AdEMAMix optimizer: `eqx_ademamix.ScaleByAdemamix` with decoupled
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
    direction: ScaleByAdemamix

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
        packed: bool | None = None,
        quantized: AbstractMomentStorage | None = None,
        *,
        layout: AbstractLayout | None = None,
        storage: AbstractMomentStorage | None = None,
    ):
        """**Arguments:**

        - `learning_rate`: a float >= 0, or a schedule `step -> lr` (any optax
          schedule).
        - `b1`, `b2`, `b3`, `alpha`, `b3_scheduler`, `alpha_scheduler`, `eps`,
          `eps_root`, `mu_dtype`, `layout`, `packed`, `storage`, `quantized`: as
          in `eqx_ademamix.ScaleByAdemamix`.
        - `weight_decay`: decoupled weight decay $\\lambda \\geq 0$, multiplied by the
          learning rate (as in optax and PyTorch).
        - `mask`: which parameters are decayed: a tree of booleans whose structure
          is a prefix of the parameters', or a callable `params -> such a tree`.
          Default: all.
        """
        direction = ScaleByAdemamix(
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
            layout=layout,
            storage=storage,
        )
        self._set_common(learning_rate, weight_decay, mask, direction)
