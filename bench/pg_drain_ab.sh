#!/usr/bin/env bash
# PostgreSQL drain of one server, for A/B runs of two builds: bench/pg_drain_ab.sh target/release [thousands] [workers]
# `thousands` thousand `true` jobs (default 3), `workers` workers (default 2), a fresh database each run. Needs grpcurl
# and psql; PostgreSQL on 127.0.0.1. QUEUECTL_BENCH_EXECUTOR=noop in the environment reaches the server.
set -euo pipefail
bin=$1; thousands=${2:-3}; workers=${3:-2}; jobs=$((thousands * 1000)); db=pgab_$$
psql -h 127.0.0.1 -U postgres -d postgres -qc "CREATE DATABASE $db"
home=$(mktemp -d); chmod 700 "$home"
"$bin/queuectld" --home "$home" --workers 0 --listen http://127.0.0.1:7392 --database-url "postgres://postgres@127.0.0.1/$db" 2>"$home/log" &
pid=$!
for _ in $(seq 200); do [ -f "$home/server.addr" ] && break; sleep 0.05; done
token=$(cat "$home/token")
batch=$(python3 -c 'import json; print(json.dumps({"jobs": [{"command": "true"} for _ in range(1000)]}))')
for _ in $(seq "$thousands"); do echo "$batch" | grpcurl -plaintext -H "authorization: Bearer $token" -d @ 127.0.0.1:7392 queuectl.v1.QueueService/EnqueueBatch >/dev/null; done
start=$(date +%s.%N)
grpcurl -plaintext -H "authorization: Bearer $token" -d "{\"count\":$workers}" 127.0.0.1:7392 queuectl.v1.QueueService/StartWorkers >/dev/null
while true; do
  done_=$(grpcurl -plaintext -H "authorization: Bearer $token" 127.0.0.1:7392 queuectl.v1.QueueService/Status | python3 -c 'import json,sys; print(json.load(sys.stdin).get("completed",0))')
  [ "$done_" -ge "$jobs" ] && break; sleep 0.05
done
end=$(date +%s.%N)
kill $pid; wait $pid || true
psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE $db WITH (FORCE)"
python3 -c "print('$bin', round($jobs/($end-$start)), 'jobs/s')"
