"""Blockwise 8-bit storage of optimizer moments (Dettmers et al. 2021).

A moment leaf is cut into blocks of `block_size` consecutive elements (row-major
order, the last block zero-padded). Each block stores one float32 scale (absmax:
its largest magnitude, or a bound on it, see `AbstractBlockwiseArray.encode`),
and one byte per element: the index of the element's value divided by absmax in
a 256-entry *dynamic tree* code book. Reading multiplies the code book's value by
the block's absmax; writing divides by the new absmax and rounds to one of the
two neighbouring codes, at random with the
probabilities that make the expected value exact (stochastic rounding), so slow
EMAs keep every small increment on average.

The dynamic tree code book (Dettmers 2016; "8-bit Optimizers via Block-wise
Quantization", Dettmers, Lewis, Shleifer, Zettlemoyer 2021) reads a byte as
`[sign] 0...0 1 f...f`: after the optional sign bit, the number `E` of zeros
before the first one is a decimal exponent, and the `F` bits after it a linear
fraction. Its magnitude is

    10**-E * (0.1 + 0.9 * (k + 1) / 2**F),    k = the fraction bits, 0 <= k < 2**F,

so level `E` holds `2**F` evenly spaced values in `(10**-(E+1), 10**-E]`; the
all-zero magnitude is 0. (bitsandbytes puts the values in the middle of each
linear step; putting them at the step's top makes 1 and -1 exact, which a
blockwise scheme needs: the block's largest element is always +-1 after scaling,
and a code book without -1 would shrink every negative block maximum each step.)
With 7 magnitude bits (signed) the smallest non-zero magnitude is 1e-6, with 8
(unsigned, for the second moment) 1e-7. The magnitude grows with the code read as
an integer, so codes are ordered like their values and a value's two neighbours
are two consecutive integers; the signed byte 0b1000_0000 (negative zero) is
never written.
"""

import abc
import functools
import math
import warnings
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Float32, Inexact, Int, PyTree, Shaped, UInt8, UInt32

from ._storage import (
    AbstractEncodedArray,
    AbstractMomentStorage,
    hash_bits,
    LinearUpdate,
    zeros_from,
)
from ._tree import compute_dtype, real_dtype


def _magnitude_bits(signed: bool) -> int:
    return 7 if signed else 8


def _select(
    index: Int[Array, "*shape"], values: list[float], dtype: Any
) -> Float[Array, "*shape"]:
    """`values[index]` for a short list of constants, as a chain of selects (no
    table lookup: elementwise, so it fuses and shards like `index`)."""
    out = jnp.full(index.shape, values[0], dtype)
    for i, v in enumerate(values[1:], start=1):
        out = jnp.where(index == i, jnp.asarray(v, dtype), out)
    return out


def decode_magnitude(
    c: Int[Array, "*shape"], bits: int, dtype: Any = jnp.float32
) -> Float[Array, "*shape"]:
    """The magnitude a code `0 <= c < 2**bits` stands for, by arithmetic.

    With the leading one of `c` at bit `j` (so `E = bits - 1 - j` zeros before it
    and `F = j` fraction bits `k = c - 2**j` after it), the magnitude is
    `10**-E * (0.1 + 0.9 * (k + 1) / 2**j) = (2**j + 9 (k + 1)) * 2**-j * 10**-(E+1)`:
    an integer times one constant per `j` (a power of two times `10**-(E+1)` rounded
    to `dtype`), so one correctly rounded product on every backend; `c = 0` is 0.
    Arithmetic rather than a table lookup: it is as fast on CPU, fuses with its
    neighbours, and needs no gather, which sharded arrays (e.g. under explicit
    sharding) do not support everywhere."""
    j = 31 - lax.clz(jnp.maximum(c, 1))
    power = jnp.left_shift(jnp.ones_like(c), j)
    numerator = (power + 9 * (c - power + 1)).astype(dtype)
    factors = [
        float(np.ldexp(np.asarray(10.0 ** -(bits - i), dtype), -i)) for i in range(bits)
    ]
    value = numerator * _select(j, factors, dtype)
    return jnp.where(c > 0, value, jnp.zeros((), dtype))


@functools.cache
def magnitudes(signed: bool) -> np.ndarray:
    """The code book's magnitudes, indexed by the magnitude code (an integer of 7
    bits when `signed`, else 8), in float32 and strictly increasing."""
    bits = _magnitude_bits(signed)
    codes = np.arange(2**bits, dtype=np.int32)
    out = np.asarray(jax.jit(decode_magnitude, static_argnums=1)(codes, bits))
    out.setflags(write=False)
    return out


