"""Find, build and run the native loader ``fastsnap-loader``.

The C sources ship in ``src/``; the binary is compiled on demand into a cache
directory keyed by the sha256 of the sources, the flags and the compiler's
version, under a file lock (xdist workers build it once), into a temporary
name that is renamed into place, so a crash never leaves half a binary.
``FASTSNAP_LOADER`` overrides the release build with a given binary.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from filelock import FileLock

from pytest_fastsnap.workdirs import cache_dir

SOURCE_DIR = Path(__file__).with_name("src")
BINARY_NAME = "fastsnap-loader"
COMMON_FLAGS = ("-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread")
VARIANT_FLAGS = {
    "release": ("-O2",),
    "asan": ("-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all"),
}
# Sanitizer runtime options used by run_loader for the asan variant.
ASAN_ENV = {
    "ASAN_OPTIONS": "abort_on_error=0:exitcode=99:detect_leaks=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=98",
}


class LoaderBuildError(RuntimeError):
    """The loader could not be built; the message names the missing piece."""


def compiler() -> str:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    raise LoaderBuildError("no C compiler found: install gcc (apt-get install gcc libc6-dev "
                           "linux-libc-dev) or set CC")


def sources() -> list[Path]:
    """The loader's C sources: everything in src/ but fuzz harnesses."""
    return sorted(p for p in SOURCE_DIR.glob("*.c") if not p.name.startswith("fuzz_"))


def _cache_root() -> Path:
    return cache_dir("native")


@functools.lru_cache(maxsize=8)
def _compiler_version(cc: str) -> str:
    """``cc --version``, once per process: every restore looks its loader up."""
    return subprocess.run([cc, "--version"], capture_output=True, text=True,
                          check=False).stdout


def build_key(variant: str, cc: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.[ch]")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    digest.update(" ".join((*COMMON_FLAGS, *VARIANT_FLAGS[variant])).encode())
    digest.update(_compiler_version(cc).encode())
    return digest.hexdigest()[:20]


def compile_command(variant: str, cc: str, out: Path) -> list[str]:
    return [cc, *COMMON_FLAGS, *VARIANT_FLAGS[variant], "-o", str(out),
            *map(str, sources()), "-lm"]


def loader_path(variant: str = "release") -> Path:
    """The loader binary for *variant* (``release`` or ``asan``), built if needed."""
    if variant not in VARIANT_FLAGS:
        raise ValueError(f"variant must be one of {sorted(VARIANT_FLAGS)}, not {variant!r}")
    override = os.environ.get("FASTSNAP_LOADER")
    if override and variant == "release":
        path = Path(override)
        if not os.access(path, os.X_OK):
            raise LoaderBuildError(f"FASTSNAP_LOADER={override} is not an executable file")
        return path
    cc = compiler()
    target_dir = _cache_root() / f"{variant}-{build_key(variant, cc)}"
    target = target_dir / BINARY_NAME
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target_dir) + ".lock"):
        if target.exists():
            return target
        fd, tmp = tempfile.mkstemp(prefix=f".{BINARY_NAME}-", dir=target_dir)
        os.close(fd)
        cmd = compile_command(variant, cc, Path(tmp))
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            hint = ""
            if "linux/userfaultfd.h" in result.stderr:
                hint = " (missing kernel headers: apt-get install linux-libc-dev)"
            raise LoaderBuildError(f"building {BINARY_NAME} ({variant}) failed{hint}:\n"
                                   f"$ {' '.join(cmd)}\n{result.stderr[-4000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    return target


def run_loader(args: Sequence[str], *, variant: str = "release", timeout: float = 30.0,
               input_bytes: bytes | None = None,
               env_extra: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the loader with *args* (*env_extra* added to the environment); a
    timeout kills it and raises TimeoutExpired."""
    env = dict(os.environ)
    env.update(env_extra or {})
    if variant == "asan":
        env.update(ASAN_ENV)
    return subprocess.run([str(loader_path(variant)), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False,
                          input=input_bytes.decode() if input_bytes else None)
