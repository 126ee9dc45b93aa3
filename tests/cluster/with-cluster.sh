#!/usr/bin/env bash
# Runs CMD... against a fresh test control plane and always stops it after:
#   tests/cluster/with-cluster.sh cargo test --all-targets
# CMD sees KUBECONFIG (admin), OPERATOR_KUBECONFIG (the operator's
# ServiceAccount identity, no permissions unless granted), CLUSTER_BIN and a
# PATH with kubectl and helm first. Exits with CMD's status.
# CLUSTER_KEEP=1 leaves the cluster running afterwards (stop it with down.sh).
# With a node (CLUSTER_NODE=1, the default), it also checks that stopping the
# cluster left the host as it found it (host-state.sh before and after) and
# fails if not.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if (($# == 0)); then
	echo "usage: $0 CMD [ARGS...]" >&2
	exit 2
fi

before="$(mktemp)"
"$cluster_here/host-state.sh" >"$before"
teardown() {
	local rc=$? after
	if [[ "${CLUSTER_KEEP:-0}" != 1 ]]; then
		"$cluster_here/down.sh" || true
	fi
	if [[ "${CLUSTER_KEEP:-0}" != 1 && "$CLUSTER_NODE" == 1 ]]; then
		after="$(mktemp)"
		"$cluster_here/host-state.sh" >"$after"
		if diff -u "$before" "$after" >&2; then
			echo "with-cluster.sh: the host is as it was before the cluster started" >&2
		else
			echo "with-cluster.sh: FAILED: stopping the cluster left the changes above on the host" >&2
			rc=1
		fi
		rm -f "$after"
	fi
	rm -f "$before"
	exit "$rc"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

exports="$("$cluster_here/up.sh")"
eval "$exports"

set +e
"$@"
status=$?
set -e
exit "$status"
