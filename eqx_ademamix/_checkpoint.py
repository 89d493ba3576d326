"""Checkpoints of models, optimizers and optimizer states that are written
atomically, verified when read, and refuse to load into a differently shaped
target.

Two formats: orbax-checkpoint (sharded and multi-host arrays; one directory per
step) and a single file of `.npy` records (the format of
`eqx.tree_serialise_leaves`, with a header and checksums; arrays are gathered to
the host). Both store a description of the tree next to the data: every leaf
(path, shape, dtype) and the static fields of every `eqx.Module` in it (the
packed layout of packed moments, the logical shape of 8-bit moments, the
optimizer's structural choices). It is compared with the target *before* any
array is read, so that a checkpoint from a differently configured optimizer
(another `mu_dtype`, `b1 = 0` against `b1 > 0`, other parameter shapes, another
storage or layout) is an error that lists the differences, instead of a silent
cast, reshape or misaligned read.
"""

import dataclasses
import json
import os
import pathlib
import re
import uuid
import zlib
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ._base import AbstractGradientTransformation
from ._tree import is_none as _is_none


_FORMAT_V1 = "eqx_ademamix-checkpoint-v1"
_FORMAT = "eqx_ademamix-checkpoint-v2"
_MAGIC_V1 = b"EQX-ADEMAMIX-LEAVES 1\n"
_MAGIC = b"EQX-ADEMAMIX-LEAVES 2\n"
# Written into a step directory once orbax has committed it: every file of the
# step and its size, so that a step with missing or truncated files (a kill
# during the deletion of an old step, a partial copy) is recognised as incomplete.
_FILES = "eqx_ademamix_files.json"
_FILES_FORMAT = "eqx_ademamix-files-v1"
_MAX_LINES = 12
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_WINDOW = 160


class _Corrupt(ValueError):
    """A file or step that is incomplete or corrupt (raised as a ValueError)."""


# ----------------------------------------------------------------- description


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


def _from_data(x: Any, target: Any) -> Any:
    """Undo `_as_data` for one leaf: wrap raw key data into a key of `target`'s
    kind."""
    if not _is_key(target):
        return x
    if isinstance(target, jax.ShapeDtypeStruct):
        impl = target.dtype._impl  # the key implementation of the key dtype
    else:
        impl = jax.random.key_impl(target)
    return jax.random.wrap_key_data(x, impl=impl)


def _static_description(value: Any) -> str:
    """A description of a static field's value that is stable across processes:
    its `checkpoint_description()` if it has one, else its `repr` without memory
    addresses."""
    describe = getattr(value, "checkpoint_description", None)
    if callable(describe) and not isinstance(value, type):
        return str(describe())
    return _ADDRESS.sub("", repr(value))


def _modules(tree: PyTree) -> list[dict]:
    """One entry per `eqx.Module` node of `tree` (outermost first): its path, type
    and static fields."""
    out = []

    def visit(node: Any, prefix: tuple) -> None:
        if isinstance(node, eqx.Module):
            static = {
                field.name: _static_description(getattr(node, field.name, None))
                for field in dataclasses.fields(node)
                if field.metadata.get("static", False)
            }
            out.append(
                {
                    "path": jax.tree_util.keystr(prefix) or "<root>",
                    "type": type(node).__name__,
                    "static": static,
                }
            )

        def inner(x: Any) -> bool:
            return x is not node and isinstance(x, eqx.Module)

        for path, child in jax.tree_util.tree_flatten_with_path(node, is_leaf=inner)[0]:
            if inner(child):
                visit(child, prefix + tuple(path))

    visit(tree, ())
    return out


def _describe(tree: PyTree) -> dict:
    """The description stored with a checkpoint: one entry per leaf (its path and,
    for arrays, shape and dtype) and one per module (its static fields)."""
    leaves = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_none):
        entry: dict[str, Any] = {"path": jax.tree_util.keystr(path) or "<root>"}
        if leaf is None:
            entry["kind"] = "none"
        elif _is_array(leaf):
            entry["kind"] = "array"
            entry["shape"] = [int(n) for n in leaf.shape]
            entry["dtype"] = _dtype_name(leaf)
            if _is_key(leaf):  # written as its uint32 key data, of this shape
                data = jax.eval_shape(jax.random.key_data, leaf)
                entry["data_shape"] = [int(n) for n in data.shape]
        else:
            entry["kind"] = "static"
            entry["type"] = type(leaf).__name__
        leaves.append(entry)
    return {"leaves": leaves, "modules": _modules(tree)}


# ------------------------------------------------------------------ comparison


def _under(path: str, prefixes: list[str] | set[str]) -> bool:
    """Whether `path` is one of `prefixes` or lies inside one of them."""
    return any(
        path == p or (path.startswith(p) and path[len(p)] in ".[") for p in prefixes
    )


def _render(entry: dict | None) -> str:
    if entry is None:
        return "nothing"
    if entry["kind"] == "array":
        return f"{entry['dtype']}{entry['shape']}"
    if entry["kind"] == "static":
        return f"a non-array {entry['type']}"
    return "None"


