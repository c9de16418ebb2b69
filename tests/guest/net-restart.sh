# Guest test: net-peer.sh's download and upload (over a tap, or to another guest on a switch)
# while the host kills the daemon (kill -9) and starts it again: TCP carries the download
# across the reconnect (the host compares its md5) and the upload, after it, is checked by the
# peer. Parameters: novaip, novapeer, novasize.
. /tests/net-peer.sh
echo "transfer after restart ok"
