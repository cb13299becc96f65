"""Options of the plugin: one definition each, as CLI flag, ini key and env var.

Resolution order: command line, then environment, then ini, then default.
With --fastsnap every value is checked at configure time: a bad one is one
usage error naming the option and where it came from.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Option:
    flag: str
    ini: str
    env: str | None
    default: str | None
    help: str
    choices: tuple[str, ...] | None = None
    is_bool: bool = False


OPTIONS: tuple[Option, ...] = (
    Option("--fastsnap", "fastsnap", "FASTSNAP", "false",
           "run the fastsnap conformance suites and self-tests that boot QEMU", is_bool=True),
    Option("--qemu-binary", "fastsnap_qemu_binary", "QEMU_BINARY", "qemu-system-x86_64",
           "QEMU binary under test (name on PATH or path); the source of every migration"),
    Option("--qemu-binary-dst", "fastsnap_qemu_binary_dst", "QEMU_BINARY_DST", None,
           "a different QEMU binary for destinations (cross-version runs); "
           "default: --qemu-binary"),
    Option("--fastsnap-accel", "fastsnap_accel", "FASTSNAP_ACCEL", "auto",
           "accelerator: auto picks KVM on bare metal and TCG when KVM is nested or unusable",
           choices=("auto", "kvm", "tcg")),
    Option("--fastsnap-mem", "fastsnap_mem", "FASTSNAP_MEM", "64M",
           "guest RAM (QEMU -m syntax) of every guest started without mem=: vm_factory's "
           "machines (default 64M) and, when set, the tiny and Linux test guests too"),
    Option("--fastsnap-keep-artifacts", "fastsnap_keep_artifacts", "FASTSNAP_KEEP_ARTIFACTS",
           "false", "keep snapshot files and QEMU logs of failed tests "
           "(in --fastsnap-artifacts-dir)", is_bool=True),
    Option("--fastsnap-artifacts-dir", "fastsnap_artifacts_dir", "FASTSNAP_ARTIFACTS_DIR",
           "fastsnap-artifacts", "where --fastsnap-keep-artifacts puts them"),
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MEM_RE = re.compile(r"(\d+(?:\.\d+)?)([KMGT]?)B?", re.IGNORECASE)
MIN_MEM = 16 << 20


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastsnap", "QEMU mapped-ram snapshots and fast snapshot load")
    for opt in OPTIONS:
        dest = _dest(opt)
        env = f" [env {opt.env}]" if opt.env else ""
        default = f" (default: {opt.default})" if opt.default and not opt.is_bool else ""
        if opt.is_bool:
            group.addoption(opt.flag, action="store_true", default=None, dest=dest,
                            help=opt.help + env)
        else:
            group.addoption(opt.flag, action="store", default=None, dest=dest,
                            choices=opt.choices, help=opt.help + env + default)
        # No ini default: an unset key must be told apart from one set to the default.
        parser.addini(opt.ini, opt.help + env + default, default=None)


def _dest(opt: Option) -> str:
    return opt.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Setting:
    """A resolved option value and where it came from (for error messages)."""

    value: str | None
    source: str         # "--flag", "ENV (environment)", "key (ini file)" or "default"

    @property
    def given(self) -> bool:
        return self.source != "default"

    def describe(self) -> str:
        return f"{self.source}={self.value!r}" if self.given else f"default {self.value!r}"


def _resolve(config: pytest.Config, opt: Option) -> Setting:
    """Command line, then environment, then ini, then default.  An empty
    environment variable or ini value counts as unset; an empty command-line
    value is kept (and refused by validation)."""
    value = config.getoption(_dest(opt))
    if value is not None:
        return Setting("true" if value is True else str(value), opt.flag)
    if opt.env and os.environ.get(opt.env):
        return Setting(os.environ[opt.env], f"{opt.env} (environment)")
    ini = config.getini(opt.ini)
    if ini not in (None, ""):
        return Setting(str(ini), f"{opt.ini} (ini file)")
    return Setting(opt.default, "default")


def _bool(setting: Setting) -> bool:
    text = (setting.value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE or text == "":
        return False
    raise pytest.UsageError(f"fastsnap: {setting.describe()} is not a boolean: use "
                            "1/0, true/false, yes/no or on/off")


def mem_bytes(text: str) -> int:
    """QEMU ``-m`` size (``64M``, ``1G``, ``512`` = MiB) in bytes; ValueError otherwise."""
    m = MEM_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a memory size like 64M or 1G: {text!r}")
    scale = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(m[1]) * scale[m[2].upper()])


@dataclass(frozen=True)
class FastsnapConfig:
    enabled: bool
    qemu_binary: str
    qemu_binary_dst: str | None
    accel: str
    mem: str
    keep_artifacts: bool
    artifacts_dir: Path
    # --fastsnap-mem / FASTSNAP_MEM / fastsnap_mem was set: every guest without
    # an explicit mem= gets it (else the test guests keep their own sizes).
    mem_given: bool = False


def _usage(setting: Setting, problem: str) -> pytest.UsageError:
    return pytest.UsageError(f"fastsnap: {setting.describe()}: {problem}")


def _validate(settings: dict[str, Setting]) -> None:
    """Refuse bad values up front, with one line naming the option and its
    source (only with --fastsnap: otherwise the plugin is inert)."""
    accel = settings["--fastsnap-accel"]
    if accel.value not in ("auto", "kvm", "tcg"):
        raise _usage(accel, "must be auto, kvm or tcg, not " + repr(accel.value))
    mem = settings["--fastsnap-mem"]
    try:
        size = mem_bytes(mem.value or "")
    except ValueError as err:
        raise _usage(mem, str(err)) from None
    if size < MIN_MEM:
        raise _usage(mem, f"at least {MIN_MEM >> 20}M is needed")
    for flag in ("--qemu-binary", "--qemu-binary-dst"):
        binary = settings[flag]
        if binary.value is None:
            continue
        if not binary.value.strip():
            raise _usage(binary, "empty: name a QEMU binary (a path or a name on PATH), or "
                         "leave the option out" + (" for qemu-system-x86_64 on PATH"
                                                   if flag == "--qemu-binary" else ""))
        if shutil.which(binary.value) is None:
            hint = (" (install qemu-system-x86 >= 9.0, or pass --qemu-binary=PATH)"
                    if not binary.given else " (not an executable file, nor a name on PATH)")
            raise _usage(binary, f"QEMU binary not found: {binary.value!r}{hint}")
    artifacts = settings["--fastsnap-artifacts-dir"]
    if not (artifacts.value or "").strip():
        raise _usage(artifacts, "empty: name a directory")


def get_config(config: pytest.Config) -> FastsnapConfig:
    settings = {opt.flag: _resolve(config, opt) for opt in OPTIONS}
    enabled = _bool(settings["--fastsnap"])
    keep = _bool(settings["--fastsnap-keep-artifacts"])
    if enabled:
        _validate(settings)
    return FastsnapConfig(
        enabled=enabled,
        qemu_binary=settings["--qemu-binary"].value or "qemu-system-x86_64",
        qemu_binary_dst=settings["--qemu-binary-dst"].value,
        accel=settings["--fastsnap-accel"].value or "auto",
        mem=settings["--fastsnap-mem"].value or "64M",
        keep_artifacts=keep,
        artifacts_dir=Path(settings["--fastsnap-artifacts-dir"].value or "fastsnap-artifacts"),
        mem_given=settings["--fastsnap-mem"].given,
    )
