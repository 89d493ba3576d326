"""How optimizer moments are stored: the storage *strategy* (an
`AbstractMomentStorage`, chosen by the user) decides at `init` how each moment is
encoded; the stored value then describes itself. It is either a plain array (read
by casting to at least float32, written by casting back) or an
`AbstractEncodedArray` (for example 8-bit blocks) that decodes, re-encodes,
describes and shards itself. So the update rule, the layouts, sharding, checkpoints
and state conversions handle every storage through the four functions
`read_moment`, `write_moment`, `moment_spec` and `moment_shardings` below, and a new
encoding is one new class, nothing else.

Reduced-precision writes use stochastic rounding. With round-to-nearest, a
bfloat16 EMA with decay 0.9999 stops moving once it is about 40x larger than its
per-step increment (1 - b3) * g, because every increment is rounded away; rounding
up or down at random, with the probability that makes the expected value exact,
keeps the EMA unbiased. The random bits are counter-based: a hash of the step
and the moment (one scalar per step) offsets a Weyl sequence over the element
indices. So no PRNG key lives in the state, every replica of a replicated parameter
draws the same bits, and the cost is two integer operations per element and
dimension on any backend.
"""

import abc
import functools
import inspect
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Inexact, PyTree, UInt32

from ._tree import abs_sq, compute_dtype, ema


# NumPy, not JAX, constants: importing the package must not start JAX's backend
# (that would break `jax.distributed.initialize()` or `jax_num_cpu_devices` set
# after the import).
_M1 = np.uint32(0x85EBCA6B)
_M2 = np.uint32(0xC2B2AE35)
_GOLDEN = np.uint32(0x9E3779B9)


def _fmix32(h: UInt32[Array, "*shape"]) -> UInt32[Array, "*shape"]:
    """MurmurHash3's 32-bit finaliser: a bijection that mixes every input bit."""
    h = h ^ (h >> 16)
    h = h * _M1
    h = h ^ (h >> 13)
    h = h * _M2
    return h ^ (h >> 16)


def mix_seed(*words: Any) -> UInt32[Array, ""]:
    """Hash integers (Python ints or integer scalars) into one uint32 seed.

    The words are combined as `(w0 * G + w1) * G + ...` (G the golden-ratio odd
    constant), which keeps small words (a step, a moment, a leaf index) apart, and
    the combination is hashed once: the seed is computed at every step, and XLA
    repeats its scalar code in the kernel of every leaf that uses it."""
    h = None
    for word in words:
        word = jnp.asarray(word).astype(jnp.uint32)
        h = word if h is None else h * _GOLDEN + word
    return _fmix32(jnp.zeros((), jnp.uint32) if h is None else h)


def index_bits(
    shape: tuple[int, ...], seed: UInt32[Array, ""], out_sharding: Any = None
) -> UInt32[Array, "..."]:
    """`flat_index * 0x9E3779B9 + seed` (mod 2**32) for every element of `shape`:
    a Weyl sequence over the elements, offset by `seed`.

    For a fixed element, a seed that is a fresh uniform hash of the step makes the
    word uniform and independent from step to step, which is all that unbiased
    stochastic rounding of an EMA needs; within a step, the golden-ratio stride
    spreads the words of neighbouring elements evenly over [0, 2**32) (a
    low-discrepancy sequence). It costs one integer multiply-add per dimension.

    The flat index is the *global* one, assembled from one iota per dimension (no
    reshape), so a sharded array draws the same bits as an unsharded one and each
    device computes only its own shard. `out_sharding` (the sharding of the array
    the bits are for, e.g. `jax.typeof(x).sharding`) is needed on meshes with
    explicit axes, where an iota without it would be replicated: every device
    would then hash the full array.
    """
    # lax, not jnp operators: this runs for every 16-bit moment leaf at trace time.
    kwargs = {} if out_sharding is None else {"out_sharding": out_sharding}
    words = None
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = lax.broadcasted_iota(jnp.uint32, shape, axis, **kwargs)
        term = lax.mul(iota, np.uint32((stride * int(_GOLDEN)) % 2**32))
        words = term if words is None else lax.add(words, term)
        stride *= shape[axis]
    if words is None:
        words = jnp.zeros(shape, jnp.uint32)
    return lax.add(words, seed)