def _render_at(path: str, leaves: dict, modules: dict) -> str:
    """What a tree holds at `path`: a module, a leaf, a subtree, or nothing."""
    if path in modules:
        return f"a {modules[path]['type']}"
    if path in leaves:
        return _render(leaves[path])
    arrays = [
        e for p, e in leaves.items() if _under(p, [path]) and e["kind"] == "array"
    ]
    if arrays:
        return f"a tree of {len(arrays)} array(s) ({_render(arrays[0])}, ...)"
    return "nothing"


def _m1_hint(path: str, none_paths: set[str]) -> str:
    """The `b1 = 0` hint, only where one side has `m1` None and the other has it."""
    if any(p.endswith(".m1") and _under(path, [p]) for p in none_paths):
        return " (a state without `m1` comes from an optimizer with b1 = 0)"
    return ""


def _window(a: str, b: str) -> tuple[str, str]:
    """`a` and `b`, shortened around their first difference if they are long."""
    if len(a) <= _WINDOW and len(b) <= _WINDOW:
        return a, b
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    start = max(0, start - 40)

    def cut(s: str) -> str:
        part = s[start : start + _WINDOW]
        return (
            ("..." if start else "")
            + part
            + ("..." if start + _WINDOW < len(s) else "")
        )

    return cut(a), cut(b)


