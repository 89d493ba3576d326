"""The packed state layout: one flat buffer per moment and per parameter dtype.

A jitted step pays a fixed cost for every array it takes and returns (argument
handling on the host, one small kernel launch per array and operation on the
device). A model of many small arrays (300 biases and norms of 16 values, say)
spends almost all of its optimizer step in that overhead: the arithmetic on 4,800
numbers takes microseconds, the 900 moment buffers cost milliseconds.

With `packed=True`, [`eqx_ademamix.ScaleByAdemamix`][] stores the moments of all
small parameters (up to `PACK_MAX_SIZE` elements) as one flat buffer per moment
and per parameter dtype. At every step the small gradients are concatenated into
the same layout, the update rule (unchanged, in `_ademamix.py`) runs once per
buffer, and the direction is sliced back into the parameters' shapes.

Large parameters keep a buffer of their own, in their own shape: for them the
per-array overhead is negligible next to the arithmetic, while packing would cost
real memory traffic (the concatenated gradient and the sliced direction are
materialised, about 16 extra bytes per float32 parameter). So `packed=True` never
slows a model of large arrays down, and large arrays keep their sharding.

The buffers carry a static [`eqx_ademamix.PackedLayout`][] (which leaf sits
where), so a gradient tree of another structure is an error, not a silent
misalignment.
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, Inexact, PyTree

from ._tree import _is_none


# Leaves with more elements than this keep their own buffer. Near the measured
# crossover on CPU (see benchmarks/RESULTS.md): packing a leaf saves a few
# microseconds of per-array overhead and costs ~16 bytes of traffic per element.
PACK_MAX_SIZE = 4096


class PackedLayout:
    """Where each leaf of a parameter tree lives in the packed buffers.

    Built from a tree's structure, shapes and dtypes (never its values), so the
    layout of the gradients equals the layout of the parameters the state was made
    for. Hashable and compared by value; the hash is computed once, because jitted
    functions hash their arguments' static data at every call.
    """

    __slots__ = ("treedef", "entries", "groups", "_hash")

    def __init__(self, tree: PyTree, max_size: int = PACK_MAX_SIZE):
        """**Arguments:**

        - `tree`: the parameters (or gradients): a PyTree of arrays, `None` leaves
          allowed. Only structure, shapes and dtypes are read.
        - `max_size`: leaves with more elements keep a buffer of their own.
        """
        leaves, self.treedef = jax.tree.flatten(tree, is_leaf=_is_none)
        sizes: dict[str, int] = {}
        entries = []
        for i, leaf in enumerate(leaves):
            if leaf is None:
                entries.append(None)
                continue
            shape = tuple(int(d) for d in leaf.shape)
            size = 1
            for d in shape:
                size *= d
            if size > max_size:
                # A buffer of its own, in its own shape (offset None).
                key = f"leaf{i:06d}"
                entries.append((key, None, shape))
                sizes[key] = size
                continue
            key = jnp.dtype(leaf.dtype).name
            offset = sizes.get(key, 0)
            entries.append((key, offset, shape))
            sizes[key] = offset + size
        # (buffer, offset or None, shape) per leaf; None for None leaves.
        self.entries: tuple = tuple(entries)
        # (buffer, size) in sorted order (the order of a dict's leaves).
        self.groups: tuple = tuple(sorted(sizes.items()))
        self._hash = hash((self.treedef, self.entries))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, PackedLayout)
            and self._hash == other._hash
            and self.treedef == other.treedef
            and self.entries == other.entries
        )

    def __repr__(self) -> str:
        packed = ", ".join(
            f"{key}: {size}" for key, size in self.groups if not key.startswith("leaf")
        )
        solo = sum(key.startswith("leaf") for key, _ in self.groups)
        return f"PackedLayout(packed {{{packed}}}, {solo} leaves on their own)"

    def checkpoint_description(self) -> str:
        """The whole layout, in order (tree structure, and each leaf's buffer,
        offset and shape), for checkpoints to compare: two layouts are equal
        exactly when their descriptions are."""
        leaves = ", ".join(
            "None" if e is None else f"{e[0]}@{'own' if e[1] is None else e[1]}{e[2]}"
            for e in self.entries
        )
        return f"packed layout of {self.treedef}: [{leaves}]"

    def pack(self, tree: PyTree) -> "PackedBuffers":
        """Concatenate the leaves of `tree` (which has this layout) into one flat
        buffer per dtype."""
        leaves = self.treedef.flatten_up_to(tree)
        parts: dict[str, list] = {key: [] for key, _ in self.groups}
        for leaf, entry in zip(leaves, self.entries):
            if entry is None:
                continue
            key, offset, _ = entry
            parts[key].append(leaf if offset is None else jnp.ravel(leaf))
        buffers = {
            key: chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
            for key, chunks in parts.items()
        }
        return PackedBuffers(buffers, self)

    def unpack(self, buffers: dict[str, Inexact[Array, "..."]]) -> list:
        """Slice buffers of this layout (of any dtype) back into the leaves' shapes.
        Returns the list of leaves (`None` where the tree has `None`)."""
        out = []
        for entry in self.entries:
            if entry is None:
                out.append(None)
                continue
            key, offset, shape = entry
            if offset is None:
                out.append(buffers[key])
                continue
            size = 1
            for d in shape:
                size *= d
            flat = lax.slice(buffers[key], (offset,), (offset + size,))
            out.append(flat.reshape(shape))
        return out


class PackedBuffers(eqx.Module):
    """The buffers of a packed tree, with the layout they were packed with.

    One flat buffer per dtype for the small leaves (keys like `"float32"`), and
    each large leaf as it is (keys like `"leaf000007"`, after its position in the
    tree).

    This is what the moments `m1`, `m2`, `nu` of a packed
    [`eqx_ademamix.ScaleByAdemamixState`][] are. The layout is static, so it is part
    of the tree structure: a state only matches gradients of the same layout.
    """

    buffers: dict[str, Array]
    layout: PackedLayout = eqx.field(static=True)


def packed_init(init: Callable[[PyTree], Any], params: PyTree) -> Any:
    """Run an optimizer's `init` on the packed form of `params`.

    Only the shapes of the packed parameters matter to `init`, so it runs under
    `jax.jit`: the concatenation is never materialised, and peak memory during
    `init` is the parameters plus the new state.
    """
    layout = PackedLayout(params)
    return jax.jit(lambda p: init(layout.pack(p)))(params)


def packed_step(
    rule: Callable[[PyTree, Any], tuple[list, Any, Any]], grads: PyTree, state: Any
) -> tuple[list, Any, Any]:
    """Run the update `rule` (which returns direction leaves, their treedef and the
    new state) on packed gradients, and return the directions as leaves of `grads`
    with `grads`' treedef."""
    layout = PackedLayout(grads)
    directions, _, state = rule(layout.pack(grads), state)
    # The rule saw the buffers as the leaves of a dict: in sorted key order.
    flat = dict(zip([key for key, _ in layout.groups], directions))
    return layout.unpack(flat), layout.treedef, state
