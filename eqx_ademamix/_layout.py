"""Layouts: how the moments of a parameter tree are laid out in arrays.

A layout turns the leaves of any parameter-shaped tree into *units*, the arrays
the update rule runs on, and back. `eqx_ademamix.PerLeaf` (the default) has
one unit per parameter; `eqx_ademamix.Packed` concatenates the small
parameters of each dtype into one flat buffer and keeps large ones on their own.

A layout is asked for a *plan* of a concrete tree (`layout.plan(leaves)`): a
static, hashable description of which leaves go into which unit, built from
shapes and dtypes only. The plan maps anything parameter-shaped: gradients and
moments (`pack` / `unpack`), the stored moment tree of the state (`wrap` /
`unwrap`), shardings, and Adam's moments when converting a state. The update rule,
sharding, checkpoints and state conversions only ever talk to plans, so no other
module special-cases a layout.

Why pack: a jitted step pays a fixed cost for every array it takes and returns
(argument handling on the host, one small kernel per array and operation on the
device). A model of many small arrays (300 biases and norms of 16 values, say)
spends almost all of its optimizer step in that overhead; packed, the 900 moment
buffers become 3. Large parameters keep a buffer of their own, in their own shape
and sharding: for them the per-array overhead is negligible, while packing would
cost memory traffic (about 16 extra bytes per float32 parameter).
"""

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from ._misc import as_bool
from ._tree import is_none


# Leaves with more elements than this keep their own buffer. Near the measured
# crossover on CPU (benchmarks/dispatch.py): packing a leaf saves a few
# microseconds of per-array overhead and costs ~16 bytes of traffic per element.
PACK_MAX_SIZE = 4096


class Unit:
    """One array the update rule runs on: its shape and dtype, and the indices
    (into the tree's flattened leaves, `None`s included) of the parameters it
    holds. A unit of a single parameter holds it in its own shape."""

    __slots__ = ("shape", "dtype", "members", "key")

    def __init__(self, shape: tuple[int, ...], dtype: Any, members: tuple, key: str):
        self.shape = shape
        self.dtype = dtype
        self.members = members
        self.key = key

    def __repr__(self) -> str:
        return f"Unit({self.key}: {self.dtype.name}{list(self.shape)})"


class AbstractPlan:
    """Where each leaf of a parameter tree lives: a static, hashable, value-compared
    description built from the leaves' shapes and dtypes.

    The tree structure itself is not part of a plan: a state matches every
    gradient tree with the same leaves (shapes and dtypes, in order), so trees that
    wrap their arrays differently at `init` and `update` (Flax NNX passes
    `Variable`s to `init` and plain arrays to `update`) share one state."""

    entries: tuple  # (shape, dtype name) per leaf, None for None leaves
    units: tuple[Unit, ...]

    def __hash__(self) -> int:
        return hash((type(self), self.entries))

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.entries == other.entries

    @abc.abstractmethod
    def pack(self, leaves: Sequence[Any]) -> list:
        """The unit arrays of a tree's flattened `leaves` (with this plan)."""

    @abc.abstractmethod
    def unpack(self, units: Sequence[Any]) -> list:
        """The leaves (`None` where the tree has `None`) of unit arrays."""

    @abc.abstractmethod
    def wrap(self, units: Sequence[Any], treedef: Any) -> PyTree:
        """The moment tree stored in the state for one stored value per unit."""

    @abc.abstractmethod
    def unwrap(self, stored: PyTree, treedef: Any) -> list | None:
        """The per-unit stored values of a moment tree made by `wrap`, or `None`
        if `stored` is not laid out by this plan for a tree of `treedef`."""

    def map_units(self, fn: Callable[[Unit, list], Any], leaves: Sequence[Any]) -> list:
        """`fn(unit, [leaves[i] for i in unit.members])` for every unit: maps any
        parameter-shaped tree (e.g. shardings) to the units."""
        return [fn(unit, [leaves[i] for i in unit.members]) for unit in self.units]


def _entries(leaves: Sequence[Any]) -> tuple:
    return tuple(
        None
        if leaf is None
        else (tuple(int(n) for n in leaf.shape), jnp.dtype(leaf.dtype).name)
        for leaf in leaves
    )


