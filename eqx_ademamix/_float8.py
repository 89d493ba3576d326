"""Block-scaled 8-bit floats: optimizer moments as one byte per element, encoded
and decoded by a handful of integer operations on float32 bit patterns.

A moment leaf is cut into blocks of `block_size` consecutive elements (row-major,
the last block zero-padded), as for `eqx_ademamix.Blockwise8Bit`. A block stores
its largest magnitude (absmax, float32) and, per element, the value divided by
absmax, `m` in [-1, 1], as an 8-bit float:

- first moments (signed): the bit pattern of `float8_e4m3fn` holding `256 * m`
  (a sign, 4 exponent bits, 3 mantissa bits, subnormals): 15 binades from
  `2**-14` to 1 at full resolution (relative steps of 6-12%), then subnormals
  in steps of `2**-17`;
- the second moment (never negative): an unsigned float with 5 exponent bits
  and 3 mantissa bits ("e5m3"), 31 binades from `2**-30` to 1, then
  subnormals in steps of `2**-33`.

In both, 1.0 is the exponent field's largest value with a zero mantissa; the
codes above it are never written. Because these are IEEE-style floats with the
top of the block at a power of two, the f32 bit pattern of `m` *is* the code
shifted: encoding keeps the exponent and the top mantissa bits of `m`'s float32
word, decoding shifts the code back into a float32 word. Stochastic rounding
adds random bits below the kept mantissa bits before the shift (as for bfloat16
in `_storage.stochastic_round`); subnormals go through the same path after
adding the smallest normal, `2**emin`, whose float32 mantissa grid at the kept
bits is exactly the subnormal grid. So a write costs one reduction per block and
about a dozen elementwise operations, with no comparisons against code books and
no table lookups: XLA traces and compiles it quickly, and on GPUs it is
memory-bound like a float32 step.
"""

from typing import Any, ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Float32, UInt8, UInt32

from ._quantize import (
    AbstractBlockwiseArray,
    AbstractBlockwiseStorage,
    divide_by_scale,
)
from ._storage import (
    index_bits,
)


def float8_format(signed: bool) -> tuple[int, int]:
    """`(exponent bits, mantissa bits)` of the magnitude code: e4m3 for signed
    moments (the byte's top bit is the sign), e5m3 for the second moment."""
    return (4, 3) if signed else (5, 3)


def _constants(exp_bits: int, man_bits: int) -> tuple[int, int, float]:
    # shift: float32 mantissa bits dropped; offset: float32 exponent bias minus
    # the code's, in code units; tiny: the code's smallest normal, 2**emin.
    shift = 23 - man_bits
    offset = (128 - 2**exp_bits) << man_bits
    tiny = 2.0 ** (2 - 2**exp_bits)
    return shift, offset, tiny


def encode_magnitude(
    m: Float32[Array, "*shape"],
    exp_bits: int,
    man_bits: int,
    bits: UInt32[Array, "*shape"] | None,
) -> UInt32[Array, "*shape"]:
    """The code of `m` in [0, 1] (float32) in an unsigned float with `exp_bits`
    exponent and `man_bits` mantissa bits whose largest written value is 1.0.

    `bits`: 32 random bits per element for stochastic rounding (up with the
    probability that makes the expected value exact), or `None` to round to
    nearest (ties up)."""
    shift, offset, tiny = _constants(exp_bits, man_bits)
    tiny = np.float32(tiny)
    small = lax.lt(m, tiny)
    # Below the smallest normal, m + tiny lies in [tiny, 2 tiny), whose float32
    # grid at `man_bits` mantissa bits is the subnormal grid (step tiny / 2**M).
    word = lax.bitcast_convert_type(lax.select(small, lax.add(m, tiny), m), jnp.uint32)
    if bits is None:
        noise = np.uint32(1 << (shift - 1))
    else:
        noise = lax.shift_right_logical(bits, np.uint32(32 - shift))
    code = lax.shift_right_logical(lax.add(word, noise), np.uint32(shift))
    # Subtracting the exponent bias; the subnormal path also removes `tiny`'s
    # leading one (a rounded-up `2 tiny` then becomes the code of `tiny`).
    sub = lax.select(
        small,
        lax.full_like(code, offset + (1 << man_bits)),
        lax.full_like(code, offset),
    )
    return lax.sub(code, sub)