def hash_bits(
    shape: tuple[int, ...], seed: UInt32[Array, ""], out_sharding: Any = None
) -> UInt32[Array, "..."]:
    """32 pseudo-random bits per element of `shape`: `index_bits` put through
    MurmurHash3's finaliser, so that every output bit depends on every bit of the
    element index and the seed (the words of neighbouring elements are then
    unrelated, not just evenly spread). Used where a few integer operations per
    element do not matter next to the rest of the work (8-bit block storage)."""
    return _fmix32(index_bits(shape, seed, out_sharding))


def sharding_of(x: Array) -> Any:
    """The sharding in `x`'s type (`None` on JAX versions without `jax.typeof`)."""
    typeof = getattr(jax, "typeof", None)
    return None if typeof is None else typeof(x).sharding


def needs_stochastic_rounding(dtype: Any) -> bool:
    """Whether a moment stored in `dtype` loses EMA increments to round-to-nearest.

    True for 16-bit and narrower floats: their 7-10 mantissa bits cannot hold an
    increment of 1e-4 relative to the EMA. float32 and wider round to nearest.
    """
    dtype = jnp.dtype(dtype)
    return jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize <= 2


def stochastic_round(
    x: Inexact[Array, "*shape"], dtype: Any, bits: UInt32[Array, "*shape"]
) -> Inexact[Array, "*shape"]:
    """Round `x` to `dtype`, up or down at random with the probabilities that make
    the result's expectation equal to `x`.

    **Arguments:**

    - `x`: real values, in float32 or wider.
    - `dtype`: the narrower floating dtype to round to.
    - `bits`: uniformly random 32-bit words, one per element of `x`.

    **Returns:** `x` in `dtype`. Non-finite values and values that are exactly
    representable pass through unchanged.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        # bfloat16 is float32 with the low 16 mantissa bits cut off. Adding 16 random
        # bits to those and keeping the high 16 rounds up with probability equal to
        # the fraction that is cut off. Sign and magnitude are separate in IEEE 754,
        # so this rounds magnitudes and is symmetric. Infinities have zero low bits
        # and stay put; NaNs are passed explicitly (a carry could turn a NaN's
        # payload into an infinity, or wrap around). `x != x` is one compare, where
        # `isfinite` cost a third of a bf16 moment write on CPU. The final convert
        # is exact (the low bits are zero) and is kept on purpose: with a pure
        # integer version (a bitcast of the high half) XLA judges the rounding
        # cheap enough to recompute inside the kernel that reads the new moment,
        # from the old one, and must then copy every donated moment first.
        x = x.astype(jnp.float32)
        word = lax.bitcast_convert_type(x, jnp.uint32)
        noise = lax.shift_right_logical(bits, np.uint32(16))
        rounded = lax.bitwise_and(lax.add(word, noise), np.uint32(0xFFFF0000))
        rounded = lax.bitcast_convert_type(rounded, jnp.float32)
        rounded = lax.select(lax.ne(x, x), x, rounded)
        return lax.convert_element_type(rounded, dtype)
    # Any other narrow dtype: pick between the two neighbours of x.
    nearest = x.astype(dtype)
    near = nearest.astype(x.dtype)
    toward = jnp.where(x > near, jnp.inf, -jnp.inf).astype(dtype)
    other = jnp.nextafter(nearest, toward)
    gap = other.astype(x.dtype) - near
    p_other = jnp.where(gap != 0, (x - near) / jnp.where(gap != 0, gap, 1), 0)
    uniform = (bits >> 8).astype(x.dtype) * jnp.asarray(2.0**-24, x.dtype)
    take_other = (uniform < p_other) & jnp.isfinite(x) & jnp.isfinite(other)
    return jnp.where(take_other, other, nearest)


class LinearUpdate(NamedTuple):
    """A moment's new value as a linear function of its old one,
    `decay * old + weight * x` elementwise, or `decay * old + weight * |x|**2`
    when `squared` (`weight=None` means 1), with `decay` and `weight` scalars:
    the form of every EMA and momentum here.

    The update rule computes the new value with `new()` and hands the update to
    the storage with it. An encoding that needs a bound on the new values can
    then take it from the old state and `x` instead of from the new values: for
    blockwise codes, `|decay| * max|old| + |weight| * max|x|` (squared, if
    `squared`) per block. That bound needs no pass over the new values before
    they are encoded, so the whole write is one pass over the data, and all
    moments of a leaf share one reduction over `x` (the gradient).
    """

    old: Inexact[Array, "*shape"]
    decay: Inexact[Array, ""]
    weight: Inexact[Array, ""] | None
    x: Inexact[Array, "*shape"]
    squared: bool = False

    def new(self) -> Inexact[Array, "*shape"]:
        """`decay * old + weight * x` (or `* |x|**2`), in `x`'s (real) dtype."""
        term = abs_sq(self.x) if self.squared else self.x
        if self.weight is None:
            return lax.add(lax.mul(self.decay, self.old.astype(term.dtype)), term)
        return ema(term, self.old, None, coefficients=(self.decay, self.weight))


