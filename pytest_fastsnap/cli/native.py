"""Pass-through to the native loader: `fastsnap inspect|verify|load|serve`."""

from __future__ import annotations

import os

LOADER_COMMANDS = ("inspect", "verify", "load", "serve")


def run_loader(argv: list[str]) -> int:
    from pytest_fastsnap.native.loader import loader_path

    path = str(loader_path())
    os.execv(path, [path, *argv])
    return 1  # not reached
