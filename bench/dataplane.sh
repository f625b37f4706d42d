#!/usr/bin/env bash
# bench/dataplane.sh: data-plane benchmark of wiremesh-wg against raw veth,
# wireguard-go and boringtun, in one run, between two network namespaces.
# Run as root. See --help and bench/README.md.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

ALL_IMPLS="raw,wiremesh-wg,wireguard-go,boringtun"
DURATION=8
PINGS=20
ONLY=$ALL_IMPLS
INSTALL_PEERS=0
BUILD=0
OUT_DIR="$SCRIPT_DIR/results"
WIREMESH_BIN="$REPO_DIR/target/release/wiremesh-wg"
BORINGTUN_BIN=""

ORIG_CMD="$0${*:+ $*}"
UNDERLAY_MTU=1500
WG_MTU=1420
PORT=51820
UL_A=198.18.0.1 # underlay (veth) addresses: RFC 2544 benchmarking range
UL_B=198.18.0.2
TUN_A=198.19.0.1 # tunnel addresses
TUN_B=198.19.0.2

usage() {
	cat <<EOF
Usage: sudo bench/dataplane.sh [OPTIONS]

Data-plane benchmark. Creates two network namespaces joined by a veth pair
(underlay MTU $UNDERLAY_MTU) and measures, one implementation after another with
the same keys, addresses and settings (WireGuard interface MTU $WG_MTU):

  raw           the veth itself, no VPN (the ceiling)
  wiremesh-wg   target/release/wiremesh-wg (this repository)
  wireguard-go  Debian package wireguard-go
  boringtun     boringtun-cli from crates.io (skipped if not installed)

Metrics (inside the tunnel, namespace A -> namespace B):
  TCP 1 stream / 4 streams   iperf3 throughput received, Gbit/s
  UDP 64 B                   iperf3 -u -l 64 -b 0: packets/s received by the server
  ping RTT                   median of N pings (ping -i 0.2), idle link, ms
  CPU s/Gbit                 utime+stime of the VPN processes on both sides over the
                             TCP 1-stream run (/proc/PID/stat), per Gbit received
  TCP×best peer              TCP 1-stream / best of wireguard-go and boringtun (this run)

Prints one markdown table on stdout (progress goes to stderr) and writes the raw
numbers to bench/results/dataplane-<UTC timestamp>.json.
A failing implementation is reported in its row ("failed: why"); the run goes on.

Options:
  -t, --time SECS        iperf3 duration per test (default $DURATION)
  -n, --pings N          number of pings for the RTT median (default $PINGS)
  --only LIST            comma-separated subset of: $ALL_IMPLS
  --wiremesh PATH        wiremesh-wg binary (default target/release/wiremesh-wg)
  --boringtun PATH       boringtun-cli binary (default: PATH, then ~/.cargo/bin)
  --build                cargo build --release -p wiremesh-wg first
  --install-peers        apt-get install wireguard-go wireguard-tools iperf3
                         iputils-ping jq, and cargo install --locked boringtun-cli
  -o, --out DIR          where the JSON goes (default bench/results)
  -h, --help             this text

Requirements: root, ip (iproute2), wg, iperf3, ping, jq, timeout.
Everything it creates (namespaces dpbench-<id>-a/-b, devices dp<id>..., their
/var/run/wireguard/*.sock) is removed on exit, failure or Ctrl-C.
EOF
}

log() { printf '[dataplane %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() {
	printf 'dataplane.sh: %s\n' "$*" >&2
	exit 1
}

while (($#)); do
	case $1 in
	-t | --time) DURATION=${2:?}; shift 2 ;;
	-n | --pings) PINGS=${2:?}; shift 2 ;;
	--only) ONLY=${2:?}; shift 2 ;;
	--wiremesh) WIREMESH_BIN=${2:?}; shift 2 ;;
	--boringtun) BORINGTUN_BIN=${2:?}; shift 2 ;;
	--build) BUILD=1; shift ;;
	--install-peers) INSTALL_PEERS=1; shift ;;
	-o | --out) OUT_DIR=${2:?}; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown argument: $1" ;;
	esac
done

[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "--time must be a positive integer"
[[ $PINGS =~ ^[1-9][0-9]*$ ]] || die "--pings must be a positive integer"
IMPLS=()
IFS=, read -r -a _req <<<"$ONLY"
for i in "${_req[@]}"; do
	case ,$ALL_IMPLS, in *,"$i",*) IMPLS+=("$i") ;; *) die "unknown implementation in --only: $i" ;; esac
done
((${#IMPLS[@]})) || die "--only selects nothing"
((EUID == 0)) || die "must run as root (creates network namespaces and TUN devices)"

find_boringtun() {
	if [[ -n $BORINGTUN_BIN ]]; then
		[[ -x $BORINGTUN_BIN ]] && echo "$BORINGTUN_BIN"
		return 0
	fi
	if command -v boringtun-cli >/dev/null 2>&1; then
		command -v boringtun-cli
	elif [[ -x ${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli ]]; then
		echo "${CARGO_HOME:-$HOME/.cargo}/bin/boringtun-cli"
	fi
}

if ((INSTALL_PEERS)); then
	log "installing wireguard-go wireguard-tools iperf3 iputils-ping jq"
	apt-get update -q >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q wireguard-go wireguard-tools iperf3 iputils-ping jq >&2
	if [[ -z $(find_boringtun) ]]; then
		log "installing boringtun-cli (cargo install --locked; compiling takes a few minutes)"
		cargo install --locked boringtun-cli >&2
	fi
fi
if ((BUILD)); then
	log "building wiremesh-wg"
	(cd "$REPO_DIR" && cargo build --release -p wiremesh-wg >&2)
fi

for c in ip wg iperf3 ping jq timeout awk; do
	command -v "$c" >/dev/null 2>&1 || die "missing command: $c (try --install-peers)"
done
BORINGTUN_BIN=$(find_boringtun)

# ---------------------------------------------------------------------------
# Run state and cleanup

RID=$(od -An -N2 -tx2 /dev/urandom | tr -d ' \n')
NS_A=dpbench-$RID-a
NS_B=dpbench-$RID-b
VETH_A=dp${RID}va
VETH_B=dp${RID}vb
WORK=$(mktemp -d "/tmp/dpbench-$RID.XXXXXX")
SUBPID=""
CLEANED=0

ifname_for() { # impl side -> a unique interface name (<= 15 bytes)
	local code
	case $1 in wiremesh-wg) code=wm ;; wireguard-go) code=wg ;; boringtun) code=bt ;; *) code=xx ;; esac
	echo "dp${RID}${code}$2"
}

kill_ns_procs() { # kill every process inside our two namespaces (they are all ours)
	local ns pids round
	for round in TERM TERM TERM KILL; do
		pids=()
		for ns in "$NS_A" "$NS_B"; do
			mapfile -t -O "${#pids[@]}" pids < <(ip netns pids "$ns" 2>/dev/null || true)
		done
		((${#pids[@]})) || return 0
		kill -"$round" "${pids[@]}" 2>/dev/null || true
		sleep 0.5
	done
}

remove_sockets() {
	local impl side
	for impl in wiremesh-wg wireguard-go boringtun; do
		for side in a b; do
			rm -f "/var/run/wireguard/$(ifname_for "$impl" "$side").sock"
		done
	done
}

cleanup() {
	((CLEANED)) && return 0
	CLEANED=1
	set +e
	[[ -n $SUBPID ]] && kill -TERM "$SUBPID" 2>/dev/null
	kill_ns_procs
	ip netns del "$NS_A" 2>/dev/null
	ip netns del "$NS_B" 2>/dev/null
	remove_sockets
	rm -rf "$WORK"
}
trap cleanup EXIT
trap 'trap "" PIPE; log "interrupted, cleaning up" 2>/dev/null || true; cleanup; exit 130' INT TERM HUP

# ---------------------------------------------------------------------------
# Underlay

log "run $RID: namespaces $NS_A, $NS_B; ${DURATION}s per iperf3 test, $PINGS pings"
ip netns add "$NS_A"
ip netns add "$NS_B"
ip link add "$VETH_A" netns "$NS_A" mtu "$UNDERLAY_MTU" type veth peer name "$VETH_B" netns "$NS_B" mtu "$UNDERLAY_MTU"
ip -n "$NS_A" addr add "$UL_A/24" dev "$VETH_A"
ip -n "$NS_B" addr add "$UL_B/24" dev "$VETH_B"
for ns in "$NS_A" "$NS_B"; do
	ip -n "$ns" link set lo up
done
ip -n "$NS_A" link set "$VETH_A" up
ip -n "$NS_B" link set "$VETH_B" up

umask 077
wg genkey >"$WORK/key-a"
wg genkey >"$WORK/key-b"
PUB_A=$(wg pubkey <"$WORK/key-a")
PUB_B=$(wg pubkey <"$WORK/key-b")

# ---------------------------------------------------------------------------
# Measurement helpers. They run inside a per-implementation subshell whose
# directory is $R; values go to $R/kv ("key number" lines), problems to
# $R/errors, and a fatal setup problem to $R/fail.

put() { echo "$1 $2" >>"$R/kv"; }
note() {
	log "  $1"
	echo "$1" >>"$R/errors"
}
fail() {
	echo "$*" >"$R/fail"
	log "  failed: $*"
	exit 1
}

# iperf3 client in namespace A; JSON to $1. Retries while the server is busy.
iperf_client() {
	local out=$1 tries=0
	shift
	while :; do
		if timeout -k 5 $((DURATION + 25)) ip netns exec "$NS_A" iperf3 -J -c "$DST" "$@" >"$out" 2>"$out.err"; then
			return 0
		fi
		if grep -qi busy "$out" "$out.err" 2>/dev/null && ((tries++ < 3)); then
			sleep 2
			continue
		fi
		return 1
	done
}
iperf_error() { # why iperf3 failed, in one line
	local msg
	msg=$(jq -r '.error // empty' "$1" 2>/dev/null || true)
	[[ -z $msg ]] && msg=$(tr '\n' ' ' <"$1.err" | cut -c1-200)
	[[ -z $msg ]] && msg="no output (killed by timeout?)"
	echo "$msg"
}

cpu_ticks() { # sum of utime+stime (clock ticks) of the given PIDs
	local p t total=0
	for p in "$@"; do
		t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null) || return 1
		[[ -n $t ]] || return 1
		total=$((total + t))
	done
	echo "$total"
}

measure_tcp() { # streams key
	local streams=$1 key=$2 out="$R/$2.json" before="" after="" gbps bytes
	if ((${#VPN_PIDS[@]})); then before=$(cpu_ticks "${VPN_PIDS[@]}") || before=""; fi
	if ! iperf_client "$out" -t "$DURATION" -P "$streams"; then
		note "$key: iperf3 failed: $(iperf_error "$out")"
		return 0
	fi
	if ((${#VPN_PIDS[@]})); then after=$(cpu_ticks "${VPN_PIDS[@]}") || after=""; fi
	gbps=$(jq -r '.end.sum_received.bits_per_second / 1e9' "$out" 2>/dev/null || true)
	bytes=$(jq -r '.end.sum_received.bytes' "$out" 2>/dev/null || true)
	if [[ -z $gbps || $gbps == null || -z $bytes || $bytes == null ]]; then
		note "$key: no result in iperf3 output"
		return 0
	fi
	put "${key}_gbps" "$gbps"
	put "${key}_bytes" "$bytes"
	if [[ -n $before && -n $after ]]; then
		put "${key}_cpu_s" "$(awk -v d=$((after - before)) -v hz="$CLK_TCK" 'BEGIN { printf "%.3f", d / hz }')"
		put "${key}_cpu_s_per_gbit" "$(awk -v d=$((after - before)) -v hz="$CLK_TCK" -v b="$bytes" \
			'BEGIN { if (b > 0) printf "%.4f", (d / hz) / (b * 8 / 1e9); else print "null" }')"
	elif ((${#VPN_PIDS[@]})); then
		note "$key: could not read /proc/PID/stat of the VPN processes"
	fi
}

measure_udp() {
	local out="$R/udp64.json" vals
	if ! iperf_client "$out" -u -l 64 -b 0 -t "$DURATION"; then
		note "udp64: iperf3 failed: $(iperf_error "$out")"
		return 0
	fi
	# sum_received is the server's count: bytes of 64-byte datagrams it received.
	vals=$(jq -r '[ (.end.sum_received.bytes / 64 / .end.sum_received.seconds),
			(.end.sum_sent.packets / .end.sum_sent.seconds), .end.sum_received.lost_percent ]
		| @tsv' "$out" 2>/dev/null || true)
	if [[ -z $vals ]]; then
		note "udp64: no result in iperf3 output"
		return 0
	fi
	read -r rx tx loss <<<"$vals"
	put udp64_rx_pps "$rx"
	put udp64_tx_pps "$tx"
	put udp64_loss_pct "$loss"
}

measure_ping() {
	local out="$R/ping.txt" stats
	timeout -k 5 $((PINGS + 20)) ip netns exec "$NS_A" ping -n -c "$PINGS" -i 0.2 -W 2 "$DST" >"$out" 2>&1 || true
	stats=$(grep -o 'time=[0-9.]*' "$out" | cut -d= -f2 | sort -n | awk '
		{ v[NR] = $1 }
		END { if (NR == 0) exit 1
		      m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
		      printf "%s %s %s %d", m, v[1], v[NR], NR }') || stats=""
	if [[ -z $stats ]]; then
		note "ping: no replies ($(tail -n 2 "$out" | tr '\n' ' '))"
		return 0
	fi
	read -r med min max n <<<"$stats"
	put ping_median_ms "$med"
	put ping_min_ms "$min"
	put ping_max_ms "$max"
	put ping_replies "$n"
	((n == PINGS)) || note "ping: only $n of $PINGS replies"
}

start_iperf_server() {
	ip netns exec "$NS_B" iperf3 -s >"$R/iperf-server.log" 2>&1 &
	local i
	for i in $(seq 50); do
		ip netns exec "$NS_B" ss -Htln "sport = :5201" 2>/dev/null | grep -q . && return 0
		kill -0 $! 2>/dev/null || fail "iperf3 server exited: $(tail -n 1 "$R/iperf-server.log")"
		sleep 0.1
	done
	fail "iperf3 server did not listen within 5 s"
}

start_device() { # impl ns ifname -> sets DEV_PID
	local impl=$1 ns=$2 ifn=$3 cmd i
	case $impl in
	wiremesh-wg) cmd=("$WIREMESH_BIN" -f "$ifn") ;;
	wireguard-go) cmd=(wireguard-go -f "$ifn") ;;
	boringtun) cmd=("$BORINGTUN_BIN" -f --disable-drop-privileges "$ifn") ;;
	esac
	rm -f "/var/run/wireguard/$ifn.sock"
	# Same log level for all three: errors only.
	env -u RUST_LOG LOG_LEVEL=error ip netns exec "$ns" "${cmd[@]}" >"$R/$ifn.log" 2>&1 &
	DEV_PID=$!
	for i in $(seq 100); do
		[[ -S /var/run/wireguard/$ifn.sock ]] && ip -n "$ns" link show "$ifn" >/dev/null 2>&1 && return 0
		kill -0 "$DEV_PID" 2>/dev/null ||
			fail "$impl exited at start: $(grep -v '^\s*$' "$R/$ifn.log" | tail -n 1 | cut -c1-160)"
		sleep 0.1
	done
	fail "$impl: no UAPI socket /var/run/wireguard/$ifn.sock within 10 s"
}

configure_side() { # ns ifname key peer_pub peer_underlay own_tunnel peer_tunnel
	local ns=$1 ifn=$2 key=$3 ppub=$4 pul=$5 own=$6 peer=$7 err
	err=$(ip netns exec "$ns" wg set "$ifn" private-key "$key" listen-port "$PORT" \
		peer "$ppub" endpoint "$pul:$PORT" allowed-ips "$peer/32" 2>&1) || fail "wg set $ifn: $err"
	err=$(ip -n "$ns" addr add "$own/24" dev "$ifn" 2>&1) || fail "ip addr add on $ifn: $err"
	err=$(ip -n "$ns" link set "$ifn" mtu "$WG_MTU" up 2>&1) || fail "ip link set $ifn up: $err"
}

# Measures one implementation; runs as a subshell, so `exit` (fail) ends only this row.
measure_impl() {
	local impl=$1 ifa ifb i pid_a pid_b
	R="$WORK/$impl"
	mkdir -p "$R"
	: >"$R/kv"
	VPN_PIDS=()
	start_iperf_server
	if [[ $impl == raw ]]; then
		DST=$UL_B
	else
		case $impl in
		wiremesh-wg) [[ -x $WIREMESH_BIN ]] || fail "$WIREMESH_BIN not found (cargo build --release -p wiremesh-wg, or --build)" ;;
		wireguard-go) command -v wireguard-go >/dev/null || fail "wireguard-go not installed (--install-peers)" ;;
		esac
		ifa=$(ifname_for "$impl" a)
		ifb=$(ifname_for "$impl" b)
		start_device "$impl" "$NS_A" "$ifa"
		pid_a=$DEV_PID
		start_device "$impl" "$NS_B" "$ifb"
		pid_b=$DEV_PID
		VPN_PIDS=("$pid_a" "$pid_b")
		configure_side "$NS_A" "$ifa" "$WORK/key-a" "$PUB_B" "$UL_B" "$TUN_A" "$TUN_B"
		configure_side "$NS_B" "$ifb" "$WORK/key-b" "$PUB_A" "$UL_A" "$TUN_B" "$TUN_A"
		DST=$TUN_B
		# Handshake: wait until a ping goes through the tunnel.
		for i in $(seq 20); do
			ip netns exec "$NS_A" ping -n -c 1 -W 1 "$DST" >/dev/null 2>&1 && break
			((i == 20)) && fail "no ping through the tunnel within 20 s (handshake?)"
		done
	fi
	log "  TCP, 1 stream"
	measure_tcp 1 tcp1
	log "  TCP, 4 streams"
	sleep 1
	measure_tcp 4 tcp4
	log "  UDP, 64-byte payloads"
	sleep 1
	measure_udp
	log "  ping x $PINGS"
	sleep 1
	measure_ping
	if [[ $impl != raw ]]; then
		# Cross-check that the traffic went through the device: its own byte counters.
		local xfer rx
		xfer=$(ip netns exec "$NS_B" wg show "$ifb" transfer 2>/dev/null || true)
		rx=$(awk '{ s += $2 } END { print s + 0 }' <<<"$xfer")
		put wg_b_rx_bytes "$rx"
		tcp1_bytes=$(awk '$1 == "tcp1_bytes" { print $2 }' "$R/kv")
		if [[ -n $tcp1_bytes ]] && ((rx < tcp1_bytes)); then
			note "wg show transfer on B reports $rx bytes received, less than the $tcp1_bytes of the TCP test alone"
		fi
	fi
	for i in "${VPN_PIDS[@]}"; do
		kill -0 "$i" 2>/dev/null || note "VPN process $i had exited by the end: $(tail -n 1 "$R"/*.log 2>/dev/null | tr '\n' ' ' | cut -c1-160)"
	done
	return 0
}

teardown_impl() {
	local impl=$1 side
	kill_ns_procs
	for side in a b; do
		local ifn ns
		ifn=$(ifname_for "$impl" "$side")
		[[ $side == a ]] && ns=$NS_A || ns=$NS_B
		ip -n "$ns" link del "$ifn" 2>/dev/null || true
		rm -f "/var/run/wireguard/$ifn.sock"
	done
}

# ---------------------------------------------------------------------------
# Run

CLK_TCK=$(getconf CLK_TCK)
START_ISO=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

for impl in "${IMPLS[@]}"; do
	mkdir -p "$WORK/$impl"
	if [[ $impl == boringtun && -z $BORINGTUN_BIN ]]; then
		echo "boringtun-cli not installed (cargo install --locked boringtun-cli, or --install-peers)" >"$WORK/$impl/skip"
		log "boringtun: skipped, boringtun-cli not installed (cargo install --locked boringtun-cli, or --install-peers)"
		continue
	fi
	log "$impl"
	set +e
	(
		set -eE
		trap - EXIT INT TERM HUP
		trap '[[ -s $WORK/$impl/fail ]] || echo "unexpected failure of: $BASH_COMMAND" >"$WORK/$impl/fail"' ERR
		measure_impl "$impl"
	) &
	SUBPID=$!
	wait "$SUBPID"
	rc=$?
	SUBPID=""
	set -e
	if ((rc != 0)) && [[ ! -s $WORK/$impl/fail ]]; then
		echo "internal error (exit $rc); see stderr" >"$WORK/$impl/fail"
	fi
	teardown_impl "$impl"
done

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------
# Results: JSON and the markdown table

version_of() {
	case $1 in
	raw) uname -r ;;
	wiremesh-wg)
		local v rev
		v=$(timeout 5 "$WIREMESH_BIN" --version 2>/dev/null | head -n 1 || true)
		rev=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || true)
		[[ -n $(git -C "$REPO_DIR" status --porcelain -- crates/wg 2>/dev/null || true) ]] && rev+=", crates/wg modified"
		echo "$v (git $rev; binary built $(date -u -r "$WIREMESH_BIN" +%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo '?'))"
		;;
	wireguard-go) timeout 5 wireguard-go --version 2>/dev/null | head -n 1 || true ;;
	boringtun) [[ -n $BORINGTUN_BIN ]] && { timeout 5 "$BORINGTUN_BIN" --version 2>/dev/null | head -n 1 || true; } ;;
	esac
}

rows=()
for impl in "${IMPLS[@]}"; do
	d="$WORK/$impl"
	if [[ -s $d/skip ]]; then
		status=skipped
		reason=$(cat "$d/skip")
	elif [[ -s $d/fail ]]; then
		status=failed
		reason=$(cat "$d/fail")
	else
		status=ok
		reason=""
	fi
	[[ -f $d/kv ]] || : >"$d/kv"
	[[ -f $d/errors ]] || : >"$d/errors"
	rows+=("$(jq -n --arg impl "$impl" --arg status "$status" --arg reason "$reason" \
		--arg version "$(version_of "$impl")" \
		--rawfile kv "$d/kv" --rawfile errors "$d/errors" '
		{ implementation: $impl, version: $version, status: $status,
		  reason: (if $reason == "" then null else $reason end),
		  errors: ($errors | split("\n") | map(select(length > 0))) }
		+ ($kv | split("\n") | map(select(length > 0) | split(" ") | { (.[0]): (.[1] | tonumber? // null) }) | add // {})')")
done

mkdir -p "$OUT_DIR"
JSON_OUT="$OUT_DIR/dataplane-$STAMP.json"
printf '%s\n' "${rows[@]}" | jq -s \
	--arg started "$START_ISO" --arg finished "$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
	--arg host "$(hostname)" --arg kernel "$(uname -r)" --argjson cpus "$(nproc)" \
	--arg cpu "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)" \
	--arg load_start "$LOAD_START" --arg load_end "$LOAD_END" \
	--arg iperf3 "$(iperf3 --version | head -n 1)" \
	--arg cmd "$ORIG_CMD" --argjson duration "$DURATION" --argjson pings "$PINGS" '
	(map(select(.implementation == "wireguard-go" or .implementation == "boringtun")
	     | .tcp1_gbps // empty) | max) as $best
	| { started: $started, finished: $finished, host: $host, kernel: $kernel, cpus: $cpus,
	    cpu_model: $cpu, loadavg_start: $load_start, loadavg_end: $load_end, iperf3: $iperf3,
	    command: $cmd,
	    settings: { iperf3_seconds: $duration, pings: $pings, underlay_mtu: 1500, wg_mtu: 1420,
	                udp_payload_bytes: 64 },
	    best_peer_tcp1_gbps: $best,
	    results: map(. + { tcp1_x_best_peer:
	      (if $best != null and $best > 0 and .tcp1_gbps != null then .tcp1_gbps / $best else null end) }) }' \
	>"$JSON_OUT"
log "raw numbers: $JSON_OUT"

# The table.
jq -r '
	def f(d): if . == null then "–" else
		(. * pow(10; d) | round | tostring) as $s
		| (if ($s | length) <= d then ("0" * (d + 1 - ($s | length))) + $s else $s end) as $p
		| $p[0:($p | length) - d] + "." + $p[($p | length) - d:] end;
	"| Implementation | TCP 1 stream (Gbit/s) | TCP 4 streams (Gbit/s) | UDP 64 B (kpps rx) | Ping RTT median (ms) | CPU s/Gbit | TCP×best peer |",
	"|---|---:|---:|---:|---:|---:|---:|",
	(.results[] |
	  if .status == "ok" then
	    "| \(.implementation) | \(.tcp1_gbps | f(2)) | \(.tcp4_gbps | f(2)) | \(.udp64_rx_pps | if . == null then null else . / 1000 end | f(1)) | \(.ping_median_ms | f(3)) | \(if .implementation == "raw" then "n/a" else (.tcp1_cpu_s_per_gbit | f(2)) end) | \(.tcp1_x_best_peer | if . == null then "–" else (f(2) + "×") end) |"
	  else
	    "| \(.implementation) | \(.status): \(.reason | gsub("\\|"; "/")) | | | | | |"
	  end),
	(if any(.results[]; .errors | length > 0) then "" else empty end),
	(.results[] | select(.errors | length > 0) | "- problems with \(.implementation): " + (.errors | join("; ")))
' "$JSON_OUT"