def decode_magnitude_float8(
    code: UInt32[Array, "*shape"], exp_bits: int, man_bits: int
) -> Float32[Array, "*shape"]:
    """The value in [0, 1] of a magnitude code of `encode_magnitude` (float32)."""
    shift, offset, tiny = _constants(exp_bits, man_bits)
    sub = lax.lt(code, np.uint32(1 << man_bits))
    lead = lax.select(
        sub,
        lax.full_like(code, offset + (1 << man_bits)),
        lax.full_like(code, offset),
    )
    word = lax.shift_left(lax.add(code, lead), np.uint32(shift))
    value = lax.bitcast_convert_type(word, jnp.float32)
    zero = jnp.zeros((), jnp.float32)
    return lax.sub(value, lax.select(sub, lax.full_like(value, tiny), value * zero))


def quantize_float8(
    blocks: Float[Array, "blocks block_size"],
    signed: bool,
    bits: UInt32[Array, "blocks block_size"] | None,
) -> tuple[UInt8[Array, "blocks block_size"], Float32[Array, " blocks"]]:
    """Codes and absmax of `blocks` (one block per row, float32).

    **Returns:** `(codes, absmax)`. A block holding a NaN or an infinity gets
    absmax NaN (its codes are unspecified): it reads back as all NaN. A block of
    zeros gets absmax 0 and reads back as zeros. In the unsigned code, negative
    values are stored as 0 and positive ones never round to 0 (below the smallest
    code they round up to it: a second moment is a denominator)."""
    blocks = blocks.astype(jnp.float32)
    magnitude = jnp.abs(blocks)
    # One reduction that also flags non-finite blocks (NaN enters it as inf).
    flagged = jnp.where(jnp.isfinite(blocks), magnitude, jnp.float32(jnp.inf))
    absmax = jnp.max(flagged, axis=1)
    finite = jnp.isfinite(absmax)
    absmax = jnp.where(finite, absmax, 0)
    m = jnp.minimum(divide_by_scale(magnitude, absmax), np.float32(1))
    exp_bits, man_bits = float8_format(signed)
    code = encode_magnitude(m, exp_bits, man_bits, bits)
    if signed:
        sign = lax.shift_right_logical(
            lax.bitcast_convert_type(blocks, jnp.uint32), np.uint32(24)
        )
        code = lax.bitwise_or(code, lax.bitwise_and(sign, np.uint32(0x80)))
    else:
        positive = lax.gt(blocks, jnp.zeros((), jnp.float32))
        code = lax.select(positive, lax.max(code, lax.full_like(code, 1)), code * 0)
    return code.astype(jnp.uint8), jnp.where(finite, absmax, jnp.nan)


def dequantize_float8(
    codes: UInt8[Array, "blocks block_size"],
    absmax: Float32[Array, " blocks"],
    signed: bool,
) -> Float32[Array, "blocks block_size"]:
    """The values the codes stand for, times their block's absmax (float32)."""
    exp_bits, man_bits = float8_format(signed)
    c = codes.astype(jnp.uint32)
    if signed:
        value = decode_magnitude_float8(
            lax.bitwise_and(c, np.uint32(0x7F)), exp_bits, man_bits
        )
        sign = lax.shift_left(lax.bitwise_and(c, np.uint32(0x80)), np.uint32(24))
        word = lax.bitwise_or(lax.bitcast_convert_type(value, jnp.uint32), sign)
        value = lax.bitcast_convert_type(word, jnp.float32)
    else:
        value = decode_magnitude_float8(c, exp_bits, man_bits)
    return value * absmax[:, None]


