#!/usr/bin/env bash
# A throwaway single-node Ceph cluster (Ceph 16 "pacific" from Debian: ceph-mon, ceph-mgr,
# ceph-osd, ceph-common) for the rbd: integration tests and the demo. No systemd, no root
# paths: everything lives under DIR, and every daemon listens on 127.0.0.1 only.
#
# Usage:
#   scripts/ceph-cluster.sh start DIR [--owner PID]
#       Create and start the cluster in DIR (absent or empty). Returns once pool `rbd` is
#       active+clean; prints `CEPH_CONF=DIR/ceph.conf` as its only stdout line. With
#       --owner PID a detached watcher runs `stop DIR` once process PID has gone (so a test
#       that dies does not leave a cluster behind). On failure: exits non-zero with the tail
#       of the relevant log, kills the daemons it started and keeps DIR for inspection
#       (`stop DIR` removes it; so does the watcher once PID is gone).
#   scripts/ceph-cluster.sh stop DIR
#       Kill every daemon of the cluster (SIGTERM, SIGKILL after a bound), wait for them,
#       remove DIR. Succeeds on a half-started cluster and on a DIR already gone.
#   scripts/ceph-cluster.sh osd-stop DIR
#       Stop the (only) OSD and wait until the monitor has it down: I/O to the cluster
#       blocks from then on (a cluster-side fault).
#   scripts/ceph-cluster.sh osd-start DIR
#       Start that OSD again on the same data; returns once it is up and in and the
#       pool's PGs are active+clean again.
#
# What it creates in DIR:
#   ceph.conf                        mon host v2:127.0.0.1:PORT (a free port, msgr2 only),
#                                    cephx on, keyring = DIR/$cluster.$name.keyring
#   ceph.client.admin.keyring        client.admin (all caps)
#   ceph.client.novacron.keyring     client.novacron: mon 'profile rbd' osd 'profile rbd pool=rbd'
#   mon/ mgr/ osd/                   daemon data (mon.a, mgr.x, osd.0); osd/block is the
#                                    BlueStore device, a 4 GiB sparse file
#   mgr-modules/                     links to the manager modules it runs
#   log/                             daemon logs (NAME.log), their stdout/stderr (NAME.out),
#                                    the cluster log, client logs (client.ID.log)
#   run/                             admin sockets, Ceph's pid files
#   pid/                             the pids this script started (NAME.pid, watcher.pid)
#   crash/                           crash dumps, if any
# One pool, `rbd` (8 PGs, size 1, application rbd); the manager also creates its own
# `device_health_metrics` pool (1 PG). Pools may be deleted (mon_allow_pool_delete). Nothing
# is written outside DIR (Ceph's own /var/lib/ceph, /var/log/ceph, /run/ceph are not used).
#
# Environment: CEPH_CLUSTER_TIMEOUT (seconds, default 120) bounds each wait.
set -euo pipefail

SELF="$(readlink -f "${BASH_SOURCE[0]}")"
TIMEOUT="${CEPH_CLUSTER_TIMEOUT:-120}"
STOP_GRACE=10          # seconds between SIGTERM and SIGKILL
PG_NUM=8
OSD_BLOCK_BYTES=$((4 << 30))
POOL=rbd
CEPH_PY=/usr/bin/python3  # the interpreter the ceph CLI itself runs on