def code_book(signed: bool) -> np.ndarray:
    """The 256 values a byte stands for, indexed by the byte (float32).

    Unsigned: the magnitude of the 8-bit code. Signed: bit 7 is the sign and bits
    0-6 the magnitude code, so `book[128 + c] == -book[c]`; the byte 128 (negative
    zero) decodes to 0 and is never written.

    **Arguments:**

    - `signed`: the signed code book (for first moments) or the unsigned one (for
      the second moment, which is never negative).

    **Returns:** a NumPy float32 array of shape `(256,)`.
    """
    mags = magnitudes(signed)
    if not signed:
        return mags
    return np.concatenate([mags, -mags]) + np.float32(0)  # -0.0 -> 0.0


def lower_code_direct(m: Float[Array, "*shape"], bits: int) -> Int[Array, "*shape"]:
    """The largest magnitude code `c` with `magnitude(c) <= m`, for `m` in [0, 1], in
    O(1) per element: the decimal exponent from `bits` comparisons, the linear
    fraction by inverting its formula; no division, no table lookup.

    Round-off in the inversion can move the result by one code when `m` lies
    within about 1e-5 of a code step of a code's value; the caller's rounding then
    picks that (almost equal) code either way."""
    dtype = m.dtype
    top = 2**bits - 1
    # Level E holds (10**-(E+1), 10**-E]; E == bits means below every non-zero code.
    exponent = jnp.zeros(m.shape, jnp.int32)
    for e in range(1, bits + 1):
        boundary = (
            decode_magnitude(jnp.asarray(2 ** (bits - e) - 1), bits, dtype)
            if e < bits
            else jnp.asarray(10.0**-bits, dtype)
        )
        exponent = exponent + (m <= boundary).astype(jnp.int32)
    j = jnp.clip(bits - 1 - exponent, 0, bits - 1)
    power = jnp.left_shift(jnp.ones(m.shape, jnp.int32), j)
    # m = 10**-E * (0.1 + 0.9 * pos / 2**j): the value of fraction k is at pos = k+1.
    scaled = m * _select(exponent, [10.0**i for i in range(bits + 1)], dtype)
    pos = (scaled - jnp.asarray(0.1, dtype)) * jnp.asarray(1 / 0.9, dtype)
    k = jnp.floor(pos * power.astype(dtype)).astype(jnp.int32) - 1
    code = jnp.where(exponent >= bits, 0, power + k)
    return jnp.clip(code, 0, top)


def lower_code_search(m: Float[Array, "*shape"], bits: int) -> Int[Array, "*shape"]:
    """Exactly the largest code `c` with `magnitude(c) <= m`, by a binary search of
    the code book per element (`jnp.searchsorted`); for comparison."""
    table = decode_magnitude(jnp.arange(2**bits, dtype=jnp.int32), bits, m.dtype)
    code = jnp.searchsorted(table, m, side="right").astype(jnp.int32) - 1
    return jnp.clip(code, 0, 2**bits - 1)


def divide_by_scale(
    x: Float[Array, "blocks block_size"], d: Float[Array, " blocks"]
) -> Float[Array, "blocks block_size"]:
    """`x / d[:, None]` for `d >= 0` (0 where `d == 0`), exact in the exponent.

    Compilers turn the division into a multiplication by `1 / d`, which is a
    denormal, flushed to zero on many backends, once `d` exceeds ~1e38 (float32).
    Splitting `d = mantissa * 2**e` and scaling by two normal powers of two keeps
    every intermediate normal."""
    mantissa, e = jnp.frexp(jnp.where(d > 0, d, jnp.ones((), d.dtype)))
    half = e // 2
    one = jnp.ones((), d.dtype)
    first = jnp.ldexp(one, -half)
    second = jnp.ldexp(one, half - e) / mantissa
    return x * first[:, None] * second[:, None]


