"""Building blocks that tests, benchmarks, documentation and new algorithms or
storages use: public names from the package's private modules. Stable within a
minor version; not part of the user-facing API."""

from .._direction import (
    check_floating as check_floating,
    is_params_placeholder as is_params_placeholder,
    leaves_with_paths as leaves_with_paths,
    NOT_PARAMETER_SHAPED as NOT_PARAMETER_SHAPED,
    path_str as path_str,
    saturating_increment as saturating_increment,
    value_at as value_at,
    zero_to_none as zero_to_none,
)
from .._float8 import (
    decode_float8 as decode_float8,
    dequantize_float8 as dequantize_float8,
    encode_magnitude as encode_magnitude,
    float8_codes as float8_codes,
    float8_format as float8_format,
    quantize_float8 as quantize_float8,
)
from .._layout import (
    AbstractPlan as AbstractPlan,
    PACK_MAX_SIZE as PACK_MAX_SIZE,
    PerLeafPlan as PerLeafPlan,
    Unit as Unit,
)
from .._misc import (
    as_bool as as_bool,
    as_float_scalar as as_float_scalar,
    as_int_scalar as as_int_scalar,
)
from .._optimizer import descend as descend, full_mask as full_mask
from .._quantize import (
    block_absmax as block_absmax,
    block_shardings as block_shardings,
    code_book as code_book,
    decode_magnitude as decode_magnitude,
    dequantize_blocks as dequantize_blocks,
    lower_code_direct as lower_code_direct,
    lower_code_search as lower_code_search,
    magnitudes as magnitudes,
    quantize_blocks as quantize_blocks,
    state_bytes as state_bytes,
    to_blocks as to_blocks,
    tree_codes as tree_codes,
)
from .._storage import (
    describe_spec as describe_spec,
    hash_bits as hash_bits,
    index_bits as index_bits,
    mix_seed as mix_seed,
    moment_shape as moment_shape,
    moment_shardings as moment_shardings,
    moment_spec as moment_spec,
    needs_stochastic_rounding as needs_stochastic_rounding,
    read_moment as read_moment,
    stochastic_round as stochastic_round,
    write_moment as write_moment,
    zeros_from as zeros_from,
)
from .._tree import (
    adam_direction as adam_direction,
    bias_correction as bias_correction,
    complement as complement,
    compute_dtype as compute_dtype,
    ema as ema,
    ema_coefficients as ema_coefficients,
    ema_of_norm as ema_of_norm,
    inverse_bias_correction as inverse_bias_correction,
    is_none as is_none,
    real_dtype as real_dtype,
    wider_dtype as wider_dtype,
)
