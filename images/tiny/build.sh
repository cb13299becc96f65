#!/usr/bin/env bash
# Build the tiny guest into the image cache and print its path.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
py="$top/.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" -c 'import sys; from pathlib import Path
from pytest_fastsnap.guests.tiny import tiny_kernel
print(tiny_kernel(Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else None))' "${1:-}"
