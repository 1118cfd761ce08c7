# Sourced by the drain scripts: starts "$bin/queuectld" without workers on a fresh owner-only home ($home, its
# pid in $pid) and enqueues $jobs `true` jobs in it.
home=$(mktemp -d); chmod 700 "$home"
export QUEUECTL_HOME=$home QUEUECTL_NO_AUTOSTART=1
"$bin/queuectld" --workers 0 2>"$home/log" &
pid=$!
for _ in $(seq 200); do "$bin/queuectl" status >/dev/null 2>&1 && break; sleep 0.05; done
seq "$jobs" | sed 's/.*/{"command":"true"}/' | "$bin/queuectl" enqueue --quiet - >/dev/null