def _module_differences(
    saved: list[dict] | None,
    target: list[dict],
    saved_leaves: dict,
    target_leaves: dict,
) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Differences of module types (lines, and the paths they explain: nothing
    inside them is listed again) and of static fields (path and line)."""
    if saved is None:  # a v1 checkpoint: no module description
        return [], [], []
    saved_by = {m["path"]: m for m in saved}
    target_by = {m["path"]: m for m in target}
    saved_none = {p for p, e in saved_leaves.items() if e["kind"] == "none"}
    target_none = {p for p, e in target_leaves.items() if e["kind"] == "none"}
    lines: list[str] = []
    reported: list[str] = []
    static_lines: list[tuple[str, str]] = []
    for path in list(saved_by) + [p for p in target_by if p not in saved_by]:
        if _under(path, reported):
            continue
        s, t = saved_by.get(path), target_by.get(path)
        if s is not None and t is not None and s["type"] == t["type"]:
            fields = [
                k
                for k in list(s["static"])
                + [k for k in t["static"] if k not in s["static"]]
                if s["static"].get(k) != t["static"].get(k)
            ]
            if not fields:
                continue
            parts_s, parts_t = [], []
            for k in fields:
                a, b = _window(
                    str(s["static"].get(k, "(no such field)")),
                    str(t["static"].get(k, "(no such field)")),
                )
                parts_s.append(f"{k}={a}")
                parts_t.append(f"{k}={b}")
            static_lines.append(
                (
                    path,
                    f"{path}: {s['type']} with {', '.join(parts_s)} in the "
                    f"checkpoint, {', '.join(parts_t)} in the target",
                )
            )
            continue  # the arrays inside are compared leaf by leaf
        elif s is not None and t is not None:
            lines.append(
                f"{path}: a {s['type']} in the checkpoint, a {t['type']} in the target"
            )
        elif s is not None:
            hint = _m1_hint(path, target_none)
            lines.append(
                f"{path}: a {s['type']} in the checkpoint, "
                f"{_render_at(path, target_leaves, target_by)} in the target{hint}"
            )
        else:
            hint = _m1_hint(path, saved_none)
            lines.append(
                f"{path}: {_render_at(path, saved_leaves, saved_by)} in the "
                f"checkpoint, a {t['type']} in the target{hint}"
            )
        reported.append(path)
    return lines, reported, static_lines


def _leaf_differences(
    saved: dict, target: dict, reported: list[str]
) -> tuple[list[str], list[str]]:
    """Differences of array leaves outside the `reported` subtrees, and their
    paths."""
    saved_none = {p for p, e in saved.items() if e["kind"] == "none"}
    target_none = {p for p, e in target.items() if e["kind"] == "none"}
    lines, paths = [], []
    for path in list(saved) + [p for p in target if p not in saved]:
        if _under(path, reported):
            continue
        s, t = saved.get(path), target.get(path)
        s_array = s is not None and s["kind"] == "array"
        t_array = t is not None and t["kind"] == "array"
        if not s_array and not t_array:
            continue  # None and non-array leaves are not saved: nothing to compare
        before = len(lines)
        if s_array and t_array:
            if s["shape"] != t["shape"]:
                lines.append(
                    f"{path}: shape {tuple(s['shape'])} in the checkpoint, "
                    f"{tuple(t['shape'])} in the target"
                )
            elif s["dtype"] != t["dtype"]:
                hint = ""
                if ".m1" in path or ".m2" in path:
                    hint = " (an optimizer with another `mu_dtype`?)"
                lines.append(
                    f"{path}: dtype {s['dtype']} in the checkpoint, {t['dtype']} in "
                    f"the target{hint}"
                )
        elif s_array:
            other = "has no such leaf" if t is None else f"has {_render(t)}"
            lines.append(
                f"{path}: the checkpoint has {_render(s)}, the target {other}"
                f"{_m1_hint(path, target_none)}"
            )
        else:
            other = "has no such leaf" if s is None else f"has {_render(s)}"
            lines.append(
                f"{path}: the target has {_render(t)}, the checkpoint {other}"
                f"{_m1_hint(path, saved_none)}"
            )
        if len(lines) > before:
            paths.append(path)
    if not lines:
        order = [
            [
                p
                for p, e in side.items()
                if e["kind"] == "array" and not _under(p, reported)
            ]
            for side in (saved, target)
        ]
        if order[0] != order[1]:
            lines.append("the array leaves are the same but in another order")
    return lines, paths


def _differences(saved: dict, target: dict, kept: list[str] = ()) -> list[str]:
    """Every difference between two descriptions, ignoring the subtrees `kept`."""

    def leaves(description: dict) -> dict:
        return {
            e["path"]: e for e in description["leaves"] if not _under(e["path"], kept)
        }

    def modules(description: dict) -> list[dict] | None:
        if description.get("modules") is None:
            return None
        return [m for m in description["modules"] if not _under(m["path"], kept)]

    saved_leaves, target_leaves = leaves(saved), leaves(target)
    lines, reported, static_lines = _module_differences(
        modules(saved), modules(target), saved_leaves, target_leaves
    )
    leaf_lines, differing = _leaf_differences(saved_leaves, target_leaves, reported)
    # A static field matters where the arrays inside are the same (a packed
    # layout, the shape of 8-bit blocks, an optimizer's settings); elsewhere the
    # arrays' differences say more.
    static_only = [
        line
        for path, line in static_lines
        if not any(_under(p, [path]) for p in differing)
    ]
    return lines + leaf_lines + static_only


def _check(saved: dict, target: dict, where: str, kept: list[str]) -> None:
    lines = _differences(saved, target, kept)
    if lines:
        shown = lines[:_MAX_LINES]
        if len(lines) > _MAX_LINES:
            shown.append(f"... and {len(lines) - _MAX_LINES} more")
        raise ValueError(
            f"the checkpoint at {where} does not match the target it is restored "
            "into (was it written by a differently configured optimizer or model?):\n"
            + "\n".join(f"  - {line}" for line in shown)
        )


def _kept_paths(like: PyTree, keep_hyperparameters: bool) -> list[str]:
    """The paths of the outermost optimizers in `like` (kept as they are)."""
    if not keep_hyperparameters:
        return []

    def is_opt(x: Any) -> bool:
        return isinstance(x, AbstractGradientTransformation)

    flat = jax.tree_util.tree_flatten_with_path(like, is_leaf=is_opt)[0]
    return [jax.tree_util.keystr(p) or "<root>" for p, x in flat if is_opt(x)]


def _data_struct(entry: dict) -> tuple[tuple[int, ...], np.dtype]:
    """The shape and dtype of the data written for an array entry (typed PRNG keys
    are written as their uint32 key data)."""
    if entry["dtype"].startswith("key<"):
        return tuple(entry.get("data_shape", entry["shape"])), np.dtype(np.uint32)
    return tuple(entry["shape"]), jnp.dtype(entry["dtype"])


def _array_entries(description: dict) -> list[dict]:
    return [e for e in description["leaves"] if e["kind"] == "array"]


def _parse_description(saved: Any) -> dict:
    """The description of a v1 or v2 checkpoint, checked for the expected keys."""
    if not isinstance(saved, dict) or saved.get("format") not in (_FORMAT_V1, _FORMAT):
        raise _Corrupt("it has no eqx_ademamix description")
    leaves = saved.get("leaves")
    if not isinstance(leaves, list) or not all(
        isinstance(e, dict) and isinstance(e.get("path"), str) and "kind" in e
        for e in leaves
    ):
        raise _Corrupt("its description has no valid list of leaves")
    for e in leaves:
        if e["kind"] == "array" and not (
            isinstance(e.get("shape"), list) and isinstance(e.get("dtype"), str)
        ):
            raise _Corrupt(f"its description of {e['path']} has no shape or dtype")
    modules = saved.get("modules")
    if saved["format"] == _FORMAT and not isinstance(modules, list):
        raise _Corrupt("its description has no list of modules")
    checksums = saved.get("checksums")
    if checksums is not None and (
        not isinstance(checksums, list)
        or len(checksums) != sum(e["kind"] == "array" for e in leaves)
        or not all(isinstance(c, int) for c in checksums)
    ):
        raise _Corrupt("its description has no valid list of checksums")
    return {"leaves": leaves, "modules": modules, "checksums": checksums}


# -------------------------------------------------------------------- steps


def _check_step(step: Any, name: str = "step") -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise ValueError(
            f"`{name}` must be a non-negative integer (a Python or NumPy int), got "
            f"{name}={step!r}; pass e.g. int(state.count)."
        )
    if step < 0:
        raise ValueError(f"`{name}` must be a non-negative integer, got {name}={step}.")
    return int(step)


# ---------------------------------------------------------- several processes


def _agree(error: BaseException | None, what: str) -> None:
    """Raise `error` here, and an error on every other process too, so that no
    process waits in a collective for one that gave up. Single-process: raise
    `error` if there is one."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(error is not None))
        failed = [i for i, flag in enumerate(np.ravel(np.asarray(flags))) if flag]
        if error is None and failed:
            raise RuntimeError(
                f"{what} failed on process(es) {failed} (see the error there); "
                f"process {jax.process_index()} stops too instead of waiting for them."
            )
    if error is not None:
        raise error


