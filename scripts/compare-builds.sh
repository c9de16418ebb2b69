#!/usr/bin/env bash
# A/B of two novacrond binaries (e.g. before and after a change) with the same libblkio load
# generator: 4 KiB random reads at QD 1 and 32 on a null device and a page-cached file, with an
# interrupt-driven and a polling client. Daemon on CPU 1, load on CPU 0, runs interleaved
# (A B B A ...), ROUNDS of each, SECONDS long; prints medians and B/A ratios.
#
# Usage: scripts/compare-builds.sh A_BINARY B_BINARY [ROUNDS=3] [SECONDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
a="$(realpath "$1")"; b="$(realpath "$2")"
rounds="${3:-3}"; secs="${4:-3}"
cargo build --release --locked --example blkload >/dev/null 2>&1
work="$PWD/target/compare-builds"
rm -rf "$work"; mkdir -p "$work"
img="$work/file.img"
dd if=/dev/urandom of="$img" bs=1M count=1024 status=none
cat "$img" > /dev/null
pid=""
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap stop EXIT
results="$work/results.txt"; : > "$results"
for backing in null file; do
  if [ "$backing" = null ]; then spec="path=null,size=8G"; else spec="path=$img"; fi
  for qd in 1 32; do
    for client in irq poll; do
      for round in $(seq "$rounds"); do
        order="A B"; [ $((round % 2)) -eq 0 ] && order="B A"
        for which in $order; do
          bin="$a"; [ "$which" = B ] && bin="$b"
          sock="$work/$which.sock"; rm -f "$sock"
          taskset -c 1 "$bin" --log-level warn --control none --blk "socket=$sock,$spec" 2>>"$work/daemon.log" &
          pid=$!
          for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
          poll=off; [ "$client" = poll ] && poll=on
          out="$(taskset -c 0 ./target/release/examples/blkload --socket "$sock" --rw randread \
                 --bs 4096 --qd "$qd" --seconds "$secs" --poll "$poll")"
          stop
          echo "$backing $qd $client $which $out" >> "$results"
        done
      done
    done
  done
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    backing, qd, client, which, js = line.split(' ', 4)
    rows.setdefault((backing, int(qd), client), {}).setdefault(which, []).append(json.loads(js)['iops'])
print(f"{'backing':8}{'qd':>4} {'client':>6} | {'A IOPS':>12}{'B IOPS':>12}{'B/A':>7} | runs A / B")
for (backing, qd, client), r in sorted(rows.items()):
    ma, mb = statistics.median(r['A']), statistics.median(r['B'])
    print(f"{backing:8}{qd:>4} {client:>6} | {ma:>12,.0f}{mb:>12,.0f}{mb/ma:>7.2f} | "
          f"{' '.join(f'{x/1e3:.0f}k' for x in r['A'])} / {' '.join(f'{x/1e3:.0f}k' for x in r['B'])}")
PY
