"""The seed code's functional API: `ademamix` and `scale_by_ademamix`, returning
`optax.GradientTransformation`s built from the typed modules."""

from typing import Any

import optax
from jaxtyping import ArrayLike, Real

from ._ademamix import AdEMAMix, ScalarOrSchedule, ScaleByAdemamix, Schedule
from ._storage import AbstractMomentStorage


def ademamix(
    lr: ScalarOrSchedule | None = None,
    b1: Real[ArrayLike, ""] = 0.9,
    b2: Real[ArrayLike, ""] = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    b3_scheduler: Schedule | None = None,
    alpha_scheduler: Schedule | None = None,
    eps: Real[ArrayLike, ""] = 1e-8,
    eps_root: Real[ArrayLike, ""] = 0.0,
    weight_decay: Real[ArrayLike, ""] = 0.0,
    mu_dtype: Any | None = None,
    mask: Any = None,
    quantized: AbstractMomentStorage | None = None,
    *,
    learning_rate: ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdEMAMix as an optax transformation, with the seed code's arguments.

    Equivalent to `eqx_ademamix.AdEMAMix(learning_rate=lr, ...).to_optax()`; see
    [`eqx_ademamix.AdEMAMix`][] for the algorithm and the arguments. Works with
    `optax.chain`, `optax.inject_hyperparams(eqx_ademamix.ademamix)` and
    `optax.MultiSteps`.

    The learning rate is `lr` (the seed code's name); `learning_rate=` (the name
    `optax.contrib.ademamix` uses) is accepted too. Pass exactly one of them.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    [`eqx_ademamix.ScaleByAdemamixState`][].
    """
    if (lr is None) == (learning_rate is None):
        raise ValueError(
            "pass the learning rate once, as `lr` or as `learning_rate`; got "
            f"lr={lr!r}, learning_rate={learning_rate!r}."
        )
    return AdEMAMix(
        learning_rate=lr if learning_rate is None else learning_rate,
        b1=b1,
        b2=b2,
        b3=b3,
        alpha=alpha,
        b3_scheduler=b3_scheduler,
        alpha_scheduler=alpha_scheduler,
        eps=eps,
        eps_root=eps_root,
        weight_decay=weight_decay,
        mask=mask,
        mu_dtype=mu_dtype,
        quantized=quantized,
    ).to_optax()


def scale_by_ademamix(
    b1: Real[ArrayLike, ""] = 0.9,
    b2: Real[ArrayLike, ""] = 0.999,
    b3: ScalarOrSchedule = 0.9999,
    alpha: ScalarOrSchedule = 5.0,
    b3_scheduler: Schedule | None = None,
    alpha_scheduler: Schedule | None = None,
    eps: Real[ArrayLike, ""] = 1e-8,
    eps_root: Real[ArrayLike, ""] = 0.0,
    mu_dtype: Any | None = None,
    quantized: AbstractMomentStorage | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The AdEMAMix direction (no learning rate, no weight decay) as an optax
    transformation, with the seed code's arguments.

    Equivalent to `eqx_ademamix.ScaleByAdemamix(...).to_optax()`. Chain it with
    `optax.add_decayed_weights` and `optax.scale_by_learning_rate` to get the
    optimizer.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    [`eqx_ademamix.ScaleByAdemamixState`][].
    """
    return ScaleByAdemamix(
        b1=b1,
        b2=b2,
        b3=b3,
        alpha=alpha,
        b3_scheduler=b3_scheduler,
        alpha_scheduler=alpha_scheduler,
        eps=eps,
        eps_root=eps_root,
        mu_dtype=mu_dtype,
        quantized=quantized,
    ).to_optax()
