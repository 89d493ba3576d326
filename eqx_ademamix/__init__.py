"""AdEMAMix for JAX, the Equinox way."""

from ._ademamix import (
    AdEMAMix as AdEMAMix,
    ScaleByAdemamix as ScaleByAdemamix,
    ScaleByAdemamixState as ScaleByAdemamixState,
)
from ._base import AbstractGradientTransformation as AbstractGradientTransformation
from ._optax import ademamix as ademamix, scale_by_ademamix as scale_by_ademamix
from ._schedules import (
    AbstractWarmupSchedule as AbstractWarmupSchedule,
    alpha_scheduler as alpha_scheduler,
    AlphaSchedule as AlphaSchedule,
    beta3_scheduler as beta3_scheduler,
    Beta3Schedule as Beta3Schedule,
)
from ._simplified import (
    scale_by_simplified_ademamix as scale_by_simplified_ademamix,
    ScaleBySimplifiedAdemamix as ScaleBySimplifiedAdemamix,
    ScaleBySimplifiedAdemamixState as ScaleBySimplifiedAdemamixState,
    simplified_ademamix as simplified_ademamix,
    SimplifiedAdEMAMix as SimplifiedAdEMAMix,
)
from ._storage import (
    AbstractMomentStorage as AbstractMomentStorage,
    CastStorage as CastStorage,
)
from ._tree import (
    tree_bias_correction as tree_bias_correction,
    tree_cast as tree_cast,
    tree_update_moment as tree_update_moment,
    tree_update_moment_per_elem_norm as tree_update_moment_per_elem_norm,
    tree_zeros_like as tree_zeros_like,
)


__version__ = "0.1.0"

__all__ = [
    "AbstractGradientTransformation",
    "AbstractMomentStorage",
    "AbstractWarmupSchedule",
    "AdEMAMix",
    "AlphaSchedule",
    "Beta3Schedule",
    "CastStorage",
    "ScaleByAdemamix",
    "ScaleByAdemamixState",
    "ScaleBySimplifiedAdemamix",
    "ScaleBySimplifiedAdemamixState",
    "SimplifiedAdEMAMix",
    "ademamix",
    "alpha_scheduler",
    "beta3_scheduler",
    "scale_by_ademamix",
    "scale_by_simplified_ademamix",
    "simplified_ademamix",
    "tree_bias_correction",
    "tree_cast",
    "tree_update_moment",
    "tree_update_moment_per_elem_norm",
    "tree_zeros_like",
]
