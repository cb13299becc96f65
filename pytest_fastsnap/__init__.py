"""pytest-fastsnap: conformance suites for QEMU mapped-ram snapshots and fast snapshot load."""

import pytest

pytest.register_assert_rewrite("pytest_fastsnap.fixtures", "pytest_fastsnap.snapshot")

__version__ = "0.1.0"
