# Shared by scripts/bond-client and scripts/bond-server (sourced, not run):
# state-recorded changes, undo, tunnel processes, status.  Copy it along with them.


run() {  # a command that changes something; with --dry-run it is printed instead
    if [ "$DRY_RUN" = yes ]; then echo "$*"; else "$@"; fi
}

record() {  # record UNDO...: how `down` undoes a change this script made (once per change)
    [ "$DRY_RUN" = yes ] && return 0
    grep -qxF -- "$*" "$STATE" 2>/dev/null || echo "$*" >>"$STATE"
}

prepare_run_dir() {
    [ "$DRY_RUN" = yes ] && return 0
    mkdir -p "$RUN_DIR"
    chmod 700 "$RUN_DIR"
    touch "$STATE"
    if command -v flock >/dev/null; then  # one up/down at a time
        exec 9>>"$RUN_DIR/lock"
        flock -w 60 9 || die "another $PROG holds $RUN_DIR/lock"
    fi
}

mptcp_enable() {  # mptcp_enable N: MPTCP on, limits at least subflow N add_addr_accepted N
    local want=$1 old sub acc
    old=$(sysctl -n net.mptcp.enabled 2>/dev/null) || die "this kernel has no MPTCP (no net.mptcp.enabled)"
    if [ "$old" != 1 ]; then
        run sysctl -q -w net.mptcp.enabled=1
        record sysctl net.mptcp.enabled "$old"
    fi
    read -r sub acc < <(ip mptcp limits show | awk '{for (i = 1; i < NF; i++) v[$i] = $(i + 1)}
        END {print v["subflows"] + 0, v["add_addr_accepted"] + 0}')
    if ((sub < want || acc < want)); then
        run ip mptcp limits set subflow $((sub > want ? sub : want)) \
            add_addr_accepted $((acc > want ? acc : want))
        record ip mptcp limits set subflow "$sub" add_addr_accepted "$acc"
    fi
}

family_of() {  # family_of ADDR[/LEN]: -6 for an IPv6 address, else -4 (ip's family option)
    if [[ $1 == *:* ]]; then echo -6; else echo -4; fi
}

canonical_ip() {  # canonical_ip ADDR: the address as ip prints it (IPv4 or IPv6), or fail
    python3 -c 'import ipaddress, sys; print(ipaddress.ip_address(sys.argv[1]))' "$1" 2>/dev/null
}

ensure_address() {  # ensure_address DEV CIDR (IPv4 or IPv6; IPv6 without DAD: usable at once)
    local family extra=()
    family=$(family_of "$2")
    [ "$family" = -6 ] && extra=(nodad)
    if ip "$family" -o addr show dev "$1" 2>/dev/null | awk '{print $4}' | grep -qxF "$2"; then
        return 0
    fi
    run ip "$family" addr add "$2" dev "$1" "${extra[@]}"
    record ip "$family" addr del "$2" dev "$1"
}

ensure_route() {  # ensure_route "[unreachable] DST [via GW] [dev DEV] [src ADDR]" table TABLE [-4|-6]
    # (the family is that of DST; give -6 for "unreachable default" in IPv6)
    local spec=$1 table=$3 family=${4:-} kind="" dst dev="" gw="" existing
    read -r dst _ <<<"$spec"
    if [ "$dst" = unreachable ]; then
        kind=unreachable
        read -r _ dst _ <<<"$spec"
    fi
    [ -n "$family" ] || family=$(family_of "$dst")
    [[ $spec =~ (^| )dev\ ([^ ]+) ]] && dev=${BASH_REMATCH[2]}
    [[ $spec =~ (^| )via\ ([^ ]+) ]] && gw=${BASH_REMATCH[2]}
    existing=$(ip "$family" route show table "$table" exact "$dst" 2>/dev/null || true)
    if [ -z "$existing" ]; then
        # shellcheck disable=SC2086
        run ip "$family" route add $spec table "$table"
        record ip "$family" route del "$spec" table "$table"
    elif [ -n "$kind" ]; then
        [[ $existing == "$kind "* ]] || die "routing table $table already has another route to $dst: $existing"
    elif ! grep -q " dev $dev\( \|$\)" <<<"$existing" || { [ -n "$gw" ] && ! grep -q "via $gw " <<<"$existing"; }; then
        die "routing table $table already has another route to $dst: $existing"
    fi
}

ensure_rule() {  # ensure_rule "SELECTOR lookup TABLE" PREF [-4|-6] (IPv4 and IPv6 rules
    # are separate lists: the same priority may be used in both)
    local want=$1 pref=$2 family=${3:--4} existing
    existing=$(ip "$family" rule show pref "$pref" | sed -e 's/^[0-9]*:[[:space:]]*//' -e 's/from all //' \
        -e 's/ \[detached\]//' -e 's/[[:space:]]\+/ /g' -e 's/ $//')
    if [ -z "$existing" ]; then
        # shellcheck disable=SC2086
        run ip "$family" rule add $want pref "$pref"
        record ip "$family" rule del "$want" pref "$pref"
    elif [ "$existing" != "$want" ]; then
        die "rule priority $pref is taken by '$existing' (choose another --rule-pref)"
    fi
}

endpoint_id() {  # endpoint_id ADDR: the id of the MPTCP endpoint with that address
    ip mptcp endpoint show | awk -v a="$1" '$1 == a {for (i = 2; i < NF; i++) if ($i == "id") print $(i + 1)}'
}

ensure_endpoint() {  # ensure_endpoint ADDR [FLAG]: an in-kernel PM endpoint (IPv4 or IPv6)
    # that opens subflows (FLAG subflow, the default) or is announced to peers (signal)
    local line flag=${2:-subflow}
    line=$(ip mptcp endpoint show | awk -v a="$1" '$1 == a')
    if [ -n "$line" ]; then
        [[ " $line " == *" $flag "* ]] \
            || warn "MPTCP endpoint for $1 exists without the $flag flag ($line); left as it is"
        return 0
    fi
    run ip mptcp endpoint add "$1" "$flag"
    record endpoint "$1"
}

resolve_tunnel_cmd() {
    if [ -n "$TUNNEL_CMD" ]; then
        read -ra TUNNEL <<<"$TUNNEL_CMD"
    elif command -v udp-encap-tun >/dev/null; then
        TUNNEL=(udp-encap-tun)
    elif python3 -c 'import udp_encap_tun' 2>/dev/null; then
        TUNNEL=(python3 -m udp_encap_tun)
    else
        die "udp-encap-tun is not installed (or give --tunnel-cmd)"
    fi
}

tunnel_pid() {  # tunnel_pid TUN: pid of the running tunnel this script started for TUN
    local pid cmdline
    pid=$(cat "$RUN_DIR/$1.pid" 2>/dev/null) && [ -n "$pid" ] || return 1
    cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ " $cmdline" == *" --interface $1 "* ]] || return 1  # (a zombie's cmdline is empty)
    echo "$pid"
}

