"""`fastsnap build-native` and `fastsnap build-images`: the build steps the
set-up script runs (both cached, keyed by source hash)."""

from __future__ import annotations

import argparse
import sys

from pytest_fastsnap.cli.common import EXIT_FAILED, output_dir


def _build_failed(command: str, err: Exception) -> int:
    """A failed build: the compiler's or tool's output is the diagnosis, so
    print all of it (an operation failure, exit 1, not bad input)."""
    print(f"fastsnap {command}: {err}", file=sys.stderr)
    return EXIT_FAILED


def _build_native(args: argparse.Namespace) -> int:
    from pytest_fastsnap.native.loader import LoaderBuildError, loader_path

    variants = ["release", "asan"] if args.variant == "all" else [args.variant]
    for variant in variants:
        try:
            print(f"fastsnap-loader ({variant}): {loader_path(variant=variant)}")
        except LoaderBuildError as err:
            return _build_failed("build-native", err)
    return 0


def _build_images(args: argparse.Namespace) -> int:
    from pytest_fastsnap.guests import build_all_images
    from pytest_fastsnap.guests.linux import LinuxImageError
    from pytest_fastsnap.guests.tiny import TinyBuildError

    cache_dir = output_dir(args.cache_dir, "--cache-dir") if args.cache_dir else None
    try:
        images = build_all_images(cache_dir)
    except (LinuxImageError, TinyBuildError) as err:
        return _build_failed("build-images", err)
    for name, path in images.items():
        print(f"{name}: {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("build-native", help="build the native loader into its cache",
                       description="Build fastsnap-loader into ~/.cache/pytest-fastsnap/native "
                       "(keyed by a hash of sources, flags and compiler) and print its path.")
    p.add_argument("--variant", choices=("release", "asan", "all"), default="all")
    p.set_defaults(func=_build_native)
    p = sub.add_parser("build-images", help="build the test guest images into their cache",
                       description="Build the tiny and Linux guest images into their cache "
                       "(keyed by source hash) and print their paths.")
    p.add_argument("--cache-dir", default=None,
                   help="default: $FASTSNAP_CACHE_DIR/images, else "
                   "$XDG_CACHE_HOME/pytest-fastsnap/images (~/.cache/...)")
    p.set_defaults(func=_build_images)
