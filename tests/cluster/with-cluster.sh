#!/usr/bin/env bash
# Runs CMD... against a fresh test control plane and always stops it after:
#   tests/cluster/with-cluster.sh cargo test --all-targets
# CMD sees KUBECONFIG (admin), OPERATOR_KUBECONFIG (the operator's
# ServiceAccount identity, no permissions unless granted), CLUSTER_BIN and a
# PATH with kubectl and helm first. Exits with CMD's status.
# CLUSTER_KEEP=1 leaves the cluster running afterwards (stop it with down.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if (($# == 0)); then
	echo "usage: $0 CMD [ARGS...]" >&2
	exit 2
fi

teardown() {
	if [[ "${CLUSTER_KEEP:-0}" != 1 ]]; then
		"$cluster_here/down.sh" || true
	fi
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
