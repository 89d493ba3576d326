"""The interface every optimizer of this package implements, and its optax adapter."""

import abc

import equinox as eqx
import optax
from jaxtyping import PyTree


class AbstractGradientTransformation(eqx.Module):
    """A gradient transformation as an Equinox module.

    Hyperparameters are the module's fields. `init` builds a state module,
    `update` returns new updates and a new state without mutating anything, and
    `eqx_ademamix.AbstractGradientTransformation.to_optax` turns the module
    into an `optax.GradientTransformationExtraArgs` for `optax.chain` and friends.
    """

    def __hash__(self) -> int:
        # By identity. The fields hold JAX arrays, which cannot be hashed, and
        # `jax.jit(opt.init)` / `jax.jit(opt.update)` hash the bound method (and so
        # the module). Equal optimizers that are distinct objects then hash apart:
        # at worst a second compilation, never a wrong result. `eqx.filter_jit`
        # does not use this: it hashes only the static part of the module.
        return id(self)

    @abc.abstractmethod
    def init(self, params: PyTree) -> PyTree:
        """The initial optimizer state for `params`."""

    @abc.abstractmethod
    def update(
        self, updates: PyTree, state: PyTree, params: PyTree | None = None, **extra_args
    ) -> tuple[PyTree, PyTree]:
        """Transform `updates` (gradients); returns the new updates and state."""

    def to_optax(self) -> optax.GradientTransformationExtraArgs:
        """This transformation as an optax one.

        The state is this module's typed state; `update` accepts (and ignores)
        extra keyword arguments, as optax transformations do.

        **Returns:** an `optax.GradientTransformationExtraArgs`.
        """

        # Plain closures rather than bound methods: `jax.jit(tx.update)` hashes the
        # function, and a module holding arrays is not hashable.
        def init(params):
            return self.init(params)

        def update(updates, state, params=None, **extra_args):
            return self.update(updates, state, params, **extra_args)

        return optax.GradientTransformationExtraArgs(init, update)