class AbstractEncodedArray(eqx.Module):
    """A moment stored in an encoding other than a plain array (e.g.
    `eqx_ademamix.Blockwise8BitArray`).

    It knows the logical shape of the moment it holds, decodes itself to compute
    precision, re-encodes a new value into its own representation (same type,
    shapes and dtypes, so the state can be a `lax.scan` carry), describes itself
    for error messages and checkpoints, and derives the shardings of its arrays
    from the sharding of the logical moment."""

    shape: eqx.AbstractVar[tuple[int, ...]]  # the shape of the moment it encodes

    @abc.abstractmethod
    def decode(self) -> Inexact[Array, "..."]:
        """The stored moment, shaped like it, in at least float32."""

    @abc.abstractmethod
    def encode(
        self,
        value: Inexact[Array, "..."],
        seed: UInt32[Array, ""],
        update: LinearUpdate | None = None,
    ) -> "AbstractEncodedArray":
        """`value` in this representation; `seed` drives stochastic rounding.
        `update`, if given, says how `value` was computed from the values this
        array holds (`value == update.new()`); an encoding may use it, e.g. to
        bound `value` without reading it first."""

    @abc.abstractmethod
    def spec(self) -> tuple:
        """A hashable description: equal for interchangeable representations."""

    @abc.abstractmethod
    def describe(self) -> str:
        """A short human-readable description, e.g. for mismatch errors."""

    @abc.abstractmethod
    def shardings(self, sharding: Any) -> "AbstractEncodedArray":
        """This object with every array replaced by its sharding, given the
        `sharding` of the logical moment (a `jax.sharding.Sharding`)."""


def read_moment(stored: Any) -> Inexact[Array, "..."]:
    """A stored moment as an array in at least float32."""
    if isinstance(stored, AbstractEncodedArray):
        return stored.decode()
    return stored.astype(compute_dtype(stored.dtype))


