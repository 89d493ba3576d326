import eqx_ademamix as eam
import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _tree(dtype=jnp.float32):
    return {
        "a": jnp.asarray([[1.0, -2.0], [3.0, 0.5]], dtype),
        "b": None,
        "c": [jnp.asarray([0.25, -4.0], dtype)],
    }


def test_tree_zeros_like_keeps_structure_and_none():
    zeros = eam.tree_zeros_like(_tree())
    assert zeros["b"] is None
    assert jax.tree.structure(zeros, is_leaf=lambda x: x is None) == jax.tree.structure(
        _tree(), is_leaf=lambda x: x is None
    )
    for x in jax.tree.leaves(zeros):
        assert x.dtype == jnp.float32 and not np.any(np.asarray(x))
    assert eam.tree_zeros_like(_tree(), jnp.bfloat16)["a"].dtype == jnp.bfloat16


def test_tree_cast():
    cast = eam.tree_cast(_tree(), jnp.bfloat16)
    assert cast["b"] is None and cast["a"].dtype == jnp.bfloat16
    tree = _tree()
    assert eam.tree_cast(tree, None) is tree


@pytest.mark.parametrize("order", [1, 2])
def test_tree_update_moment_matches_numpy(order):
    g, m = _tree(), eam.tree_cast(_tree(), jnp.float32)
    m = jax.tree.map(lambda x: x * 0.5, m)
    out = eam.tree_update_moment(g, m, 0.9, order)
    for key in ("a",):
        expected = (
            0.9 * np.asarray(m[key], np.float64)
            + 0.1 * np.asarray(g[key], np.float64) ** order
        )
        np.testing.assert_allclose(out[key], expected, rtol=1e-6)
    assert out["b"] is None


def test_tree_update_moment_keeps_moment_dtype():
    """The seed code let a bfloat16 moment drift to float32 here."""
    g = {"w": jnp.ones(3, jnp.float32)}
    m = {"w": jnp.zeros(3, jnp.bfloat16)}
    assert eam.tree_update_moment(g, m, 0.9, 1)["w"].dtype == jnp.bfloat16
    assert eam.tree_update_moment_per_elem_norm(g, m, 0.9, 2)["w"].dtype == jnp.bfloat16


def test_tree_update_moment_per_elem_norm_complex_is_real():
    g = {"z": jax.lax.complex(jnp.asarray([3.0, 0.0]), jnp.asarray([4.0, 1.0]))}
    m = {"z": jnp.zeros(2, jnp.float32)}
    out = eam.tree_update_moment_per_elem_norm(g, m, 0.5, 2)
    assert out["z"].dtype == jnp.float32
    np.testing.assert_allclose(out["z"], 0.5 * np.array([25.0, 1.0]), rtol=1e-6)


def test_tree_bias_correction_matches_numpy():
    m = {"a": jnp.asarray([1.0, 2.0]), "b": None}
    out = eam.tree_bias_correction(m, 0.999, jnp.asarray(10))
    np.testing.assert_allclose(
        out["a"], np.array([1.0, 2.0]) / (1 - 0.999**10), rtol=2e-5
    )
    assert out["b"] is None


def test_helpers_are_type_checked():
    """jaxtyping + beartype check the annotations (pytest runs the import hook)."""
    with pytest.raises(Exception):
        eam.tree_bias_correction({"a": jnp.ones(2)}, 0.9, jnp.ones(3))


@pytest.mark.parametrize("eps_root", [None, 1e-6])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64])
def test_adam_direction_matches_numpy(getkey, dtype, eps_root):
    from eqx_ademamix.internal import adam_direction, inverse_bias_correction

    num = jax.random.normal(getkey(), (5, 3), dtype)
    nu = jax.random.uniform(getkey(), (5, 3), jnp.float32, 0.0, 2.0)
    inverse = inverse_bias_correction(0.999, 7, jnp.float32)
    # Evaluated on the stored (float32) decay, as optax does.
    b = float(np.float32(0.999))
    # `1 - b**7` cancels: float32 gets it to about 1e-5 relative.
    np.testing.assert_allclose(float(inverse), 1 / (1 - b**7), rtol=3e-5)
    root = None if eps_root is None else jnp.float32(eps_root)
    got = adam_direction(num, nu, inverse, root, jnp.float32(1e-8))
    assert got.dtype == jnp.dtype(dtype)
    nu_hat = np.asarray(nu, np.float64) / (1 - b**7)
    expected = np.asarray(num, np.complex128) / (
        np.sqrt(nu_hat + (eps_root or 0.0)) + 1e-8
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=3e-5)
