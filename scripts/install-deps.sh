#!/usr/bin/env bash
# Installs what building, the demo and the tests need on a Debian machine (run as root):
# QEMU (TCG guests, qemu-storage-daemon), busybox-static and cpio (guest initramfs),
# util-linux (losetup/mount for the durability test), python3 (the import-circle check; the
# system's, at /usr/bin/python3, for a test that runs it as an unprivileged uid),
# prometheus/promtool (the metrics test), dpdk-testpmd (the DPDK front-end test), dpkg-deb (the package test), libvirt (the libvirt
# test), Ceph (a single-node cluster for the rbd: tests: scripts/ceph-cluster.sh; librbd1 for
# the daemon's rbd engine; qemu-block-extra for qemu-storage-daemon's rbd driver);
# checks the Rust toolchain (rustup stable with rustfmt and clippy; it is not installed here).
set -euo pipefail
need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-system-x86_64 || need_apt+=(qemu-system-x86)
have qemu-storage-daemon || need_apt+=(qemu-system-x86)
have busybox || need_apt+=(busybox-static)
busybox --list 2>/dev/null | grep -x mke2fs >/dev/null || need_apt+=(busybox-static)
have cpio || need_apt+=(cpio)
have losetup || need_apt+=(util-linux)
have flock || need_apt+=(util-linux)
have cc || need_apt+=(gcc)
have taskset || need_apt+=(util-linux)
have ip || need_apt+=(iproute2)
[ -x /usr/bin/python3 ] || need_apt+=(python3)
# Prometheus and promtool: the metrics test runs a real Prometheus and checks our rules.
have prometheus || need_apt+=(prometheus)
have promtool || need_apt+=(prometheus)
have dpkg-deb || need_apt+=(dpkg)
# DPDK's testpmd: a front-end that is not ours (virtio_user) for the switch test, and the
# peer of scripts/compare-dpdk.sh.
have dpdk-testpmd || need_apt+=(dpdk-dev)
# libvirt (the libvirt test starts libvirtd itself: scripts/libvirt-up.sh).
have libvirtd || need_apt+=(libvirt-daemon libvirt-daemon-driver-qemu)
have virsh || need_apt+=(libvirt-clients)
# Ceph, installed as Debian installs it (with its recommends: the manager's modules).
need_ceph=()
have ceph-mon || need_ceph+=(ceph-mon)
have ceph-mgr || need_ceph+=(ceph-mgr)
have ceph-osd || need_ceph+=(ceph-osd)
have rbd || need_ceph+=(ceph-common)
[ -e /usr/lib/x86_64-linux-gnu/librbd.so.1 ] || need_ceph+=(librbd1)
[ -e /usr/lib/x86_64-linux-gnu/qemu/block-rbd.so ] || need_ceph+=(qemu-block-extra)
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: run as root (apt-get, mount and losetup need it)" >&2
    exit 1
fi
# apt-get update is always needed: build-guest.sh downloads the kernel package by name.
apt-get update -qq
if [ ${#need_apt[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ${#need_ceph[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_ceph[@]}" >/dev/null
fi
# The Rust toolchain is not an apt package here: Debian's cargo/rustc are older than the
# crate's rust-version. Use rustup's stable toolchain with rustfmt and clippy.
need_rust="$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)"
if ! have cargo || ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    echo "install-deps: needs a Rust toolchain >= $need_rust with rustfmt and clippy" \
         "(rustup: rustup toolchain install stable --component rustfmt,clippy)" >&2
    exit 1
fi
have_rust="$(rustc --version | awk '{print $2}')"
if [ "$(printf '%s\n%s\n' "$need_rust" "$have_rust" | sort -V | head -1)" != "$need_rust" ]; then
    echo "install-deps: rustc $have_rust is older than rust-version $need_rust (rustup update stable)" >&2
    exit 1
fi
echo "install-deps: ok"