pid_alive() {  # pid_alive PID: the process exists and is not a zombie
    local state
    state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "${state:0:1}" != Z ]
}

wait_for_link() {  # wait_for_link DEV
    local i
    for ((i = 0; i < WAIT * 10; i++)); do
        ip link show dev "$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    return 1
}

tunnel_up() {  # tunnel_up TUN OPTIONS...: start udp-encap-tun for TUN unless it runs already
    local name=$1 pidfile=$RUN_DIR/$1.pid log=$RUN_DIR/$1.log pid start i
    shift
    resolve_tunnel_cmd
    # shellcheck disable=SC2206
    local argv=("${TUNNEL[@]}" "$@" $TUNNEL_ARGS)
    if [ "$START" != yes ]; then
        [ "$DRY_RUN" = yes ] && return 0
        wait_for_link "$name" && return 0
        echo "start it with: ${argv[*]}" >&2
        die "tun $name does not exist (with --no-start the tunnels must be running)"
    fi
    tunnel_pid "$name" >/dev/null && return 0
    if [ "$DRY_RUN" = yes ]; then
        echo "setsid ${argv[*]} 2>>$log &"
        return 0
    fi
    start=$(($( (wc -l <"$log") 2>/dev/null || echo 0) + 1))
    setsid "${argv[@]}" </dev/null >>"$log" 2>&1 9>&- &  # (fd 9 holds our lock)
    pid=$!
    echo "$pid" >"$pidfile"
    record stop "$name"
    for ((i = 0; i < WAIT * 10; i++)); do
        tail -n "+$start" "$log" | grep -q "ready:" && ip link show dev "$name" >/dev/null 2>&1 \
            && { info "started ${argv[*]} (pid $pid, log $log)"; return 0; }
        pid_alive "$pid" || break
        sleep 0.1
    done
    tail -n "+$start" "$log" >&2 || true
    kill -TERM "$pid" 2>/dev/null || true
    die "udp-encap-tun for $name did not become ready (log: $log)"
}

