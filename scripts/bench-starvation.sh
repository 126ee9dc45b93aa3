#!/usr/bin/env bash
# The starvation figure (issue 30): does a namespace of hostile JobRuns delay another namespace's
# token refreshes? Runs tests/starvation.rs (release build) against a test control plane without a
# node: a baseline round (namespace B's 20 connections refreshed every 10 s, namespace A idle), then
# the same with 200 claimed JobRuns in A whose CRM never answers. Prints B's refreshes in a 60 s
# window against the schedule, the peak RSS of the test process (operator + fake CRMs + harness),
# and the ratios hostile / baseline. Uses a running test cluster when KUBECONFIG points at one.
# Usage: scripts/bench-starvation.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cmd=(cargo test --release --test starvation -- --ignored --nocapture --test-threads 1)
if [[ -n ${KUBECONFIG:-} && -n ${OPERATOR_KUBECONFIG:-} ]]; then
	"${cmd[@]}"
else
	CLUSTER_NODE=0 tests/cluster/with-cluster.sh "${cmd[@]}"
fi
