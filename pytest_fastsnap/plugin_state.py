"""Stash keys shared by the plugin hooks and the fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_fastsnap.config import FastsnapConfig
from pytest_fastsnap.qemu.machine import QemuMachine
from pytest_fastsnap.qemu.machine_types import MachineTypes
from pytest_fastsnap.qemu.probe import QemuProbe

CONFIG_KEY = pytest.StashKey[FastsnapConfig]()
PROBE_KEY = pytest.StashKey[QemuProbe]()
PROBE_DST_KEY = pytest.StashKey[QemuProbe]()
MACHINE_TYPES_KEY = pytest.StashKey[MachineTypes]()
ACCEL_KEY = pytest.StashKey[tuple[str, str]]()
SESSION_DIR_KEY = pytest.StashKey[Path]()
MACHINES_KEY = pytest.StashKey[list[QemuMachine]]()
PHASE_REPORTS_KEY = pytest.StashKey[dict[str, pytest.TestReport]]()

# user_properties names: how workers hand results to the controller's summary.
MATRIX_PROPERTY = "fastsnap_matrix"
DEFECT_PROPERTY = "fastsnap_defect"
DEFECT_RECORD_PROPERTY = "fastsnap_defect_record"
ARTIFACTS_PROPERTY = "fastsnap_artifacts"
