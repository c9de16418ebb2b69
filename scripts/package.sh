#!/usr/bin/env bash
# Installs NovaCron the way the package does, into a staging root, and builds the Debian
# package from it:
#
#   scripts/package.sh [--root DIR] [--bin-dir DIR] [--lib-dir DIR] [--deb OUT.deb] [--fast]
#
#   /usr/bin/novacrond, /usr/bin/novactl
#   /usr/libexec/novacron/vhost-user-blk, vhost-user-net   (links to novacrond: the
#       vhost-user backend-program entry points; the name selects --type)
#   /usr/share/qemu/vhost-user/50-novacrond-vhost-user-{blk,net}.json   (QEMU's backend
#       descriptors, docs/interop/vhost-user.json)
#   /lib/systemd/system/novacrond.service, novacrond.socket, novacrond@.service
#   /usr/lib/x86_64-linux-gnu/libnovacron.so, /usr/include/novacron.h   (the C client)
#   /usr/share/novacron/prometheus/novacron-rules.yml, grafana/novacron-dashboard.json
#   /usr/share/doc/novacron/instance.conf.example
#
# --bin-dir takes already built binaries (novacrond, novactl) from DIR and --lib-dir
# libnovacron.so (default: the bin dir) instead of building release ones; --fast builds an uncompressed .deb (tests). Default
# root: target/pkgroot.
set -euo pipefail
cd "$(dirname "$0")/.."
root=target/pkgroot
bin_dir=""
lib_dir=""
deb=""
compress=(-Zxz)
while [ $# -gt 0 ]; do
    case "$1" in
        --root) root="$2"; shift 2 ;;
        --bin-dir) bin_dir="$2"; shift 2 ;;
        --lib-dir) lib_dir="$2"; shift 2 ;;
        --deb) deb="$2"; shift 2 ;;
        --fast) compress=(-Znone); shift ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -z "$bin_dir" ]; then
    cargo build --release --locked -p novacron --bin novacrond --bin novactl >/dev/null
    cargo build --release --locked -p novacron-ffi --lib >/dev/null
    bin_dir=target/release
fi
rm -rf "$root"
inst() { install -D -m "$1" "$2" "$root/$3"; }
inst 755 "$bin_dir/novacrond" usr/bin/novacrond
inst 755 "$bin_dir/novactl" usr/bin/novactl
mkdir -p "$root/usr/libexec/novacron"
ln -s ../../bin/novacrond "$root/usr/libexec/novacron/vhost-user-blk"
ln -s ../../bin/novacrond "$root/usr/libexec/novacron/vhost-user-net"
for f in packaging/qemu/*.json; do inst 644 "$f" "usr/share/qemu/vhost-user/$(basename "$f")"; done
for f in packaging/systemd/*; do inst 644 "$f" "lib/systemd/system/$(basename "$f")"; done
lib_dir="${lib_dir:-$bin_dir}"
[ -f "$lib_dir/libnovacron.so" ] || { echo "package.sh: no $lib_dir/libnovacron.so" >&2; exit 1; }
inst 644 "$lib_dir/libnovacron.so" usr/lib/x86_64-linux-gnu/libnovacron.so
inst 644 ffi/include/novacron.h usr/include/novacron.h
inst 644 packaging/prometheus/novacron-rules.yml usr/share/novacron/prometheus/novacron-rules.yml
inst 644 packaging/grafana/novacron-dashboard.json usr/share/novacron/grafana/novacron-dashboard.json
inst 644 packaging/etc/instance.conf.example usr/share/doc/novacron/instance.conf.example
inst 644 README.md usr/share/doc/novacron/README.md
if [ -n "$deb" ]; then
    version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
    mkdir -p "$root/DEBIAN"
    cat > "$root/DEBIAN/control" <<CONTROL
Package: novacron
Version: $version
Architecture: amd64
Maintainer: NovaCron <dev@novacron.invalid>
Depends: libc6
Recommends: qemu-system-x86
Section: admin
Priority: optional
Description: NovaCron vhost-user data plane (virtio-blk and virtio-net backends)
 novacrond serves virtio-blk and virtio-net devices to QEMU, libvirt and
 cloud-hypervisor guests over vhost-user sockets, with io_uring disks, tiering,
 an in-daemon L2 switch, QoS, a JSON-RPC control socket and Prometheus metrics.
CONTROL
    dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
    rm -rf "$root/DEBIAN"
    echo "package.sh: $deb"
fi
echo "package.sh: installed into $root"
