# Guest test: two guests on one novacrond switch. novarole=server serves a 4 MiB file over
# HTTP and checks an upload with `nc -e md5sum`; novarole=client is net-peer.sh against it.
# Parameters: novarole, novaip, novapeer, novasize.
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
# Blocks until the client has uploaded; prints nothing itself.
nc -l -p 9000 -e md5sum
echo "server done"
