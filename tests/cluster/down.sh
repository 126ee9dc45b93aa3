#!/usr/bin/env bash
# Stops the test control plane started by up.sh (SIGTERM, then SIGKILL after
# 60 s) and checks that none of its processes is left. kubecluster undoes what
# its node did to the host when it stops; if it had to be killed,
# "kubecluster node-cleanup" does it here.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

pidfile="$CLUSTER_STATE/kubecluster.pid"
if pid="$(cluster_pid "$pidfile")"; then
	kill -TERM "$pid"
	for ((i = 0; i < 600; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		echo "down.sh: kubecluster (pid $pid) ignored SIGTERM for 60s, killing it" >&2
		kill -KILL "$pid" 2>/dev/null || true
		sleep 1
		killed=1
	fi
	echo "down.sh: kubecluster (pid $pid) stopped" >&2
else
	echo "down.sh: kubecluster not running" >&2
fi
rm -f "$pidfile" "$CLUSTER_STATE/ready"

# The children die with their parent (Pdeathsig); make sure.
left=0
for name in apiserver controller-manager scheduler containerd kubelet; do
	if cpid="$(cluster_pid "$CLUSTER_STATE/$name.pid")"; then
		echo "down.sh: $name (pid $cpid) still running, killing it" >&2
		kill -KILL "$cpid" 2>/dev/null || true
		left=1
	fi
	rm -f "$CLUSTER_STATE/$name.pid"
done
if ((left)); then
	sleep 1
fi
if [[ "$CLUSTER_NODE" == 1 ]] && [[ "${killed:-0}" == 1 || "$left" == 1 || -d /run/kubecluster ]] && [[ -x "$CLUSTER_BIN/kubecluster" ]] && [[ $EUID == 0 ]]; then
	"$CLUSTER_BIN/kubecluster" node-cleanup || echo "down.sh: node cleanup failed (see above)" >&2
fi
rm -f "$CLUSTER_STATE/node.env"