log() { printf 'ceph-cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

# Paths of the cluster in $1; refuses paths ceph.conf cannot carry.
set_paths() {
    [ -n "${1:-}" ] || usage
    dir="$(realpath -m -- "$1")"
    case "$dir" in
        /) die "refusing DIR=/" ;;
        *[[:space:]\$\;\#,=\'\"\\]*) die "DIR must not contain blanks or any of \$;#,=\'\"\\: $dir" ;;
    esac
    conf="$dir/ceph.conf"
    marker="$dir/.ceph-cluster"
}

# Serialize the commands on one cluster (a watcher's stop waits for a running start).
lock_dir() {
    exec 9>>"$dir/.lock"
    flock -w $((TIMEOUT * 4)) 9 || die "could not lock $dir"
}

ceph_() { timeout 60 ceph -c "$conf" --connect-timeout 20 "$@" 9>&-; }

# Run CMD..., showing its output only if it fails.
quiet() { local out; out="$("$@" 2>&1)" || { printf '%s\n' "$out" >&2; return 1; }; }

# `json_ok EXPR` evaluates the Python expression EXPR over the JSON document on stdin (as d).
json_ok() { "$CEPH_PY" -c 'import json,sys; d=json.load(sys.stdin); sys.exit(0 if eval(sys.argv[1]) else 1)' "$1"; }

# --- processes ----------------------------------------------------------------------------

# The fields of /proc/PID/stat from field 3 (state) on, or failure if PID is gone.
proc_stat() { local s; s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; printf '%s\n' "${s##*) }"; }

# PID is a live (not zombie) process whose argument list has the exact argument $2.
proc_has_arg() {
    local pid="$1" want="$2" st arg
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    st="$(proc_stat "$pid")" || return 1
    [ "${st:0:1}" != Z ] || return 1
    while IFS= read -r -d '' arg; do
        [ "$arg" != "$want" ] || return 0
    done < "/proc/$pid/cmdline" 2>/dev/null
    return 1
}

# Start daemon NAME (mon.a, ...) from BINARY ARGS..., detached (own session, no terminal,
# stdio to log/NAME.out, so a caller reading our stdout does not wait for the daemons).
launch() {
    local name="$1"; shift
    setsid "$@" -f -c "$conf" </dev/null >>"$dir/log/$name.out" 2>&1 9>&- &
    echo "$!" > "$dir/pid/$name.pid"
}

# Pid of daemon NAME if it is running, else failure.
daemon_pid() {
    local pid
    pid="$(cat "$dir/pid/$1.pid" 2>/dev/null)" || return 1
    proc_has_arg "$pid" "$conf" || return 1
    echo "$pid"
}

# Every ceph-mon/mgr/osd process started with `-c DIR/ceph.conf`, pid files or not.
find_daemons() {
    local f pid comm
    for f in /proc/[0-9]*/cmdline; do
        pid="${f#/proc/}"; pid="${pid%/cmdline}"
        comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || continue
        case "$comm" in ceph-mon|ceph-mgr|ceph-osd) ;; *) continue ;; esac
        proc_has_arg "$pid" "$conf" && echo "$pid"
    done
    return 0
}

