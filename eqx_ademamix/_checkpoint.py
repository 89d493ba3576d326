"""Checkpoints of models, optimizers and optimizer states that are written
atomically and refuse to load into a differently shaped target.

Two formats: orbax-checkpoint (sharded and multi-host arrays; one directory per
step) and `eqx.tree_serialise_leaves` (one file; arrays are gathered to the host).
Both store a description of every leaf (path, shape, dtype) next to the data and
compare it with the target *before* reading any array, so that a checkpoint from
a differently configured optimizer (another `mu_dtype`, `b1 = 0` against
`b1 > 0`, other parameter shapes) is an error that lists the differences,
instead of a silent cast, reshape or misaligned read.
"""

import json
import os
import pathlib
import uuid
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._tree import is_none as _is_none


_FORMAT = "eqx_ademamix-checkpoint-v1"
_MAGIC = b"EQX-ADEMAMIX-LEAVES 1\n"
_MAX_LINES = 12


def _is_array(x: Any) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _is_key(x: Any) -> bool:
    return _is_array(x) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _dtype_name(x: Any) -> str:
    return str(x.dtype) if _is_key(x) else jnp.dtype(x.dtype).name


def _as_data(tree: PyTree) -> PyTree:
    """Typed PRNG keys replaced by their raw uint32 data (what gets written)."""

    def data(x: Any) -> Any:
        if not _is_key(x):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.eval_shape(jax.random.key_data, x)
        return jax.random.key_data(x)

    return jax.tree.map(data, tree)


def _from_data(tree: PyTree, like: PyTree) -> PyTree:
    """Undo `_as_data`: wrap raw key data back into keys of `like`'s kind."""

    def wrap(x: Any, target: Any) -> Any:
        if not _is_key(target):
            return x
        if isinstance(target, jax.ShapeDtypeStruct):
            impl = target.dtype._impl  # the key implementation of the key dtype
        else:
            impl = jax.random.key_impl(target)
        return jax.random.wrap_key_data(x, impl=impl)

    return jax.tree.map(wrap, tree, like)


def _describe(tree: PyTree) -> list[dict]:
    """One entry per leaf: its path and, for arrays, shape and dtype."""
    out = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_none):
        entry: dict[str, Any] = {"path": jax.tree_util.keystr(path) or "<root>"}
        if leaf is None:
            entry["kind"] = "none"
        elif _is_array(leaf):
            entry["kind"] = "array"
            entry["shape"] = [int(n) for n in leaf.shape]
            entry["dtype"] = _dtype_name(leaf)
        else:
            entry["kind"] = "static"
            entry["type"] = type(leaf).__name__
        out.append(entry)
    return out


def _hint(path: str) -> str:
    if ".m1" in path:
        return " (a state without `m1` comes from an optimizer with b1 = 0)"
    return ""


def _render(entry: dict | None) -> str:
    if entry is None:
        return "nothing"
    if entry["kind"] == "array":
        return f"{entry['dtype']}{entry['shape']}"
    if entry["kind"] == "static":
        return f"a non-array {entry['type']}"
    return "None"


def _is_prefix(path: str, paths: dict) -> bool:
    return any(p.startswith(path) and p[len(path)] in ".[" for p in paths if p != path)


