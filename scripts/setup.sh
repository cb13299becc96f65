#!/usr/bin/env bash
# Prepare everything pytest-fastsnap needs on a fresh Debian 12/13 machine:
# system packages (QEMU >= 9.0, compiler, headers), a virtualenv in .venv with
# the project installed, the native loader and the test guest images.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bash scripts/install-system-deps.sh

venv="$top/.venv"
stamp="$venv/.fastsnap-installed"
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ]; then
    echo "setup: creating $venv"
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing pytest-fastsnap and its dependencies into $venv"
    "$venv/bin/pip" install -q --upgrade pip
    "$venv/bin/pip" install -q -e ".[dev]"
    echo "$want" > "$stamp"
else
    echo "setup: $venv up to date"
fi

# Build once here so compile errors show apart from test failures; the test
# run reuses the cache (keyed by source hash) and rebuilds only on change.
"$venv/bin/fastsnap" build-native
"$venv/bin/fastsnap" build-images