stop_tunnel() {  # stop_tunnel TUN: SIGTERM the tunnel this script started, wait, show its counters
    local name=$1 pid i
    if pid=$(tunnel_pid "$name"); then
        run kill -TERM "$pid"
        for ((i = 0; i < 100; i++)); do
            tunnel_pid "$name" >/dev/null || break
            sleep 0.1
        done
        if tunnel_pid "$name" >/dev/null; then
            warn "tunnel $name (pid $pid) did not stop within 10 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        grep "counters {" "$RUN_DIR/$name.log" 2>/dev/null | tail -n 1 | sed "s/^/$name: /" || true
    fi
    rm -f "$RUN_DIR/$name.pid"
}

undo_all() {  # down: undo what `up` recorded, newest first
    if [ ! -f "$STATE" ]; then
        info "nothing to undo ($STATE does not exist)"
        return 0
    fi
    prepare_run_dir
    local lines i id
    mapfile -t lines <"$STATE"
    for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
        read -ra a <<<"${lines[i]}"
        ((${#a[@]})) || continue
        case "${a[0]}" in
            ip)
                run "${a[@]}" 2>/dev/null || info "already gone: ${a[*]:1}" ;;
            sysctl)
                run sysctl -q -w "${a[1]}=${a[2]}" ;;
            endpoint)
                id=$(endpoint_id "${a[1]}")
                if [ -n "$id" ]; then run ip mptcp endpoint delete id "$id"; else info "already gone: endpoint ${a[1]}"; fi ;;
            stop)
                stop_tunnel "${a[1]}" ;;
            *)
                warn "ignoring unknown line in $STATE: ${lines[i]}" ;;
        esac
    done
    [ "$DRY_RUN" = yes ] || { rm -f "$STATE"; info "down: undone"; }
}

status_common() {
    echo "net.mptcp.enabled = $(sysctl -n net.mptcp.enabled 2>/dev/null || echo missing)"
    echo "mptcp limits: $(ip mptcp limits show)"
    ip mptcp endpoint show | sed 's/^/mptcp endpoint: /'
    if [ -s "$STATE" ]; then echo "changes recorded in $STATE: $(wc -l <"$STATE")"; else echo "no changes recorded ($STATE)"; fi
}

tunnel_status() {  # tunnel_status TUN
    local name=$1 pid before i
    if pid=$(tunnel_pid "$name"); then
        before=$(grep -c "counters {" "$RUN_DIR/$name.log" || true)
        kill -USR1 "$pid"
        for ((i = 0; i < 20; i++)); do
            (($(grep -c "counters {" "$RUN_DIR/$name.log" || true) > before)) && break
            sleep 0.1
        done
        echo "  tunnel: running (pid $pid, log $RUN_DIR/$name.log)"
        grep "counters {" "$RUN_DIR/$name.log" | tail -n 1 | sed 's/.*counters /  counters /'
    elif ip link show dev "$name" >/dev/null 2>&1; then
        echo "  tunnel: $name exists (not started by $PROG)"
    else
        echo "  tunnel: not running"
    fi
}
