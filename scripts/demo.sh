#!/usr/bin/env bash
# The local demo (`make demo`): builds everything, starts the real cluster with its node
# (tests/cluster/: control plane + kubelet + containerd; needs root), loads the operator image
# (scripts/image.sh), serves a simulated Salesforce + Dynamics 365 over https with a throwaway CA
# on the node's bridge address (the fake-providers test binary, not part of the operator), installs
# the operator with Helm as a pod, applies example connections, shows them turn Active with their
# retriever pods Running and claiming the jobs queued in the simulated CRMs (JobRuns), revokes one
# token and shows it Inactive with its pod gone.
# `make demo-down` stops it all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
state=$root/target/demo
# The real provider host names, which the operator pod resolves to the simulated providers
# (the chart's hostAliases): the connections below look exactly like real ones.
hosts=(login.salesforce.com test.salesforce.com login.microsoftonline.us contoso.crm.microsoftdynamics.us)
ns=demo
release=connection-operator
release_ns=connection-operator

stop_fake() {
	if [[ -f $state/fake-providers.pid ]]; then
		kill "$(cat "$state/fake-providers.pid")" 2>/dev/null || true
		rm -f "$state/fake-providers.pid"
	fi
}

# What a user's own shell sources to reach the demo's cluster and binaries (`make demo` runs this
# script in a subshell, which cannot export them for the user): `source target/demo/env`, from any
# directory and any shell. `scripts/demo.sh env` prints it for the running cluster.
env_lines() {
	printf '%s\n' "$1" "export PATH=$root/target/debug:\$PATH" \
		"export KUBECTL_CRM_EXTRA_CA_BUNDLE=$state/pki/ca.crt KUBECTL_CRM_ALLOW_PROVIDER_DOMAINS=\${CLUSTER_NODE_IP:-}"
}
if [[ ${1:-} == env ]]; then
	env_lines "$(tests/cluster/up.sh 2>/dev/null)"
	exit 0
fi

if [[ ${1:-} == down ]]; then
	stop_fake
	tests/cluster/down.sh
	echo "demo stopped"
	exit 0
fi

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

step "Building the operator image and the fake providers (first run: a few minutes)"
cargo build --workspace --bins --quiet
scripts/image.sh 2>&1 | grep '^image.sh' || { scripts/image.sh; exit 1; }
bin=$root/target/debug

step "Starting the Kubernetes cluster with one node (first run builds it from the Go module proxy)"
exports=$(tests/cluster/up.sh)
eval "$exports"
export KUBECONFIG PATH
mkdir -p "$state"
env_lines "$exports" >"$state/env"
echo "kubectl for your shell: source $state/env   (then kubectl get conn -A; connection-operator --help)"
stop_fake
scripts/image.sh --load 2>&1 | grep '^image.sh: loaded' || true
kubectl get nodes
fake=https://$CLUSTER_NODE_IP

step "Starting the simulated Salesforce and Dynamics 365 on $fake (https, a throwaway test CA)"
cat >"$state/seed.yaml" <<SEED
salesforce:
  - {orgId: 00D5g000004ACMEAA1, userId: 0055g00000ACMEAAA1, username: ops@acme.example, clientId: demo-client, refreshTokens: [demo-prod-token]}
  - {orgId: 00D7z000000UATAAA1, userId: 0057z00000UATAAAA1, username: qa@acme.example.uat, clientId: demo-client, refreshTokens: [demo-uat-token]}
  # Connected from the terminal with \`kubectl crm connect\` (no token yet: the user signs in).
  - {orgId: 00D3x000000GLBXAA1, userId: 0053x00000GLBXAA1, username: support@globex.example, clientId: demo-cli}
dynamics:
  - {organizationId: 6f1c2a9e-0000-4000-8000-00000000c0de, userId: 2b7d4e11-0000-4000-8000-0000000a11ce, clientId: demo-app, environmentUrl: "https://contoso.crm.microsoftdynamics.us", refreshTokens: [demo-dyn-token]}
# Jobs queued for the cloud in each CRM (and one for a desktop processor, which is not ours). The
# record-count jobs run with examples/jobtemplates/record-count.yaml; nightly-export has no template,
# so no retriever claims it (they claim only the types a JobTemplate can run).
jobs:
  - {remoteId: 00D5g000004ACMEAA1, count: 2, type: record-count}
  - {remoteId: 00D5g000004ACMEAA1, count: 1, type: nightly-export}
  - {remoteId: 00D5g000004ACMEAA1, type: report, processor: Desktop}
  - {remoteId: 00D7z000000UATAAA1, count: 1, type: record-count}
  - {remoteId: 6f1c2a9e-0000-4000-8000-00000000c0de, count: 2, type: record-count}
