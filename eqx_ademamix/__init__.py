"""AdEMAMix for JAX, the Equinox way."""

from . import internal as internal
from ._ademamix import (
    AdEMAMix as AdEMAMix,
    ScaleByAdemamix as ScaleByAdemamix,
    ScaleByAdemamixState as ScaleByAdemamixState,
)
from ._base import AbstractGradientTransformation as AbstractGradientTransformation
from ._checkpoint import (
    latest_step as latest_step,
    load_leaves as load_leaves,
    restore_checkpoint as restore_checkpoint,
    save_checkpoint as save_checkpoint,
    save_leaves as save_leaves,
)
from ._direction import (
    AbstractAdamDirection as AbstractAdamDirection,
    AbstractDirection as AbstractDirection,
    MomentSpec as MomentSpec,
)
from ._faults import (
    SkipNonFinite as SkipNonFinite,
    SkipNonFiniteState as SkipNonFiniteState,
)
from ._float8 import (
    BlockwiseFloat8 as BlockwiseFloat8,
    BlockwiseFloat8Array as BlockwiseFloat8Array,
)
from ._layout import (
    AbstractLayout as AbstractLayout,
    Packed as Packed,
    PackedBuffers as PackedBuffers,
    PackedLayout as PackedLayout,
    PerLeaf as PerLeaf,
)
from ._optax import (
    ademamix as ademamix,
    scale_by_ademamix as scale_by_ademamix,
    scale_by_simplified_ademamix as scale_by_simplified_ademamix,
    simplified_ademamix as simplified_ademamix,
)
from ._optimizer import AbstractOptimizer as AbstractOptimizer
from ._quantize import (
    Blockwise8Bit as Blockwise8Bit,
    Blockwise8BitArray as Blockwise8BitArray,
)
from ._schedules import (
    AbstractWarmupSchedule as AbstractWarmupSchedule,
    alpha_scheduler as alpha_scheduler,
    AlphaSchedule as AlphaSchedule,
    beta3_scheduler as beta3_scheduler,
    Beta3Schedule as Beta3Schedule,
)
from ._sharding import state_shardings as state_shardings
from ._simplified import (
    ScaleBySimplifiedAdemamix as ScaleBySimplifiedAdemamix,
    ScaleBySimplifiedAdemamixState as ScaleBySimplifiedAdemamixState,
    SimplifiedAdEMAMix as SimplifiedAdEMAMix,
)
from ._storage import (
    AbstractEncodedArray as AbstractEncodedArray,
    AbstractMomentStorage as AbstractMomentStorage,
    CastStorage as CastStorage,
    LinearUpdate as LinearUpdate,
)
from ._transitions import (
    reset_slow_ema as reset_slow_ema,
    state_from_adam as state_from_adam,
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
    "AbstractAdamDirection",
    "AbstractDirection",
    "AbstractEncodedArray",
    "AbstractGradientTransformation",
    "AbstractLayout",
    "AbstractMomentStorage",
    "AbstractOptimizer",
    "AbstractWarmupSchedule",
    "AdEMAMix",
    "AlphaSchedule",
    "Beta3Schedule",
    "Blockwise8Bit",
    "Blockwise8BitArray",
    "BlockwiseFloat8",
    "BlockwiseFloat8Array",
    "CastStorage",
    "LinearUpdate",
    "MomentSpec",
    "Packed",
    "PackedBuffers",
    "PackedLayout",
    "PerLeaf",
    "ScaleByAdemamix",
    "ScaleByAdemamixState",
    "ScaleBySimplifiedAdemamix",
    "ScaleBySimplifiedAdemamixState",
    "SimplifiedAdEMAMix",
    "SkipNonFinite",
    "SkipNonFiniteState",
    "ademamix",
    "alpha_scheduler",
    "beta3_scheduler",
    "latest_step",
    "load_leaves",
    "reset_slow_ema",
    "restore_checkpoint",
    "save_checkpoint",
    "save_leaves",
    "scale_by_ademamix",
    "scale_by_simplified_ademamix",
    "simplified_ademamix",
    "state_from_adam",
    "state_shardings",
    "tree_bias_correction",
    "tree_cast",
    "tree_update_moment",
    "tree_update_moment_per_elem_norm",
    "tree_zeros_like",
]
