# Shared by the guest tests (sourced, not a test itself): kernel command line parameters and
# bringing eth0 up until the peer answers.
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}" ;; esac; done; }

# eth0 up with address $1/24, then pings $2 until it answers (2 minutes at most).
net_up_and_reach() {
    ip link set lo up
    ip link set eth0 up
    ip addr add "$1/24" dev eth0
    tries=0
    until ping -c 1 -W 1 "$2" >/dev/null 2>&1; do
        tries=$((tries + 1))
        [ $tries -lt 120 ] || { echo "peer never answered"; exit 3; }
    done
}
