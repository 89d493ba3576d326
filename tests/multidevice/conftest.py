"""Tests that need 8 devices. `tests/test_multidevice.py` runs them in a pytest
of their own with `XLA_FLAGS=--xla_force_host_platform_device_count=8` (set
before JAX starts); collected in a run with fewer devices, they skip. To run them
directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m pytest tests/multidevice
"""

import pathlib

import jax
import pytest


DEVICES = 8


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= DEVICES:
        return
    skip = pytest.mark.skip(
        reason=f"needs {DEVICES} devices; run by tests/test_multidevice.py"
    )
    here = pathlib.Path(__file__).parent
    for item in items:
        if here in pathlib.Path(item.fspath).parents:
            item.add_marker(skip)
