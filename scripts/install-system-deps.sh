#!/usr/bin/env bash
# Install the system packages pytest-fastsnap needs: QEMU >= 9.0 (mapped-ram),
# a C compiler and the kernel headers for the native loader, Python venv support.
# Idempotent: does nothing when everything is present.  Needs root (or sudo).
#
# Debian 13 ships QEMU 10.0 in its own suite.  On Debian 12 QEMU comes from
# bookworm-backports; never from trixie, which would drag in a new libc.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_qemu() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || return 0
    local v
    v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
    [ "${v:-0}" -ge 9 ] && return 1 || return 0
}

pkgs=(gcc make libc6-dev linux-libc-dev python3-venv clang cpio busybox-static)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# libFuzzer's runtime (for the parser fuzz test) matches clang's major version.
if command -v clang >/dev/null 2>&1; then
    cv=$(clang --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
    rt="libclang-rt-${cv}-dev"
    dpkg-query -W -f='${Status}' "$rt" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$rt")
else
    # clang is installed below; its runtime in a second, cheap pass.
    trap 'bash "$0"' EXIT
fi

if ! need_qemu && [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: everything present ($(qemu-system-x86_64 --version | head -1))"
    exit 0
fi

. /etc/os-release
qemu_target=()
if need_qemu; then
    case "${VERSION_CODENAME:-}" in
        bookworm)
            src=/etc/apt/sources.list.d/bookworm-backports.sources
            if [ ! -f "$src" ]; then
                echo "install-system-deps: adding bookworm-backports for QEMU >= 9.0"
                $SUDO tee "$src" >/dev/null <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
            fi
            qemu_target=(-t bookworm-backports)
            ;;
        *) ;;
    esac
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if need_qemu; then
    $SUDO apt-get install -y -qq --no-install-recommends "${qemu_target[@]}" \
        qemu-system-x86 qemu-utils
fi
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
qemu-system-x86_64 --version | head -1
