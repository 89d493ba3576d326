"""The optimizer matrix every generic test runs over (as optax's
`contrib/_common_test.py` lists its optimizers): algorithm x storage x layout,
plus `SkipNonFinite` around two of them.

A variant builds the module optimizer, its functional (optax) twin, and says
what it supports; the parameters are small but reach every code path: a leaf
large enough to be quantized and to stay on its own when packed, small leaves
that are packed together, a scalar and a `None` leaf."""

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import eqx_ademamix as eam
import jax.numpy as jnp


EIGHT_BIT = eam.Blockwise8Bit(block_size=64, min_size=256)
FLOAT8 = eam.BlockwiseFloat8(block_size=64, min_size=256)
PACKED = eam.Packed(max_size=300)
STORAGES = {
    "f32": {},
    "bf16": {"mu_dtype": jnp.bfloat16},
    "8bit": {"storage": EIGHT_BIT},
    "fp8": {"storage": FLOAT8},
}
LAYOUTS = {"leaf": {}, "packed": {"layout": PACKED}}
ALGORITHMS = {
    "ademamix": (
        eam.AdEMAMix,
        eam.ademamix,
        dict(learning_rate=1e-2, b3=0.99, alpha=3.0, weight_decay=0.1),
    ),
    "simplified": (
        eam.SimplifiedAdEMAMix,
        eam.simplified_ademamix,
        dict(learning_rate=1e-3, b1=0.9, alpha=2.0, weight_decay=0.1),
    ),
}


@dataclasses.dataclass(frozen=True)
class Variant:
    algorithm: str
    storage: str
    layout: str
    skip_nonfinite: bool = False

    @property
    def id(self) -> str:
        skip = "-skip" if self.skip_nonfinite else ""
        return f"{self.algorithm}-{self.storage}-{self.layout}{skip}"

    @property
    def options(self) -> dict[str, Any]:
        cls, _, hyper = ALGORITHMS[self.algorithm]
        return {**hyper, **STORAGES[self.storage], **LAYOUTS[self.layout]}

    def make(self, **overrides) -> eam.AbstractGradientTransformation:
        cls, _, _ = ALGORITHMS[self.algorithm]
        opt = cls(**{**self.options, **overrides})
        return eam.SkipNonFinite(opt) if self.skip_nonfinite else opt

    def functional(self) -> tuple[Callable, dict]:
        """The functional API's factory and its keyword arguments (for
        `SkipNonFinite`, a factory of the wrapped optimizer's optax form)."""
        cls, factory, _ = ALGORITHMS[self.algorithm]
        if self.skip_nonfinite:

            def factory(**kwargs):
                return eam.SkipNonFinite(cls(**kwargs)).to_optax()

            # optax.inject_hyperparams binds arguments by signature.
            signature = inspect.signature(cls.__init__)
            factory.__signature__ = signature.replace(
                parameters=list(signature.parameters.values())[1:]
            )

        return factory, dict(self.options)


VARIANTS = [
    Variant(a, s, layout) for a in ALGORITHMS for s in STORAGES for layout in LAYOUTS
] + [
    Variant("ademamix", "bf16", "packed", skip_nonfinite=True),
    Variant("simplified", "8bit", "leaf", skip_nonfinite=True),
]
IDS = [v.id for v in VARIANTS]


def params(dtype=jnp.float32) -> dict:
    """A leaf that is quantized and stays on its own when packed (32 x 16 = 512
    elements), small leaves that are packed, a scalar and a None."""
    w = jnp.linspace(-1.0, 1.0, 512, dtype=dtype).reshape(32, 16)
    return {
        "w": w,
        "layers": [
            {"b": jnp.full((16,), 0.5, dtype)},
            {"b": jnp.arange(8, dtype=dtype)},
        ],
        "scale": jnp.asarray(2.0, dtype),
        "frozen": None,
    }


def grads(step: int, like: dict) -> dict:
    """Deterministic gradients for step `step`, shaped like `like`."""
    import jax

    def leaf(p):
        if p is None:
            return None
        n = p.size
        base = jnp.sin(jnp.arange(n, dtype=jnp.float32) * 0.37 + step * 0.91)
        return (base.reshape(p.shape) + 0.1 * step).astype(p.dtype)

    return jax.tree.map(leaf, like, is_leaf=lambda x: x is None)
