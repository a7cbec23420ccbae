#!/usr/bin/env bash
# loadtest/profile.sh — where Portcullis spends its time on the benchmark's work.
#
#   loadtest/profile.sh perf MODE [load options]        # perf record of the proxy under load
#   loadtest/profile.sh callgrind MODE [load options]   # userspace instructions per request
#   loadtest/profile.sh ops MODE [load options]         # io_uring operations and system calls per request
#
# MODE is keepalive | handshake | resume. Same configuration and certificates as bench.sh
# (loadtest/conf/portcullis.toml.in, or with CONF=accesslog or CONF=operator that mode's
# configuration, loadtest/conf/portcullis-$CONF.toml.in; operator starts the broker Tansu on
# KAFKA_ADDR as bench.sh does), the proxy pinned to PROXY_CPU (its threads other than the
# worker on BG_CPUS, by default LOAD_CPU, as in bench.sh), backend and load generator on
# LOAD_CPU, loopback only, every run bounded.
#
# perf: samples the proxy for DURATION seconds (default 8) with call graphs into $OUT/perf.data, then
#   prints the split kernel / userspace and the heaviest symbols. The sampling itself costs
#   CPU: read the CPU per request of bench.sh, not of this run.
# callgrind: runs the proxy under valgrind twice, N1 and N2 requests (defaults 2000, 12000),
#   and prints (Ir(N2) - Ir(N1)) / (N2 - N1): start-up cancels out, and the count repeats from
#   run to run whatever else the machine does. Valgrind hides the CPU's SHA, ADX and VAES
#   extensions from the program, so crypto counts are those of the slower generic code. And it
#   takes io_uring_enter for a call that does not block: a worker waiting in it holds valgrind's
#   lock and starves the other threads. Under valgrind the proxy therefore runs on the epoll
#   driver (`driver = "epoll"`): the proxy's own code is the same, the runtime's differs.
#   VALGRIND_ARGS adds options to valgrind, and then every event it counts is printed per
#   request: with "--cache-sim=yes --LL=1048576,8,64", cache misses of one core's L1 and of an
#   L2 the size of this machine's (all of the proxy's threads share them, as when it is pinned
#   to one core).
# ops: N2 requests under perf's io_uring and system-call tracepoints; prints, per request, the
#   io_uring operations submitted (by opcode), the receives that found nothing and armed a poll,
#   and the system calls made (by name), io_uring_enter among them.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOL=${1:?perf, callgrind or ops}; MODE=${2:?keepalive, handshake or resume}; shift 2
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BG_CPUS=${BG_CPUS:-$LOAD_CPU}   # background_cpus of the Portcullis configurations (e.g. "0" or "0, 1")
# BG_CPUS=none leaves the setting out (a build from before it).
case $BG_CPUS in none) BG_SED='/@BG_CPUS@/d';; *) BG_SED="s|@BG_CPUS@|$BG_CPUS|g";; esac
SECONDS_=${DURATION:-8}
N1=${N1:-2000}; N2=${N2:-12000}
LISTEN=127.0.0.1:18446
BACKEND=127.0.0.1:18080
KAFKA_ADDR=${KAFKA_ADDR:-127.0.0.1:19092}
CONF=${CONF:-}
OUT=${OUT:-target/profile/$MODE${CONF:+-$CONF}}
BIN=target/release
PROXY_BIN=${PROXY_BIN:-$BIN/portcullis}   # another build of the proxy (a path from the top), to compare
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CERTS=$OUT/certs

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -p portcullis -p portcullis-loadtest
[ -f "$CERTS/root.pem" ] || "$BIN/portcullis-load" pki "$CERTS" >/dev/null
sed -e "s|@LISTEN@|$LISTEN|g" -e "s|@CERTS@|$CERTS|g" -e "s|@BACKEND@|$BACKEND|g" -e "s|@RUN@|$OUT|g" \
  -e "s|@KAFKA@|$KAFKA_ADDR|g" -e "$BG_SED" "loadtest/conf/portcullis${CONF:+-$CONF}.toml.in" > "$OUT/portcullis.toml"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

taskset -c "$LOAD_CPU" "$BIN/portcullis-load" backend --listen "$BACKEND" --size 1024 >/dev/null 2>&1 &
PIDS+=($!)
if [ "$CONF" = operator ]; then
  taskset -c "$LOAD_CPU" nice -n 19 tansu broker --listener-url "tcp://$KAFKA_ADDR" --advertised-listener-url "tcp://$KAFKA_ADDR" \
    --storage-engine memory://tansu/ >"$OUT/kafka.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 100); do tansu topic create --broker "tcp://$KAFKA_ADDR" --partitions 1 requests >>"$OUT/kafka.log" 2>&1 && break; sleep 0.1; done
fi

load() { # load N|- [extra] — one bounded load run against the proxy
  local n=$1; shift
  local count=(); [ "$n" != - ] && count=(-n "$n")
  taskset -c "$LOAD_CPU" "$BIN/portcullis-load" run "https://localhost:${LISTEN##*:}/" --ca "$CERTS/root.pem" \
    --cert "$CERTS/client1-chain.pem" --key "$CERTS/client1.key" --mode "$MODE" "${count[@]}" "$@"
}

wait_log() { # wait_log FILE — until the proxy says it listens
  for _ in $(seq 300); do grep -q "listening on" "$1" 2>/dev/null && return 0; sleep 0.2; done
  echo "the proxy did not start; see $1" >&2; exit 1
}

