"""Restore strategies: QEMU full load, QEMU fast load, and the native loader
acting as a postcopy source (``loader-bridge``)."""

from pytest_fastsnap.restore.manifest import Manifest, read_manifest, write_manifest
from pytest_fastsnap.restore.strategies import (
    STRATEGIES,
    DestinationFactory,
    RestoredGuest,
    RestoreFailed,
    RestoreNotRecovered,
    RestoreRefused,
    RestoreTimeout,
    RestoreUnsupported,
    machine_factory,
    restore,
)

__all__ = [
    "STRATEGIES",
    "DestinationFactory",
    "Manifest",
    "RestoreFailed",
    "RestoreNotRecovered",
    "RestoreRefused",
    "RestoreTimeout",
    "RestoreUnsupported",
    "RestoredGuest",
    "machine_factory",
    "read_manifest",
    "restore",
    "write_manifest",
]
