#!/usr/bin/env bash
# Puts the QEMU that the live-migration tests run in DIR (default target/qemu-migration):
# DIR/usr/bin/qemu-system-x86_64, QEMU 10.0 from Debian's bookworm-backports, unpacked, not
# installed (the rest of the suite, the demo and libvirt keep Debian 12's QEMU 7.2).
#
# Why: QEMU 7.2 under TCG leaves guest pages stale at a migration's switchover when the host
# is loaded, whatever the device. scripts/qemu-migration-control.py shows it with QEMU's own
# virtio-net and no novacrond: beside one busy loop, 3 of 10 runs ended with 3-5 differing
# kernel pages and 2 destination kernels crashed; QEMU 10.0.2 in the same setting: 0 pages
# differ in 10 of 10 runs (2026-11-30). The migration tests compare guest RAM byte for byte,
# so they need a QEMU whose own migration is exact.
#
# On Debian 12 the backports suite is added to apt's sources (priority 100: nothing else
# changes unless asked for) if it is not there. Elsewhere, a system QEMU >= 10 is linked.
set -euo pipefail
dir="${1:-target/qemu-migration}"
want="10."
bin="$dir/usr/bin/qemu-system-x86_64"
if [ -x "$bin" ] && "$bin" --version | grep "version $want" >/dev/null; then
    exit 0
fi
rm -rf "$dir"
mkdir -p "$dir/usr/bin"
if qemu-system-x86_64 --version 2>/dev/null | grep -E 'version (1[0-9]|[2-9][0-9])\.' >/dev/null; then
    ln -s "$(command -v qemu-system-x86_64)" "$bin"
    exit 0
fi
. /etc/os-release
if [ "${VERSION_CODENAME:-}" != bookworm ]; then
    echo "migration-qemu: needs QEMU >= 10 for the migration tests (found" \
         "$(qemu-system-x86_64 --version 2>/dev/null | head -1); not Debian 12 either)" >&2
    exit 1
fi
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -qq
fi
debs="$(mktemp -d)"
trap 'rm -rf "$debs"' EXIT
# apt-get download writes into the working directory, as the _apt user when it can.
chmod 755 "$debs"
(cd "$debs" && apt-get download -qq -t bookworm-backports \
    qemu-system-x86 qemu-system-common qemu-system-data 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
for deb in "$debs"/*.deb; do
    dpkg-deb -x "$deb" "$dir"
done
"$bin" --version | grep "version $want" >/dev/null || {
    echo "migration-qemu: $bin is not QEMU $want*" >&2
    exit 1
}