case $TOOL in
  perf)
    taskset -c "$PROXY_CPU" "$PROXY_BIN" run -c "$OUT/portcullis.toml" >"$OUT/proxy.log" 2>&1 &
    proxy=$!; PIDS+=($proxy)
    wait_log "$OUT/proxy.log"
    (sleep 1; perf record -q -F 4999 -e cpu-clock -g --call-graph dwarf,16384 -p "$proxy" \
      -o "$OUT/perf.data" -- sleep "$((SECONDS_ - 2))" >/dev/null 2>&1) &
    rec=$!
    load - -d "${SECONDS_}s" -w 1s --watch-pid "$proxy" "$@"
    wait "$rec"
    perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null | grep '%' | head -5
    perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | grep '%' | head -40
    echo "perf report -i $OUT/perf.data --children   # for the call graph"
    ;;
  callgrind)
    sed -e 's|^\[server\]$|[server]\ndriver = "epoll"|' "$OUT/portcullis.toml" > "$OUT/portcullis-epoll.toml"
    total() { # total N — Ir of a proxy run that served N requests
      local n=$1 f="$OUT/callgrind.$1.out"; shift
      rm -f "$f"*
      # shellcheck disable=SC2086 # VALGRIND_ARGS is words, e.g. "--cache-sim=yes --LL=1048576,8,64"
      taskset -c "$PROXY_CPU" valgrind --tool=callgrind --callgrind-out-file="$f" ${VALGRIND_ARGS:-} \
        "$PROXY_BIN" run -c "$OUT/portcullis-epoll.toml" >"$OUT/valgrind.log" 2>&1 &
      local vg=$!; PIDS+=($vg)
      wait_log "$OUT/valgrind.log"
      load "$n" -d 300s -w 0s "$@" >&2
      # Dump the counts, then stop it the quick way (nothing of the run is needed any more).
      callgrind_control -d "$vg" >/dev/null
      sleep 1
      kill -9 "$vg" 2>/dev/null || true; wait "$vg" 2>/dev/null || true
      callgrind_annotate "$(ls -t "$f".* | head -1)" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", ""); o = ""; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+$/) o = o " " $i; print substr(o, 2)}'
    }
    a=$(total "$N1" "$@"); b=$(total "$N2" "$@")
    echo "$MODE: $(( (${b%% *} - ${a%% *}) / (N2 - N1) )) instructions per request (userspace; runs of $N1 and $N2: ${a%% *}, ${b%% *})"
    if [ -n "${VALGRIND_ARGS:-}" ]; then   # every event callgrind counted, per request
      events=$(callgrind_annotate "$(ls -t "$OUT/callgrind.$N2.out".* | head -1)" 2>/dev/null | awk '/^Events shown:/ {$1 = $2 = ""; print}')
      python3 -c 'import sys; e, a, b, n = sys.argv[1].split(), sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4])
print("per request: " + ", ".join(f"{k} {(int(y) - int(x)) / n:.1f}" for k, x, y in zip(e, a, b)))' "$events" "$a" "$b" "$((N2 - N1))"
    fi
    echo "callgrind_annotate $(ls -t "$OUT/callgrind.$N2.out".* | head -1)   # for where they go"
    ;;
  ops)
    taskset -c "$PROXY_CPU" "$PROXY_BIN" run -c "$OUT/portcullis.toml" >"$OUT/proxy.log" 2>&1 &
    proxy=$!; PIDS+=($proxy)
    wait_log "$OUT/proxy.log"
    load 200 -d 30s -w 0s "$@" >/dev/null   # warm: pools, caches, sessions
    perf record -q -e io_uring:io_uring_submit_req -e io_uring:io_uring_poll_arm -e raw_syscalls:sys_enter \
      -p "$proxy" -o "$OUT/ops.data" >/dev/null 2>&1 &
    rec=$!
    sleep 1
    load "$N2" -d 300s -w 0s "$@" | sed -n 1p
    kill -INT "$rec"; wait "$rec" 2>/dev/null || true
    perf script -i "$OUT/ops.data" -F event,trace 2>/dev/null | N="$N2" python3 -c '
import collections, os, re, sys
n = int(os.environ["N"]); ops = collections.Counter(); calls = collections.Counter(); arms = 0
names = {}
for line in open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"):
    m = re.match(r"#define __NR_(\w+) (\d+)", line)
    if m: names[int(m.group(2))] = m.group(1)
for line in sys.stdin:
    if "io_uring_submit_req" in line:
        m = re.search(r"opcode (\w+)", line); ops[m.group(1) if m else "?"] += 1
    elif "io_uring_poll_arm" in line: arms += 1
    elif "sys_enter" in line:
        m = re.search(r"NR (\d+)", line); calls[names.get(int(m.group(1)), m.group(1)) if m else "?"] += 1
print("per request, over %d requests:" % n)
print("  io_uring operations %.2f: %s" % (sum(ops.values()) / n, ", ".join("%s %.2f" % (k, v / n) for k, v in ops.most_common())))
print("  polls armed %.2f" % (arms / n))
print("  system calls %.2f: %s" % (sum(calls.values()) / n, ", ".join("%s %.2f" % (k, v / n) for k, v in calls.most_common(8))))'
    ;;
  *) echo "unknown tool $TOOL (perf, callgrind or ops)" >&2; exit 2;;
esac