def _everywhere() -> jax.sharding.Sharding:
    """Where a restored array without a sharding of its own goes: the first device
    in a single process; replicated over all devices (which every process can
    address) in a multi-process run."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _host_local(x: Any) -> bool:
    """A JAX array of this process only, in a multi-process run (e.g. a scalar
    hyperparameter made by `jnp.asarray`)."""
    return (
        jax.process_count() > 1 and isinstance(x, jax.Array) and x.is_fully_addressable
    )


def _to_global(x: Any) -> Any:
    """A host-local array as a global array replicated over all devices (orbax
    writes it once, from the first replica, i.e. process 0's value)."""
    if not _host_local(x):
        return x
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, _everywhere(), lambda i: value[i])


def _uncommitted(x: Any) -> bool:
    """A JAX array not committed to a device (e.g. made by `jnp.asarray`): jit
    moves it to where the other arguments are."""
    return isinstance(x, jax.Array) and not x.committed


def _local_value(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = value.addressable_data(0)  # replicated: every copy is the value
    return np.asarray(value)


def _place(value: Any, like: Any) -> Any:
    """`value` as `like` holds it: NumPy stays NumPy; an uncommitted JAX array
    (e.g. an optimizer's scalar hyperparameter) stays uncommitted, so it can be
    used with arrays on any devices; other JAX arrays get `like`'s sharding (a
    host-local target gets this process's copy)."""
    if isinstance(like, np.ndarray):
        return _local_value(value)
    if _uncommitted(like):
        return jnp.asarray(_local_value(value))
    if _host_local(like):
        return jax.device_put(value.addressable_data(0), like.sharding)
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.device_put(value, sharding)
    return value if isinstance(value, jax.Array) else jnp.asarray(value)


def _target_sharding(path: str, x: Any) -> jax.sharding.Sharding:
    """The sharding an array restored into `x` is read with."""
    if _host_local(x) or _uncommitted(x):
        return _everywhere()
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
        return _everywhere()
    if jax.process_count() > 1 and not sharding.addressable_devices:
        raise ValueError(
            f"the target at {path} is placed on {sharding}, which process "
            f"{jax.process_index()} cannot address; give it a sharding over the "
            "devices of every process (e.g. NamedSharding(mesh, PartitionSpec())) "
            "or none."
        )
    return sharding


# --------------------------------------------------------------------- equinox


class _CrcWriter:
    def __init__(self, f):
        self.f, self.crc = f, 0

    def write(self, data) -> int:
        self.crc = zlib.crc32(data, self.crc)
        return self.f.write(data)


class _CrcReader:
    def __init__(self, f):
        self.f, self.crc = f, 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.crc = zlib.crc32(data, self.crc)
        return data


def _crc_line(data: bytes) -> bytes:
    return f"crc32 {zlib.crc32(data):08x}\n".encode()


def save_leaves(path: str | os.PathLike, tree: PyTree) -> None:
    """Save the arrays of `tree` (a model, an optimizer, a state, or a tuple of
    them) to one file, atomically and with checksums.

    The file is written next to `path` under a temporary name, flushed to disk, and
    renamed over `path`: a crash mid-save leaves the previous file at `path` intact.
    It holds a description of the tree (every leaf's path, shape and dtype, and the
    static fields of every `eqx.Module`, e.g. the layout of packed moments),
    one `.npy` record per array (as `eqx.tree_serialise_leaves` writes them),
    and a CRC-32 of the description and of every record:
    `eqx_ademamix.load_leaves` refuses a file with any flipped bit, missing
    or extra byte. Non-array leaves (Python functions, floats) are not saved; they
    come from the target on load.

    **Arguments:**

    - `path`: the file to write.
    - `tree`: any PyTree. Its arrays must be fully addressable from this process
      (sharded arrays on one host are fine: they are gathered); for multi-host
      runs use `eqx_ademamix.save_checkpoint`.

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
    header = json.dumps({"format": _FORMAT, **_describe(tree)}).encode() + b"\n"
    arrays = [x for x in jax.tree.leaves(_as_data(tree)) if _is_array(x)]
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + header + _crc_line(header))
            checksums = []
            for x in arrays:
                writer = _CrcWriter(f)
                np.lib.format.write_array(writer, np.asarray(x), allow_pickle=False)
                checksums.append(writer.crc)
            trailer = json.dumps({"checksums": checksums}).encode() + b"\n"
            f.write(trailer + _crc_line(trailer))
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


def _read_checked_line(f, what: str) -> bytes:
    line = f.readline()
    check = f.readline()
    if not line.endswith(b"\n") or check != _crc_line(line):
        raise _Corrupt(f"its {what} fails its checksum")
    return line


def _read_record(f, entry: dict) -> tuple[np.ndarray, int]:
    """One `.npy` record, checked against its description; and its CRC-32."""
    reader = _CrcReader(f)
    try:
        version = np.lib.format.read_magic(reader)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(reader)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(reader)
    except Exception as e:  # NumPy parses the header with `ast`: any error
        raise _Corrupt(
            f"the record of {entry['path']} is unreadable ({type(e).__name__})"
        ) from None
    want_shape, want = _data_struct(entry)
    if dtype.hasobject or tuple(shape) != want_shape:
        raise _Corrupt(f"the record of {entry['path']} has another shape or dtype")
    size = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
    data = reader.read(size)
    if len(data) != size:
        raise _Corrupt(f"the record of {entry['path']} is truncated")
    value = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    if value.dtype.kind == "V" and value.dtype.itemsize == want.itemsize:
        value = value.view(want)  # bfloat16 and friends are saved as raw bytes
    if value.dtype != want:
        raise _Corrupt(f"the record of {entry['path']} has another shape or dtype")
    return value, reader.crc


def load_leaves(
    path: str | os.PathLike, like: PyTree, *, keep_hyperparameters: bool = False
) -> PyTree:
    """Load a file written by `eqx_ademamix.save_leaves` into the structure of
    `like`.

    Restoring a tree that holds an optimizer (e.g. `(model, opt, state)`) replaces
    the target optimizer's hyperparameters (learning rate, betas, ...: they are
    arrays) with the saved ones. To resume with new hyperparameters, pass
    `keep_hyperparameters=True`.

    **Arguments:**

    - `path`: the file.
    - `like`: a tree with the structure, shapes and dtypes that were saved (e.g. a
      freshly built model, optimizer and `opt.init(params)`); its array leaves may
      be `jax.ShapeDtypeStruct`s. Arrays are placed with `like`'s shardings.
    - `keep_hyperparameters`: if `True`, every optimizer in `like` (every outermost
      `eqx_ademamix.AbstractGradientTransformation`, such as the `opt` of
      `(model, opt, state)`) is returned as it is: its hyperparameters and static
      configuration are neither compared with the saved ones nor replaced. The
      state is still compared and restored.

    **Returns:** `like` with its arrays replaced by the saved ones.

    **Raises:** `ValueError` listing every leaf or module whose path, shape, dtype
    or static fields differ (before any array is read); `ValueError` saying the
    file "is incomplete or corrupt" when a checksum, record or the end of the file
    is wrong.
    """
    path = pathlib.Path(path)
    kept = _kept_paths(like, keep_hyperparameters)
    with open(path, "rb") as f:
        magic = f.readline()
        if magic not in (_MAGIC, _MAGIC_V1):
            raise ValueError(
                f"{path} is not a file written by eqx_ademamix.save_leaves (or its "
                "first line is corrupt)."
            )
        try:
            if magic == _MAGIC_V1:
                saved = _parse_description(json.loads(f.readline()))
            else:
                header = _read_checked_line(f, "description")
                saved = _parse_description(json.loads(header))
        except (_Corrupt, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is incomplete or corrupt: {e}.") from None
        _check(saved, _describe(like), str(path), kept)
        if magic == _MAGIC_V1:
            return _load_v1(f, like, kept)
        try:
            values, checksums = [], []
            for entry in _array_entries(saved):
                value, crc = _read_record(f, entry)
                values.append((entry["path"], value))
                checksums.append(crc)
            trailer = json.loads(_read_checked_line(f, "list of checksums"))
            if f.read(1):
                raise _Corrupt("it has bytes after its end")
        except (_Corrupt, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is incomplete or corrupt: {e}.") from None
        saved_sums = trailer.get("checksums") if isinstance(trailer, dict) else None
        if saved_sums is None or len(saved_sums) != len(checksums):
            raise ValueError(f"{path} is incomplete or corrupt: no list of checksums.")
        for (leaf_path, _), want, got in zip(values, saved_sums, checksums):
            if want != got:
                raise ValueError(
                    f"{path} is incomplete or corrupt: the record of {leaf_path} "
                    f"fails its checksum (crc32 {got:08x}, saved {want:08x})."
                )
    restored = {p: v for p, v in values}

    def fill(key_path, x):
        p = jax.tree_util.keystr(key_path) or "<root>"
        if not _is_array(x) or _under(p, kept):
            return x
        return _from_data(_place(restored[p], _as_data(x)), x)

    return jax.tree_util.tree_map_with_path(fill, like)


def _load_v1(f, like: PyTree, kept: list[str]) -> PyTree:
    """A file of the first format (no checksums): `eqx.tree_deserialise_leaves`."""
    arrays, static = eqx.partition(like, _is_array)
    data = _as_data(arrays)
    loaded = eqx.tree_deserialise_leaves(f, data)
    placed = jax.tree.map(_place, loaded, data)
    placed = jax.tree.map(_from_data, placed, arrays)
    out = eqx.combine(placed, static)
    if not kept:
        return out
    return jax.tree_util.tree_map_with_path(
        lambda p, new, old: old if _under(jax.tree_util.keystr(p), kept) else new,
        out,
        like,
    )


# ----------------------------------------------------------------------- orbax
#
# orbax stores arrays with tensorstore (zarr chunks, zstd, OCDBT), which keeps no
# checksum of the data: flipped bytes in a chunk file load as wrong numbers
# (measured: 19 of 20 flips in the data files). So every array's checksum is
# computed on its devices when saved, stored in the step's description, and
# compared when restored. It is a sum (mod 2^32) of a hash of each element's bits
# and its position: the same for any sharding (integer sums do not depend on the
# order), and any change of one element changes it.


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finaliser: a bijection of uint32 that mixes all bits."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (a trailing axis of 2 for 64-bit types)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.stack([_words(jnp.real(x)), _words(jnp.imag(x))], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
    words = _words(x)
    index = jnp.zeros(words.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(words.ndim)):
        iota = jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= words.shape[axis]
    terms = _fmix32(words + _fmix32(index * jnp.uint32(0x9E3779B9) + jnp.uint32(1)))
    return jnp.sum(terms, dtype=jnp.uint32)


@jax.jit
def _checksum_all(arrays: list) -> list:
    return [_checksum(x) for x in arrays]


def _checksums(arrays: list) -> list[int]:
    """The checksum of every array (one jitted program per set of devices)."""
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(arrays):
        sharding = getattr(x, "sharding", None)
        devices = None if sharding is None else frozenset(sharding.device_set)
        groups.setdefault(devices, []).append(i)
    out = [0] * len(arrays)
    for indices in groups.values():
        sums = _checksum_all([arrays[i] for i in indices])
        for i, value in zip(indices, sums):
            out[i] = int(np.asarray(value))
    return out


def _ocp():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "checkpoints need orbax-checkpoint: pip install 'eqx_ademamix[checkpoint]'"
        ) from e
    return ocp


def _manager(directory: str | os.PathLike, read_only: bool):
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(
        create=not read_only,
        read_only=read_only,
        enable_async_checkpointing=False,
    )
    return ocp, ocp.CheckpointManager(
        os.fspath(os.path.abspath(directory)), options=options
    )


def _step_dir(directory: str | os.PathLike, step: int) -> pathlib.Path:
    return pathlib.Path(os.path.abspath(directory)) / str(step)


def _files_of(step_dir: pathlib.Path) -> dict[str, int]:
    """Every file of the step's two items and its size (orbax's step metadata
    beside them is not needed to restore, and orbax may rewrite it)."""
    return {
        p.relative_to(step_dir).as_posix(): p.stat().st_size
        for item in ("arrays", "spec")
        for p in sorted((step_dir / item).rglob("*"))
        if p.is_file()
    }


def _write_files(step_dir: pathlib.Path) -> None:
    """Record every file of a committed step and its size (atomically)."""
    body = json.dumps({"format": _FILES_FORMAT, "files": _files_of(step_dir)})
    tmp = step_dir / f".{_FILES}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / _FILES)
    _fsync_dir(step_dir)


def _read_spec(ocp, manager, directory, step: int) -> dict:
    """The description of a step, or `_Corrupt` saying why the step is unusable."""
    step_dir = _step_dir(directory, step)
    try:
        spec = manager.restore(
            step, args=ocp.args.Composite(spec=ocp.args.JsonRestore())
        )["spec"]
    except Exception as e:  # orbax raises KeyError, JSONDecodeError, ... here
        raise _Corrupt(
            f"its `spec` item is missing or unreadable ({e!r:.200})"
        ) from None
    saved = _parse_description(spec)
    if spec["format"] == _FORMAT:
        if saved["checksums"] is None:
            raise _Corrupt("its description has no checksums")
        try:
            files = json.loads((step_dir / _FILES).read_text())
            listed = files["files"]
        except (OSError, ValueError, KeyError, TypeError):
            raise _Corrupt(
                f"its list of files ({_FILES}) is missing or unreadable"
            ) from None
        for name, size in listed.items():
            p = step_dir / name
            if not p.is_file():
                raise _Corrupt(f"its file {name} is missing")
            if p.stat().st_size != size:
                raise _Corrupt(
                    f"its file {name} has {p.stat().st_size} bytes, not {size}"
                )
    elif not (step_dir / "arrays").is_dir():
        raise _Corrupt("its `arrays` item is missing")
    return saved


def _corrupt(directory, step: int, reason: Any) -> ValueError:
    return ValueError(
        f"step {step} in {directory} is incomplete or corrupt: {reason}; restore "
        "another step (`step=`), or delete this one."
    )


def _steps(directory: str | os.PathLike) -> tuple[Any, Any, list[int]]:
    ocp, manager = _manager(directory, read_only=True)
    return ocp, manager, sorted(manager.all_steps())


def save_checkpoint(
    directory: str | os.PathLike,
    step: Any,
    tree: PyTree,
    *,
    max_to_keep: int | None = None,
    overwrite: bool = False,
) -> None:
    """Save the arrays of `tree` (model, optimizer, state, ...) as step `step` of an
    orbax-checkpoint directory.

    Sharded arrays are written shard by shard (each host writes its own shards;
    call it on every process of a multi-process run). Arrays that live on one
    process only, such as an optimizer's scalar hyperparameters, are written once,
    with process 0's values. A checksum of every array, computed on its devices,
    is stored with the step and compared on restore. orbax writes the step to a
    temporary directory and renames it when complete; then the list of the step's
    files is recorded, so a crash mid-save, or a step that later loses files, is
    invisible to `eqx_ademamix.latest_step` and reported by
    `eqx_ademamix.restore_checkpoint`.

    **Arguments:**

    - `directory`: the checkpoint directory (created if needed).
    - `step`: the training step, a non-negative Python or NumPy int.
    - `tree`: any PyTree; non-array leaves are not saved (they come from the
      target on restore).
    - `max_to_keep`: after saving, keep only the newest this many complete steps
      (default: all). Incomplete or corrupt steps older than the newest complete
      one are deleted too.
    - `overwrite`: what to do when `step` exists already or is older than the
      newest step in `directory` (e.g. a run resumed from an older step). `False`
      (default): raise a `ValueError`. `True`: delete `step` and every newer step
      first (they belong to the run that was abandoned), then save.

    **Returns:** nothing; the step is complete on disk when this returns.

    **Raises:** `ValueError` for a bad `step`, or an existing or newer step without
    `overwrite=True`. In a multi-process run, an error on one process is an
    error on all.
    """
    if not isinstance(overwrite, bool):
        raise ValueError(
            f"`overwrite` must be True or False, got overwrite={overwrite!r}."
        )
    error = None
    try:
        step = _check_step(step)
        if max_to_keep is not None and (
            isinstance(max_to_keep, bool)
            or not isinstance(max_to_keep, (int, np.integer))
            or max_to_keep < 1
        ):
            raise ValueError(
                "`max_to_keep` must be None or an int >= 1, got "
                f"max_to_keep={max_to_keep!r}."
            )
        ocp, manager = _manager(directory, read_only=False)
        existing = sorted(manager.all_steps())
        newer = [s for s in existing if s >= step]
        if newer and not overwrite:
            what = (
                f"step {step} exists already in {directory}"
                if step in existing
                else f"step {step} is older than step {newer[-1]} in {directory}"
            )
            raise ValueError(
                f"{what}: orbax saves only steps newer than the newest one; pass "
                f"overwrite=True to delete step(s) {newer} first (e.g. when resuming "
                "from an older step), or save under a newer step."
            )
        spec = {"format": _FORMAT, **_describe(tree)}
        arrays = {k: _to_global(v) for k, v in _flat_arrays(_as_data(tree)).items()}
    except Exception as e:
        error = e
    _agree(error, "save_checkpoint")
    spec["checksums"] = _checksums(list(arrays.values()))
    with manager:
        for s in reversed(newer):
            manager.delete(s)
        saved = manager.save(
            step,
            args=ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays),
                spec=ocp.args.JsonSave(spec),
            ),
            force=True,
        )
        manager.wait_until_finished()
        if not saved:  # pragma: no cover - guarded against above
            raise RuntimeError(f"orbax did not save step {step} in {directory}.")
        if jax.process_index() == 0:
            _write_files(_step_dir(directory, step))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"eqx_ademamix save {step}")
        if max_to_keep is not None:
            _prune(ocp, manager, directory, int(max_to_keep))


def _prune(ocp, manager, directory, max_to_keep: int) -> None:
    """Delete all but the newest `max_to_keep` complete steps, and incomplete
    steps older than the newest complete one."""
    manager.reload()
    steps = sorted(manager.all_steps())
    complete = []
    for s in steps:
        try:
            _read_spec(ocp, manager, directory, s)
            complete.append(s)
        except _Corrupt:
            pass
    if not complete:
        return
    keep = set(complete[-max_to_keep:])
    for s in steps:
        if s not in keep and s < complete[-1]:
            manager.delete(s)


def _flat_arrays(tree: PyTree) -> dict[str, Any]:
    leaves = [x for x in jax.tree.leaves(tree) if _is_array(x)]
    return {f"leaf{i:06d}": x for i, x in enumerate(leaves)}


def latest_step(directory: str | os.PathLike) -> int | None:
    """The newest complete step in an orbax-checkpoint `directory`, or `None`.

    Steps that are incomplete or corrupt (a missing or unreadable description, a
    missing or truncated file, e.g. after a kill during the deletion of an old
    step) are skipped; `eqx_ademamix.restore_checkpoint` with that `step=`
    says what is wrong with them. (The arrays' contents are checked when they are
    read, against the checksums `save_checkpoint` stores with them.)
    """
    if not os.path.isdir(directory):
        return None
    ocp, manager, steps = _steps(directory)
    with manager:
        for step in reversed(steps):
            try:
                _read_spec(ocp, manager, directory, step)
            except _Corrupt:
                continue
            return step
    return None


def restore_checkpoint(
    directory: str | os.PathLike,
    like: PyTree,
    step: Any = None,
    *,
    keep_hyperparameters: bool = False,
) -> PyTree:
    """Restore a step written by `eqx_ademamix.save_checkpoint` into the
    structure of `like`.

    Restoring a tree that holds an optimizer (e.g. `(model, opt, state)`) replaces
    the target optimizer's hyperparameters (learning rate, betas, ...: they are
    arrays) with the saved ones. To resume with new hyperparameters, pass
    `keep_hyperparameters=True`.

    **Arguments:**

    - `directory`: the checkpoint directory.
    - `like`: a tree with the saved structure, shapes and dtypes. Array leaves may
      be arrays, NumPy arrays or `jax.ShapeDtypeStruct`s; their shardings (e.g.
      from `eqx_ademamix.state_shardings`) say where each restored shard goes.
      Leaves without a sharding go to the first device of a single-process run,
      and are replicated over all devices in a multi-process run (so that every
      process can address them); NumPy targets come back as NumPy arrays.
    - `step`: which step; default: the newest complete one
      (`eqx_ademamix.latest_step`).
    - `keep_hyperparameters`: if `True`, every optimizer in `like` (every outermost
      `eqx_ademamix.AbstractGradientTransformation`, such as the `opt` of
      `(model, opt, state)`) is returned as it is: its hyperparameters and static
      configuration are neither compared with the saved ones nor replaced. The
      state is still compared and restored.

    **Returns:** `like` with its arrays replaced by the saved ones.

    **Raises:** `FileNotFoundError` if there is no such step or no complete step;
    `ValueError` listing every leaf or module whose path, shape, dtype or static
    fields differ (before any array is read); `ValueError` saying "step N in DIR
    is incomplete or corrupt" for a step with missing files, an unreadable
    description or arrays that fail their checksums. In a multi-process run an
    error on one process is an error on all.
    """
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory {directory}")
    error = None
    try:
        kept = _kept_paths(like, keep_hyperparameters)
        ocp, manager, steps = _steps(directory)
        if step is None:
            step = latest_step(directory)
            if step is None:
                raise FileNotFoundError(
                    f"no complete checkpoint in {directory}"
                    + (f" (steps {steps} are incomplete or corrupt)" if steps else "")
                )
        else:
            step = _check_step(step)
            if step not in steps:
                raise FileNotFoundError(
                    f"no step {step} in {directory}; it has steps {steps}."
                )
        try:
            saved = _read_spec(ocp, manager, directory, step)
        except _Corrupt as e:
            raise _corrupt(directory, step, e) from None
        _check(saved, _describe(like), f"{directory} (step {step})", kept)
        targets = _restore_targets(saved, like, kept)
    except Exception as e:
        error = e
    _agree(error, "restore_checkpoint")
    error = None
    with manager:
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(arrays=ocp.args.StandardRestore(targets)),
            )["arrays"]
        except Exception as e:
            # Each process reads its own shards: agree before the checksums'
            # collective, so that no process waits there for one that failed.
            error = _corrupt(
                directory, step, f"reading its arrays failed ({type(e).__name__}: {e})"
            )
            error.__cause__ = e
    _agree(error, "restore_checkpoint")
    if saved.get("checksums") is not None:
        got = _checksums([restored[k] for k in targets])
        for entry, want, crc in zip(_array_entries(saved), saved["checksums"], got):
            if want != crc:
                raise _corrupt(
                    directory,
                    step,
                    f"the array at {entry['path']} fails its checksum ({crc:08x}, "
                    f"saved {want:08x})",
                )
    keys = iter(f"leaf{i:06d}" for i in range(len(targets)))
    by_path = {e["path"]: next(keys) for e in _array_entries(saved)}

    def fill(key_path, x):
        p = jax.tree_util.keystr(key_path) or "<root>"
        if not _is_array(x) or _under(p, kept):
            return x
        return _from_data(_place(restored[by_path[p]], _as_data(x)), x)

    return jax.tree_util.tree_map_with_path(fill, like)


def _restore_targets(saved: dict, like: PyTree, kept: list[str]) -> dict:
    """The abstract arrays orbax restores into, one per saved array: `like`'s
    shapes, dtypes and shardings, or (for the arrays of kept optimizers) the
    saved shapes and dtypes, replicated."""
    targets_by_path = {}
    for key_path, x in jax.tree_util.tree_leaves_with_path(like, is_leaf=_is_none):
        p = jax.tree_util.keystr(key_path) or "<root>"
        if _is_array(x) and not _under(p, kept):
            data = _as_data(x)
            targets_by_path[p] = jax.ShapeDtypeStruct(
                data.shape, data.dtype, sharding=_target_sharding(p, x)
            )
    out = {}
    for i, entry in enumerate(_array_entries(saved)):
        target = targets_by_path.get(entry["path"])
        if target is None:  # inside a kept optimizer: read and dropped
            shape, dtype = _data_struct(entry)
            target = jax.ShapeDtypeStruct(shape, dtype, sharding=_everywhere())
        out[f"leaf{i:06d}"] = target
    return out
