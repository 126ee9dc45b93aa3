#!/usr/bin/env bash
# The local demo (`make demo`): builds everything, starts the real control plane (tests/cluster/), a
# simulated Salesforce + Dynamics 365 (the fake-providers test binary, not part of the operator),
# the operator with the chart's least-privilege RBAC, applies example connections, shows them turn
# Active, revokes one token and shows it Inactive with its reason. `make demo-down` stops it all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
state=$root/target/demo
fake_port=${DEMO_FAKE_PORT:-18089}
fake=http://127.0.0.1:$fake_port
metrics_port=${DEMO_METRICS_PORT:-18090}
ns=demo

stop_all() {
	for p in operator fake-providers; do
		if [[ -f $state/$p.pid ]]; then
			kill "$(cat "$state/$p.pid")" 2>/dev/null || true
			rm -f "$state/$p.pid"
		fi
	done
}

if [[ ${1:-} == down ]]; then
	stop_all
	tests/cluster/down.sh
	echo "demo stopped"
	exit 0
fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Building the operator and the fake providers (first run: a few minutes)"
cargo build --workspace --bins --quiet
bin=$root/target/debug

step "Starting the Kubernetes control plane (first run builds it from the Go module proxy)"
eval "$(tests/cluster/up.sh)"
export KUBECONFIG OPERATOR_KUBECONFIG PATH
mkdir -p "$state"
stop_all

step "Installing the CRD and the chart's ServiceAccount + least-privilege RBAC"
kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
kubectl wait --for condition=established --timeout=60s -f crds/ >/dev/null
kubectl create namespace connection-operator --dry-run=client -o yaml | kubectl apply -f - >/dev/null
helm template connection-operator charts/connection-operator --namespace connection-operator \
	--show-only templates/serviceaccount.yaml --show-only templates/rbac.yaml |
	kubectl apply --server-side --force-conflicts -f - >/dev/null

step "Starting the simulated Salesforce and Dynamics 365 on $fake"
cat >"$state/seed.yaml" <<SEED
salesforce:
  - {orgId: 00D5g000004ACMEAA1, userId: 0055g00000ACMEAAA1, username: ops@acme.example, clientId: demo-client, refreshTokens: [demo-prod-token]}
  - {orgId: 00D7z000000UATAAA1, userId: 0057z00000UATAAAA1, username: qa@acme.example.uat, clientId: demo-client, refreshTokens: [demo-uat-token]}
dynamics:
  - {organizationId: 6f1c2a9e-0000-4000-8000-00000000c0de, userId: 2b7d4e11-0000-4000-8000-0000000a11ce, clientId: demo-app, refreshTokens: [demo-dyn-token]}
SEED
nohup "$bin/fake-providers" --listen "127.0.0.1:$fake_port" --seed "$state/seed.yaml" >"$state/fake-providers.log" 2>&1 &
echo $! >"$state/fake-providers.pid"
for _ in $(seq 50); do curl -fsS "$fake/_admin/stats" >/dev/null 2>&1 && break; sleep 0.1; done

step "Starting the operator as its ServiceAccount (log: target/demo/operator.log)"
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=info,kube=warn NO_COLOR=1 nohup "$bin/connection-operator" run \
	--namespace "$ns" --revalidate-interval 10s --entra-authority-override "$fake" \
	--metrics-addr "127.0.0.1:$metrics_port" \
	--retriever-image connection-operator:demo >"$state/operator.log" 2>&1 &
echo $! >"$state/operator.pid"

step "Applying example connections in namespace $ns"
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl apply -n "$ns" -f - <<YAML
apiVersion: v1
kind: Secret
metadata: {name: acme-prod-credentials, labels: {crmconnect.io/credentials: "true"}}
stringData: {client_id: demo-client, refresh_token: demo-prod-token}
---
apiVersion: v1
kind: Secret
metadata: {name: acme-uat-credentials, labels: {crmconnect.io/credentials: "true"}}
stringData: {client_id: demo-client, refresh_token: demo-uat-token}
---
apiVersion: v1
kind: Secret
metadata: {name: contoso-credentials, labels: {crmconnect.io/credentials: "true"}}
stringData: {client_id: demo-app, refresh_token: demo-dyn-token}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {name: acme-prod}
spec:
  team: sales-ops
  provider: SalesforceProduction
  displayName: ACME production org
  salesforce: {loginUrl: "$fake"}
  credentialsSecretRef: {name: acme-prod-credentials}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {name: acme-uat}
spec:
  team: sales-ops
  provider: SalesforceSandbox
  displayName: ACME UAT sandbox
  salesforce: {loginUrl: "$fake"}
  credentialsSecretRef: {name: acme-uat-credentials}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {name: contoso}
spec:
  team: public-sector
  provider: Dynamics365
  displayName: Contoso (GCC High)
  dynamics: {environmentUrl: "$fake", cloud: GCCHigh}
  credentialsSecretRef: {name: contoso-credentials}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {name: acme-prod-marketing}
spec:
  team: marketing
  provider: SalesforceProduction
  displayName: Marketing's try at the same org
  salesforce: {loginUrl: "$fake"}
  credentialsSecretRef: {name: acme-prod-credentials}
YAML

wait_for() { # name jsonpath-value
	for _ in $(seq 120); do
		[[ $(kubectl get conn -n "$ns" "$1" -o jsonpath='{.status.state}' 2>/dev/null) == "$2" ]] && return 0
		sleep 0.5
	done
	echo "timed out waiting for $1 to be $2 (see target/demo/operator.log)" >&2
	return 1
}

step "Waiting for the connections to be validated"
wait_for acme-prod Active
wait_for acme-uat Active
wait_for contoso Active
wait_for acme-prod-marketing Conflict
kubectl get connections -n "$ns"
echo
kubectl get deployments -n "$ns"

step "Revoking the UAT sandbox's refresh token at the provider (as an admin would in Salesforce)"
curl -fsS -X POST "$fake/_admin/revoke" -H 'content-type: application/json' -d '{"refreshToken":"demo-uat-token"}'
echo
echo "(the operator re-checks every 10 s here; 15 min by default)"
wait_for acme-uat Inactive
kubectl get connections -n "$ns"
echo
kubectl get conn acme-uat -n "$ns" -o jsonpath='{.status.message}{"\n"}'
kubectl get deployment acme-uat-retriever -n "$ns" -o jsonpath='acme-uat-retriever replicas: {.spec.replicas}{"\n"}'

cat <<EOF

Poke further (in this shell: eval "\$(tests/cluster/up.sh)"):
  kubectl get conn -n $ns -o wide                      # all connections
  kubectl describe conn acme-uat -n $ns                # conditions and events
  kubectl get events -n $ns                            # Activated, Deactivated, Conflict, ...
  kubectl patch conn acme-prod -n $ns --type merge -p '{"spec":{"paused":true}}'   # pause
  curl -X POST $fake/_admin/tokens -H 'content-type: application/json' -d '{"remoteId":"00D7z000000UATAAA1","refreshToken":"new-uat-token"}'
  kubectl create secret generic acme-uat-credentials -n $ns --from-literal=client_id=demo-client \\
      --from-literal=refresh_token=new-uat-token --dry-run=client -o yaml | kubectl apply -f -   # re-authorize
  kubectl delete conn acme-prod -n $ns                 # acme-prod-marketing takes over the org
  curl -s 127.0.0.1:$metrics_port/metrics | grep ^connection_operator_connections   # metrics
  tail -f target/demo/operator.log

Stop everything: make demo-down
EOF