class PerLeafPlan(AbstractPlan):
    """One unit per parameter; the moment tree has the parameters' structure."""

    __slots__ = ("entries", "units")

    def __init__(self, leaves: Sequence[Any]):
        self.entries = _entries(leaves)
        self.units = tuple(
            Unit(entry[0], jnp.dtype(entry[1]), (i,), f"leaf{i:06d}")
            for i, entry in enumerate(self.entries)
            if entry is not None
        )

    def pack(self, leaves: Sequence[Any]) -> list:
        return [leaf for leaf in leaves if leaf is not None]

    def unpack(self, units: Sequence[Any]) -> list:
        out: list = [None] * len(self.entries)
        for unit, value in zip(self.units, units):
            out[unit.members[0]] = value
        return out

    def wrap(self, units: Sequence[Any], treedef: Any) -> PyTree:
        return treedef.unflatten(self.unpack(units))

    def unwrap(self, stored: PyTree, treedef: Any) -> list | None:
        if isinstance(stored, PackedBuffers):
            return None
        try:
            leaves = treedef.flatten_up_to(stored)
        except (ValueError, TypeError):
            return None
        if any((a is None) != (e is None) for a, e in zip(leaves, self.entries)):
            return None
        return self.pack(leaves)

    def __repr__(self) -> str:
        return f"PerLeafPlan({len(self.units)} leaves)"

    def checkpoint_description(self) -> str:
        return f"per-leaf layout {list(self.entries)}"


class PackedLayout(AbstractPlan):
    """The plan of `eqx_ademamix.Packed`: each leaf with at most `max_size`
    elements goes into the flat buffer of its dtype (keys like `"float32"`), each
    larger leaf into a buffer of its own, in its own shape (keys like
    `"leaf000007"`, after its position in the tree).

    Built from shapes and dtypes (never values), so the plan of the gradients
    equals the plan of the parameters the state was made for. Hashable and
    compared by value; the hash is computed once, because jitted functions hash
    their arguments' static data at every call.
    """

    __slots__ = ("entries", "units", "max_size", "_hash")

    def __init__(self, tree: PyTree | Sequence[Any], max_size: int = PACK_MAX_SIZE):
        """**Arguments:**

        - `tree`: the parameters (or gradients), or their flattened leaves (`None`
          leaves allowed). Only shapes and dtypes are read.
        - `max_size`: leaves with more elements keep a buffer of their own.
        """
        if not isinstance(tree, list):
            tree = jax.tree.leaves(tree, is_leaf=is_none)
        self.entries = _entries(tree)
        self.max_size = max_size
        groups: dict[str, list] = {}
        for i, entry in enumerate(self.entries):
            if entry is None:
                continue
            shape, dtype = entry
            key = f"leaf{i:06d}" if math.prod(shape) > max_size else dtype
            groups.setdefault(key, []).append(i)
        units = []
        for key in sorted(groups):
            members = tuple(groups[key])
            if key.startswith("leaf"):
                shape, dtype = self.entries[members[0]]
            else:
                dtype = key
                shape = (sum(math.prod(self.entries[i][0]) for i in members),)
            units.append(Unit(shape, jnp.dtype(dtype), members, key))
        self.units = tuple(units)
        self._hash = hash((PackedLayout, self.entries, max_size))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, PackedLayout)
            and self._hash == other._hash
            and self.entries == other.entries
            and self.max_size == other.max_size
        )

    def __repr__(self) -> str:
        packed = ", ".join(
            f"{u.key}: {u.shape[0]}" for u in self.units if not u.key.startswith("leaf")
        )
        solo = sum(u.key.startswith("leaf") for u in self.units)
        return f"PackedLayout(packed {{{packed}}}, {solo} leaves on their own)"

    def checkpoint_description(self) -> str:
        """Every leaf's shape and dtype in order, and `max_size`: two states are
        laid out alike exactly when these are equal."""
        return f"packed layout (max_size={self.max_size}) {list(self.entries)}"

    @property
    def groups(self) -> tuple:
        """`(buffer key, number of elements)` per buffer, in key order."""
        return tuple((u.key, math.prod(u.shape)) for u in self.units)

    def pack(self, leaves: Sequence[Any]) -> list:
        out = []
        for unit in self.units:
            parts = [leaves[i] for i in unit.members]
            if unit.key.startswith("leaf"):
                out.append(parts[0])
            elif len(parts) == 1:
                out.append(jnp.ravel(parts[0]))
            else:
                out.append(jnp.concatenate([jnp.ravel(p) for p in parts]))
        return out

    def unpack(self, units: Sequence[Any]) -> list:
        out: list = [None] * len(self.entries)
        for unit, value in zip(self.units, units):
            if unit.key.startswith("leaf"):
                out[unit.members[0]] = value
                continue
            offset = 0
            for i in unit.members:
                shape = self.entries[i][0]
                size = math.prod(shape)
                flat = lax.slice(value, (offset,), (offset + size,))
                out[i] = flat.reshape(shape)
                offset += size
        return out

    def wrap(self, units: Sequence[Any], treedef: Any) -> "PackedBuffers":
        del treedef
        return PackedBuffers({u.key: v for u, v in zip(self.units, units)}, self)

    def unwrap(self, stored: PyTree, treedef: Any) -> list | None:
        del treedef
        if not isinstance(stored, PackedBuffers) or stored.layout != self:
            return None
        return [stored.buffers[u.key] for u in self.units]


