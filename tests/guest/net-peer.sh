# Guest test: a virtio_net client of a peer serving HTTP on 8080 and `nc -l -p 9000 -e md5sum`
# on 9000: the tap's far end in a network namespace the test created, or another guest on the
# same switch (net-switch.sh runs this as its client). Waits for the peer, pings it, downloads a
# file over HTTP (the test compares the md5), uploads one (the peer answers with its md5).
# Parameters come from the kernel command line: novaip, novapeer, novasize.
. /tests/lib.sh
ip=$(arg novaip); peer=$(arg novapeer); size=$(arg novasize)
test -d /sys/class/net/eth0 || { echo "no eth0"; ls /sys/class/net; exit 2; }
echo "mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu)"
echo "queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
# The virtio features the driver accepted, bit 0 first.
echo "features=$(cat /sys/class/net/eth0/device/features)"
net_up_and_reach "$ip" "$peer"
ping -c 3 -W 5 "$peer"
echo "ping ok"
printf 'GET /blob HTTP/1.0\r\n\r\n' | nc "$peer" 8080 > /tmp/resp
echo "download md5=$(tail -c "$size" /tmp/resp | md5sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/up bs=1M count=4 2>/dev/null
want=$(md5sum < /tmp/up | cut -d' ' -f1)
# The peer answers with the md5 of what it received (nc -e md5sum), after our half-close.
got=$(nc "$peer" 9000 < /tmp/up | cut -d' ' -f1)
echo "upload want=$want got=$got"
[ "$want" = "$got" ]
