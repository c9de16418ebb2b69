# Guest test: the disk grows under the running guest (the host calls device.resize). The new
# capacity arrives as a config-change interrupt (virtio_blk re-reads it); the grown tail is then
# written and read back with O_DIRECT. Runs under `sh -e`.
dev=/dev/vda
test -b "$dev" || { echo "no $dev"; exit 2; }
old=$(cat /sys/block/vda/size)
echo "size-sectors=$old"
echo "waiting-for-resize"
tries=0
while [ "$(cat /sys/block/vda/size)" = "$old" ]; do
    tries=$((tries + 1))
    [ $tries -lt 1200 ] || { echo "the size never changed"; exit 3; }
    sleep 0.1
done
new=$(cat /sys/block/vda/size)
echo "resized-sectors=$new"
# The last MiB of the grown disk, beyond the old end.
dd if=/dev/urandom of=/tmp/tail bs=1M count=1 2>/dev/null
dd if=/tmp/tail of=$dev bs=1M seek=$(( new / 2048 - 1 )) oflag=direct conv=notrunc 2>/dev/null
[ "$(md5sum < /tmp/tail | cut -d' ' -f1)" = \
  "$(dd if=$dev bs=1M skip=$(( new / 2048 - 1 )) count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)" ]
echo "resize ok"