def write_moment(
    stored: Any,
    value: Inexact[Array, "..."],
    seed: UInt32[Array, ""],
    update: LinearUpdate | None = None,
) -> Any:
    """`value` stored in the representation of `stored`: encoded arrays re-encode
    (told how `value` came from `stored` if `update` is given); plain arrays of
    16-bit floats round stochastically (unbiased), wider ones round to nearest."""
    if isinstance(stored, AbstractEncodedArray):
        return stored.encode(value, seed, update)
    if needs_stochastic_rounding(stored.dtype) and jnp.isrealobj(value):
        # The Weyl words, not the full hash: at a bandwidth of ~100 GB/s on
        # two CPU cores the finaliser's five integer operations per element
        # cost 15-20% of a bfloat16 step, and the rounding needs per-element
        # independence across steps (a fresh seed per step), not across
        # elements.
        bits = index_bits(value.shape, seed, sharding_of(value))
        return stochastic_round(value, stored.dtype, bits)
    return value.astype(stored.dtype)


def moment_for_direction(
    stored: Any, value: Inexact[Array, "..."]
) -> Inexact[Array, "..."]:
    """The new moment a step's direction uses, given the new `stored` moment and
    the `value` it was written from.

    A plain array: its stored (rounded) value, read from the buffer just written,
    so a donated moment is updated in place. An encoded array: `value`, before
    encoding, as bitsandbytes does: decoding the new codes would make XLA
    recompute the whole encoding inside the kernel of the update."""
    if isinstance(stored, AbstractEncodedArray):
        return value
    return read_moment(stored)


@functools.cache
def takes_update(write: Any) -> bool:
    """Whether a storage's `write` method takes the `update` argument (storages
    written before it existed take `(stored, value, seed)`)."""
    return "update" in inspect.signature(write).parameters


def moment_shape(stored: Any) -> tuple[int, ...]:
    """The logical shape of a stored moment."""
    return tuple(stored.shape)


def moment_spec(stored: Any) -> tuple:
    """A hashable description of how a moment is stored (encoding, shape, dtype)."""
    if isinstance(stored, AbstractEncodedArray):
        return stored.spec()
    return ("array", tuple(int(n) for n in stored.shape), jnp.dtype(stored.dtype).name)


def describe_spec(spec: tuple) -> str:
    """`moment_spec`'s tuple as words, for errors."""
    if spec[0] == "array":
        return f"a {spec[2]} array of shape {spec[1]}"
    return spec[-1]


def moment_shardings(stored: Any, sharding: Any) -> Any:
    """The shardings of the arrays of a stored moment, given the sharding of the
    logical moment."""
    if isinstance(stored, AbstractEncodedArray):
        return stored.shardings(sharding)
    return sharding


def zeros_from(like: Inexact[Array, "..."], dtype: Any) -> Inexact[Array, "..."]:
    """Zeros of `like`'s shape in `dtype`, with `like`'s sharding."""
    if not isinstance(like, jax.core.Tracer):
        # Eagerly, `zeros_like` takes a concrete array's sharding and allocates
        # just the result (the formula below would allocate temporaries).
        return jnp.zeros_like(like, dtype)
    # Under `jit`, zeros computed *from* the parameter, so that they take its
    # sharding on meshes with explicit or automatic axes (a plain `zeros_like`
    # is a constant to XLA's sharding propagation, and comes out replicated on
    # automatic meshes). `|x| * 0` is +0.0 for finite x. XLA fuses this into
    # the kernel that writes the zeros: no temporaries.
    zeros = jnp.where(jnp.isfinite(like), jnp.abs(like) * 0, 0)
    return zeros.astype(dtype)