def _differences(saved: list[dict], target: list[dict]) -> list[str]:
    saved_by_path = {e["path"]: e for e in saved}
    target_by_path = {e["path"]: e for e in target}
    lines = []
    for path in list(saved_by_path) + [
        p for p in target_by_path if p not in saved_by_path
    ]:
        s, t = saved_by_path.get(path), target_by_path.get(path)
        if s is not None and t is not None:
            if s["kind"] != t["kind"]:
                lines.append(
                    f"{path}: the checkpoint has {_render(s)}, the target {_render(t)}"
                )
            elif s["kind"] == "array" and s["shape"] != t["shape"]:
                lines.append(
                    f"{path}: shape {tuple(s['shape'])} in the checkpoint, "
                    f"{tuple(t['shape'])} in the target"
                )
            elif s["kind"] == "array" and s["dtype"] != t["dtype"]:
                hint = ""
                if ".m1" in path or ".m2" in path:
                    hint = " (an optimizer with another `mu_dtype`?)"
                lines.append(
                    f"{path}: dtype {s['dtype']} in the checkpoint, {t['dtype']} in "
                    f"the target{hint}"
                )
        elif (s or t)["kind"] == "none" and _is_prefix(
            path, target_by_path if s is not None else saved_by_path
        ):
            continue  # a None subtree on one side: its leaves are listed already
        elif s is not None:
            lines.append(
                f"{path}: the checkpoint has {_render(s)}, the target has no such "
                f"leaf{_hint(path)}"
            )
        else:
            lines.append(
                f"{path}: the target has {_render(t)}, the checkpoint has no such "
                f"leaf{_hint(path)}"
            )
    if not lines and [e["path"] for e in saved] != [e["path"] for e in target]:
        lines.append("the leaves are the same but in another order")
    return lines


def _check(saved: list[dict], like: PyTree, where: str) -> None:
    lines = _differences(saved, _describe(like))
    if lines:
        shown = lines[:_MAX_LINES]
        if len(lines) > _MAX_LINES:
            shown.append(f"... and {len(lines) - _MAX_LINES} more")
        raise ValueError(
            f"the checkpoint at {where} does not match the target it is restored "
            "into (was it written by a differently configured optimizer or model?):\n"
            + "\n".join(f"  - {line}" for line in shown)
        )


def _place(value: Any, like: Any) -> Any:
    """`value` as `like` holds it: NumPy stays NumPy; JAX arrays get `like`'s
    sharding when it has one."""
    if isinstance(like, np.ndarray):
        return np.asarray(value)
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.device_put(value, sharding)
    return jnp.asarray(value)


# --------------------------------------------------------------------- equinox


