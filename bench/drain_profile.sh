#!/usr/bin/env bash
# SQLite drain of one server, with the server's CPU and context switches per job by thread, for A/B runs of two
# builds: bench/drain_profile.sh BIN_DIR [jobs] [workers] [perf.data]
# Enqueues `jobs` `true` jobs (default 5,000), starts `workers` workers (default 2), waits until the last ones are
# final, and reads /proc/<server>/task/*/{stat,status} before and after. With a fourth argument, `perf record -g`
# samples the server (and the shells it starts) into that file meanwhile. QUEUECTL_BENCH_EXECUTOR=noop and
# QUEUECTL_CGROUPS=off in the environment reach the server.
set -euo pipefail
bin=$1; jobs=${2:-5000}; workers=${3:-2}; perf_out=${4:-}
source "$(dirname "$0")/queued.sh"
# One line per thread name: "<name> <CPU ticks>" and "switches_<name> <context switches>", summed over threads.
threads() {
  for task in /proc/"$pid"/task/*; do
    name=$(tr ' ' _ <"$task/comm")
    echo "$name $(awk '{print $14 + $15}' "$task/stat")"
    echo "switches_$name $(awk '/ctxt_switches/ {n += $2} END {print n}' "$task/status")"
  done | awk '{sum[$1] += $2} END {for (name in sum) print name, sum[name]}'
}
threads >"$home/before"
if [ -n "$perf_out" ]; then
  perf record -F 2000 -g -p "$pid" -o "$perf_out" 2>/dev/null &
  perf_pid=$!
  sleep 0.5
fi
start=$(date +%s.%N)
"$bin/queuectl" worker start --count "$workers" --daemon >/dev/null
# Jobs of one priority run in the order they were enqueued: the last ones end the drain.
"$bin/queuectl" wait $(seq $((jobs - workers + 1)) "$jobs" | sed 's/^/job/') >/dev/null
end=$(date +%s.%N)
threads >"$home/after"
if [ -n "$perf_out" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
python3 - "$home" "$jobs" "$start" "$end" "$(getconf CLK_TCK)" <<'PY'
import sys
home, jobs, start, end, ticks = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
def read(name):
    return {line.split()[0]: int(line.split()[1]) for line in open(f"{home}/{name}")}
before, after = read("before"), read("after")
used = {name: (after[name] - before.get(name, 0)) / jobs for name in after}
cpu = {name: value * 1e6 / ticks for name, value in used.items() if not name.startswith("switches_")}
switches = {name[len("switches_"):]: value for name, value in used.items() if name.startswith("switches_")}
by_thread = lambda values, unit, least: ", ".join(
    f"{name} {value:.{0 if unit else 1}f}{unit}" for name, value in sorted(values.items(), key=lambda kv: -kv[1]) if value >= least)
print(f"{jobs / (end - start):.0f} jobs/s; server CPU per job {sum(cpu.values()):.0f} µs ({by_thread(cpu, ' µs', 1)});"
      f" context switches per job {sum(switches.values()):.1f} ({by_thread(switches, '', 0.05)})")
PY
kill "$pid"; wait "$pid" || true
rm -rf "$home"