class AbstractMomentStorage(eqx.Module):
    """How an optimizer stores its moments (the first moments `m1`, `m2`, or the
    second moment `nu`): a strategy that picks, at `init`, the representation of
    each moment leaf.

    The representation then describes itself (a plain array, or an
    `eqx_ademamix.AbstractEncodedArray`), so the update rule reads each leaf
    into at least float32 with `read`, computes the new moment, and stores it back
    with `write`; the representation's type, shape and dtype never change, so the
    state can be a `lax.scan` carry. Subclasses implement `init` and `spec`.
    """

    @abc.abstractmethod
    def init(self, like: Inexact[Array, "..."], dtype: Any, signed: bool) -> PyTree:
        """Zeros stored for a moment of `like`'s shape whose values have `dtype`
        (with `like`'s sharding). `signed` is False for the second moment, whose
        values are never negative."""

    @abc.abstractmethod
    def spec(self, like: Any, dtype: Any, signed: bool) -> tuple:
        """`moment_spec` of what `init(like, dtype, signed)` stores, computed from
        `like`'s shape and dtype without building it (the update rule checks every
        state leaf against it)."""

    def notice(self, shapes: list[tuple[int, ...]]) -> None:
        """Called by `init` with the shapes of all moment units: a storage may warn
        about a configuration that does nothing (default: nothing)."""
        del shapes

    def read(self, stored: PyTree) -> Inexact[Array, "..."]:
        """The stored moment as an array in at least float32."""
        return read_moment(stored)

    def write(
        self,
        stored: PyTree,
        value: Inexact[Array, "..."],
        seed: UInt32[Array, ""],
        update: LinearUpdate | None = None,
    ) -> PyTree:
        """Store `value` in the representation of `stored`; `seed` drives rounding;
        `update` (optional) is how `value` was computed from `stored`'s values."""
        return write_moment(stored, value, seed, update)

    def shape(self, stored: PyTree) -> tuple[int, ...]:
        """The shape of the moment that `stored` represents."""
        return moment_shape(stored)


class CastStorage(AbstractMomentStorage):
    """Store each moment as a plain array of a floating dtype (the optimizer's
    `mu_dtype` for first moments, the parameter's real dtype for the second).

    float32 and wider round to nearest. 16-bit and narrower floats (bfloat16,
    float16) use stochastic rounding, so that slow EMAs stay unbiased; the
    update direction is then computed from the stored (rounded) values, so the
    stored value and the one used are the same (and XLA updates a donated
    moment in place: the kernel that uses it reads the buffer it wrote).

    `stochastic_rounding=False` rounds 16-bit moments to nearest instead: a
    reference point for benchmarks, not for training (a bfloat16 EMA with decay
    0.9999 then stalls far below its value).
    """

    stochastic_rounding: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        if not isinstance(self.stochastic_rounding, bool):
            raise TypeError(
                "`stochastic_rounding` must be True or False, got "
                f"stochastic_rounding={self.stochastic_rounding!r}."
            )

    def init(self, like: Inexact[Array, "..."], dtype: Any, signed: bool) -> Array:
        del signed
        return zeros_from(like, dtype)

    def spec(self, like: Any, dtype: Any, signed: bool) -> tuple:
        del signed
        return ("array", tuple(int(n) for n in like.shape), jnp.dtype(dtype).name)

    def write(
        self,
        stored: PyTree,
        value: Inexact[Array, "..."],
        seed: UInt32[Array, ""],
        update: LinearUpdate | None = None,
    ) -> PyTree:
        if self.stochastic_rounding or isinstance(stored, AbstractEncodedArray):
            return write_moment(stored, value, seed, update)
        return value.astype(stored.dtype)


def as_storage(
    storage: AbstractMomentStorage | None, quantized: AbstractMomentStorage | None
) -> AbstractMomentStorage:
    """The storage of the constructor arguments `storage=` and its older name
    `quantized=` (default: plain arrays)."""
    if storage is not None and quantized is not None:
        raise ValueError(
            f"got storage={storage} and quantized={quantized}; pass one of them "
            "(`quantized` is the older name of `storage`)."
        )
    chosen = storage if storage is not None else quantized
    if chosen is None:
        return CastStorage()
    if not isinstance(chosen, AbstractMomentStorage):
        name = "storage" if storage is not None else "quantized"
        raise TypeError(
            f"`{name}` must be an eqx_ademamix storage such as "
            f"eqx_ademamix.Blockwise8Bit(), got {chosen!r:.80}."
        )
    return chosen
