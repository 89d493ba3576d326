"""Block-scaled 8-bit floats: optimizer moments as one byte per element, encoded
by a handful of integer operations on float32 bit patterns and decoded through
float16.

A moment leaf is cut into blocks of `block_size` consecutive elements (row-major,
the last block zero-padded), as for `eqx_ademamix.Blockwise8Bit`. A block stores
one float32 scale that bounds its magnitudes and, per element, the value divided
by the scale, `m` in [-1, 1], as an 8-bit float:

- first moments (signed): the magnitude as `float8_e4m3fn`'s 7 magnitude bits
  of `256 * |m|` (4 exponent bits, 3 mantissa bits, subnormals; 15 binades from
  `2**-14` to 1 at full resolution, relative steps of 6-12%, then subnormals in
  steps of `2**-17`), shifted up by one, with the sign in bit 0. The byte's
  integer order is then the magnitude's, so a block's largest magnitude is one
  integer maximum over its bytes;
- the second moment (never negative): an unsigned float with 5 exponent bits
  and 3 mantissa bits ("e5m3"), 1.0 at exponent 30: 30 binades from `2**-29`
  to 1, then subnormals in steps of `2**-32`.

Both are float16 bit patterns cut short: the 7 or 8 magnitude bits are bits
7-13 or 7-14 of the float16 of `m` (signed) or of `2**15 * m` (unsigned), whose
low mantissa bits are zero. Decoding widens the byte to 16 bits, shifts it into
place and converts float16 to float32, which CPUs (F16C), GPUs and TPUs do in
hardware, subnormals included. Encoding keeps the exponent and the top mantissa
bits of `m`'s float32 word; stochastic rounding adds random bits below the kept
mantissa bits before the shift (as for bfloat16 in `_storage.stochastic_round`);
subnormals go through the same path after adding the smallest normal,
`2**emin`, whose float32 mantissa grid at the kept bits is exactly the subnormal
grid. No comparisons against code books, no table lookups: a write is about a
dozen elementwise operations, and on GPUs the step is memory-bound like a
float32 step.
"""

from typing import Any, ClassVar

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Float32, UInt8, UInt16, UInt32

from ._quantize import (
    AbstractBlockwiseArray,
    AbstractBlockwiseStorage,
    block_absmax,
    divide_by_scale,
)
from ._storage import index_bits


def float8_format(signed: bool) -> tuple[int, int, int]:
    """`(exponent bits, mantissa bits, exponent of 1.0)` of the magnitude code:
    e4m3 with 1.0 at exponent 15 for signed moments (the byte's bit 0 is the
    sign), e5m3 with 1.0 at exponent 30 for the second moment."""
    return (4, 3, 15) if signed else (5, 3, 30)


def _constants(man_bits: int, top: int) -> tuple[int, int, float]:
    # shift: float32 mantissa bits dropped; offset: float32 exponent bias minus
    # the code's, in code units; tiny: the code's smallest normal, 2**emin.
    shift = 23 - man_bits
    offset = (127 - top) << man_bits
    tiny = 2.0 ** (1 - top)
    return shift, offset, tiny


def encode_magnitude(
    m: Float32[Array, "*shape"],
    signed: bool,
    bits: UInt32[Array, "*shape"] | None,
) -> UInt32[Array, "*shape"]:
    """The magnitude code of `m` in [0, 1] (float32) in the format of
    `float8_format(signed)`.

    `bits`: 32 random bits per element for stochastic rounding (up with the
    probability that makes the expected value exact), or `None` to round to
    nearest (ties up)."""
    _, man_bits, top = float8_format(signed)
    shift, offset, tiny = _constants(man_bits, top)
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


def float16_bits(
    codes: UInt8[Array, "*shape"], signed: bool
) -> UInt16[Array, "*shape"]:
    """The float16 bit patterns the bytes stand for: `m` (signed, the sign from
    bit 0) or `2**15 * m` (unsigned)."""
    h = codes.astype(jnp.uint16)
    if not signed:
        return lax.shift_left(h, np.uint16(7))
    sign = lax.shift_left(lax.bitwise_and(h, np.uint16(1)), np.uint16(15))
    magnitude = lax.shift_left(lax.bitwise_and(h, np.uint16(0xFE)), np.uint16(6))
    return lax.bitwise_or(sign, magnitude)


def decode_float8(
    codes: UInt8[Array, "*shape"], signed: bool
) -> Float32[Array, "*shape"]:
    """The values in [-1, 1] the bytes stand for, in float32 (exact)."""
    value = lax.bitcast_convert_type(float16_bits(codes, signed), jnp.float16)
    value = value.astype(jnp.float32)
    if not signed:
        value = lax.mul(value, np.float32(2.0**-15))
    return value


def float8_codes(
    blocks: Float[Array, "blocks block_size"],
    scale: Float32[Array, " blocks"],
    signed: bool,
    bits: UInt32[Array, "blocks block_size"] | None,
) -> UInt8[Array, "blocks block_size"]:
    """The codes of `blocks` (one block per row) relative to the per-block
    `scale`, which must bound each block's magnitudes (larger values are stored
    as the scale). The codes of a block whose scale is NaN are unspecified; a
    zero scale gives zeros. In the unsigned code, negative values are stored as
    0 and positive ones never round to 0 (below the smallest code they round up
    to it: a second moment is a denominator)."""
    blocks = blocks.astype(jnp.float32)
    magnitude = jnp.abs(blocks)
    finite = jnp.isfinite(scale)
    m = jnp.minimum(
        divide_by_scale(magnitude, jnp.where(finite, scale, 0)), np.float32(1)
    )
    code = encode_magnitude(m, signed, bits)
    if signed:
        sign = lax.shift_right_logical(
            lax.bitcast_convert_type(blocks, jnp.uint32), np.uint32(31)
        )
        code = lax.bitwise_or(lax.shift_left(code, np.uint32(1)), sign)
    else:
        positive = lax.gt(blocks, jnp.zeros((), jnp.float32))
        code = lax.select(positive, lax.max(code, lax.full_like(code, 1)), code * 0)
    return code.astype(jnp.uint8)


