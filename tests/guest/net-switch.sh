# Guest test: two guests on one novacrond switch. novarole=server serves a 4 MiB file over
# HTTP and checks an upload with `nc -e md5sum`; novarole=client is net-peer.sh against it.
# Parameters: novarole, novaip, novapeer, novasize (the server pings novapeer throughout when
# given, and prints the loss).
. /tests/lib.sh
role=$(arg novarole); ip=$(arg novaip); peer=$(arg novapeer); size=$(arg novasize)
if [ "$role" != server ]; then
    . /tests/net-peer.sh
    exit 0
fi
test -d /sys/class/net/eth0 || { echo "no eth0"; ls /sys/class/net; exit 2; }
echo "mac=$(cat /sys/class/net/eth0/address)"
ip link set lo up
ip link set eth0 up
mkdir -p /www
dd if=/dev/urandom of=/www/blob bs=1M count=$((size / 1048576)) 2>/dev/null
echo "serve md5=$(md5sum < /www/blob | cut -d' ' -f1)"
httpd -p 8080 -h /www
ip addr add "$ip/24" dev eth0
# With novapeer (a migration test), ping the client 10 times a second from when it first
# answers until the upload is in, and report the loss.
if [ -n "$peer" ]; then
    ( until ping -c 1 -W 1 "$peer" > /dev/null 2>&1; do :; done
      exec ping -q -i 0.1 "$peer" ) > /tmp/ping 2>&1 &
    pinger=$!
fi
# Blocks until the client has uploaded; prints nothing itself.
nc -l -p 9000 -e md5sum
if [ -n "$peer" ]; then
    kill -INT $pinger
    wait $pinger || true
    echo "ping: $(grep 'packet loss' /tmp/ping)"
fi
echo "server done"