class BlockwiseFloat8Array(AbstractBlockwiseArray):
    """One moment leaf stored as block-scaled 8-bit floats (see
    `eqx_ademamix.BlockwiseFloat8`).

    - `codes`: one byte per element, `(blocks, block_size)`, row-major over the
      flattened moment, the last block zero-padded. Signed moments: the
      `float8_e4m3fn` bit pattern of `256 * value / absmax`; the second moment:
      an unsigned e5m3 float of `value / absmax`.
    - `absmax`: the largest magnitude of each block, float32, `(blocks,)`; NaN marks
      a block that was written a NaN or an infinity.
    - `shape`: the shape of the moment (static).
    - `dtype`: the dtype reads return (static): the moment's dtype, at least
      float32.
    - `signed`: whether the signed code is used (static).
    - `stochastic_rounding`: whether writes round stochastically (static).
    """

    codes: UInt8[Array, "blocks block_size"]
    absmax: Float32[Array, " blocks"]
    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    signed: bool = eqx.field(static=True)
    stochastic_rounding: bool = eqx.field(static=True, default=True)

    def quantize(self, blocks, bits):
        return quantize_float8(blocks, self.signed, bits)

    def dequantize_codes(self):
        values = dequantize_float8(self.codes, self.absmax, self.signed)
        return values.astype(self.dtype)

    def rounding_bits(self, shape, seed):
        # Weyl words (one multiply-add per dimension), not a full hash: each
        # element needs bits that are independent from step to step, which the
        # per-step seed gives (see `_storage.index_bits`).
        return index_bits(shape, seed)

    @classmethod
    def code_name(cls, signed: bool) -> str:
        return "8-bit floats (" + ("e4m3, signed" if signed else "e5m3, unsigned") + ")"


class BlockwiseFloat8(AbstractBlockwiseStorage):
    r"""Store optimizer moments in 8 bits per element as block-scaled 8-bit
    floats, with stochastic rounding: the fast 8-bit storage.

    Each moment leaf with at least `min_size` elements is cut into blocks of
    `block_size` consecutive elements; a block stores its largest magnitude
    (absmax, float32) and one byte per element, the element divided by absmax as
    an 8-bit float. The first moments `m1`, `m2` use `float8_e4m3fn`'s bit
    pattern (of `256 * value / absmax`: 3 mantissa bits, relative steps of
    6-12%, full resolution over 15 binades below the block's maximum, subnormals
    below); the second moment `nu` an unsigned float with 5 exponent and 3
    mantissa bits (31 binades, about 9 decades, like
    `eqx_ademamix.Blockwise8Bit`'s unsigned code book).

    Encoding and decoding are a dozen integer operations on float32 bit
    patterns, where `eqx_ademamix.Blockwise8Bit`'s dynamic tree code needs
    a chain of comparisons per element: the step is faster and the program
    compiles in a fraction of the time (see the benchmarks), at the price of a
    coarser code near each block's maximum. It is backend-agnostic (no float8
    hardware needed; the signed codes are `jnp.float8_e4m3fn` bit patterns).

    Writes round stochastically (up or down to a neighbouring code, with the
    probability that makes the expected stored value exact), so slow EMAs such
    as AdEMAMix's `m2` (`b3 = 0.9999`) stay unbiased; the random bits are a
    Weyl sequence over the element indices offset by a per-step hash, so no PRNG
    key lives in the state. The noise this adds to an EMA does not shrink as the
    EMA slows down: with noisy gradients it can exceed the EMA's own sampling
    noise (see the 8-bit guide).

    Memory: 1 byte per element plus 4 bytes per block, i.e. 3.05 bytes per
    parameter for AdEMAMix's three moments at `block_size=256`. Leaves with fewer
    than `min_size` elements and complex leaves are kept as plain arrays.

    Non-finite values: a block written a NaN or an infinity stores absmax NaN, so
    the whole block reads back as NaN (its codes are unspecified). A block of
    zeros stores absmax 0. A positive second moment never rounds to 0: below
    the smallest code it rounds up to it. Sharding: as
    `eqx_ademamix.Blockwise8Bit` (codes and absmax sharded along the block
    axis).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ademamix as eam

        opt = eam.AdEMAMix(learning_rate=1e-3, storage=eam.BlockwiseFloat8())
        params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)}
        state = opt.init(params)
        print(type(state.m2["w"]).__name__, state.m2["w"].codes.dtype)
        # BlockwiseFloat8Array uint8   ("b" is small, so it stays a float32 array)
        ```
    """

    block_size: int = eqx.field(static=True, default=256)
    min_size: int = eqx.field(static=True, default=4096)
    stochastic_rounding: bool = eqx.field(static=True, default=True)

    encoded_type: ClassVar[type[AbstractBlockwiseArray]] = BlockwiseFloat8Array
