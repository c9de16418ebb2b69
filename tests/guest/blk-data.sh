# Guest test: patterned writes through virtio_blk, page cache dropped, read back and compared;
# then a filesystem made, filled, remounted and checked; then discard. Runs under `sh -e`.
dev=/dev/vda
test -b "$dev" || { echo "no $dev"; ls /dev; exit 2; }
echo "size-sectors=$(cat /sys/block/vda/size)"
echo "serial=$(cat /sys/block/vda/serial 2>/dev/null || echo none)"
echo "queues=$(ls /sys/block/vda/mq | wc -l)"
echo "discard-max=$(cat /sys/block/vda/queue/discard_max_bytes)"
echo "logical-block-size=$(cat /sys/block/vda/queue/logical_block_size)"

# 8 MiB of pseudo-random data at offset 1 MiB, read back after dropping caches.
dd if=/dev/urandom of=/tmp/pattern bs=1M count=8 2>/dev/null
want=$(md5sum < /tmp/pattern | cut -d' ' -f1)
dd if=/tmp/pattern of=$dev bs=1M seek=1 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
got=$(dd if=$dev bs=1M skip=1 count=8 2>/dev/null | md5sum | cut -d' ' -f1)
echo "pattern want=$want got=$got"
[ "$want" = "$got" ]

# O_DIRECT-sized small writes across the device, verified after cache drop.
dd if=/dev/urandom of=/tmp/small bs=4k count=16 2>/dev/null
dd if=/tmp/small of=$dev bs=4k seek=2560 conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
[ "$(md5sum < /tmp/small | cut -d' ' -f1)" = "$(dd if=$dev bs=4k skip=2560 count=16 2>/dev/null | md5sum | cut -d' ' -f1)" ]
echo "small-writes ok"

# Discard must make the range read back as zeros (we punch holes).
blkdiscard -o 1048576 -l 1048576 $dev
echo 3 > /proc/sys/vm/drop_caches
zeros=$(dd if=/dev/zero bs=1M count=1 2>/dev/null | md5sum | cut -d' ' -f1)
[ "$(dd if=$dev bs=1M skip=1 count=1 2>/dev/null | md5sum | cut -d' ' -f1)" = "$zeros" ]
echo "discard ok"

# A filesystem: make, fill, unmount, remount, verify.
mke2fs -q -b 4096 $dev
mount -t ext4 $dev /mnt
cp /tmp/pattern /mnt/file
sync
umount /mnt
echo 3 > /proc/sys/vm/drop_caches
mount -t ext4 $dev /mnt
[ "$(md5sum < /mnt/file | cut -d' ' -f1)" = "$want" ]
umount /mnt
echo "filesystem ok"

# Leave a checked file for the next boot (reconnect test).
mount -t ext4 $dev /mnt
echo "$want" > /mnt/file.md5
umount /mnt
sync
echo "guest-data ok"
