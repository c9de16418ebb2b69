#!/usr/bin/env bash
# Builds a tiny test guest: a Debian kernel and a busybox-static initramfs whose /init loads
# the virtio modules and runs the guest test named by `novatest=NAME` on the kernel command
# line (scripts from tests/guest/NAME.sh), printing NOVATEST-EXIT=<status> before powering off.
#
# Usage: scripts/build-guest.sh [OUTDIR]   (default: target/guest)
# Needs: apt-get (to download the kernel package), busybox-static, cpio, gzip.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$here/target/guest}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
# Several test binaries may build at once: one builder at a time, atomic results.
exec 9>"$out/.lock"
flock 9

for tool in busybox cpio gzip apt-get dpkg; do
    command -v "$tool" >/dev/null || { echo "build-guest: missing $tool (run scripts/install-deps.sh)" >&2; exit 1; }
done
if ! busybox --list | grep -x mke2fs >/dev/null; then
    echo "build-guest: busybox lacks mke2fs; install busybox-static" >&2
    exit 1
fi

# The kernel package linux-image-amd64 currently points at (never a glob: the archive holds many).
kpkg="$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kpkg" ]; then
    echo "build-guest: cannot resolve linux-image-amd64 (run apt-get update)" >&2
    exit 1
fi
kver="${kpkg#linux-image-}"
if [ ! -f "$out/vmlinuz" ] || [ "$(cat "$out/kernel-version" 2>/dev/null)" != "$kver" ]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    (cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1) || {
        echo "build-guest: apt-get download $kpkg failed" >&2; exit 1; }
    dpkg -x "$work"/"$kpkg"_*.deb "$work/x"
    cp "$work/x/boot/vmlinuz-$kver" "$out/vmlinuz"
    rm -rf "$out/modules"
    mkdir -p "$out/modules"
    # Only what the tests need; order matters (dependencies first).
    for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
             virtio_blk failover net_failover virtio_net crc16 crc32c_generic mbcache jbd2 ext4; do
        ko="$(find "$work/x/lib/modules/$kver" -name "$m.ko" -o -name "$m.ko.xz" | head -n1)"
        [ -n "$ko" ] || { echo "build-guest: module $m not found in $kpkg" >&2; exit 1; }
        case "$ko" in
            *.xz) xz -dc "$ko" > "$out/modules/$m.ko" ;;
            *) cp "$ko" "$out/modules/$m.ko" ;;
        esac
        echo "$m" >> "$out/modules/order"
    done
    echo "$kver" > "$out/kernel-version"
fi

root="$(mktemp -d)"
trap 'rm -rf "$root" ${work:-}' EXIT
mkdir -p "$root"/{bin,dev,proc,sys,tmp,mnt,tests,lib/modules}
cp "$(command -v busybox)" "$root/bin/busybox"
cp "$out"/modules/*.ko "$out/modules/order" "$root/lib/modules/"
cp "$here"/tests/guest/*.sh "$root/tests/"
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /lib/modules/order); do insmod /lib/modules/$m.ko 2>/dev/null || echo "insmod $m failed"; done
name=""
for word in $(cat /proc/cmdline); do
    case "$word" in novatest=*) name="${word#novatest=}" ;; esac
done
if [ -n "$name" ] && [ -f "/tests/$name.sh" ]; then
    echo "NOVATEST-START=$name"
    sh -e "/tests/$name.sh"
    echo "NOVATEST-EXIT=$?"
else
    echo "NOVATEST-EXIT=127 (no test named '$name')"
fi
sync
poweroff -f
INIT
chmod +x "$root/init" "$root/bin/busybox"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) > "$out/initramfs.gz.tmp"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
echo "$out"
