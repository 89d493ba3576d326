"""The functional API: `ademamix`, `scale_by_ademamix` (the original
implementation's names and arguments), `simplified_ademamix` and
`scale_by_simplified_ademamix` (optax.contrib's), each returning an
`optax.GradientTransformationExtraArgs` built from the typed modules. Each accepts
every option the modules accept (layout, storage)."""

from typing import Any

import optax
from jaxtyping import ArrayLike, Real

from ._ademamix import AdEMAMix, ScaleByAdemamix
from ._direction import ScalarOrSchedule, Schedule
from ._layout import AbstractLayout
from ._simplified import ScaleBySimplifiedAdemamix, SimplifiedAdEMAMix
from ._storage import AbstractMomentStorage


def as_optax(cls: type, arguments: dict) -> optax.GradientTransformationExtraArgs:
    """`cls(**arguments).to_optax()`: each function below passes its own
    arguments (`locals()`), which are the constructor's, by name."""
    return cls(**arguments).to_optax()


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
    packed: bool | None = None,
    layout: AbstractLayout | None = None,
    storage: AbstractMomentStorage | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AdEMAMix as an optax transformation, with the original implementation's
    arguments.

    Equivalent to `eqx_ademamix.AdEMAMix(learning_rate=lr, ...).to_optax()`; see
    `eqx_ademamix.AdEMAMix` for the algorithm and the arguments (`packed`,
    `layout`, `storage`, `quantized` included). Works with `optax.chain`,
    `optax.inject_hyperparams(eqx_ademamix.ademamix)` and `optax.MultiSteps`.

    The learning rate is `lr` (the original name); `learning_rate=` (the name
    `optax.contrib.ademamix` uses) is accepted too. Pass exactly one of them.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `eqx_ademamix.ScaleByAdemamixState`.
    """
    arguments = dict(locals())
    if (lr is None) == (learning_rate is None):
        raise ValueError(
            "pass the learning rate once, as `lr` or as `learning_rate`; got "
            f"lr={lr!r}, learning_rate={learning_rate!r}."
        )
    arguments["learning_rate"] = lr if learning_rate is None else learning_rate
    del arguments["lr"]
    return as_optax(AdEMAMix, arguments)


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
    *,
    packed: bool | None = None,
    layout: AbstractLayout | None = None,
    storage: AbstractMomentStorage | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The AdEMAMix direction (no learning rate, no weight decay) as an optax
    transformation, with the original implementation's arguments.

    Equivalent to `eqx_ademamix.ScaleByAdemamix(...).to_optax()`. Chain it with
    `optax.add_decayed_weights` and `optax.scale_by_learning_rate` to get the
    optimizer.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `eqx_ademamix.ScaleByAdemamixState`.
    """
    return as_optax(ScaleByAdemamix, locals())


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
    *,
    packed: bool | None = None,
    quantized: AbstractMomentStorage | None = None,
    layout: AbstractLayout | None = None,
    storage: AbstractMomentStorage | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Simplified AdEMAMix as an optax transformation, with the arguments of
    `optax.contrib.simplified_ademamix` (plus `mu_dtype`, layouts and storages;
    `b1` may be a schedule).

    Equivalent to `eqx_ademamix.SimplifiedAdEMAMix(learning_rate, ...).to_optax()`;
    see `eqx_ademamix.SimplifiedAdEMAMix` for the algorithm and the arguments.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `eqx_ademamix.ScaleBySimplifiedAdemamixState`.
    """
    return as_optax(SimplifiedAdEMAMix, locals())


def scale_by_simplified_ademamix(
    b1: ScalarOrSchedule = 0.99,
    b2: Real[ArrayLike, ""] = 0.95,
    alpha: ScalarOrSchedule = 0.0,
    eps: Real[ArrayLike, ""] = 1e-8,
    eps_root: Real[ArrayLike, ""] = 0.0,
    mu_dtype: Any | None = None,
    *,
    packed: bool | None = None,
    quantized: AbstractMomentStorage | None = None,
    layout: AbstractLayout | None = None,
    storage: AbstractMomentStorage | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The Simplified AdEMAMix direction (no learning rate, no weight decay) as an
    optax transformation, with the arguments of
    `optax.contrib.scale_by_simplified_ademamix` (plus `mu_dtype`, layouts and
    storages).

    Equivalent to `eqx_ademamix.ScaleBySimplifiedAdemamix(...).to_optax()`.

    **Returns:** an `optax.GradientTransformationExtraArgs` whose state is an
    `eqx_ademamix.ScaleBySimplifiedAdemamixState`.
    """
    return as_optax(ScaleBySimplifiedAdemamix, locals())