SEED
dns_args=()
for h in "${hosts[@]}"; do dns_args+=(--dns "$h"); done
"$bin/fake-providers" gen-certs --dir "$state/pki" --ip "$CLUSTER_NODE_IP" "${dns_args[@]}" >/dev/null
nohup "$bin/fake-providers" --listen "$CLUSTER_NODE_IP:443" --seed "$state/seed.yaml" \
	--tls-cert "$state/pki/tls.crt" --tls-key "$state/pki/tls.key" >"$state/fake-providers.log" 2>&1 &
echo $! >"$state/fake-providers.pid"
for _ in $(seq 50); do curl -fsS --cacert "$state/pki/ca.crt" "$fake/_admin/stats" >/dev/null 2>&1 && break; sleep 0.1; done

step "Installing the operator with Helm (its image loaded into the node; it trusts the test CA)"
# The watched namespace first: the operator's Role (namespaced mode) lives there.
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
cat >"$state/values.yaml" <<VALUES
watchNamespace: $ns
revalidateInterval: 10s
image: {pullPolicy: Never}
retriever: {pullPolicy: Never}
# The simulated Salesforce's answers name it by the node's IP (instance and identity URLs); the
# operator sends credentials only to provider hosts and the ones added here.
providerHosts: {extraDomains: ["$CLUSTER_NODE_IP"]}
# The simulated providers answer for the real host names (on $fake).
hostAliases:
  - ip: "$CLUSTER_NODE_IP"
    hostnames: [$(IFS=,; echo "${hosts[*]}")]
VALUES
helm upgrade --install "$release" charts/connection-operator -n "$release_ns" --create-namespace \
	-f "$state/values.yaml" --set-file extraCABundle="$state/pki/ca.crt" --wait --timeout 180s >/dev/null
kubectl wait pods -n "$release_ns" -l app.kubernetes.io/name=connection-operator --for=condition=Ready --timeout=120s >/dev/null
kubectl get pods -n "$release_ns" -o wide
echo
echo "(it watches namespace $ns only: Connections applied elsewhere get no status from it)"
echo "(two replicas: the Lease's holder reconciles, the other is a standby)"
kubectl get lease -n "$release_ns"

step "Applying the example JobTemplate (the administrator's: how record-count jobs run)"
kubectl apply -f examples/jobtemplates/record-count.yaml

step "Applying example connections in namespace $ns"
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
  credentialsSecretRef: {name: acme-prod-credentials}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {name: acme-uat}
spec:
  team: sales-ops
  provider: SalesforceSandbox
  displayName: ACME UAT sandbox
  credentialsSecretRef: {name: acme-uat-credentials}
---
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {name: contoso}
spec:
  team: public-sector
  provider: Dynamics365
  displayName: Contoso (GCC High)
  dynamics: {environmentUrl: "https://contoso.crm.microsoftdynamics.us", cloud: GCCHigh}
  credentialsSecretRef: {name: contoso-credentials}
YAML

wait_for() { # name jsonpath-value
	for _ in $(seq 120); do
		[[ $(kubectl get conn -n "$ns" "$1" -o jsonpath='{.status.state}' 2>/dev/null) == "$2" ]] && return 0
		sleep 0.5
	done
	echo "timed out waiting for $1 to be $2 (see: kubectl logs -n connection-operator deploy/connection-operator)" >&2
	return 1
}

step "Waiting for the connections to be validated"
wait_for acme-prod Active
wait_for acme-uat Active
wait_for contoso Active

step "Another team connects the same org: the first valid holder keeps it (kubectl get orgclaims)"
kubectl apply -n "$ns" -f - <<YAML
apiVersion: crmconnect.io/v1alpha1
kind: Connection
metadata: {name: acme-prod-marketing}
spec:
  team: marketing
  provider: SalesforceProduction
  displayName: Marketing's try at the same org
  credentialsSecretRef: {name: acme-prod-credentials}
YAML
wait_for acme-prod-marketing Conflict
kubectl get orgclaims
kubectl get connections -n "$ns"
echo
for _ in $(seq 120); do
	[[ $(kubectl get pods -n "$ns" -l app.kubernetes.io/name=connection-retriever \
		-o jsonpath='{range .items[*]}{.status.containerStatuses[0].ready}{"\n"}{end}' | grep -c true) == 3 ]] && break
	sleep 0.5
done
kubectl get deployments,pods -n "$ns"