def block_absmax(
    blocks: Float[Array, "blocks block_size"],
) -> Float32[Array, " blocks"]:
    """Each block's largest magnitude as a float32 scale; NaN for a block holding
    a NaN or an infinity (or whose maximum overflows float32)."""
    # A maximum does not say whether a block holds a NaN: how a NaN propagates
    # through one differs between backends (XLA:CPU's fast reduction skips it).
    # The block's sum is NaN exactly then (or if it holds +inf and -inf, which
    # the maximum makes inf anyway). Two plain reductions are cheaper on CPU
    # than one over flagged values, which XLA writes out first.
    largest = jnp.max(jnp.abs(blocks), axis=1)
    total = jnp.sum(blocks, axis=1)
    return finite_scale(jnp.where(jnp.isnan(total), total, largest))


def finite_scale(bound: Float[Array, " blocks"]) -> Float32[Array, " blocks"]:
    """`bound` as a float32 scale, NaN where it is not finite (a marked block)."""
    bound = bound.astype(jnp.float32)
    return jnp.where(jnp.isfinite(bound), bound, jnp.float32(jnp.nan))


def tree_codes(
    blocks: Float[Array, "blocks block_size"],
    scale: Float32[Array, " blocks"],
    signed: bool,
    bits: UInt32[Array, "blocks block_size"] | None,
    search: bool = False,
) -> UInt8[Array, "blocks block_size"]:
    """The dynamic tree codes of `blocks` (one block per row) relative to the
    per-block `scale`, which must bound each block's magnitudes (larger values
    are stored as the scale). A NaN scale gives codes 0; a zero scale (a block
    of zeros) gives codes 0.

    - `signed`: use the signed code book; else negative values are stored as 0.
    - `bits`: 32 random bits per element for stochastic rounding, or `None` to
      round to the nearest code.
    - `search`: find the neighbouring codes by binary search (`jnp.searchsorted`)
      instead of the O(1) inversion of the code book (same result; for
      benchmarks).
    """
    dtype = blocks.dtype
    n_bits = _magnitude_bits(signed)
    top = 2**n_bits - 1
    finite = jnp.isfinite(scale)
    m = jnp.minimum(
        divide_by_scale(jnp.abs(blocks), jnp.where(finite, scale, 0).astype(dtype)), 1
    )
    if not signed:
        m = jnp.where(blocks > 0, m, 0)
    find = lower_code_search if search else lower_code_direct
    low = find(m, n_bits)
    high = jnp.minimum(low + 1, top)
    below = decode_magnitude(low, n_bits, dtype)
    gap = decode_magnitude(high, n_bits, dtype) - below
    # Round up with probability (m - below) / gap (stochastic), or past half a gap
    # (nearest); written without a division. If the inversion was one code off,
    # m - below is ~0 or ~gap and the right neighbour is still chosen.
    if bits is None:
        up = 2 * (m - below) > gap
    else:
        uniform = (bits >> 8).astype(dtype) * jnp.asarray(2.0**-24, dtype)
        up = uniform * gap < m - below
    code = jnp.where(up, high, low)
    if not signed:
        # A second moment is a denominator: a positive value stored as 0 would turn
        # the step of that element into m / eps. Below the smallest non-zero code,
        # positive values therefore round up to it (a step that is at most that
        # much smaller, never one that explodes).
        code = jnp.where(m > 0, jnp.maximum(code, 1), code)
    if signed:
        code = jnp.where((blocks < 0) & (code > 0), code + 128, code)
    code = jnp.where(finite[:, None], code, 0)
    return code.astype(jnp.uint8)


def quantize_blocks(
    blocks: Float[Array, "blocks block_size"],
    signed: bool,
    bits: UInt32[Array, "blocks block_size"] | None,
    search: bool = False,
) -> tuple[UInt8[Array, "blocks block_size"], Float32[Array, " blocks"]]:
    """Codes and absmax of `blocks` (one block per row): `tree_codes` with each
    block's own largest magnitude as its scale.

    **Returns:** `(codes, absmax)`. A block holding a NaN or an infinity gets
    absmax NaN (and codes 0): it reads back as all NaN instead of as finite numbers
    that hide the problem. A block of zeros gets absmax 0 and reads back as zeros.
    """
    absmax = block_absmax(blocks)
    return tree_codes(blocks, absmax, signed, bits, search), absmax


def dequantize_blocks(
    codes: UInt8[Array, "blocks block_size"],
    absmax: Float32[Array, " blocks"],
    signed: bool,
    dtype: Any = jnp.float32,
) -> Float[Array, "blocks block_size"]:
    """The values `code_book(signed)[codes] * absmax`, in `dtype`."""
    c = codes.astype(jnp.int32)
    if signed:
        magnitude = decode_magnitude(c & 127, 7, dtype)
        value = jnp.where(c >= 128, -magnitude, magnitude)
    else:
        value = decode_magnitude(c, 8, dtype)
    return value * absmax.astype(dtype)[:, None]