# Send SIGTERM to PIDS, wait up to STOP_GRACE s, SIGKILL what is left, wait again.
kill_wait() {
    local pids=("$@") pid left deadline sig st
    [ ${#pids[@]} -gt 0 ] || return 0
    for sig in TERM KILL; do
        kill -s "$sig" "${pids[@]}" 2>/dev/null || true
        deadline=$((SECONDS + STOP_GRACE))
        while :; do
            left=()
            for pid in "${pids[@]}"; do
                st="$(proc_stat "$pid")" && [ "${st:0:1}" != Z ] && left+=("$pid")
            done
            [ ${#left[@]} -gt 0 ] || return 0
            [ "$SECONDS" -lt "$deadline" ] || break
            sleep 0.2
        done
        [ "$sig" = KILL ] || log "still running after SIGTERM, sending SIGKILL: ${left[*]}"
        pids=("${left[@]}")
    done
    log "error: processes did not exit after SIGKILL: ${pids[*]}"
    return 1
}

# Kill all daemons of the cluster (not the watcher): the OSD first, while the monitor it
# reports its shutdown to is still there (else it waits 5 s for it), then the others.
kill_daemons() {
    local f pid pids=() osds=() others=()
    for f in "$dir"/pid/*.pid; do
        [ -e "$f" ] || continue
        [ "$(basename "$f")" != watcher.pid ] || continue
        pid="$(cat "$f" 2>/dev/null)" || continue
        proc_has_arg "$pid" "$conf" && pids+=("$pid")
    done
    for pid in $(find_daemons); do
        [[ " ${pids[*]} " == *" $pid "* ]] || pids+=("$pid")
    done
    for pid in "${pids[@]}"; do
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = ceph-osd ]; then osds+=("$pid"); else others+=("$pid"); fi
    done
    kill_wait "${osds[@]}" && kill_wait "${others[@]}"
}

# --- failure reporting and waiting ----------------------------------------------------------

# The daemons whose logs matter for the step in progress.
relevant=()

show_logs() {
    local name f
    for name in "${relevant[@]}"; do
        for f in "$dir/log/$name.log" "$dir/log/$name.out"; do
            [ -s "$f" ] || continue
            echo "----- tail $f" >&2
            tail -n 25 "$f" >&2
        done
    done
}

# Fail if a daemon we started has died (with its log).
check_daemons() {
    local f name
    for f in "$dir"/pid/*.pid; do
        [ -e "$f" ] || continue
        name="$(basename "$f" .pid)"
        [ "$name" != watcher ] || continue
        if ! daemon_pid "$name" >/dev/null; then
            relevant=("$name")
            die "$name exited"
        fi
    done
}

# `wait_until WHAT CMD...`: poll CMD until it succeeds, for at most TIMEOUT seconds.
wait_until() {
    local what="$1"; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@"; do
        check_daemons
        [ "$SECONDS" -lt "$deadline" ] || die "timed out after ${TIMEOUT}s waiting for $what"
        sleep 0.5
    done
}

mon_up() { ceph_ mon stat >/dev/null 2>&1; }
mgr_up() { ceph_ mgr stat -f json 2>/dev/null | json_ok 'd["available"]'; }
osd_up_in() { ceph_ osd stat -f json 2>/dev/null | json_ok 'd["num_up_osds"] >= 1 and d["num_in_osds"] >= 1'; }
osd_down() { ceph_ osd stat -f json 2>/dev/null | json_ok 'd["num_up_osds"] == 0'; }

# All PG_NUM PGs of the pool active+clean, as reported after osd.0 last came up (so not a
# stale report from before an osd-stop).
pool_clean() {
    local up_from
    up_from="$(ceph_ osd dump -f json 2>/dev/null | "$CEPH_PY" -c 'import json,sys; print(json.load(sys.stdin)["osds"][0]["up_from"])')" || return 1
    ceph_ pg ls-by-pool "$POOL" -f json 2>/dev/null | json_ok "
[len(p) == $PG_NUM and all(s['state'] == 'active+clean' and int(s['reported_epoch']) >= $up_from for s in p)
 for p in [d['pg_stats'] if isinstance(d, dict) else d]][0]"
}

# --- start --------------------------------------------------------------------------------

write_conf() {
    local port="$1" fsid="$2"
    # Unix socket paths have at most 107 bytes; a socket Ceph cannot bind is skipped (with
    # an error line in the log, and on a client's stderr).
    local client_asok="$dir/run/\$name.\$pid.\$cctid.asok"
    if [ $((${#dir} + 50)) -gt 107 ]; then
        client_asok=""
        log "note: DIR is too long for per-process client admin sockets, clients get none"
    fi
    [ $((${#dir} + 16)) -le 107 ] || log "warning: DIR is too long for admin sockets, daemons run without"
    cat > "$conf" <<EOF
# Throwaway single-node cluster made by scripts/ceph-cluster.sh; everything under $dir.
[global]
fsid = $fsid
mon host = v2:127.0.0.1:$port
public network = 127.0.0.0/8
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind msgr2 = true
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
auth allow insecure global id reclaim = false
keyring = $dir/\$cluster.\$name.keyring
run dir = $dir/run
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
pid file = $dir/run/\$name.pid
crash dir = $dir/crash
log to syslog = false
err to syslog = false
mon cluster log file = $dir/log/cluster.log
mon cluster log to syslog = false
mgr initial modules = iostat
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = $PG_NUM
osd pool default pgp num = $PG_NUM
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# The host's disk may be fuller than the 30 % free a production monitor wants.
mon data avail warn = 2
mon data avail crit = 1
# Faster map changes (the monitor batches them for 1 s by default) and PG state reports
# (every 5 s by default): a quicker start and osd-start.
paxos propose interval = 0.1
mgr stats period = 1
# No scrubbing during a test's lifetime.
osd scrub min interval = 31536000
osd scrub max interval = 31536000
osd deep scrub interval = 31536000

[mon]
mon data = $dir/mon
keyring = $dir/mon/keyring

[mgr]
mgr data = $dir/mgr
mgr module path = $dir/mgr-modules
keyring = $dir/mgr/keyring

[osd]
osd data = $dir/osd
keyring = $dir/osd/keyring
osd objectstore = bluestore
bluestore block create = true
bluestore block size = $OSD_BLOCK_BYTES
# Small memory: the lowest target 16.2 accepts (a smaller value is silently ignored and
# the 4 GiB default stays), and a fixed 128 MiB BlueStore cache instead of autotuning.
osd memory target = 939524096
bluestore cache autotune = false
bluestore cache size = 134217728
osd op num shards = 2
osd op num threads per shard = 1

[client]
# Per process, so concurrent clients (and several in one process) do not collide.
admin socket = $client_asok
log file = $dir/log/\$name.log
EOF
}

# A free TCP port on 127.0.0.1, away from Ceph's defaults (3300, 6789, 6800-7300) and the
# kernel's ephemeral range.
pick_port() {
    "$CEPH_PY" - <<'EOF'
import random, socket, sys
for _ in range(200):
    port = random.randint(10000, 30000)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        continue
    finally:
        s.close()
    print(port)
    sys.exit(0)
sys.exit("no free port")
EOF
}

# The manager loads every module it finds, each in its own Python interpreter (~300 MB RSS
# for Debian's set); give it only the ones this cluster has on (the always-on ones, which it
# must have, and the enabled ones): about half of that.
link_mgr_modules() {
    local m mods
    mods="$(ceph_ mgr module ls -f json | "$CEPH_PY" -c '
import json, sys
d = json.load(sys.stdin)
print(" ".join(sorted(set(d["always_on_modules"]) | set(d["enabled_modules"]))))')" \
        || die "ceph mgr module ls failed"
    mkdir -p "$dir/mgr-modules"
    ln -sf /usr/share/ceph/mgr/mgr_module.py /usr/share/ceph/mgr/mgr_util.py "$dir/mgr-modules/"
    for m in $mods; do
        [ -d "/usr/share/ceph/mgr/$m" ] || die "mgr module $m not in /usr/share/ceph/mgr"
        ln -sfn "/usr/share/ceph/mgr/$m" "$dir/mgr-modules/$m"
    done
}

start_watcher() {
    local owner="$1" st
    st="$(proc_stat "$owner")" || die "--owner $owner: no such process"
    read -r -a st <<<"$st"
    setsid bash "$SELF" _watch "$dir" "$owner" "${st[19]}" \
        </dev/null >>"$dir/log/watcher.out" 2>&1 9>&- &
    echo "$!" > "$dir/pid/watcher.pid"
}

# `_watch DIR PID STARTTIME`: once PID (started at STARTTIME, against pid reuse) is gone,
# stop the cluster.
cmd_watch() {
    set_paths "$1"
    local owner="$2" start="$3" st
    while [ -e "$marker" ]; do
        st="$(proc_stat "$owner")" || break
        [ "${st:0:1}" != Z ] || break
        read -r -a st <<<"$st"
        [ "${st[19]}" = "$start" ] || break
        sleep 1
    done
    [ -e "$marker" ] || exit 0
    log "owner $owner is gone, stopping the cluster in $dir"
    exec bash "$SELF" stop "$dir"
}

on_start_exit() {
    local rc=$?
    [ "$rc" -ne 0 ] || return 0
    show_logs
    log "start failed; killing the daemons, keeping $dir for inspection (remove it with: $SELF stop $dir)"
    kill_daemons || true
    exit "$rc"
}

cmd_start() {
    set_paths "${1:-}"; shift || true
    local owner=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --owner) owner="${2:?--owner needs a pid}"; shift 2 ;;
            *) usage ;;
        esac
    done
    local bin
    for bin in ceph ceph-mon ceph-mgr ceph-osd ceph-authtool monmaptool rbd uuidgen setsid flock; do
        command -v "$bin" >/dev/null || die "$bin not found (apt-get install ceph-mon ceph-mgr ceph-osd ceph-common)"
    done
    # DIR must be new: `stop` removes it whole, so it must never be a directory we adopted.
    mkdir -p -- "$(dirname -- "$dir")"
    mkdir -- "$dir" 2>/dev/null || die "$dir exists (give a new directory)"
    local t0=$SECONDS
    mkdir -p "$dir"/{mon,mgr,osd,log,run,pid,crash}
    touch "$marker"
    lock_dir
    trap on_start_exit EXIT
    trap 'exit 143' TERM HUP INT  # so that the EXIT trap cleans up when killed too
    [ -z "$owner" ] || start_watcher "$owner"

    local port fsid
    port="$(pick_port)"
    fsid="$(uuidgen)"
    write_conf "$port" "$fsid"

    # Keys: the monitor's (which also carries client.admin for the monitor's first start),
    # the admin's.
    relevant=(mon.a)
    local monkey="$dir/mon-bootstrap.keyring"
    ceph-authtool "$monkey" --create-keyring --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$dir/ceph.client.admin.keyring" --create-keyring --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mds 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool "$monkey" --import-keyring "$dir/ceph.client.admin.keyring" >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "[v2:127.0.0.1:$port]" \
        --enable-all-features --set-min-mon-release 16 "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$monkey" \
        >>"$dir/log/mon.a.out" 2>&1 9>&- || die "ceph-mon --mkfs failed"
    rm -f "$monkey" "$dir/monmap"
    launch mon.a ceph-mon -i a
    log "mon.a on v2:127.0.0.1:$port"
    wait_until "the monitor" mon_up

    relevant=(mgr.x mon.a)
    link_mgr_modules
    quiet ceph_ auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' mds 'allow *' \
        -o "$dir/mgr/keyring"
    launch mgr.x ceph-mgr -i x

    quiet ceph_ auth get-or-create client.novacron mon 'profile rbd' osd "profile rbd pool=$POOL" \
        -o "$dir/ceph.client.novacron.keyring"

    relevant=(osd.0 mon.a)
    local uuid secret id
    uuid="$(uuidgen)"
    secret="$(ceph-authtool --gen-print-key)"
    id="$(printf '{"cephx_secret": "%s"}' "$secret" | ceph_ osd new "$uuid" -i -)"
    [ "$id" = 0 ] || die "ceph osd new gave id '$id', expected 0"
    ceph-authtool "$dir/osd/keyring" --create-keyring -n osd.0 --add-key "$secret" >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >>"$dir/log/osd.0.out" 2>&1 9>&- \
        || die "ceph-osd --mkfs failed"
    launch osd.0 ceph-osd -i 0

    relevant=(mgr.x mon.a)
    wait_until "the manager" mgr_up
    relevant=(osd.0 mon.a)
    wait_until "osd.0 up and in" osd_up_in

    relevant=(osd.0 mon.a mgr.x)
    quiet ceph_ osd pool create "$POOL" "$PG_NUM" "$PG_NUM" replicated \
        || die "ceph osd pool create $POOL failed"
    quiet timeout 60 rbd -c "$conf" pool init "$POOL" 9>&- || die "rbd pool init $POOL failed"
    wait_until "pool $POOL active+clean" pool_clean

    local health
    health="$(ceph_ health detail 2>&1)" || die "ceph health failed: $health"
    case "$health" in HEALTH_ERR*) die "$health" ;; esac
    log "up in $((SECONDS - t0))s: ${health//$'\n'/ | }"
    trap - EXIT TERM HUP INT
    echo "CEPH_CONF=$conf"
}

# --- stop, osd-stop, osd-start ------------------------------------------------------------

cmd_stop() {
    set_paths "${1:-}"
    if [ ! -e "$dir" ]; then
        log "$dir: already gone"
        return 0
    fi
    if [ ! -e "$marker" ]; then
        # Not (or no longer) a cluster of ours: left as it is.
        die "$dir is not a cluster made by this script"
    fi
    lock_dir
    [ -e "$marker" ] || return 0  # stopped while we waited for the lock
    kill_daemons
    local pid
    pid="$(cat "$dir/pid/watcher.pid" 2>/dev/null)" || pid=""
    if [ -n "$pid" ] && [ "$pid" != $$ ] && proc_has_arg "$pid" "$dir"; then
        kill_wait "$pid" || true
    fi
    rm -rf -- "$dir"
    log "stopped, $dir removed"
}

require_cluster() {
    set_paths "${1:-}"
    [ -e "$marker" ] && [ -e "$conf" ] || die "$dir: no cluster"
    lock_dir
    trap 'rc=$?; [ "$rc" -eq 0 ] || show_logs; exit "$rc"' EXIT
}

cmd_osd_stop() {
    require_cluster "$@"
    relevant=(osd.0 mon.a)
    local pid
    if pid="$(daemon_pid osd.0)"; then
        kill_wait "$pid"
    fi
    rm -f "$dir/pid/osd.0.pid"
    # The OSD tells the monitor when it shuts down; after a SIGKILL nobody would (no peer
    # OSD to report it), so mark it down ourselves.
    ceph_ osd down 0 >/dev/null 2>&1 || true
    wait_until "osd.0 down" osd_down
    log "osd.0 stopped"
}

cmd_osd_start() {
    require_cluster "$@"
    relevant=(osd.0 mon.a)
    if ! daemon_pid osd.0 >/dev/null; then
        launch osd.0 ceph-osd -i 0
    fi
    wait_until "osd.0 up" osd_up_or_out
    # Marked out if it was down longer than mon_osd_down_out_interval: bring it back in.
    quiet ceph_ osd in 0
    wait_until "osd.0 up and in" osd_up_in
    relevant=(osd.0 mon.a mgr.x)
    wait_until "pool $POOL active+clean" pool_clean
    log "osd.0 started"
}
osd_up_or_out() { ceph_ osd stat -f json 2>/dev/null | json_ok 'd["num_up_osds"] >= 1'; }

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; [ $# -eq 1 ] || usage; cmd_stop "$1" ;;
    osd-stop) shift; [ $# -eq 1 ] || usage; cmd_osd_stop "$1" ;;
    osd-start) shift; [ $# -eq 1 ] || usage; cmd_osd_start "$1" ;;
    _watch) shift; [ $# -eq 3 ] || usage; cmd_watch "$@" ;;
    *) usage ;;
esac