def quantize_float8(
    blocks: Float[Array, "blocks block_size"],
    signed: bool,
    bits: UInt32[Array, "blocks block_size"] | None,
) -> tuple[UInt8[Array, "blocks block_size"], Float32[Array, " blocks"]]:
    """Codes and absmax of `blocks` (one block per row): `float8_codes` with each
    block's own largest magnitude as its scale.

    **Returns:** `(codes, absmax)`. A block holding a NaN or an infinity gets
    absmax NaN (its codes are unspecified): it reads back as all NaN. A block of
    zeros gets absmax 0 and reads back as zeros."""
    absmax = block_absmax(blocks)
    return float8_codes(blocks, absmax, signed, bits), absmax


def dequantize_float8(
    codes: UInt8[Array, "blocks block_size"],
    absmax: Float32[Array, " blocks"],
    signed: bool,
) -> Float32[Array, "blocks block_size"]:
    """The values the codes stand for, times their block's scale (float32)."""
    return lax.mul(decode_float8(codes, signed), absmax[:, None])


class BlockwiseFloat8Array(AbstractBlockwiseArray):
    """One moment leaf stored as block-scaled 8-bit floats (see
    `eqx_ademamix.BlockwiseFloat8`).

    - `codes`: one byte per element, `(blocks, block_size)`, row-major over the
      flattened moment, the last block zero-padded. Signed moments: the
      `float8_e4m3fn` bit pattern of `256 * value / absmax`; the second moment:
      an unsigned e5m3 float of `value / absmax`.
    - `absmax`: the scale of each block, float32, `(blocks,)`: a bound on its
      magnitudes (see `eqx_ademamix.BlockwiseFloat8`); NaN marks a block that
      was written a NaN or an infinity.
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

    def quantize(self, blocks, scale, bits):
        return float8_codes(blocks, scale, self.signed, bits)

    def dequantize_codes(self):
        values = dequantize_float8(self.codes, self.absmax, self.signed)
        return values.astype(self.dtype)

    def block_max(self):
        # The byte's integer order is the magnitude's (the sign is bit 0).
        top = jnp.max(self.codes, axis=1)
        if self.signed:
            top = lax.bitwise_and(top, np.uint8(0xFE))
        return lax.mul(decode_float8(top, self.signed), self.absmax)

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
    `block_size` consecutive elements; a block stores one float32 scale and one
    byte per element, the element divided by the scale as an 8-bit float. The
    first moments `m1`, `m2` use `float8_e4m3fn`'s magnitude bits (of
    `256 * value / scale`: 3 mantissa bits, relative steps of 6-12%, full
    resolution over 15 binades below the scale, subnormals below) with the sign
    in bit 0; the second moment `nu` an unsigned float with 5 exponent and 3
    mantissa bits (30 binades, about 9 decades, like
    `eqx_ademamix.Blockwise8Bit`'s unsigned code book).

    The scale of a block is a bound on its magnitudes. In the optimizer's
    update, where each moment is `decay * old + weight * x`, it is
    `|decay| * (largest old magnitude) + |weight| * max|x|`: known before the
    new values are computed, so the step computes, encodes and uses them in one
    pass over memory instead of writing them out, finding each block's maximum
    and reading them back. A block's first write is exact; over many steps the
    scale drifts above the block's maximum (an element rounded up to the top
    code pins the next bound; 1.3-2.7x in the 8-bit guide's measurement), which
    costs range at the bottom of the block and adds rounding noise. A write
    with no such update (e.g. `eqx_ademamix.state_from_adam`) uses each block's
    largest magnitude.

    Encoding is a dozen integer operations on float32 bit patterns and decoding
    a shift into a float16 and a conversion (hardware on CPUs with F16C, GPUs
    and TPUs), where `eqx_ademamix.Blockwise8Bit`'s dynamic tree code needs
    a chain of comparisons per element: the step is several times faster and the
    program compiles in a fraction of the time (see the benchmarks), at the
    price of a coarser code near each block's maximum. It is backend-agnostic
    (no float8 hardware needed).

    Writes round stochastically (up or down to a neighbouring code, with the
    probability that makes the expected stored value exact), so slow EMAs such
    as AdEMAMix's `m2` (`b3 = 0.9999`) stay unbiased; the random bits are a
    Weyl sequence over the element indices offset by a per-step hash, so no PRNG
    key lives in the state. The noise this adds to an EMA does not shrink as the
    EMA slows down: with noisy gradients it can exceed the EMA's own sampling
    noise (see the 8-bit guide). As in bitsandbytes, a step's direction uses the
    new moments before they are rounded.

    Memory: 1 byte per element plus 4 bytes per block, i.e. 3.05 bytes per
    parameter for AdEMAMix's three moments at `block_size=256`. Leaves with fewer
    than `min_size` elements and complex leaves are kept as plain arrays.

    Non-finite values: a block written a NaN or an infinity stores scale NaN, so
    the whole block reads back as NaN (its codes are unspecified). A block of
    zeros stores scale 0. A positive second moment never rounds to 0: below
    the smallest code it rounds up to it. Sharding: as
    `eqx_ademamix.Blockwise8Bit` (codes and scales sharded along the block
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
