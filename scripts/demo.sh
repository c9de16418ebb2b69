#!/usr/bin/env bash
# Demo: installs what it needs, builds novacrond, serves a 256 MiB disk image
# (target/demo/disk0.img) on a vhost-user socket, boots a small Linux guest under QEMU against
# it and prints what the guest sees. The image is kept, so a second run finds the file the
# first one wrote.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --locked
bash scripts/build-guest.sh target/guest >/dev/null
mkdir -p target/demo
sock="$PWD/target/demo/disk0.sock"
./target/release/novacrond --control "$PWD/target/demo/control.sock" --blk "socket=$sock,path=$PWD/target/demo/disk0.img,size=256M,queues=2,serial=DEMO-DISK0" \
    2> target/demo/novacrond.log &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { cat target/demo/novacrond.log; exit 1; }
echo "== novacrond is serving $sock; booting the guest (QEMU, TCG) =="
qemu-system-x86_64 -accel tcg -machine q35 -cpu max -smp 2 -m 512M \
    -nographic -no-reboot -nodefaults -serial stdio \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -kernel target/guest/vmlinuz -initrd target/guest/initramfs.gz \
    -append "console=ttyS0 quiet panic=-1 novatest=demo" \
    -chardev socket,id=vda,path="$sock" -device vhost-user-blk-pci,chardev=vda,num-queues=2 \
    </dev/null | tr -d '\r' | sed -n '/NOVATEST-START/,/NOVATEST-EXIT/p'
echo "== daemon log =="
cat target/demo/novacrond.log
