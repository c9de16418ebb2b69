# Guest test: a download from the peer (HTTP over a tap, or another guest on a switch) that
# runs while the host kills the daemon (kill -9) and starts it again: TCP carries it across
# the reconnect, and the bytes that arrive must be exactly the file (the host compares the
# md5). Then an upload (the peer answers with its md5) and pings. Parameters: novaip,
# novapeer, novasize.
. /tests/lib.sh
ip=$(arg novaip); peer=$(arg novapeer); size=$(arg novasize)
net_up_and_reach "$ip" "$peer"
echo "restart-download started"
printf 'GET /blob HTTP/1.0\r\n\r\n' | nc "$peer" 8080 > /tmp/resp
echo "download bytes=$(wc -c < /tmp/resp)"
echo "download md5=$(tail -c "$size" /tmp/resp | md5sum | cut -d' ' -f1)"
dd if=/dev/urandom of=/tmp/up bs=1M count=4 2>/dev/null
want=$(md5sum < /tmp/up | cut -d' ' -f1)
got=$(nc "$peer" 9000 < /tmp/up | cut -d' ' -f1)
echo "upload want=$want got=$got"
[ "$want" = "$got" ]
ping -c 3 -W 5 "$peer"
echo "ping after restart ok"
