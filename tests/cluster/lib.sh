# Shared by up.sh, down.sh and with-cluster.sh (sourced, not run).
cluster_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cluster_root="$(cd "$cluster_here/../.." && pwd)"
CLUSTER_BIN="${CLUSTER_BIN:-$cluster_root/target/cluster/bin}"
CLUSTER_STATE="${CLUSTER_STATE:-$cluster_root/target/cluster/state}"
CLUSTER_TIMEOUT="${CLUSTER_TIMEOUT:-180}"
CLUSTER_NODE="${CLUSTER_NODE:-1}"

# cluster_pid FILE: prints the pid in FILE if that process is alive and is ours.
cluster_pid() {
	local f="$1" pid
	[[ -f "$f" ]] || return 1
	pid="$(tr -dc 0-9 <"$f")"
	[[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q kubecluster || return 1
	echo "$pid"
}

cluster_ready() {
	[[ -f "$CLUSTER_STATE/ready" ]] && cluster_pid "$CLUSTER_STATE/kubecluster.pid" >/dev/null &&
		[[ "$("$CLUSTER_BIN/kubectl" --kubeconfig "$CLUSTER_STATE/kubeconfig" --request-timeout=5s \
			get --raw /readyz 2>/dev/null)" == ok ]]
}

cluster_exports() {
	echo "export KUBECONFIG=$CLUSTER_STATE/kubeconfig"
	echo "export OPERATOR_KUBECONFIG=$CLUSTER_STATE/operator.kubeconfig"
	echo "export CLUSTER_BIN=$CLUSTER_BIN"
	echo "export PATH=$CLUSTER_BIN:\$PATH"
	# With a node: CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE, CLUSTER_NODE_IP.
	if [[ -f "$CLUSTER_STATE/node.env" ]]; then
		cat "$CLUSTER_STATE/node.env"
	fi
}

cluster_logs() {
	local f
	for f in kubecluster apiserver controller-manager scheduler containerd kubelet etcd; do
		if [[ -s "$CLUSTER_STATE/$f.log" ]]; then
			echo "----- last lines of $CLUSTER_STATE/$f.log -----"
			tail -n 25 "$CLUSTER_STATE/$f.log"
		fi
	done
}