class AbstractBlockwiseArray(AbstractEncodedArray):
    """A moment leaf stored as blocks of 8-bit codes with one float32 scale per
    block (absmax, the block's largest magnitude; NaN marks a block that was
    written a NaN or an infinity). Reading, re-encoding, the spec, the
    description and the shardings are written here once; a final class declares
    its fields and its code: `quantize` (blocks to codes and absmax),
    `dequantize_codes` (back), `rounding_bits` and `code_name`."""

    codes: eqx.AbstractVar[UInt8[Array, "blocks block_size"]]
    absmax: eqx.AbstractVar[Float32[Array, " blocks"]]
    dtype: eqx.AbstractVar[Any]
    signed: eqx.AbstractVar[bool]
    stochastic_rounding: eqx.AbstractVar[bool]

    @abc.abstractmethod
    def quantize(
        self,
        blocks: Float[Array, "blocks block_size"],
        scale: Float32[Array, " blocks"],
        bits: UInt32[Array, "blocks block_size"] | None,
    ) -> UInt8[Array, "blocks block_size"]:
        """The codes of `blocks` (in `self.dtype`) relative to the per-block
        `scale`, which bounds their magnitudes (NaN: a marked block, any codes;
        0: a block of zeros); `bits` drive stochastic rounding (`None`: round to
        nearest)."""

    @abc.abstractmethod
    def dequantize_codes(self) -> Float[Array, "blocks block_size"]:
        """The values of `self.codes` times their block's absmax, in `self.dtype`."""

    @abc.abstractmethod
    def block_max(self) -> Float32[Array, " blocks"]:
        """The largest magnitude each block holds (its largest decoded value),
        from the codes alone; NaN for a marked block."""

    @abc.abstractmethod
    def rounding_bits(
        self, shape: tuple[int, ...], seed: UInt32[Array, ""]
    ) -> UInt32[Array, "..."]:
        """32 random bits per element of `shape` for this step's `seed`."""

    @classmethod
    @abc.abstractmethod
    def code_name(cls, signed: bool) -> str:
        """Words for the code, for specs and errors."""

    @property
    def block_size(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> Float[Array, "..."]:
        """The stored values, shaped like the moment, in `self.dtype`."""
        values = self.dequantize_codes()
        size = math.prod(self.shape)
        flat = values.reshape(-1)
        if flat.shape[0] != size:
            flat = flat[:size]
        return flat.reshape(self.shape)

    def decode(self) -> Float[Array, "..."]:
        return self.dequantize()

    def encode(
        self,
        value: Inexact[Array, "..."],
        seed: UInt32[Array, ""],
        update: LinearUpdate | None = None,
    ) -> "AbstractBlockwiseArray":
        """`value` in blocks of codes with one scale per block.

        Without `update`, each block's scale is its largest magnitude, a
        reduction over `value` that must finish before the first code can be
        written. With `update` (`value = decay * old + weight * x`), the scale is
        the bound `|decay| * block_max(old) + |weight| * max|x|` (`max|x|**2`
        if `update.squared`), from the old codes and `x` (the gradient, already
        in memory): the new values are then computed and encoded in one pass,
        fused with the kernel that uses them, instead of being written out,
        reduced and read back. The bound exceeds the block's largest new
        magnitude by at most twice the increment's block maximum
        (`2 |weight| max|x|`, or `max|x|**2`), and a block's first write
        (old = 0) is exact. Over many steps it drifts above the true maximum,
        because an element that rounds up to the top code makes `block_max(old)`
        the previous bound (measured in the 8-bit guide)."""
        blocks = to_blocks(value.astype(self.dtype), self.block_size)
        if update is None:
            scale = block_absmax(blocks)
        else:
            x = to_blocks(update.x.astype(self.dtype), self.block_size)
            bound = lax.mul(jnp.abs(update.decay).astype(jnp.float32), self.block_max())
            # The same reduction for every moment of the leaf: XLA computes it
            # once.
            increment = block_absmax(x)
            if update.squared:
                increment = lax.mul(increment, increment)
            if update.weight is not None:
                increment = lax.mul(
                    jnp.abs(update.weight).astype(jnp.float32), increment
                )
            scale = finite_scale(lax.add(bound, increment))
        bits = (
            self.rounding_bits(blocks.shape, seed) if self.stochastic_rounding else None
        )
        codes = self.quantize(blocks, scale, bits)
        return eqx.tree_at(lambda a: (a.codes, a.absmax), self, (codes, scale))

    @classmethod
    def static_spec(
        cls,
        shape: tuple[int, ...],
        dtype: Any,
        signed: bool,
        block_size: int,
        stochastic_rounding: bool,
    ) -> tuple:
        """The `moment_spec` of an array of this class with these static fields."""
        rounding = "" if stochastic_rounding else ", round-to-nearest"
        words = (
            f"{cls.code_name(signed)} in blocks of {block_size}{rounding} for shape "
            f"{tuple(shape)}"
        )
        return (
            cls.__name__,
            tuple(int(n) for n in shape),
            jnp.dtype(dtype).name,
            bool(signed),
            int(block_size),
            bool(stochastic_rounding),
            words,
        )

    def spec(self) -> tuple:
        return self.static_spec(
            self.shape,
            self.dtype,
            self.signed,
            self.block_size,
            self.stochastic_rounding,
        )

    def describe(self) -> str:
        return self.spec()[-1]

    def shardings(self, sharding: Any) -> "AbstractBlockwiseArray":
        # tree_at, not a constructor call: the arrays become shardings.
        return eqx.tree_at(
            lambda a: (a.codes, a.absmax),
            self,
            block_shardings(sharding, self.codes.shape[0]),
        )


class Blockwise8BitArray(AbstractBlockwiseArray):
    """One moment leaf stored in blockwise 8-bit form (see
    `eqx_ademamix.Blockwise8Bit`).

    - `codes`: one byte per element, `(blocks, block_size)`, row-major over the
      flattened moment, the last block zero-padded.
    - `absmax`: the scale of each block, float32, `(blocks,)`: its largest
      magnitude, or in the optimizer's update a bound on it (see
      `AbstractBlockwiseArray.encode`); NaN marks a block that was written a NaN
      or an infinity.
    - `shape`: the shape of the moment (static).
    - `dtype`: the dtype reads return (static): the moment's dtype, at least
      float32.
    - `signed`: whether the signed code book is used (static).
    - `stochastic_rounding`: whether writes round stochastically (static).
    """

    codes: UInt8[Array, "blocks block_size"]
    absmax: Float32[Array, " blocks"]
    shape: tuple[int, ...] = eqx.field(static=True)
    dtype: Any = eqx.field(static=True)
    signed: bool = eqx.field(static=True)
    stochastic_rounding: bool = eqx.field(static=True, default=True)

    def quantize(self, blocks, scale, bits):
        return tree_codes(blocks, scale, self.signed, bits)

    def dequantize_codes(self):
        return dequantize_blocks(self.codes, self.absmax, self.signed, self.dtype)

    def block_max(self):
        bits = _magnitude_bits(self.signed)
        # Codes are ordered like their magnitudes: the largest is one integer max.
        key = self.codes & np.uint8(127) if self.signed else self.codes
        top = jnp.max(key, axis=1).astype(jnp.int32)
        return decode_magnitude(top, bits, jnp.float32) * self.absmax

    def rounding_bits(self, shape, seed):
        return hash_bits(shape, seed)

    @classmethod
    def code_name(cls, signed: bool) -> str:
        return f"8-bit dynamic tree codes ({'signed' if signed else 'unsigned'})"


def block_shardings(sharding: Any, blocks: int) -> tuple[Any, Any]:
    """Shardings of `codes` `(blocks, block_size)` and `absmax` `(blocks,)` for a
    moment whose logical sharding is `sharding`.

    The blocks run over the flattened moment, so a moment sharded along its
    leading axis gives codes sharded along the block axis, each device holding the
    blocks of its own rows. A moment sharded along other axes has no such
    correspondence; its blocks are still sharded over the same mesh axes, so each
    device stores the same fraction of the state as of the parameter (XLA moves
    the data the update needs). A number of `blocks` those axes do not divide,
    and anything else, is replicated."""
    if not isinstance(sharding, NamedSharding):
        return sharding, sharding
    axes: list[str] = []
    for entry in sharding.spec:
        if entry is None:
            continue
        axes.extend((entry,) if isinstance(entry, str) else entry)
    if not axes or blocks % math.prod(sharding.mesh.shape[a] for a in axes):
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        return replicated, replicated
    entry = axes[0] if len(axes) == 1 else tuple(axes)
    return (
        NamedSharding(sharding.mesh, PartitionSpec(entry, None)),
        NamedSharding(sharding.mesh, PartitionSpec(entry)),
    )


def to_blocks(
    value: Shaped[Array, "..."], block_size: int
) -> Shaped[Array, "blocks block_size"]:
    """`value` flattened (row-major), zero-padded to whole blocks, one block a row."""
    flat = value.reshape(-1)
    pad = -flat.shape[0] % block_size
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad,), flat.dtype)])
    return flat.reshape(-1, block_size)


