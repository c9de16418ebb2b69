# Guest test: four writers, each in its own 4 MiB area of /dev/vda, write 256 KiB of fresh
# random data with O_DIRECT and read it back with O_DIRECT, round after round, while the host
# kills the daemon (kill -9) and starts it again under them. Every read must match what was
# written: a request lost, completed twice or executed stale shows as a mismatch or a hang.
# The host ends the run by writing NOVACRON-STOP into the disk's last 4 KiB. Each writer
# prints its progress every 20 rounds. Runs under `sh -e`.
dev=/dev/vda
test -b "$dev" || { echo "no $dev"; exit 2; }
last=$(( $(cat /sys/block/vda/size) / 8 - 1 ))
echo "queues=$(ls /sys/block/vda/mq | wc -l)"

writer() {
    id=$1
    round=0
    while [ ! -e /tmp/stop ]; do
        slot=$(( id * 16 + (round % 4) * 4 ))
        dd if=/dev/urandom of=/tmp/w$id bs=64k count=4 2>/dev/null
        dd if=/tmp/w$id of=$dev bs=64k seek=$slot count=4 oflag=direct conv=notrunc 2>/dev/null \
            || { echo "writer $id: write failed in round $round"; return 1; }
        dd if=$dev of=/tmp/r$id bs=64k skip=$slot count=4 iflag=direct 2>/dev/null \
            || { echo "writer $id: read failed in round $round"; return 1; }
        cmp -s /tmp/w$id /tmp/r$id || { echo "writer $id: MISMATCH in round $round"; return 1; }
        round=$(( round + 1 ))
        # Progress the host can wait for (a migration test waits for it on each side).
        if [ $(( round % 20 )) = 0 ]; then echo "writer $id: round $round"; fi
    done
    echo "writer $id: $round rounds verified"
}

pids=""
for id in 0 1 2 3; do
    writer $id &
    pids="$pids $!"
done
echo "crash-writers started"
while :; do
    if dd if=$dev bs=4k skip=$last count=1 iflag=direct 2>/dev/null | grep -q NOVACRON-STOP; then
        break
    fi
    sleep 1
done
touch /tmp/stop
failed=0
for pid in $pids; do
    wait $pid || failed=1
done
[ "$failed" = 0 ]
echo "crash-writers ok"
