#!/usr/bin/env bash
# Times the test node and the chart on it, each next to a baseline measured in the same run:
#   node:   cluster start with the node vs without it (CLUSTER_NODE=0), up.sh to ready;
#   pods:   a bare pause pod, created to Ready (baseline) vs `helm install --wait` of the chart
#           with the local operator image (the operator pod Ready through its probes);
#   image:  scripts/image.sh --load with the release binary already built.
# Needs root (the node). Usage: scripts/bench-node.sh [ROUNDS, default 3]. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
rounds=${1:-3}
now() { date +%s.%N; }
since() { echo "$(now) - $1" | awk '{ printf "%.2f", $1 - $3 }'; }
median() { sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

tests/cluster/build.sh >/dev/null 2>&1
cargo build --release --locked --bin connection-operator -q
tests/cluster/down.sh >/dev/null 2>&1 || true
declare -a up0 up1 pod chart image
for ((r = 0; r < rounds; r++)); do
	t=$(now); CLUSTER_NODE=0 tests/cluster/up.sh >/dev/null 2>&1; up0+=("$(since "$t")")
	tests/cluster/down.sh >/dev/null 2>&1
	t=$(now); exports=$(tests/cluster/up.sh 2>/dev/null); up1+=("$(since "$t")")
	eval "$exports"
	t=$(now); scripts/image.sh --load >/dev/null 2>&1; image+=("$(since "$t")")
	t=$(now)
	kubectl run bench-pause --image=registry.k8s.io/pause:kubecluster --image-pull-policy=Never --restart=Never >/dev/null
	kubectl wait --for=condition=Ready pod/bench-pause --timeout=120s >/dev/null
	pod+=("$(since "$t")")
	kubectl create namespace bench-chart >/dev/null
	t=$(now)
	helm install bench charts/connection-operator -n bench-chart --set watchNamespace=bench-chart \
		--set image.pullPolicy=Never --wait --timeout 180s >/dev/null
	chart+=("$(since "$t")")
	tests/cluster/down.sh >/dev/null 2>&1
done
m() { printf '%s\n' "$@" | median; }
u0=$(m "${up0[@]}"); u1=$(m "${up1[@]}"); p=$(m "${pod[@]}"); c=$(m "${chart[@]}"); i=$(m "${image[@]}")
echo "| what | median of $rounds | baseline (same run) | ratio |"
echo "|---|---|---|---|"
echo "| cluster start with the node (up.sh until the Node is Ready) | ${u1} s | ${u0} s without the node | $(awk "BEGIN { printf \"%.2f\", $u1 / $u0 }") |"
echo "| \`helm install --wait\` of the chart (operator pod Ready) | ${c} s | ${p} s for a bare pause pod to be Ready | $(awk "BEGIN { printf \"%.2f\", $c / $p }") |"
echo "| \`scripts/image.sh --load\` (release binary built) | ${i} s | | |"
