# Guest test under libvirt (tests/it/libvirt.rs): the disk (vda) and NIC (eth0) novacrond
# serves to a domain libvirt started. First boot: a pattern is written to vda (marker in
# sector 0, its md5 in sector 1, data at 1 MiB), the peer pinged, then a disk the host
# hot-plugs (vdb) is written, read back and unplugged; then the guest waits to be destroyed.
# Second boot (after `virsh destroy` + `virsh start`: the daemon saw QEMU vanish and come
# back): the pattern is read back and the peer pinged again.
. /tests/lib.sh
ip=$(arg novaip); peer=$(arg novapeer)
test -b /dev/vda || { echo "no vda"; exit 2; }
test -d /sys/class/net/eth0 || { echo "no eth0"; exit 2; }
marker=$(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 9)
if [ "$marker" = "NOVABOOT1" ]; then
    want=$(dd if=/dev/vda bs=512 skip=1 count=1 2>/dev/null | head -c 32)
    got=$(dd if=/dev/vda bs=1M skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1)
    echo "boot=2 pattern want=$want got=$got"
    [ "$want" = "$got" ]
    boot=2
else
    dd if=/dev/urandom of=/tmp/p bs=1M count=4 2>/dev/null
    want=$(md5sum < /tmp/p | cut -d' ' -f1)
    dd if=/tmp/p of=/dev/vda bs=1M seek=1 conv=fsync 2>/dev/null
    printf '%s' "$want" | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null
    printf 'NOVABOOT1' | dd of=/dev/vda bs=512 conv=fsync 2>/dev/null
    echo 3 > /proc/sys/vm/drop_caches
    got=$(dd if=/dev/vda bs=1M skip=1 count=4 2>/dev/null | md5sum | cut -d' ' -f1)
    echo "boot=1 pattern want=$want got=$got"
    [ "$want" = "$got" ]
    boot=1
fi
net_up_and_reach "$ip" "$peer"
echo "ping ok"
[ $boot = 2 ] && exit 0
echo "READY-FOR-HOTPLUG"
tries=0
until [ -b /dev/vdb ]; do
    tries=$((tries + 1)); [ $tries -lt 600 ] || { echo "vdb never came"; exit 4; }
    sleep 0.2
done
dd if=/dev/urandom of=/tmp/q bs=64k count=16 2>/dev/null
dd if=/tmp/q of=/dev/vdb bs=64k conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
[ "$(md5sum < /tmp/q | cut -d' ' -f1)" = "$(dd if=/dev/vdb bs=64k count=16 2>/dev/null | md5sum | cut -d' ' -f1)" ]
echo "hotplug ok"
echo "READY-FOR-UNPLUG"
tries=0
while [ -b /dev/vdb ]; do
    tries=$((tries + 1)); [ $tries -lt 600 ] || { echo "vdb never left"; exit 5; }
    sleep 0.2
done
echo "unplug ok"
echo "WAITING-FOR-DESTROY"
while true; do sleep 10; done