def zero_blocks(
    like: Inexact[Array, "..."], block_size: int
) -> tuple[UInt8[Array, "blocks block_size"], Float32[Array, " blocks"]]:
    """Zero codes `(blocks, block_size)` and zero scales `(blocks,)` for a moment
    of `like`'s shape, sharded like `like` (along the block axis, see
    `block_shardings`)."""
    blocks = -(-math.prod(like.shape) // block_size)
    if isinstance(like, jax.core.Tracer):
        # Under `jit`: zero codes computed from the parameter, so that they
        # follow its sharding (see `_storage.zeros_from`).
        zeros = to_blocks(zeros_from(like, jnp.float32), block_size)
        return zeros.astype(jnp.uint8), jnp.max(zeros, axis=1)
    codes = jnp.zeros((blocks, block_size), jnp.uint8)
    absmax = jnp.zeros((blocks,), jnp.float32)
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, NamedSharding):
        # Eagerly: the blocks of a sharded parameter, sharded alike.
        codes_sharding, absmax_sharding = block_shardings(sharding, blocks)
        codes = jax.device_put(codes, codes_sharding)
        absmax = jax.device_put(absmax, absmax_sharding)
    return codes, absmax


class AbstractBlockwiseStorage(AbstractMomentStorage):
    """A storage that keeps each moment leaf of at least `min_size` elements as
    blocks of `block_size` codes with one float32 scale per block, and smaller or
    complex leaves as plain arrays. Validation, the choice of leaves, `init`,
    `spec` and the warning for a configuration that quantizes nothing are
    written here once; a final storage declares the three fields and says which
    encoded array it builds (`encoded`) and its spec (`encoded_spec`)."""

    block_size: eqx.AbstractVar[int]
    min_size: eqx.AbstractVar[int]
    stochastic_rounding: eqx.AbstractVar[bool]

    def __check_init__(self):
        for name, low in (("block_size", 1), ("min_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"`{name}` must be an integer >= {low}, got {name}={value!r}."
                )
        if not isinstance(self.stochastic_rounding, bool):
            raise ValueError(
                "`stochastic_rounding` must be True or False, got "
                f"stochastic_rounding={self.stochastic_rounding!r}."
            )

    encoded_type: eqx.AbstractClassVar[type[AbstractBlockwiseArray]]

    def _quantizes(self, shape: tuple[int, ...], dtype: Any) -> bool:
        return math.prod(shape) >= max(self.min_size, 1) and not jnp.issubdtype(
            dtype, jnp.complexfloating
        )

    def init(
        self, like: Inexact[Array, "..."], dtype: Any, signed: bool
    ) -> AbstractEncodedArray | Inexact[Array, "..."]:
        shape = tuple(like.shape)
        if not self._quantizes(shape, like.dtype) or not self._quantizes(shape, dtype):
            return zeros_from(like, dtype)
        codes, absmax = zero_blocks(like, self.block_size)
        return self.encoded_type(
            codes=codes,
            absmax=absmax,
            shape=shape,
            dtype=compute_dtype(real_dtype(dtype)),
            signed=signed,
            stochastic_rounding=self.stochastic_rounding,
        )

    def spec(self, like: Any, dtype: Any, signed: bool) -> tuple:
        shape = tuple(like.shape)
        if not self._quantizes(shape, like.dtype) or not self._quantizes(shape, dtype):
            return ("array", tuple(int(n) for n in shape), jnp.dtype(dtype).name)
        return self.encoded_type.static_spec(
            shape,
            compute_dtype(real_dtype(dtype)),
            signed,
            self.block_size,
            self.stochastic_rounding,
        )

    def notice(self, shapes: list[tuple[int, ...]]) -> None:
        sizes = [math.prod(s) for s in shapes]
        if sizes and max(sizes) < max(self.min_size, 1):
            warnings.warn(
                f"{type(self).__name__}(min_size={self.min_size}) stores no moment "
                f"in 8 bits: the largest has {max(sizes)} elements. Pass "
                f"min_size={max(sizes)} (or less) to quantize it, or drop "
                "`storage=` (`quantized=`) for plain state.",
                UserWarning,
                stacklevel=4,
            )


class Blockwise8Bit(AbstractBlockwiseStorage):
    r"""Store optimizer moments in 8 bits per element: blockwise dynamic (tree)
    quantization with stochastic rounding.

    Each moment leaf with at least `min_size` elements is cut into blocks of
    `block_size` consecutive elements; a block stores a float32 scale (absmax:
    its largest magnitude, or in the optimizer's update the bound
    `|decay| * (largest old magnitude) + |weight| * max|x|`, which lets the step
    encode in one pass) and one byte per element, the element divided by the
    scale rounded to a 256-entry *dynamic tree* code book: a decimal exponent
    (the number of leading zero bits) and a linear fraction (the remaining
    bits), so that the code book spans seven decades with a relative resolution
    of about 1.4%-14% within each. The first moments `m1`, `m2` use the signed
    code book, the second moment `nu` the unsigned one (one more bit of
    resolution). The scheme is that of Dettmers, Lewis, Shleifer, Zettlemoyer,
    *8-bit Optimizers via Block-wise Quantization*, ICLR 2022 ([arXiv:2110.02861](https://arxiv.org/abs/2110.02861)),
    which bitsandbytes applies to AdEMAMix.

    Each step dequantizes to float32, updates, and re-quantizes. Re-quantizing to
    the nearest code, as bitsandbytes does, loses every increment smaller than half
    a code step, and AdEMAMix's slow EMA (`b3 = 0.9999`) moves by 1e-4 of the
    gradient per step: it would stall far from its value. Here each element is
    rounded to one of its two neighbouring codes at random, with the probability
    that makes the expected stored value exact (stochastic rounding), so all three
    EMAs stay unbiased. The random bits are a counter-based hash of the element's
    index and a per-step seed: no PRNG key in the state, identical on every replica.
    A rounded value never changes sign.

    Memory: 1 byte per element plus 4 bytes per block, i.e. 3.05 bytes per
    parameter for AdEMAMix's three moments at `block_size=256`, against 12 bytes in
    float32. Leaves with fewer than `min_size` elements (biases, norms) and complex
    leaves are kept as plain arrays (in `mu_dtype`, as without quantization).

    Non-finite values: a block written a NaN or an infinity stores absmax NaN, so the
    whole block reads back as NaN (the same failure as float32 state, widened to
    the block) instead of as finite numbers that hide it. Finite inputs never
    produce a NaN: a block of zeros stores absmax 0. A positive second moment never
    rounds to 0 (its step would be `m / eps`): below the smallest code it rounds up.

    Sharding: the codes are laid out as `(blocks, block_size)` over the flattened
    leaf, so a leaf sharded along its leading axis gives codes sharded along the
    block axis, and each device quantizes its own blocks. Under explicit sharding
    (`jax.sharding.AxisType.Explicit`) JAX only accepts this when each shard holds
    whole blocks (the leaf's size is a multiple of `block_size` times the number of
    shards); raise `min_size` to keep other leaves in full precision.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_ademamix as eam

        opt = eam.AdEMAMix(learning_rate=1e-3, quantized=eam.Blockwise8Bit())
        params = {"w": jnp.zeros((256, 256)), "b": jnp.zeros(256)}
        state = opt.init(params)
        print(type(state.m2["w"]).__name__, state.m2["w"].codes.dtype)
        # Blockwise8BitArray uint8   ("b" is small, so it stays a float32 array)
        ```
    """

    block_size: int = eqx.field(static=True, default=256)
    min_size: int = eqx.field(static=True, default=4096)
    stochastic_rounding: bool = eqx.field(static=True, default=True)

    encoded_type: ClassVar[type[AbstractBlockwiseArray]] = Blockwise8BitArray


def state_bytes(state: PyTree) -> int:
    """The number of bytes of all arrays in `state` (e.g. an optimizer state)."""
    return sum(
        x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if eqx.is_array(x)
    )
