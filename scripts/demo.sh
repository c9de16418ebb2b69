#!/usr/bin/env bash
# Demo: installs what it needs, builds novacrond, serves a 256 MiB disk image
# (target/demo/disk0.img) and a NIC on vhost-user sockets, boots a small Linux guest under QEMU
# against them and prints what the guest sees. The NIC is a tap inside a network namespace the
# demo creates (the host side is 10.99.0.1 there, serving a page over HTTP); nothing leaves
# that namespace. The image is kept, so a second run finds the file the first one wrote.
#
# `scripts/demo.sh --rbd`: the disk is an image on a throwaway single-node Ceph cluster
# (scripts/ceph-cluster.sh, loopback only), removed with the cluster at the end.
set -euo pipefail
rbd_demo=""
[ "${1:-}" = --rbd ] && rbd_demo=1
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked
bash scripts/build-guest.sh target/guest >/dev/null
mkdir -p target/demo/www
sock="$PWD/target/demo/disk0.sock"
nic="$PWD/target/demo/nic0.sock"
ns="novademo-$$"
ip netns add "$ns"
ip -n "$ns" link set lo up
ceph_dir="/tmp/novademo-ceph-$$"
cleanup() {
    kill ${httpd:-} ${daemon:-} 2>/dev/null || true
    wait ${daemon:-} 2>/dev/null || true
    [ -z "$rbd_demo" ] || ip netns exec "$ns" bash scripts/ceph-cluster.sh stop "$ceph_dir" >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
disk="path=$PWD/target/demo/disk0.img,size=256M"
if [ -n "$rbd_demo" ]; then
    # In the demo's namespace, like the daemon: its loopback is where the cluster listens.
    echo "== starting a single-node Ceph cluster in $ceph_dir =="
    ip netns exec "$ns" bash scripts/ceph-cluster.sh start "$ceph_dir" --owner $$ >/dev/null
    ip netns exec "$ns" rbd -c "$ceph_dir/ceph.conf" --id novacron create rbd/demo-disk0 --size 256M
    disk="path=rbd:rbd/demo-disk0,ceph-conf=$ceph_dir/ceph.conf,ceph-id=novacron"
    disk+=",ceph-keyring=$ceph_dir/ceph.client.novacron.keyring"
fi
# The daemon runs in the namespace so its tap is created there; its sockets are ordinary files.
ip netns exec "$ns" ./target/release/novacrond --control "$PWD/target/demo/control.sock" \
    --blk "socket=$sock,$disk,queues=2,serial=DEMO-DISK0" \
    --net "socket=$nic,tap=demotap0,mac=52:54:00:de:00:01,queues=2" \
    2> target/demo/novacrond.log &
daemon=$!
for _ in $(seq 100); do [ -S "$sock" ] && [ -S "$nic" ] && break; sleep 0.1; done
[ -S "$nic" ] || { cat target/demo/novacrond.log; exit 1; }
ip -n "$ns" addr add 10.99.0.1/24 dev demotap0
ip -n "$ns" link set demotap0 up
echo "hello from the host side of the tap, $(date -u +%FT%TZ)" > target/demo/www/index.html
ip netns exec "$ns" busybox httpd -f -p 8080 -h "$PWD/target/demo/www" &
httpd=$!
echo "== novacrond is serving $sock and $nic; booting the guest (QEMU, TCG) =="
qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m 512M \
    -nographic -no-reboot -nodefaults -serial stdio \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel target/guest/vmlinuz -initrd target/guest/initramfs.gz \
    -append "console=ttyS0 quiet panic=-1 novatest=demo novaip=10.99.0.2 novapeer=10.99.0.1" \
    -chardev socket,id=vda,path="$sock" -device vhost-user-blk-pci,chardev=vda,num-queues=2 \
    -chardev socket,id=n0,path="$nic" -netdev vhost-user,id=net0,chardev=n0,queues=2 \
    -device virtio-net-pci,netdev=net0,mac=52:54:00:de:00:01,mq=on,vectors=0 \
    </dev/null | tr -d '\r' | sed -n '/NOVATEST-START/,/NOVATEST-EXIT/p'
echo "== novactl device stats nic0 =="
./target/release/novactl --control "$PWD/target/demo/control.sock" device stats nic0
echo "== daemon log =="
cat target/demo/novacrond.log
