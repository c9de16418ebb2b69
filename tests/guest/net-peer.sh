# Guest test: virtio_net served by novacrond on a tap; the peer (the tap's far end) sits in a
# network namespace the test created. Ping, download a file over HTTP, upload one with nc.
# The peer runs `nc -l -p 9000 -e md5sum` to check the upload.
# Parameters come from the kernel command line: novaip, novapeer, novasize.
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
ip=$(arg novaip); peer=$(arg novapeer); size=$(arg novasize)
test -d /sys/class/net/eth0 || { echo "no eth0"; ls /sys/class/net; exit 2; }
echo "mac=$(cat /sys/class/net/eth0/address) mtu=$(cat /sys/class/net/eth0/mtu)"
echo "queues=$(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)"
ip link set lo up
ip link set eth0 up
ip addr add "$ip/24" dev eth0
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