step "Retrievers claim the queued jobs; each runs as a Job; the outcome goes back to the CRM"
echo "(first poll within 30 s of a retriever's start; retrievers claim only the types a JobTemplate runs,"
echo " so acme-prod claims its 2 record-count jobs and leaves nightly-export; the Conflict connection claims none)"
for _ in $(seq 240); do
	[[ $(kubectl get jobruns -n "$ns" -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' 2>/dev/null | grep -c Succeeded) -ge 5 ]] && break
	sleep 0.5
done
kubectl get orgsettings,jobruns,jobs -n "$ns"
echo
prod_jobs=$(curl -fsS --cacert "$state/pki/ca.crt" "$fake/_admin/jobs/00D5g000004ACMEAA1")
echo "in acme-prod's org (the simulated Salesforce), one job record:"
grep -o '{[^{}]*"status":"Completed"[^{}]*}' <<<"$prod_jobs" | head -1 | tr ',' '\n' |
	grep -E '"(id|jobType|status|claimedBy|attempt|result)"' | sed 's/^/  /'
echo "  ... and $(grep -o '"status":"Holding"' <<<"$prod_jobs" | wc -l) still Holding (one for a Desktop processor, never ours; nightly-export, which no JobTemplate runs)"

step "Revoking the UAT sandbox's refresh token at the provider (as an admin would in Salesforce)"
curl -fsS --cacert "$state/pki/ca.crt" -X POST "$fake/_admin/revoke" -H 'content-type: application/json' -d '{"refreshToken":"demo-uat-token"}'
echo
echo "(the operator re-checks every 10 s here; 15 min by default)"
wait_for acme-uat Inactive
kubectl get connections -n "$ns"
echo
kubectl get conn acme-uat -n "$ns" -o jsonpath='{.status.message}{"\n"}'
for _ in $(seq 60); do
	[[ -z $(kubectl get pods -n "$ns" -l crmconnect.io/connection=acme-uat -o name) ]] && break
	sleep 0.5
done
kubectl get pods -n "$ns"

step "A new connection from the terminal: kubectl crm connect, signing in with a device code"
# kubectl finds the plugin (target/debug/kubectl-crm) on PATH. On your machine the login would go to
# login.salesforce.com; here the simulated Salesforce answers on $fake, with the demo's CA.
export PATH=$bin:$PATH KUBECTL_CRM_EXTRA_CA_BUNDLE=$state/pki/ca.crt KUBECTL_CRM_ALLOW_PROVIDER_DOMAINS=$CLUSTER_NODE_IP
echo "\$ kubectl crm connect globex -n $ns --team support --provider SalesforceProduction --login-url $fake --client-id demo-cli"
kubectl crm connect globex -n "$ns" --team support --provider SalesforceProduction --login-url "$fake" \
	--client-id demo-cli --display-name "Globex support org" </dev/null &
connect_pid=$!
code=
for _ in $(seq 100); do
	code=$(curl -fsS --cacert "$state/pki/ca.crt" "$fake/_admin/device-codes" | grep -o '"userCode":"[^"]*"' | head -1 | cut -d'"' -f4) || true
	[[ -n $code ]] && break
	sleep 0.2
done
sleep 1
echo "(you would now open the URL on any device, sign in to Salesforce and enter $code;"
echo " here the simulated Salesforce is told that the user allowed access)"
curl -fsS --cacert "$state/pki/ca.crt" -X POST "$fake/_admin/device-codes/$code" -H 'content-type: application/json' \
	-d '{"decision":"approve","remoteId":"00D3x000000GLBXAA1"}'
wait "$connect_pid"
echo
echo "\$ kubectl crm status -n $ns"
kubectl crm status -n "$ns"
echo
echo "\$ kubectl crm status acme-uat -n $ns"
kubectl crm status acme-uat -n "$ns"

cat <<EOF

Poke further: first point kubectl (and connection-operator) at the demo cluster in your shell
(make ran in a subshell):
  source target/demo/env
then:
  kubectl crm status -n $ns                            # all connections (kubectl get conn -n $ns -o wide)
  kubectl crm status globex -n $ns                     # one connection's details
  kubectl crm pause globex -n $ns; kubectl crm activate globex -n $ns
  kubectl crm check acme-prod -n $ns                   # have the operator check the tokens now
  kubectl get orgs,jr -n $ns                           # org settings and claimed jobs
  kubectl describe conn acme-uat -n $ns                # conditions and events
  kubectl get events -n $ns                            # Activated, Deactivated, Conflict, ...
  kubectl patch conn acme-prod -n $ns --type merge -p '{"spec":{"paused":true}}'   # pause
  curl --cacert target/demo/pki/ca.crt -X POST $fake/_admin/tokens -H 'content-type: application/json' -d '{"remoteId":"00D7z000000UATAAA1","refreshToken":"new-uat-token"}'
  kubectl create secret generic acme-uat-credentials -n $ns --from-literal=client_id=demo-client \\
      --from-literal=refresh_token=new-uat-token --dry-run=client -o yaml | kubectl apply -f -   # re-authorize
  kubectl delete conn acme-prod -n $ns                 # acme-prod-marketing takes over the org
  kubectl port-forward -n $release_ns deploy/$release 18090:8080 &  curl -s 127.0.0.1:18090/metrics | grep ^connection_operator_connections
  kubectl logs -n $release_ns deploy/$release -f       # the operator's log
  kubectl logs -n $ns deploy/acme-prod-retriever       # a retriever's log

Stop everything: make demo-down
EOF
