#!/usr/bin/env bash
# Installs what building, the demo and the tests need on a Debian machine (run as root):
# QEMU (TCG guests, qemu-storage-daemon), busybox-static and cpio (guest initramfs),
# util-linux (losetup/mount for the durability test), and a Rust toolchain if none exists.
set -euo pipefail
need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need_apt+=(qemu-system-x86)
have qemu-storage-daemon || need_apt+=(qemu-system-x86)
have busybox || need_apt+=(busybox-static)
busybox --list 2>/dev/null | grep -qx mke2fs || need_apt+=(busybox-static)
have cpio || need_apt+=(cpio)
have losetup || need_apt+=(util-linux)
have flock || need_apt+=(util-linux)
have cc || need_apt+=(gcc)
have taskset || need_apt+=(util-linux)
have ip || need_apt+=(iproute2)
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: run as root (apt-get, mount and losetup need it)" >&2
    exit 1
fi
# apt-get update is always needed: build-guest.sh downloads the kernel package by name.
apt-get update -qq
if [ ${#need_apt[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if ! have cargo; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cargo rustc >/dev/null
fi
echo "install-deps: ok"
