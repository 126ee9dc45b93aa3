#!/usr/bin/env bash
# Scale benchmark: N connections (default 1000) on the local control plane with the fake providers.
# Measures time until all are Active, the operator's peak RSS, provider calls, and what a restart
# on the unchanged cluster costs (writes, provider calls). Usage: scripts/bench-scale.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-1000}
state=target/bench
port=${BENCH_FAKE_PORT:-18189}
fake=http://127.0.0.1:$port
ns=bench-$n
mkdir -p "$state"

cargo build --release --workspace --bins --quiet
bin=$PWD/target/release
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
	kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
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

rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
count_active() { kubectl get conn -n "$ns" -o jsonpath='{range .items[*]}{.status.state}{"\n"}{end}' | grep -c '^Active$' || true; }

start=$(date +%s.%N)
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=warn "$bin/connection-operator" run --namespace "$ns" \
	--provider-rate 500 --provider-burst 100 --concurrency 32 >"$state/operator.log" 2>&1 &
op=$!
while (($(count_active) < n)); do sleep 1; done
end=$(date +%s.%N)
calls=$(curl -fsS "$fake/_admin/stats")
peak=$(rss $op)
kill $op; wait $op 2>/dev/null || true
op=

# What the operator writes: Connections, Secrets (resourceVersion) and Deployment specs (generation;
# their status belongs to the deployment controller).
snapshot() {
	{
		kubectl get conn,secret -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.resourceVersion}{"\n"}{end}'
		kubectl get deploy -n "$ns" -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.generation}{"\n"}{end}'
	} | sort | md5sum
}
before=$(snapshot)
curl -fsS -X DELETE "$fake/_admin/stats" >/dev/null
rstart=$(date +%s.%N)
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=warn "$bin/connection-operator" run --namespace "$ns" \
	--provider-rate 500 --provider-burst 100 --concurrency 32 >"$state/operator-restart.log" 2>&1 &
op=$!
sleep 20
after=$(snapshot)
rcalls=$(curl -fsS "$fake/_admin/stats")
rpeak=$(rss $op)

echo "connections:                         $n"
echo "time until all Active (cold start):  $(awk "BEGIN {printf \"%.1f\", $end - $start}") s"
echo "operator peak RSS (cold start):      $((peak / 1024)) MiB"
echo "provider requests (cold start):      $calls"
echo "restart: objects unchanged after 20s: $([[ $before == "$after" ]] && echo yes || echo NO)"
echo "restart: provider requests:          $rcalls"
echo "restart: operator peak RSS:          $((rpeak / 1024)) MiB"
