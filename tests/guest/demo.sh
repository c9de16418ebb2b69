# Demo guest: show the disk novacrond serves, and use it.
echo "guest kernel: $(uname -r)"
echo "disk /dev/vda: $(( $(cat /sys/block/vda/size) / 2048 )) MiB, serial '$(cat /sys/block/vda/serial)', $(ls /sys/block/vda/mq | wc -l) queue(s)"
echo "logical block size: $(cat /sys/block/vda/queue/logical_block_size), discard max: $(cat /sys/block/vda/queue/discard_max_bytes) bytes"
if ! mount -t ext4 /dev/vda /mnt 2>/dev/null; then
    echo "no filesystem yet: making one"
    mke2fs -q /dev/vda >/dev/null 2>&1
    mount -t ext4 /dev/vda /mnt
fi
runs=$(( $(cat /mnt/runs 2>/dev/null || echo 0) + 1 ))
echo $runs > /mnt/runs
dd if=/dev/urandom of=/mnt/data bs=1M count=16 2>/dev/null
sum=$(md5sum < /mnt/data | cut -d' ' -f1)
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 /dev/vda /mnt
echo "boot number $runs on this disk; 16 MiB written, read back after dropping caches: $( [ "$(md5sum < /mnt/data | cut -d' ' -f1)" = "$sum" ] && echo match || echo MISMATCH)"
df -h /mnt | tail -1
umount /mnt
# The NIC novacrond serves (a tap whose far end is a namespace the demo created).
. /tests/lib.sh
if [ -d /sys/class/net/eth0 ]; then
    ip=$(arg novaip); peer=$(arg novapeer)
    echo "nic eth0: mac $(cat /sys/class/net/eth0/address), mtu $(cat /sys/class/net/eth0/mtu), $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l) queue pair(s)"
    ip link set eth0 up
    ip addr add "$ip/24" dev eth0
    ping -c 3 -W 5 "$peer" | tail -2
    echo "fetched from the host over HTTP: $(printf 'GET / HTTP/1.0\r\n\r\n' | nc "$peer" 8080 | tail -1)"
fi