class PackedBuffers(eqx.Module):
    """The moment buffers of a packed state, with the plan they were packed with.

    One flat buffer per dtype for the small leaves (keys like `"float32"`), and
    each large leaf as it is (keys like `"leaf000007"`). Each buffer is stored
    as the optimizer's storage decides (e.g. in 8 bits).

    This is what the moments of a state made with `eqx_ademamix.Packed` are.
    The layout is static, so it is part of the tree structure.
    """

    buffers: dict[str, Any]
    layout: PackedLayout = eqx.field(static=True)


class AbstractLayout(eqx.Module):
    """How an optimizer lays out its moments: a strategy that makes a plan
    (`eqx_ademamix.internal.AbstractPlan`) for a tree's leaves.

    The update rule never sees a layout: it runs on the plan's units."""

    @abc.abstractmethod
    def plan(self, leaves: Sequence[Any]) -> AbstractPlan:
        """The plan for a tree's flattened leaves (`None` leaves allowed; only
        shapes and dtypes are read)."""


class PerLeaf(AbstractLayout):
    """One moment array per parameter, in the parameter's shape (and sharding):
    the default, and what optax does."""

    def plan(self, leaves: Sequence[Any]) -> PerLeafPlan:
        return PerLeafPlan(leaves)


class Packed(AbstractLayout):
    """The moments of all parameters with at most `max_size` elements in one flat
    buffer per moment and dtype; larger parameters keep their own array, in their
    own shape and sharding.

    Much less per-step overhead for models of many small arrays (a step's cost
    is dominated by the number of arrays there); no slowdown for large ones. The
    small-leaf buffers are replicated over the devices that hold the parameters
    (they are small); the large leaves follow the parameters' sharding.
    """

    max_size: int = eqx.field(static=True, default=PACK_MAX_SIZE)

    def __check_init__(self):
        if (
            isinstance(self.max_size, bool)
            or not isinstance(self.max_size, int)
            or self.max_size < 0
        ):
            raise ValueError(
                f"`max_size` must be an integer >= 0, got max_size={self.max_size!r}."
            )

    def plan(self, leaves: Sequence[Any]) -> PackedLayout:
        return PackedLayout(list(leaves), self.max_size)


def as_layout(layout: AbstractLayout | None, packed: Any) -> AbstractLayout:
    """The layout of the constructor arguments `layout=` and the older
    `packed=True`."""
    if packed is not None:
        packed = as_bool(packed, "packed")
    if layout is None:
        return Packed() if packed else PerLeaf()
    if not isinstance(layout, AbstractLayout):
        raise TypeError(
            "`layout` must be an eqx_ademamix layout such as eqx_ademamix.PerLeaf() "
            f"or eqx_ademamix.Packed(), got {layout!r:.80}."
        )
    if packed is not None and packed != isinstance(layout, Packed):
        raise ValueError(f"got packed={packed} and layout={layout}; pass one of them.")
    return layout


def unit_arrays(units: Sequence[Any]) -> list[Array]:
    """The arrays of stored units (for byte counts)."""
    return [x for x in jax.tree.leaves(list(units)) if eqx.is_array(x)]