def save_leaves(path: str | os.PathLike, tree: PyTree) -> None:
    """Save the arrays of `tree` (a model, an optimizer, a state, or a tuple of
    them) to one file with `eqx.tree_serialise_leaves`, atomically.

    The file is written next to `path` under a temporary name, flushed to disk, and
    renamed over `path`: a crash mid-save leaves the previous file at `path` intact.
    Non-array leaves (Python functions, floats) are not saved; they come from the
    target on load.

    **Arguments:**

    - `path`: the file to write.
    - `tree`: any PyTree. Its arrays must be fully addressable from this process
      (sharded arrays on one host are fine: they are gathered); for multi-host
      runs use [`eqx_ademamix.save_checkpoint`][].

    **Returns:** nothing.
    """
    path = pathlib.Path(path)
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                "save_leaves gathers every array to this host, but the tree holds "
                "arrays spread over several hosts; use "
                "eqx_ademamix.save_checkpoint (orbax) for multi-host runs."
            )
    header = json.dumps({"format": _FORMAT, "leaves": _describe(tree)})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC)
            f.write(header.encode() + b"\n")
            eqx.tree_serialise_leaves(f, eqx.filter(_as_data(tree), eqx.is_array))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_leaves(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Load a file written by [`eqx_ademamix.save_leaves`][] into the structure of
    `like`.

    **Arguments:**

    - `path`: the file.
    - `like`: a tree with the structure, shapes and dtypes that were saved (e.g. a
      freshly built model, optimizer and `opt.init(params)`); its array leaves may
      be `jax.ShapeDtypeStruct`s. Arrays are placed with `like`'s shardings.

    **Returns:** `like` with its arrays replaced by the saved ones.

    **Raises:** `ValueError` listing every leaf whose path, shape or dtype differs
    (before any array is read).
    """
    path = pathlib.Path(path)
    with open(path, "rb") as f:
        if f.readline() != _MAGIC:
            raise ValueError(
                f"{path} is not a file written by eqx_ademamix.save_leaves."
            )
        header = json.loads(f.readline())
        _check(header["leaves"], like, str(path))
        arrays, static = eqx.partition(like, _is_array)
        data = _as_data(arrays)
        loaded = eqx.tree_deserialise_leaves(f, data)
    placed = _from_data(jax.tree.map(_place, loaded, data), arrays)
    return eqx.combine(placed, static)


# ----------------------------------------------------------------------- orbax


def _manager(directory: str | os.PathLike, max_to_keep: int | None, read_only: bool):
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "checkpoints need orbax-checkpoint: pip install 'eqx_ademamix[checkpoint]'"
        ) from e
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=not read_only,
        enable_async_checkpointing=False,
    )
    return ocp, ocp.CheckpointManager(
        os.fspath(os.path.abspath(directory)), options=options
    )


def _flat_arrays(tree: PyTree) -> dict[str, Any]:
    leaves = [x for x in jax.tree.leaves(tree) if _is_array(x)]
    return {f"leaf{i:06d}": x for i, x in enumerate(leaves)}


def save_checkpoint(
    directory: str | os.PathLike,
    step: int,
    tree: PyTree,
    *,
    max_to_keep: int | None = None,
) -> None:
    """Save the arrays of `tree` (model, optimizer, state, ...) as step `step` of an
    orbax-checkpoint directory.

    Sharded arrays are written shard by shard (each host writes its own shards;
    call it on every host of a multi-host run). orbax writes the step to a
    temporary directory and renames it when complete, so a crash mid-save leaves
    the earlier steps usable and the incomplete one invisible to
    [`eqx_ademamix.restore_checkpoint`][].

    **Arguments:**

    - `directory`: the checkpoint directory (created if needed).
    - `step`: the training step, an int >= 0.
    - `tree`: any PyTree; non-array leaves are not saved (they come from the
      target on restore).
    - `max_to_keep`: keep only the newest this many steps (default: all).

    **Returns:** nothing; the step is complete on disk when this returns.
    """
    ocp, manager = _manager(directory, max_to_keep, read_only=False)
    spec = {"format": _FORMAT, "leaves": _describe(tree)}
    with manager:
        manager.save(
            int(step),
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(_flat_arrays(_as_data(tree))),
                spec=ocp.args.JsonSave(spec),
            ),
        )
        manager.wait_until_finished()


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step in an orbax-checkpoint `directory`, or `None`."""
    if not os.path.isdir(directory):
        return None
    _, manager = _manager(directory, None, read_only=True)
    with manager:
        return manager.latest_step()


def restore_checkpoint(
    directory: str | os.PathLike, like: PyTree, step: int | None = None
) -> PyTree:
    """Restore a step written by [`eqx_ademamix.save_checkpoint`][] into the
    structure of `like`.

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `like`: a tree with the saved structure, shapes and dtypes. Array leaves may
      be arrays or `jax.ShapeDtypeStruct`s; their shardings (e.g. from
      [`eqx_ademamix.state_shardings`][]) say where each restored shard goes.
    - `step`: which step; default: the newest complete one.

    **Returns:** `like` with its arrays replaced by the saved ones.

    **Raises:** `FileNotFoundError` if there is no complete step; `ValueError`
    listing every leaf whose path, shape or dtype differs (before any array is
    read).
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    ocp, manager = _manager(directory, None, read_only=True)
    with manager:
        if step is None:
            step = manager.latest_step()
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint in {directory}")
        spec = manager.restore(
            step, args=ocp.args.Composite(spec=ocp.args.JsonRestore())
        )
        saved = spec["spec"]
        if not isinstance(saved, dict) or saved.get("format") != _FORMAT:
            raise ValueError(
                f"step {step} in {directory} was not written by "
                "eqx_ademamix.save_checkpoint."
            )
        _check(saved["leaves"], like, f"{directory} (step {step})")
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def abstract(x: Any) -> jax.ShapeDtypeStruct:
            sharding = getattr(x, "sharding", None)
            if not isinstance(sharding, jax.sharding.Sharding):
                sharding = default
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

        arrays, static = eqx.partition(like, _is_array)
        data = _as_data(arrays)
        targets = _flat_arrays(data)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardRestore(
                    {k: abstract(v) for k, v in targets.items()}
                )
            ),
        )["arrays"]
    values = iter([_place(restored[k], targets[k]) for k in targets])
    placed = jax.tree.map(lambda x: next(values), data)
    return eqx.combine(_from_data(placed, arrays), static)
