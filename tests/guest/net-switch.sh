# Guest test: two guests on one novacrond switch. novarole=server serves a 4 MiB file over
# HTTP and checks an upload with `nc -e md5sum`; novarole=client pings it, downloads the file
# (the test compares both md5s) and uploads its own. Parameters: novarole, novaip, novapeer,
# novasize.
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }
role=$(arg novarole); ip=$(arg novaip); peer=$(arg novapeer); size=$(arg novasize)
test -d /sys/class/net/eth0 || { echo "no eth0"; ls /sys/class/net; exit 2; }
echo "mac=$(cat /sys/class/net/eth0/address)"
ip link set lo up
ip link set eth0 up
if [ "$role" = server ]; then
    mkdir -p /www
    dd if=/dev/urandom of=/www/blob bs=1M count=$((size / 1048576)) 2>/dev/null
    echo "serve md5=$(md5sum < /www/blob | cut -d' ' -f1)"
    httpd -p 8080 -h /www
    ip addr add "$ip/24" dev eth0
    # Blocks until the client has uploaded; prints nothing itself.
    nc -l -p 9000 -e md5sum
    echo "server done"
else
    ip addr add "$ip/24" dev eth0
    tries=0
    until ping -c 1 -W 1 "$peer" >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -lt 120 ] || { echo "peer never answered"; exit 3; }
    done
    ping -c 3 -W 5 "$peer"
    echo "ping ok"
    printf 'GET /blob HTTP/1.0\r\n\r\n' | nc "$peer" 8080 > /tmp/resp
    echo "download md5=$(tail -c "$size" /tmp/resp | md5sum | cut -d' ' -f1)"
    dd if=/dev/urandom of=/tmp/up bs=1M count=4 2>/dev/null
    want=$(md5sum < /tmp/up | cut -d' ' -f1)
    got=$(nc "$peer" 9000 < /tmp/up | cut -d' ' -f1)
    echo "upload want=$want got=$got"
    [ "$want" = "$got" ]
fi
