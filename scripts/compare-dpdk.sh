#!/usr/bin/env bash
# Side by side: novacrond's vhost-user-net switch vs DPDK's own vhost backend (net_vhost),
# both driven by the same front-end: dpdk-testpmd with two virtio_user ports in `mac`
# forwarding mode (a packet received on one port is sent out of the other), primed with
# --tx-first, so packets circulate A -> element -> B -> testpmd -> A ... The element under
# test is either a novacrond switch with two ports or a second dpdk-testpmd with two
# net_vhost ports in `io` forwarding (DPDK's vhost switch). The element gets CPU 1, the
# driver CPU 0; runs are interleaved, ROUNDS of each, SECONDS long, for 64-, 1518- and (fwd)
# 9000-byte frames; the table shows the median packets/s (both directions), the ratio of the
# medians, and the spread of each round's ratio against the DPDK run next to it ("paired").
#
# Note: DPDK busy-polls its vhost rings on a dedicated core; novacrond sleeps when idle and
# runs on kicks (see README "Performance"). DPDK front-ends need --single-file-segments with
# any vhost-user backend that maps at most 8 regions (DPDK's own limit of 8 per table).
#
# Rows: novacrond with adaptive polling (the default), novacrond with poll=busy (a dedicated
# core, like DPDK's; busy queues are polled by one thread, `shell::group`), DPDK; each with
# the element's CPU use in cores over the run, packets per CPU-second and the frame bytes
# that makes per CPU-second in Gbit/s (the per-core rate of large frames).
#
# Two loads: `fwd` (the loop above, through two ports) and `drain` (a testpmd `txonly`
# front-end on one port; novacrond's port is alone on its switch and drops what it reads,
# DPDK's net_vhost runs `rxonly`; the rate is what the front-end got into the ring).
#
# Usage: scripts/compare-dpdk.sh [ROUNDS=3] [SECONDS=6]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
secs="${2:-6}"
command -v dpdk-testpmd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dpdk-dev >/dev/null
# NOVACROND=PATH runs another build of the daemon (an A/B against an older commit).
novacrond="$(realpath "${NOVACROND:-./target/release/novacrond}")"
cargo build --release --locked --bin novacrond >/dev/null 2>&1
work="$PWD/target/compare-dpdk"
rm -rf "$work"
mkdir -p "$work"

# Hugepages for the testpmd instances (not for novacrond).
if [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 1024 ]; then echo 1024 > /proc/sys/vm/nr_hugepages; fi
mkdir -p /dev/hugepages
mountpoint -q /dev/hugepages || mount -t hugetlbfs nodev /dev/hugepages

element_pid=""
cleanup() {
    if [ -n "$element_pid" ]; then kill "$element_pid" 2>/dev/null || true; wait "$element_pid" 2>/dev/null || true; fi
    element_pid=""
    rm -f /dev/hugepages/nc-cmp-* 2>/dev/null || true
}
trap cleanup EXIT

