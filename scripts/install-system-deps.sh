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

# iproute2: `ip netns` / veth pairs and `tc` for the TCP transport tests.
pkgs=(gcc make libc6-dev linux-libc-dev python3-venv clang cpio busybox-static iproute2)
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

ensure_bookworm_backports() {
    local src=/etc/apt/sources.list.d/bookworm-backports.sources
    [ -f "$src" ] && return 0
    echo "install-system-deps: adding bookworm-backports for $1"
    $SUDO tee "$src" >/dev/null <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

# --- libvirt (libvirt sparse save images suite, suites/test_libvirt.py) ---------------
# `virsh save --image-format sparse` needs libvirt >= 11.2: bookworm-backports on
# Debian 12 (no recommends: QEMU and libc stay as they are), the distribution's own on
# 13.  The daemons are not started here; the suite starts private instances.
# FASTSNAP_SKIP_LIBVIRT=1 leaves libvirt out.
install_libvirt() {
    [ "${FASTSNAP_SKIP_LIBVIRT:-0}" = 1 ] && return 0
    local lp=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients) p lmissing=()
    for p in "${lp[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
            || lmissing+=("$p")
    done
    if [ ${#lmissing[@]} -eq 0 ]; then
        echo "install-system-deps: libvirt present ($(virsh --version))"
        return 0
    fi
    . /etc/os-release
    local target=()
    if [ "${VERSION_CODENAME:-}" = bookworm ]; then
        ensure_bookworm_backports "libvirt >= 11.2"
        target=(-t bookworm-backports)
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${target[@]}" "${lp[@]}"
    echo "install-system-deps: libvirt $(virsh --version)"
}
install_libvirt
# --- end libvirt -------------------------------------------------------------------------

if ! need_qemu && [ ${#missing[@]} -eq 0 ]; then
    echo "install-system-deps: everything present ($(qemu-system-x86_64 --version | head -1))"
    exit 0
fi

. /etc/os-release
qemu_target=()
if need_qemu; then
    case "${VERSION_CODENAME:-}" in
        bookworm)
            ensure_bookworm_backports "QEMU >= 9.0"
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
