"""`fastsnap build-native` and `fastsnap build-images`: the build steps the
set-up script runs (both cached, keyed by source hash)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _build_native(args: argparse.Namespace) -> int:
    from pytest_fastsnap.native.loader import loader_path

    variants = ["release", "asan"] if args.variant == "all" else [args.variant]
    for variant in variants:
        print(f"fastsnap-loader ({variant}): {loader_path(variant=variant)}")
    return 0


def _build_images(args: argparse.Namespace) -> int:
    from pytest_fastsnap.guests import build_all_images

    for name, path in build_all_images(Path(args.cache_dir) if args.cache_dir else None).items():
        print(f"{name}: {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("build-native", help="build the native loader into its cache")
    p.add_argument("--variant", choices=("release", "asan", "all"), default="all")
    p.set_defaults(func=_build_native)
    p = sub.add_parser("build-images", help="build the test guest images into their cache")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=_build_images)