wait_socket() { for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1" >&2; exit 1; }

# Jumbo frames (above 1518 bytes): both elements and the front-end take frames up to 9000
# bytes (DPDK's virtio driver stops at an MTU of 9698, so 9000 is as large as a frame from it
# gets), in 10 KiB mbufs.
jumbo() { [ "$1" -gt 1518 ]; }
start_element() { # which load size
    rm -f "$work"/*.sock
    local mtu="" be=()
    if jumbo "$3"; then mtu=",mtu=9000"; be=(--mbuf-size=10240 --max-pkt-len=9018 --total-num-mbufs=8192); fi
    if [ "$1" = novacrond ] || [ "$1" = busy ]; then
        poll=adaptive; [ "$1" = busy ] && poll=busy
        second=(--net "socket=$work/b.sock,switch=cmp,mac=02:00:00:00:00:02,poll=$poll$mtu")
        [ "$2" = drain ] && second=()
        # A log that runs away must never fill the disk: cap it at 100 MB.
        (ulimit -f 200000; exec taskset -c 1 "$novacrond" --log-level warn --control none \
            --net "socket=$work/a.sock,switch=cmp,mac=02:00:00:00:00:01,poll=$poll$mtu" \
            "${second[@]}" 2>>"$work/novacrond.log") &
    elif [ "$2" = drain ]; then
        dpdk-testpmd --lcores '0@1,1@1' --no-pci --single-file-segments --file-prefix=nc-cmp-be \
            --vdev "net_vhost0,iface=$work/a.sock,queues=1" \
            -- --forward-mode=rxonly --auto-start --nb-cores=1 --stats-period=3600 "${be[@]}" >>"$work/dpdk-backend.log" 2>&1 &
    else
        dpdk-testpmd --lcores '0@1,1@1' --no-pci --single-file-segments --file-prefix=nc-cmp-be \
            --vdev "net_vhost0,iface=$work/a.sock,queues=1" --vdev "net_vhost1,iface=$work/b.sock,queues=1" \
            -- --forward-mode=io --auto-start --nb-cores=1 --stats-period=3600 "${be[@]}" >>"$work/dpdk-backend.log" 2>&1 &
    fi
    element_pid=$!
    wait_socket "$work/a.sock"
    [ "$2" = drain ] || wait_socket "$work/b.sock"
}

drive() { # frame size -> packets/s summed over both ports (median of the last readings)
    local fe=()
    # (--mbuf-size before --txpkts: testpmd checks the frame length against it as it parses.)
    if jumbo "$1"; then fe=(--mbuf-size=10240 --max-pkt-len=9018 --total-num-mbufs=4096); fi
    timeout $((secs + 4)) dpdk-testpmd --lcores '0@0,1@0' --no-pci --single-file-segments --file-prefix=nc-cmp-fe \
        --vdev "net_virtio_user0,path=$work/a.sock,queues=1,mac=02:00:00:00:00:01" \
        --vdev "net_virtio_user1,path=$work/b.sock,queues=1,mac=02:00:00:00:00:02" \
        -- --forward-mode=mac --eth-peer=0,02:00:00:00:00:02 --eth-peer=1,02:00:00:00:00:01 \
        --auto-start --tx-first "${fe[@]}" --txpkts="$1" --stats-period=1 --nb-cores=1 2>&1 \
        | awk '/Rx-pps:/ { v[n++] = $2 } END { s = 0; c = 0; for (i = n - 2 * 3; i < n; i++) if (i >= 4) { s += v[i]; c++ } if (c) printf "%d\n", 2 * s / c; else print 0 }' || true
}

drain() { # frame size -> packets/s the txonly front-end got into the element's ring
    local fe=()
    if jumbo "$1"; then fe=(--mbuf-size=10240 --max-pkt-len=9018 --total-num-mbufs=4096); fi
    timeout $((secs + 4)) dpdk-testpmd --lcores '0@0,1@0' --no-pci --single-file-segments --file-prefix=nc-cmp-fe \
        --vdev "net_virtio_user0,path=$work/a.sock,queues=1,mac=02:00:00:00:00:01" \
        -- --forward-mode=txonly --eth-peer=0,02:00:00:00:00:09 \
        --auto-start "${fe[@]}" --txpkts="$1" --stats-period=1 --nb-cores=1 2>&1 \
        | awk '/Tx-pps:/ { v[n++] = $2 } END { s = 0; c = 0; for (i = n - 3; i < n; i++) if (i >= 2) { s += v[i]; c++ } if (c) printf "%d\n", s / c; else print 0 }' || true
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Each round's element against the same round's DPDK (run next to it): "min-max" of those
# paired ratios. The VM's speed shifts for seconds at a time (the same element reads 2-3x
# apart between runs a minute apart); a pair shares its conditions more often than the
# medians of whole columns do.
spread() { paste "$1" "$2" | awk '$2 > 0 { r = $1 / $2; if (n == 0 || r < lo) lo = r; if (n == 0 || r > hi) hi = r; n++ }
    END { if (n) printf "%.2f-%.2f", lo, hi; else print "-" }'; }
ratio() { awk -v n="$1" -v d="$2" 'BEGIN { if (d > 0) printf "%.3f", n / d; else print "-" }'; }

# novacrond = adaptive polling (the default), busy = poll=busy on both ports, dpdk = net_vhost
# (which busy-polls its core). "cpu" is the element's CPU use during the run, in cores.
printf "%-6s %-6s %-10s %12s %6s %12s %8s %12s %7s %s\n" "load" "frame" "element" "pps" "cpu" "pkts/cpu-s" "Gb/cpu-s" "dpdk pps" "ratio" "paired"
hz=$(getconf CLK_TCK)
for load in fwd drain; do
sizes="64 1518"; [ "$load" = fwd ] && sizes="64 1518 9000"
for size in $sizes; do
    for which in novacrond busy dpdk; do : > "$work/$load-$which-$size"; : > "$work/$load-$which-$size.cpu"; done
    for r in $(seq "$rounds"); do
        order="novacrond busy dpdk"; [ $((r % 2)) -eq 0 ] && order="dpdk busy novacrond"
        for which in $order; do
            start_element "$which" "$load" "$size"
            before=$(cpu_ticks "$element_pid"); t0=$(date +%s.%N)
            if [ "$load" = drain ]; then drain "$size"; else drive "$size"; fi >> "$work/$load-$which-$size"
            after=$(cpu_ticks "$element_pid"); t1=$(date +%s.%N)
            awk -v a="$after" -v b="$before" -v hz="$hz" -v t0="$t0" -v t1="$t1" \
                'BEGIN { printf "%.2f\n", (a - b) / hz / (t1 - t0) }' >> "$work/$load-$which-$size.cpu"
            cleanup
        done
    done
    d=$(median < "$work/$load-dpdk-$size")
    for which in novacrond busy dpdk; do
        p=$(median < "$work/$load-$which-$size"); c=$(median < "$work/$load-$which-$size.cpu")
        per=$(awk -v p="$p" -v c="$c" 'BEGIN { if (c > 0) printf "%d", p / c; else print "-" }')
        gbit=$(awk -v p="$p" -v c="$c" -v s="$size" 'BEGIN { if (c > 0) printf "%.1f", p / c * s * 8 / 1e9; else print "-" }')
        printf "%-6s %-6s %-10s %12s %6s %12s %8s %12s %7s %s\n" "$load" "$size" "$which" "$p" "$c" "$per" "$gbit" "$d" \
            "$(ratio "$p" "$d")" "$(spread "$work/$load-$which-$size" "$work/$load-dpdk-$size")"
    done
done
done
