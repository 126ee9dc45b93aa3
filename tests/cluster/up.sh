#!/usr/bin/env bash
# Starts the test control plane in the background (building it first if
# needed), waits until it is ready and prints the lines to eval:
#   eval "$(tests/cluster/up.sh)"
# Idempotent: if it is already running and ready, only prints them.
# Env: CLUSTER_STATE (default target/cluster/state), CLUSTER_BIN
# (default target/cluster/bin), CLUSTER_TIMEOUT seconds (default 180),
# CLUSTER_NODE (default 1: also a worker node, which needs root; 0: control plane only).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

"$cluster_here/build.sh" >&2
if [[ "$CLUSTER_NODE" == 1 ]]; then
	# runc, the CNI plugins, iptables, iproute2 and lua5.4 from Debian (a no-op when they are there).
	"$cluster_root/scripts/install-test-deps.sh" >&2
fi

if cluster_ready; then
	echo "up.sh: cluster already running (pid $(cat "$CLUSTER_STATE/kubecluster.pid"))" >&2
	cluster_exports
	exit 0
fi
if pid="$(cluster_pid "$CLUSTER_STATE/kubecluster.pid")"; then
	echo "up.sh: kubecluster (pid $pid) is running but not ready; restarting it" >&2
	"$cluster_here/down.sh" >&2
fi

mkdir -p "$CLUSTER_STATE"
rm -f "$CLUSTER_STATE/ready"
start=$SECONDS
node_flag=()
if [[ "$CLUSTER_NODE" == 1 ]]; then
	node_flag=(--node)
fi
setsid nohup "$CLUSTER_BIN/kubecluster" up --dir "$CLUSTER_STATE" --timeout "${CLUSTER_TIMEOUT}s" "${node_flag[@]}" \
	>"$CLUSTER_STATE/kubecluster.log" 2>&1 </dev/null &
pid=$!
echo "up.sh: started kubecluster (pid $pid), state in $CLUSTER_STATE" >&2

while ! cluster_ready; do
	if ! kill -0 "$pid" 2>/dev/null; then
		echo "up.sh: kubecluster exited before it was ready" >&2
		cluster_logs >&2
		exit 1
	fi
	if ((SECONDS - start > CLUSTER_TIMEOUT + 15)); then
		echo "up.sh: cluster not ready after ${CLUSTER_TIMEOUT}s" >&2
		cluster_logs >&2
		"$cluster_here/down.sh" >&2 || true
		exit 1
	fi
	sleep 0.5
done
echo "up.sh: cluster ready in $((SECONDS - start))s" >&2
cluster_exports
