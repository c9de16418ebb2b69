#!/usr/bin/env bash
# Starts libvirt (Debian's libvirtd) without systemd, as root, for the libvirt test and demo;
# idempotent. Debian's libvirt-daemon-system would create the libvirt-qemu user, the kvm group
# and /etc/libvirt/qemu.conf and start the daemons through systemd; here the script does the
# part the test needs: a QEMU driver that runs TCG guests as root with no security driver,
# cgroups or namespaces (a container has none of them), console logs to files.
set -euo pipefail
have() { command -v "$1" >/dev/null 2>&1; }
have libvirtd && have virsh || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        libvirt-daemon libvirt-clients libvirt-daemon-driver-qemu >/dev/null
}
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null ||
    useradd -r -g kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu /var/lib/libvirt/qemu /var/cache/libvirt/qemu /run/libvirt /etc/libvirt
conf=/etc/libvirt/qemu.conf
if ! grep -q "novacron: libvirt-up.sh" "$conf" 2>/dev/null; then
    cat >> "$conf" <<'CONF'
# novacron: libvirt-up.sh — libvirt without systemd, TCG guests as root
user = "root"
group = "root"
security_driver = "none"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
fi
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    # Detached from our stdio: a daemon holding a test harness pipe would keep it open.
    libvirtd -d -p /run/libvirt/novacron-libvirtd.pid </dev/null >>/var/log/libvirt/novacron-libvirtd.log 2>&1
    for _ in $(seq 100); do
        virsh -c qemu:///system version >/dev/null 2>&1 && break
        sleep 0.1
    done
fi
virsh -c qemu:///system version >/dev/null
echo "libvirt-up: libvirtd serving qemu:///system"
