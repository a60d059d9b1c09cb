#!/usr/bin/env bash
# Several piiguard replicas on one PostgreSQL (issue 15): server CPU per call with 1, 2 and 3
# replicas behind one load generator that spreads its connections over them.
#
# One `piiguard dev` (local OpenBao, dev PKI, bootstrap) is replica 1 with its store switched to
# PostgreSQL through the environment; replicas 2 and 3 are `piiguard serve` with the same config
# file, their own listeners, audit folders and instance names. PostgreSQL is a throw-away
# cluster (initdb) with its durability defaults (fsync on, synchronous_commit on), on loopback.
# Everything stops by itself at the end (and on Ctrl-C).
#
#   cargo build --release --bins
#   bench/replicas.sh                      # REPLICAS="1 2 3", 6 connections, 64 in flight
#   SCENARIOS=health,encrypt-warm RUNS=3 DURATION=6 bench/replicas.sh
#   bench/summarize.py bench/out/replicas/r1-*.json   # per replica count
#
# Ports: 45000-45999 (PORT_BASE). Output: bench/out/replicas/rN-RUN.json and the logs in $WORK.
set -euo pipefail
cd "$(dirname "$0")/.."

REPLICAS=${REPLICAS:-"1 2 3"}
RUNS=${RUNS:-2}
DURATION=${DURATION:-6}
SCENARIOS=${SCENARIOS:-health,encrypt-warm,decrypt-warm,tokenize-random,tokenize-det,detokenize}
CONNECTIONS=${CONNECTIONS:-6}
CONCURRENCY=${CONCURRENCY:-64}
PORT_BASE=${PORT_BASE:-45000}
WORK=${WORK:-/tmp/piiguard-replicas}
OUT=${OUT:-bench/out/replicas}
# Seconds of idle before the runs of each replica count: every replica's CPU over that time (the
# background work of a replica: eviction feed polls, reaper, KEK job, metrics), in $OUT/idle.txt.
IDLE_SECS=${IDLE_SECS:-10}
BIN=${BIN:-target/release}
BAO=${PIIGUARD_BAO_BIN:-$PWD/.venv/bin/bao}

for b in "$BIN/piiguard" "$BIN/piiguard-bench"; do
  [ -x "$b" ] || { echo "missing $b: cargo build --release --bins" >&2; exit 1; }
done
PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -x "$PG_BIN/initdb" ] || { echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK" "$OUT"
chmod 0777 "$WORK"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

PG_PORT=$((PORT_BASE + 432))
PG_URL="postgres://piiguard@127.0.0.1:$PG_PORT/postgres"
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$p" 2>/dev/null || true
  done
  as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -m fast stop >/dev/null 2>&1 || true
}
trap stop_all EXIT

as_pg "$PG_BIN/initdb" -D "$WORK/pg" -A trust -U piiguard -E UTF8 >"$WORK/initdb.log"
as_pg "$PG_BIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w \
  -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK -c max_connections=200" start >/dev/null
PG_PID=$(head -1 "$WORK/pg/postmaster.pid")

wait_health() { # port
  for _ in $(seq 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  echo "nothing listens on 127.0.0.1:$1" >&2; return 1
}
grpc_port() { echo $((PORT_BASE + 443 + 10 * ($1 - 1))); }

# Replica 1: piiguard dev (its OpenBao and bootstrap), store on PostgreSQL.
PIIGUARD_BAO_BIN=$BAO PIIGUARD_STORE__URL=$PG_URL PIIGUARD_METRICS__LISTEN=127.0.0.1:$((PORT_BASE + 464)) \
  setsid "$BIN/piiguard" dev --dir "$WORK/dev" --pki-dir "$WORK/pki" \
  --listen "127.0.0.1:$(grpc_port 1)" --health-listen "127.0.0.1:$((PORT_BASE + 80))" \
  --vault-port $((PORT_BASE + 200)) >"$WORK/replica-1.log" 2>&1 &
pids+=($!)
R1=$!
wait_health "$(grpc_port 1)"
BAO_PID=$(pgrep -f -- "-config=$WORK/dev/bao/bao.hcl" | head -1)

start_replica() { # n
  local n=$1
  PIIGUARD_STORE__URL=$PG_URL \
  PIIGUARD_SERVER__LISTEN=127.0.0.1:$(grpc_port "$n") \
  PIIGUARD_SERVER__HEALTH_LISTEN=127.0.0.1:$((PORT_BASE + 80 + 10 * (n - 1))) \
  PIIGUARD_SERVER__INSTANCE=replica-$n \
  PIIGUARD_METRICS__LISTEN=127.0.0.1:$((PORT_BASE + 464 + 10 * (n - 1))) \
  PIIGUARD_AUDIT__DIR=$WORK/audit-$n \
    setsid "$BIN/piiguard" serve --config "$WORK/dev/piiguard.toml" >"$WORK/replica-$n.log" 2>&1 &
  pids+=($!)
  eval "R$n=$!"
  wait_health "$(grpc_port "$n")"
}

for n in $REPLICAS; do
  addrs=() spids=()
  for i in $(seq "$n"); do
    if [ "$i" -gt 1 ] && [ -z "$(eval echo "\${R$i:-}")" ]; then start_replica "$i"; fi
    addrs+=("127.0.0.1:$(grpc_port "$i")")
    spids+=("$(eval echo "\$R$i")")
  done
  if [ "$IDLE_SECS" -gt 0 ]; then
    cpu() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
    before=() ; for p in "${spids[@]}"; do before+=("$(cpu "$p")"); done
    sleep "$IDLE_SECS"
    i=0; for p in "${spids[@]}"; do
      echo "$n replica(s): replica $((i + 1)) idle CPU $(( ($(cpu "$p") - ${before[$i]}) * 1000000 / $(getconf CLK_TCK) / IDLE_SECS )) us/s over ${IDLE_SECS} s" | tee -a "$OUT/idle.txt" >&2
      i=$((i + 1))
    done
  fi
  for run in $(seq "$RUNS"); do
    echo "== $n replica(s), run $run/$RUNS, load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    "$BIN/piiguard-bench" run --dev-dir "$WORK/dev" --pki-dir "$WORK/pki" \
      --addr "$(IFS=,; echo "${addrs[*]}")" --vault-addr "https://127.0.0.1:$((PORT_BASE + 200))" \
      --server-pid "$(IFS=,; echo "${spids[*]}")" --vault-pid "$BAO_PID" --store-pid "$PG_PID" \
      -s "$SCENARIOS" --connections "$CONNECTIONS" -c "$CONCURRENCY" -d "$DURATION" --warmup 1 \
      --json --label "replicas=$n" >"$OUT/r$n-$run.json"
  done
done
echo "done: $OUT/r*-*.json (bench/summarize.py $OUT/r1-*.json ...)" >&2
