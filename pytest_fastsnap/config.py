"""Options of the plugin: one definition each, as CLI flag, ini key and env var.

Resolution order: command line, then environment, then ini, then default.
"""

from __future__ import annotations

import os
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
    Option("--fastsnap-machine", "fastsnap_machine", "FASTSNAP_MACHINE", None,
           "versioned machine type(s) every guest uses, e.g. pc-q35-10.0 or "
           "q35=pc-q35-10.0,pc=pc-i440fx-10.0; default: when --qemu-binary-dst differs, "
           "the older binary's resolution of the aliases q35 and pc, else the aliases"),
    Option("--fastsnap-accel", "fastsnap_accel", "FASTSNAP_ACCEL", "auto",
           "accelerator: auto picks KVM on bare metal and TCG when KVM is nested or unusable",
           choices=("auto", "kvm", "tcg")),
    Option("--fastsnap-mem", "fastsnap_mem", "FASTSNAP_MEM", "64M",
           "guest RAM size for the default guests (QEMU -m syntax)"),
    Option("--fastsnap-report-json", "fastsnap_report_json", "FASTSNAP_REPORT_JSON", None,
           "write this run's QEMU versions and known-defect outcomes to FILE "
           "(`fastsnap report FILE...` prints the defect table over several runs)"),
    Option("--fastsnap-keep-artifacts", "fastsnap_keep_artifacts", "FASTSNAP_KEEP_ARTIFACTS",
           "false", "keep snapshot files and QEMU logs of failed tests "
           "(in --fastsnap-artifacts-dir)", is_bool=True),
    Option("--fastsnap-artifacts-dir", "fastsnap_artifacts_dir", "FASTSNAP_ARTIFACTS_DIR",
           "fastsnap-artifacts", "where --fastsnap-keep-artifacts puts them"),
)

_TRUE = {"1", "true", "yes", "on"}


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
        parser.addini(opt.ini, opt.help + env, default=opt.default)


def _dest(opt: Option) -> str:
    return opt.flag.lstrip("-").replace("-", "_")


def _resolve(config: pytest.Config, opt: Option) -> str | None:
    value = config.getoption(_dest(opt))
    if value is not None:
        return "true" if value is True else str(value)
    if opt.env and os.environ.get(opt.env):
        return os.environ[opt.env]
    ini = config.getini(opt.ini)
    return str(ini) if ini not in (None, "") else opt.default


@dataclass(frozen=True)
class FastsnapConfig:
    enabled: bool
    qemu_binary: str
    qemu_binary_dst: str | None
    machine: str | None
    accel: str
    mem: str
    keep_artifacts: bool
    artifacts_dir: Path
    report_json: Path | None = None


def get_config(config: pytest.Config) -> FastsnapConfig:
    values = {opt.flag: _resolve(config, opt) for opt in OPTIONS}
    accel = values["--fastsnap-accel"] or "auto"
    if accel not in ("auto", "kvm", "tcg"):
        raise pytest.UsageError(f"--fastsnap-accel / FASTSNAP_ACCEL must be auto, kvm or tcg, "
                                f"not {accel!r}")
    return FastsnapConfig(
        enabled=(values["--fastsnap"] or "").lower() in _TRUE,
        qemu_binary=values["--qemu-binary"] or "qemu-system-x86_64",
        qemu_binary_dst=values["--qemu-binary-dst"],
        machine=values["--fastsnap-machine"],
        accel=accel,
        mem=values["--fastsnap-mem"] or "64M",
        keep_artifacts=(values["--fastsnap-keep-artifacts"] or "").lower() in _TRUE,
        artifacts_dir=Path(values["--fastsnap-artifacts-dir"] or "fastsnap-artifacts"),
        report_json=Path(values["--fastsnap-report-json"])
        if values["--fastsnap-report-json"] else None,
    )
