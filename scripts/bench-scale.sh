#!/usr/bin/env bash
# Scale benchmark: N connections (default 1000) on the local control plane (no node) with the fake
# providers. Measures, in one run:
# - the baseline: a bare client making the operator's writes for N new connections
#   (benches/bare_writes.rs, same concurrency, same API server), and the operator's cold start
#   until all are Active, as a ratio;
# - the operator's peak RSS (VmHWM), provider calls;
# - the steady state: writes and provider calls over BENCH_STEADY seconds (default 120) once all
#   are Active;
# - what a restart on the unchanged cluster costs (writes, provider calls, RSS).
# Usage: scripts/bench-scale.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-1000}
state=target/bench
port=${BENCH_FAKE_PORT:-18189}
fake=http://127.0.0.1:$port
ns=bench-$n
bare_ns=bare-$n
steady=${BENCH_STEADY:-120}
concurrency=32
mkdir -p "$state"

cargo build --release --workspace --bins --quiet
cargo bench --bench bare_writes --no-run --quiet 2>/dev/null
bin=$PWD/target/release
# The operator is what is measured: no node, so no retriever pods compete for the 2 cores.
export CLUSTER_NODE=${CLUSTER_NODE:-0}
eval "$(tests/cluster/up.sh 2>/dev/null)"
export KUBECONFIG OPERATOR_KUBECONFIG PATH
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl create namespace connection-operator --dry-run=client -o yaml | kubectl apply -f - >/dev/null
helm template connection-operator charts/connection-operator --namespace connection-operator \
	--show-only templates/serviceaccount.yaml --show-only templates/rbac.yaml |
	kubectl apply --server-side --force-conflicts -f - >/dev/null

cleanup() {
	[[ -n ${op:-} ]] && kill "$op" 2>/dev/null || true
	[[ -n ${fk:-} ]] && kill "$fk" 2>/dev/null || true
	kubectl delete namespace "$ns" "$bare_ns" --wait=false >/dev/null 2>&1 || true
	kubectl delete orgclaims --all --wait=false >/dev/null 2>&1 || true
}
trap cleanup EXIT

# One org per connection, one refresh token each.
python3 - "$n" >"$state/seed.yaml" <<'PY'
import sys
n = int(sys.argv[1])
print("salesforce:")
for i in range(n):
    print(f"  - {{orgId: 00D{i:012d}AAA, userId: 005{i:012d}AAA, username: u{i}@bench, clientId: bench, refreshTokens: [rt-{i}]}}")
PY
"$bin/fake-providers" --listen "127.0.0.1:$port" --seed "$state/seed.yaml" >"$state/fake.log" 2>&1 &
fk=$!
kubectl create namespace "$ns" >/dev/null
kubectl create namespace "$bare_ns" >/dev/null
python3 - "$n" "$fake" >"$state/objects.yaml" <<'PY'
import sys
n, url = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    print(f"""---
apiVersion: v1
kind: Secret
metadata: {{name: c{i}, labels: {{crmconnect.io/credentials: "true"}}}}
stringData: {{client_id: bench, refresh_token: rt-{i}}}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {{name: c{i}}}
spec: {{team: team{i}, provider: SalesforceProduction, salesforce: {{loginUrl: "{url}"}}, credentialsSecretRef: {{name: c{i}}}}}""")
PY
kubectl apply -n "$ns" -f "$state/objects.yaml" >/dev/null
kubectl apply -n "$bare_ns" -f "$state/objects.yaml" >/dev/null

# The baseline first, in its own namespace (no operator watches it).
bare=$(cargo bench --bench bare_writes --quiet -- "$bare_ns" "$n" "$concurrency" 2>/dev/null | awk '/^bare writes:/ {print $3}')

rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
count_active() { kubectl get conn -n "$ns" -o jsonpath='{range .items[*]}{.status.state}{"\n"}{end}' | grep -c '^Active$' || true; }

start=$(date +%s.%N)
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=warn "$bin/connection-operator" run --namespace "$ns" \
	--provider-rate 500 --provider-burst 100 --concurrency "$concurrency" >"$state/operator.log" 2>&1 &
op=$!
while (($(count_active) < n)); do sleep 1; done
end=$(date +%s.%N)
calls=$(curl -fsS "$fake/_admin/stats")
peak=$(rss $op)

# What the operator writes: Connections, Secrets, ServiceAccounts, RoleBindings, OrgSettings
# (resourceVersion), Deployment specs (generation; their status belongs to the deployment
# controller), OrgClaims.
snapshot() {
	{
		kubectl get conn,secret,serviceaccount,rolebinding,orgsettings -n "$ns" -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{"\n"}{end}'
		kubectl get deploy -n "$ns" -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}={.metadata.generation}{"\n"}{end}'
		kubectl get orgclaims -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{"\n"}{end}' | grep "^OrgClaim/$ns\." || true
	} | sort >"$1"
}
# Steady state: the same operator, all Active, for $steady s.
sleep 5
snapshot "$state/steady-before"
curl -fsS -X DELETE "$fake/_admin/stats" >/dev/null
sleep "$steady"
snapshot "$state/steady-after"
steady_writes=$(diff "$state/steady-before" "$state/steady-after" | grep -c '^>' || true)
steady_calls=$(curl -fsS "$fake/_admin/stats" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["tokenRequests"] + s["identityRequests"])')
kill $op; wait $op 2>/dev/null || true
op=

snapshot "$state/restart-before"
curl -fsS -X DELETE "$fake/_admin/stats" >/dev/null
rstart=$(date +%s.%N)
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=warn "$bin/connection-operator" run --namespace "$ns" \
	--provider-rate 500 --provider-burst 100 --concurrency "$concurrency" >"$state/operator-restart.log" 2>&1 &
op=$!
sleep 20
snapshot "$state/restart-after"
rcalls=$(curl -fsS "$fake/_admin/stats")
rpeak=$(rss $op)

cold=$(awk "BEGIN {printf \"%.1f\", $end - $start}")
echo "connections:                         $n"
echo "time until all Active (cold start):  $cold s"
echo "bare writes (same objects, same concurrency): $bare s"
echo "ratio cold start / bare writes: $(awk "BEGIN {printf \"%.2f\", $cold / $bare}")"
echo "operator peak RSS (cold start): $((peak / 1024)) MiB"
echo "provider requests (cold start):      $calls"
echo "steady state: writes $steady_writes, provider calls $steady_calls (over ${steady}s)"
echo "restart: objects unchanged after 20s: $(cmp -s "$state/restart-before" "$state/restart-after" && echo yes || echo NO)"
echo "restart: provider requests:          $rcalls"
echo "restart: operator peak RSS:          $((rpeak / 1024)) MiB"
