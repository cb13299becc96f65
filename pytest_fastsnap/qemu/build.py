"""Other QEMU versions on demand: ``qemu-system-x86_64`` built into the cache.

    binary = build_qemu("10.2.2")          # Debian's source package of QEMU 10.2.2
    binary = build_qemu("master", source=Path("~/qemu"))   # a checkout of your own

Each version lives in ``<cache>/qemu/<VERSION>/`` (``bin/qemu-system-x86_64`` and
``BUILD-INFO.json``); ``<cache>`` is ``$FASTSNAP_CACHE_DIR``, else
``$XDG_CACHE_HOME/pytest-fastsnap`` (the loader's and the guest images' cache).
A build runs under ``<cache>/qemu/<VERSION>.lock``, so xdist workers and tox
environments asking for the same version wait for one build and share it.

Sources come from Debian's source packages through a private apt configuration
in ``<cache>/qemu/apt`` (the machine's own apt sources are never read or
changed; no binary package comes from there).  ``apt-get source`` unpacks the
package with Debian's patches (among them the one that skips the edk2 blobs the
``+ds`` tarball lacks).  Build dependencies come from the machine's own suite.
Firmware is the distribution's (``seabios``, ``qemu-system-data``), compiled in
with ``--firmwarepath``.  Recipe and timings: reference/measured-on-these-machines.md.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from filelock import FileLock

from pytest_fastsnap.workdirs import cache_dir

BINARY = "qemu-system-x86_64"
INFO = "BUILD-INFO.json"
DEB_SRC_SUITES = ("unstable",)
DEB_MIRROR = "http://deb.debian.org/debian"
INDEX_MAX_AGE = 24 * 3600
BUILD_DEPS = ("ninja-build", "libglib2.0-dev", "libpixman-1-dev", "flex", "bison",
              "pkg-config", "libslirp-dev", "libfdt-dev", "device-tree-compiler",
              "xz-utils", "dpkg-dev", "python3-venv", "gcc")
# QEMU's configure runs offline and wants these in its Python (the +ds
# tarball's python/wheels is empty).
PYTHON_DEPS = ("meson==1.9.0", "pycotap")
FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/share/qemu")
FIRMWARE_FILES = {"/usr/share/seabios/bios-256k.bin": "seabios",
                  "/usr/share/qemu/multiboot_dma.bin": "qemu-system-data",
                  "/usr/share/qemu/qboot.rom": "qemu-system-data"}
CONFIGURE_ARGS = ("--target-list=x86_64-softmmu", "--disable-docs", "--disable-werror",
                  "--disable-user", "--disable-rust", "--disable-download",
                  "--disable-install-blobs",
                  f"--firmwarepath={':'.join(FIRMWARE_DIRS)}")
VERSION_RE = re.compile(r"\d+\.\d+\.\d+(-rc\d+)?")
LABEL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+~:-]{0,63}")


class BuildInputError(Exception):
    """Bad input: an unknown version, a bad --source, a missing firmware package."""


class BuildFailed(Exception):
    """A build step failed; the message names the step and the log."""


@dataclass(frozen=True)
class BuiltQemu:
    version: str
    binary: Path
    info: dict[str, object]


def cache_root() -> Path:
    """``<cache>/qemu`` (see :func:`pytest_fastsnap.workdirs.cache_dir`)."""
    return cache_dir("qemu")


def check_version_label(version: str, *, source: Path | None) -> None:
    """A Debian-built VERSION is ``X.Y.Z`` (or Debian's own version string);
    with --source any short label (``master``) names the cache entry."""
    if source is None:
        if not (VERSION_RE.fullmatch(version) or _debian_version_like(version)):
            raise BuildInputError(f"VERSION must look like 10.2.2 (or a Debian version such "
                                  f"as 1:10.2.2+ds-1), not {version!r}")
    elif not LABEL_RE.fullmatch(version) or version in (".", "..") or version == "apt":
        raise BuildInputError(f"VERSION names the cache entry of a --source build: letters, "
                              f"digits and ._+~:- only, not {version!r}")


def _debian_version_like(text: str) -> bool:
    return bool(re.fullmatch(r"(\d+:)?\d+\.\d+\.\d+[A-Za-z0-9.+~]*-[A-Za-z0-9.+~]+", text))


def built(version: str, root: Path | None = None) -> BuiltQemu | None:
    """The cached build of *version*, or None."""
    entry = (root or cache_root()) / version
    binary, info = entry / "bin" / BINARY, entry / INFO
    if not (info.is_file() and binary.is_file() and os.access(binary, os.X_OK)):
        return None
    try:
        data = json.loads(info.read_text())
    except (OSError, ValueError):
        return None
    return BuiltQemu(version, binary, data)


def list_built(root: Path | None = None) -> list[BuiltQemu]:
    root = root or cache_root()
    if not root.is_dir():
        return []
    return [b for d in sorted(root.iterdir()) if d.is_dir() and (b := built(d.name, root))]


def build_qemu(version: str, *, source: Path | None = None, root: Path | None = None,
               log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr)
               ) -> BuiltQemu:
    """The cached build of *version*, building it first if needed (under the lock)."""
    check_version_label(version, source=source)
    if source is not None:
        source = source.expanduser().resolve()
        if not (source / "configure").is_file() or not (source / "meson.build").is_file():
            raise BuildInputError(f"--source {source}: not a QEMU source tree "
                                  "(no configure and meson.build there)")
    root = root or cache_root()
    found = built(version, root)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / f"{version}.lock"))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        log(f"waiting for another build of QEMU {version} (lock {lock.lock_file})")
        lock.acquire()
    try:
        found = built(version, root)
        if found is not None:
            return found
        return _build_locked(version, source, root, log)
    finally:
        lock.release()


def _build_locked(version: str, source: Path | None, root: Path,
                  log: Callable[[str], None]) -> BuiltQemu:
    _check_firmware()
    info: dict[str, object] = {"version": version}
    deb_version = ""
    if source is None:
        deb_version = resolve_debian_version(version, root)
        info |= {"source": f"debian qemu={deb_version}", "debian_version": deb_version}
        log(f"QEMU {version}: Debian source package qemu={deb_version}")
    else:
        info["source"] = str(source)
    entry, work = root / version, root / f"{version}.work"
    log_path = root / f"{version}.build.log"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    try:
        with open(log_path, "w") as logf:
            step = Steps(logf, log_path)
            _install_build_deps(log, step)
            tree = source or _fetch_debian_source(deb_version, root, work, step)
            python = _build_python(root, step)
            build_dir = work / "build"
            build_dir.mkdir()
            log(f"QEMU {version}: configure ({tree})")
            step("configure", [str(tree / "configure"), *CONFIGURE_ARGS,
                               f"--python={python}"], cwd=build_dir)
            log(f"QEMU {version}: ninja {BINARY} (about 5 min on 2 cores; log {log_path})")
            step("ninja", ["ninja", BINARY], cwd=build_dir)
            staged = work / "entry"
            (staged / "bin").mkdir(parents=True)
            shutil.copy2(build_dir / BINARY, staged / "bin" / BINARY)
            out = step("version", [str(staged / "bin" / BINARY), "--version"])
            info |= {"version_text": out.splitlines()[0] if out else "",
                     "configure": list(CONFIGURE_ARGS),
                     "build_seconds": round(time.monotonic() - started, 1),
                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            (staged / INFO).write_text(json.dumps(info, indent=2) + "\n")
            shutil.rmtree(entry, ignore_errors=True)
            os.replace(staged, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = built(version, root)
    if result is None:
        raise BuildFailed(f"{entry} incomplete after the build")
    log(f"QEMU {version}: built in {info['build_seconds']} s")
    return result


class Steps:
    """Runs build steps with their output in one log; a failed step raises
    BuildFailed naming the step, with its output's tail and the log's path."""

    def __init__(self, logf: TextIO, log_path: Path) -> None:
        self.logf = logf
        self.log_path = log_path

    def __call__(self, what: str, cmd: list[str], *, cwd: Path | None = None,
                 env: dict[str, str] | None = None) -> str:
        if shutil.which(cmd[0]) is None:
            raise BuildFailed(f"{what}: {cmd[0]} not found")
        self.logf.write(f"\n# {what}: {' '.join(cmd)}\n")
        self.logf.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                              check=False, stdin=subprocess.DEVNULL)
        self.logf.write(proc.stdout + proc.stderr)
        self.logf.flush()
        if proc.returncode != 0:
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise BuildFailed(f"{what} failed (exit {proc.returncode}); full log "
                              f"{self.log_path}:\n{tail}")
        return proc.stdout


def _check_firmware() -> None:
    missing = sorted({pkg for path, pkg in FIRMWARE_FILES.items() if not Path(path).exists()})
    if missing:
        raise BuildInputError(f"firmware missing: install {' '.join(missing)} from your "
                              "distribution (the build uses its firmware via --firmwarepath)")


# -- Debian's source index, through a private apt configuration ---------------------


def apt_options(root: Path) -> list[str]:
    apt = root / "apt"
    return ["-o", f"Dir::State={apt}/state", "-o", f"Dir::Cache={apt}/cache",
            "-o", f"Dir::Etc::SourceList={apt}/sources.list",
            "-o", "Dir::Etc::SourceParts=/dev/null"]


def _refresh_index(root: Path, step: Steps) -> None:
    """``apt-get update`` of the private index, at most once a day."""
    apt = root / "apt"
    sources = "".join(f"deb-src {DEB_MIRROR} {suite} main\n" for suite in DEB_SRC_SUITES)
    stamp = apt / "updated"
    if (stamp.exists() and time.time() - stamp.stat().st_mtime < INDEX_MAX_AGE
            and (apt / "sources.list").read_text() == sources):
        return
    (apt / "sources.list").write_text(sources)
    step("apt-get update (private source index)", ["apt-get", *apt_options(root), "update"])
    stamp.touch()


def available_versions(root: Path) -> list[str]:
    """Debian versions of the ``qemu`` source package in the private index, newest first."""
    apt = root / "apt"
    for sub in ("state/lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    with FileLock(str(apt / "index.lock")), open(apt / "index.log", "w") as logf:
        step = Steps(logf, apt / "index.log")
        _refresh_index(root, step)
        out = step("apt-cache showsrc qemu",
                   ["apt-cache", *apt_options(root), "showsrc", "qemu"])
    versions = {m[1] for m in re.finditer(r"^Version: (\S+)$", out, re.M)}
    return sorted(versions, key=functools.cmp_to_key(_dpkg_compare), reverse=True)


def upstream_of(debian_version: str) -> str:
    """``1:10.2.2+ds-1`` -> ``10.2.2``; ``1:11.0.0~rc1+ds-1`` -> ``11.0.0-rc1``."""
    text = debian_version.split(":", 1)[-1].rsplit("-", 1)[0]
    text = re.split(r"\+", text, maxsplit=1)[0]
    return text.replace("~rc", "-rc")


def resolve_debian_version(version: str, root: Path) -> str:
    """The Debian version string of the ``qemu`` source package for *version*."""
    versions = available_versions(root)
    if version in versions:
        return version
    matching = [v for v in versions if upstream_of(v) == version]
    if matching:
        return matching[0]
    listed = ", ".join(f"{upstream_of(v)} ({v})" for v in versions) or "none"
    suites = ", ".join(DEB_SRC_SUITES)
    raise BuildInputError(f"QEMU {version} is not in Debian's source index ({suites}); "
                          f"available: {listed}; or pass --source DIR for a QEMU checkout")


def _dpkg_compare(a: str, b: str) -> int:
    if a == b:
        return 0
    lt = subprocess.run(["dpkg", "--compare-versions", a, "lt", b], check=False).returncode
    return -1 if lt == 0 else 1


def _fetch_debian_source(deb_version: str, root: Path, work: Path,
                         step: Steps) -> Path:
    """Download and unpack (with Debian's patches) the source package into *work*."""
    src = work / "src"
    src.mkdir()
    step("apt-get source", ["apt-get", *apt_options(root), "source", f"qemu={deb_version}"],
         cwd=src)
    trees = [p for p in src.iterdir() if p.is_dir() and (p / "configure").is_file()]
    if len(trees) != 1:
        raise BuildFailed(f"apt-get source qemu={deb_version} unpacked {len(trees)} source "
                          f"trees in {src}")
    return trees[0]


def _install_build_deps(log: Callable[[str], None], step: Steps) -> None:
    """Install missing build dependencies from the machine's own suite."""
    missing = [pkg for pkg in BUILD_DEPS if not _installed(pkg)]
    if not missing:
        return
    if os.geteuid() != 0:
        raise BuildInputError(f"build dependencies missing: sudo apt-get install "
                              f"{' '.join(missing)}")
    log(f"installing build dependencies from this machine's suite: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    step("apt-get install (build dependencies)",
         ["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq",
          "--no-install-recommends", *missing], env=env)


def _installed(package: str) -> bool:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                         text=True, check=False).stdout
    return out.endswith("install ok installed")


def _build_python(root: Path, step: Steps) -> Path:
    """A venv with the Python packages QEMU's offline configure wants (shared by builds)."""
    venv = root / "pyvenv"
    python = venv / "bin" / "python3"
    stamp = venv / "fastsnap-deps"
    with FileLock(str(root / "pyvenv.lock")):
        if stamp.exists() and stamp.read_text() == " ".join(PYTHON_DEPS):
            return python
        shutil.rmtree(venv, ignore_errors=True)
        step("python venv", ["/usr/bin/python3", "-m", "venv", str(venv)])
        step("pip install", [str(python), "-m", "pip", "install", "-q", *PYTHON_DEPS])
        stamp.write_text(" ".join(PYTHON_DEPS))
    return python
