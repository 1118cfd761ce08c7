#!/usr/bin/env bash
# SQLite drain of one server, for A/B runs of two builds: bench/drain_ab.sh target/release [jobs] [workers]
# Enqueues `jobs` `true` jobs (default 5,000) in batches, starts `workers` workers (default 2), and times the
# drain until every job completed; then times the same number of `sh -c true` spawned `workers` at once, the
# ceiling, and prints both and their ratio.
set -euo pipefail
bin=$1; jobs=${2:-5000}; workers=${3:-2}
source "$(dirname "$0")/queued.sh"
start=$(date +%s.%N)
"$bin/queuectl" worker start --count "$workers" --daemon >/dev/null
# Jobs of one priority run in the order they were enqueued: the last ones end the drain.
"$bin/queuectl" wait $(seq $((jobs - workers + 1)) "$jobs" | sed 's/^/job/') >/dev/null
test "$("$bin/queuectl" status --output json | python3 -c 'import json,sys; print(json.load(sys.stdin)["completed"])')" = "$jobs"
end=$(date +%s.%N)
kill "$pid"; wait "$pid" || true
rm -rf "$home"
ceiling_start=$(date +%s.%N)
seq "$jobs" | xargs -P "$workers" -n 100 sh -c 'for _ in "$@"; do sh -c true; done' sh
ceiling_end=$(date +%s.%N)
python3 -c "
drain = $jobs / ($end - $start); ceiling = $jobs / ($ceiling_end - $ceiling_start)
print('$bin', round(drain), 'jobs/s; ceiling', round(ceiling), 'spawns/s; ratio', round(drain / ceiling, 2))"
