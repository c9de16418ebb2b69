#!/usr/bin/env bash
# Tiering numbers, side by side in one run:
#  1. hot-extent IOPS of a tiered disk vs a plain disk (same page-cached data, 4 KiB random
#     reads, QD 32, polling libblkio client; interleaved, ROUNDS each, medians, ratio);
#  2. a realistic image: an ext4 filesystem filled with this machine's /usr/share and
#     /usr/lib (text and binaries) served as a tiered disk; demotion of every extent (MB/s of
#     extent data per second, one core) and the compression ratio;
#  3. cold read latency (4 KiB random reads, QD 1, on the fully demoted disk);
#  4. promotion of every extent back (MB/s).
# Daemon on CPU 1, client on CPU 0.
#
# Usage: scripts/tier-bench.sh [ROUNDS=3] [SECONDS=5]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-5}"
cargo build --release --locked --bin novacrond --bin novactl --example blkload >/dev/null 2>&1
work="$PWD/target/tier-bench"
rm -rf "$work"; mkdir -p "$work"
ctl() { ./target/release/novactl --control "$work/c.sock" "$@"; }
load() { taskset -c 0 ./target/release/examples/blkload --socket "$1" --rw randread --bs 4096 --qd "$2" --seconds "$secs" --poll "$3"; }
field() { sed -n "s/.*\"$1\":\([0-9.]*\).*/\1/p"; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
pid=""
stop() { [ -n "$pid" ] && { kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; }; pid=""; }
trap 'stop; mountpoint -q "$work/mnt" && umount "$work/mnt" || true' EXIT
start() { # --blk specs...
    rm -f "$work"/*.sock
    taskset -c 1 ./target/release/novacrond --log-level warn --control "$work/c.sock" "$@" 2>>"$work/novacrond.log" &
    pid=$!
    for _ in $(seq 200); do [ -S "$work/c.sock" ] && break; sleep 0.05; done
    sleep 0.2 # the device socket appears with the control socket; let the daemon settle
}

echo "== 1. hot extents vs a plain disk (4 KiB randread, QD 32, polling client) =="
# The same page-cached file, served alternately as a plain disk and as the hot file of a
# tiered disk whose extents are all hot.
dd if=/dev/urandom of="$work/data.img" bs=1M count=1024 status=none
cat "$work/data.img" > /dev/null
for r in $(seq "$rounds"); do
    start --blk "socket=$work/d.sock,path=$work/data.img"
    load "$work/d.sock" 32 on | field iops >> "$work/plain.iops"
    stop
    start --blk "socket=$work/d.sock,tier-hot=$work/data.img,tier-cold=$work/data.cold,size=1G"
    load "$work/d.sock" 32 on | field iops >> "$work/tiered.iops"
    stop
done
p=$(median < "$work/plain.iops"); t=$(median < "$work/tiered.iops")
printf "plain %s IOPS, tiered (all hot) %s IOPS, ratio %.3f\n" "$p" "$t" "$(awk -v a="$t" -v b="$p" 'BEGIN { print a / b }')"

echo "== 2. a realistic image: ext4 with /usr/share and /usr/lib =="
truncate -s 1G "$work/image.hot"
mkfs.ext4 -q -F "$work/image.hot"
mkdir -p "$work/mnt"
mount -o loop "$work/image.hot" "$work/mnt"
cp -a /usr/share "$work/mnt/share" 2>/dev/null || true
cp -a /usr/lib "$work/mnt/lib" 2>/dev/null || true
used=$(df -B1 --output=used "$work/mnt" | tail -1)
umount "$work/mnt"
echo "filesystem holds $((used / 1048576)) MiB"
start --blk "socket=$work/image.sock,tier-hot=$work/image.hot,tier-cold=$work/image.cold,size=1G,extent=1M"
t0=$(date +%s.%N); ctl --json tier demote image --all > "$work/demote.json"; t1=$(date +%s.%N)
ctl --json tier status image > "$work/status.json"
raw=$(grep -o '"moved": *[0-9]*' "$work/demote.json" | grep -o '[0-9]*$')
ratio=$(grep -o '"compression-ratio": *[0-9.]*' "$work/status.json" | grep -o '[0-9.]*$')
awk -v n="$raw" -v a="$t0" -v b="$t1" -v r="$ratio" 'BEGIN { printf "demoted %d extents (1 MiB) in %.2f s: %.0f MB/s of extent data; compression ratio %.2f\n", n, b - a, n * 1.048576 / (b - a), r }'

echo "== 3. cold reads (4 KiB random, QD 1, interrupt-driven client) =="
load "$work/image.sock" 1 off | tee "$work/cold.json"

echo "== 4. promotion of every extent =="
t0=$(date +%s.%N); ctl --json tier promote image --all > "$work/promote.json"; t1=$(date +%s.%N)
moved=$(grep -o '"moved": *[0-9]*' "$work/promote.json" | grep -o '[0-9]*$')
awk -v n="$moved" -v a="$t0" -v b="$t1" 'BEGIN { printf "promoted %d extents in %.2f s: %.0f MB/s\n", n, b - a, n * 1.048576 / (b - a) }'
stop
