#!/usr/bin/env bash
# Build the Linux guest (kernel + initramfs) into the image cache; print the paths.
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
py="$top/.venv/bin/python"
[ -x "$py" ] || py=python3
exec "$py" -c 'import sys; from pathlib import Path
from pytest_fastsnap.guests.linux import linux_image
print(*linux_image(Path(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] else None), sep="\n")' "${1:-}"
