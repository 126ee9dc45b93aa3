#!/usr/bin/env bash
# Scale benchmark: N connections (default 1000) on the local control plane (no node) with the fake
# providers. Measures, in one run:
# - the baseline: a bare client making the operator's writes for N new connections
#   (benches/bare_writes.rs, same concurrency, same API server), and the operator's cold start
#   until all are Active, as a ratio;
# - the operator's peak RSS (VmHWM), provider calls;
# - the steady state: writes and provider calls over BENCH_STEADY seconds (default 120) once all
#   are Active;
# - what a restart on the unchanged cluster costs (writes, provider calls, RSS);
# - re-authorization latency (100 at once), the revalidation wave with a short interval
#   (BENCH_WAVE s, default 60: calls per second as a histogram) and the time until revoked tokens
#   are seen (Inactive).
# Usage: scripts/bench-scale.sh [N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-1000}
state=target/bench
port=${BENCH_FAKE_PORT:-18189}
fake=http://127.0.0.1:$port
# BENCH_TAG names the namespaces (several runs on one control plane); BENCH_OPERATOR is the binary
# measured (an A/B of two builds); BENCH_COLD_ONLY=1 stops after the cold-start lines.
ns=bench-$n${BENCH_TAG:+-$BENCH_TAG}
bare_ns=bare-$n${BENCH_TAG:+-$BENCH_TAG}
steady=${BENCH_STEADY:-120}
concurrency=32
mkdir -p "$state"

cargo build --release --workspace --bins --quiet
cargo bench --bench bare_writes --no-run --quiet 2>/dev/null
bin=$PWD/target/release
operator=${BENCH_OPERATOR:-$bin/connection-operator}
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
	# BENCH_KEEP=1 keeps the namespaces (e.g. to profile restarts of the operator by hand).
	[[ ${BENCH_KEEP:-0} == 1 ]] && return
	kubectl delete namespace "$ns" "$bare_ns" "$bare_ns-reauth" --wait=false >/dev/null 2>&1 || true
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
# create_connections K NAMESPACE...: K Secrets and K Connections (c0..c{K-1}) in each namespace,
# created through `kubectl proxy` by 32 threads (kubectl apply of 20,000 objects takes many minutes:
# a GET and a write each, client-throttled).
create_connections() {
	kubectl proxy --port=18002 >/dev/null 2>&1 &
	local proxy=$!
	sleep 1
	python3 - "$1" "$fake" "${@:2}" <<'PY'
import json, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
n, url, namespaces = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
api = "http://127.0.0.1:18002"
def post(path, body):
    request = urllib.request.Request(api + path, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request).read()
def create(job):
    ns, i = job
    post(f"/api/v1/namespaces/{ns}/secrets", {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": f"c{i}", "labels": {"crmconnect.io/credentials": "true"}},
        "stringData": {"client_id": "bench", "refresh_token": f"rt-{i}"}})
    post(f"/apis/crmconnect.io/v1alpha1/namespaces/{ns}/connections", {
        "apiVersion": "crmconnect.io/v1alpha1", "kind": "Connection", "metadata": {"name": f"c{i}"},
        "spec": {"team": f"team{i}", "provider": "SalesforceProduction", "salesforce": {"loginUrl": url},
                 "credentialsSecretRef": {"name": f"c{i}"}}})
with ThreadPoolExecutor(max_workers=32) as pool:
    list(pool.map(create, [(ns, i) for ns in namespaces for i in range(n)]))
PY
	kill $proxy
}
create_connections "$n" "$ns" "$bare_ns"

# The baseline first, in its own namespace (no operator watches it).
bare=$(cargo bench --bench bare_writes --quiet -- "$bare_ns" "$n" "$concurrency" 2>/dev/null | awk '/^bare writes:/ {print $3}')

rss() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# Waits, on one watch (a LIST of N Connections every second would load the API server it measures),
# until all N are Active; prints the time then. Started before the operator: kubectl prints its
# initial list as one object, so only the events that follow name each connection.
all_active_watch() {
	python3 - "$ns" "$n" <<'PY'
import sys, threading, time
sys.path.insert(0, "scripts")
from bench_watch import watch_states
ns, n = sys.argv[1], int(sys.argv[2])
state, active, done = {}, [0], threading.Event()
def seen(name, now, at):
    active[0] += (now == "Active") - (state.get(name) == "Active")
    state[name] = now
    if active[0] >= n and not done.is_set():
        print(f"{time.time():.3f}", flush=True)
        done.set()
watch = watch_states(ns, seen)
done.wait()
watch.kill()
PY
}

# The API server's request counters (by verb and resource), to say what each connection cost.
requests() { kubectl get --raw /metrics | awk '/^apiserver_request_total\{/ {print}' >"$1"; }
requests "$state/requests-before"
all_active_watch >"$state/all-active" &
watcher=$!
sleep 3
start=$(date +%s.%N)
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=${BENCH_LOG:-warn} "$operator" run --namespace "$ns" \
	--allow-loopback-providers --provider-rate 500 --provider-burst 100 --concurrency "$concurrency" >"$state/operator.log" 2>&1 &
op=$!
wait $watcher
end=$(cat "$state/all-active")
calls=$(curl -fsS "$fake/_admin/stats")
peak=$(rss $op)
# Where that memory is: the resident pages by mapping (binary, glibc's heap and arenas, the rest).
resident=$(awk '/^[0-9a-f]+-[0-9a-f]+ / {name = (NF >= 6) ? $6 : "anonymous"; sub(/.*\//, "", name)} /^Rss:/ {kb[name] += $2}
	END {for (n in kb) if (kb[n] >= 1024) printf "%s %d MiB, ", n, kb[n] / 1024}' "/proc/$op/smaps" | sed 's/, $//')
requests "$state/requests-after"
per_connection=$(python3 - "$state/requests-before" "$state/requests-after" "$n" <<'PY'
# Requests per connection during the cold start, by verb and resource (the script's own polling,
# one LIST of Connections a second, included).
import re, sys
def load(path):
    counts = {}
    for line in open(path):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
        key = (labels.get("verb"), labels.get("resource"))
        counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts
before, after, n = load(sys.argv[1]), load(sys.argv[2]), int(sys.argv[3])
diff = {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) >= n / 10}
print(", ".join(f"{verb} {res} {v / n:.1f}" for (verb, res), v in sorted(diff.items(), key=lambda kv: -kv[1])))
PY
)

cold=$(awk "BEGIN {printf \"%.1f\", $end - $start}")
cold_lines() {
	echo "connections:                         $n"
	echo "time until all Active (cold start):  $cold s"
	echo "bare writes (same objects, same concurrency): $bare s"
	echo "ratio cold start / bare writes: $(awk "BEGIN {printf \"%.2f\", $cold / $bare}")"
	echo "operator peak RSS (cold start): $((peak / 1024)) MiB"
	echo "operator resident at the end of the cold start, by mapping: $resident"
	echo "API requests per connection (cold start): $per_connection"
	echo "provider requests (cold start):      $calls"
}
if [[ ${BENCH_COLD_ONLY:-0} == 1 ]]; then
	cold_lines
	exit 0
fi

# What the operator writes: Connections, Secrets, ServiceAccounts, RoleBindings, OrgSettings
# (resourceVersion), Deployment specs (generation; their status belongs to the deployment
# controller), OrgClaims.
snapshot() {
	{
		kubectl get conn,secret,serviceaccount,rolebinding,orgsettings -n "$ns" -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{"\n"}{end}'
		kubectl get deploy -n "$ns" -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}={.metadata.generation}{"\n"}{end}'
		kubectl get orgclaims -o jsonpath='{range .items[*]}{.kind}/{.metadata.name}={.metadata.resourceVersion}{"\n"}{end}' | grep "^OrgClaim/$ns\." || true
	} | sort >"$1"
	# What the Connections said, to see what changed when something did.
	kubectl get conn -n "$ns" -o json >"$1.json"
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
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=${BENCH_LOG:-warn} "$operator" run --namespace "$ns" \
	--allow-loopback-providers --provider-rate 500 --provider-burst 100 --concurrency "$concurrency" \
	--metrics-addr 127.0.0.1:18090 >"$state/operator-restart.log" 2>&1 &
op=$!
# Its first pass: every connection reconciled once (the operator's own counter), then 5 s more.
reconciled() { { curl -fsS 127.0.0.1:18090/metrics 2>/dev/null || true; } | awk '/^connection_operator_reconciles_total\{result="ok"\}/ {s = int($2)} END {print s + 0}'; }
until (($(reconciled) >= n)); do sleep 0.5; done
rpass=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $rstart}")
sleep 5
snapshot "$state/restart-after"
rcalls=$(curl -fsS "$fake/_admin/stats")
rpeak=$(rss $op)

# Latency under load (the restarted operator): K (at most 100) connections lose their tokens (revoked at the provider, and the
# operator asked to check now), then are re-authorized at once (new tokens in their Secrets):
# the time from the Secret update to Active, per connection, from a watch.
k=$((n < 100 ? n : 100))
names=$(seq -f 'c%g' 0 $((k - 1)) | tr '\n' ' ')
for i in $(seq 0 $((k - 1))); do
	curl -fsS -X POST "$fake/_admin/revoke" -H 'content-type: application/json' -d "{\"refreshToken\":\"rt-$i\"}" >/dev/null
	curl -fsS -X POST "$fake/_admin/tokens" -H 'content-type: application/json' \
		-d "{\"remoteId\":\"00D$(printf '%012d' "$i")AAA\",\"refreshToken\":\"rt2-$i\"}" >/dev/null
done
# shellcheck disable=SC2086
kubectl annotate conn -n "$ns" $names crmconnect.io/revalidate=bench-revoke --overwrite >/dev/null
inactive() { kubectl get conn -n "$ns" $names -o jsonpath='{range .items[*]}{.status.state}{"\n"}{end}' | grep -c '^Inactive$' || true; }
until (($(inactive) == k)); do sleep 0.5; done
python3 - "$ns" "$k" <<'PY' >"$state/reauth.txt"
# All Secrets are updated at once; a watch, read as it arrives, timestamps each connection's first
# Active. Latency: from the moment its Secret's update is sent to Active.
import sys
sys.path.insert(0, "scripts")
from bench_watch import reauthorize
p50, p99, most, missing = reauthorize(sys.argv[1], int(sys.argv[2]), lambda i: f"rt2-{i}")
print(f"{p50:.2f} {p99:.2f} {most:.2f} {missing}")
PY
read -r reauth_p50 reauth_p99 reauth_max reauth_missing <"$state/reauth.txt"
# The floor under that latency: the bare client making a new connection's writes for K connections
# at once (a re-authorization makes most of them again: token Secret, session, Deployment, claim,
# status, event), same concurrency, same API server, with the operator idle beside it.
floor_ns=$bare_ns-reauth
kubectl create namespace "$floor_ns" >/dev/null
create_connections "$k" "$floor_ns"
reauth_floor=$(cargo bench --bench bare_writes --quiet -- "$floor_ns" "$k" "$concurrency" 2>/dev/null | awk '/^bare writes:/ {print $3}')

# The revalidation wave: the operator restarted with a short interval (BENCH_WAVE s, default 60), so
# every connection is rechecked once per interval (identity calls; the tokens are not due for a
# refresh). The fake's counters are sampled every second for two intervals, as a histogram.
# Meanwhile R (at most 100) other connections' tokens are revoked at the provider (nothing else
# changes): the time until each is Inactive, against the goal of the interval + 1 s.
kill $op; wait $op 2>/dev/null || true
op=
wave=${BENCH_WAVE:-60}
rk=$((n - k < 100 ? n - k : 100))
KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=${BENCH_LOG:-warn} "$operator" run --namespace "$ns" \
	--allow-loopback-providers --provider-rate 500 --provider-burst 100 --concurrency "$concurrency" \
	--revalidate-interval "${wave}s" --metrics-addr 127.0.0.1:18090 >"$state/operator-wave.log" 2>&1 &
op=$!
# The wave is sampled once this fresh operator has made its first pass (every connection reconciled
# once): at 10,000 that pass takes ~100 s, and checks placed inside it wait behind it. Measured from
# then on, the wave and the revoke figures are those of an operator in steady operation.
wstart=$(date +%s.%N)
until (($(reconciled) >= n)); do sleep 0.5; done
wpass=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $wstart}")
curl -fsS -X DELETE "$fake/_admin/stats" >/dev/null
python3 - "$ns" "$fake" "$wave" "$k" "$rk" 500 <<'PY' >"$state/wave.txt"
import json, subprocess, sys, threading, time, urllib.request
ns, fake, wave, first, count, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
names = {f"c{i}": i for i in range(first, first + count)}
inactive, revoked_at, revoked_wall = {}, [None], [0.0]
sys.path.insert(0, "scripts")
from bench_watch import watch_states
def seen(name, state, at):
    if revoked_at[0] and name in names and name not in inactive and state == "Inactive":
        inactive[name] = at
watch = watch_states(ns, seen)
def stats():
    s = json.load(urllib.request.urlopen(f"{fake}/_admin/stats"))
    return s["tokenRequests"], s["identityRequests"]
def revoke():
    time.sleep(wave / 2)
    revoked_at[0] = time.monotonic()
    revoked_wall[0] = time.time()
    for name, i in names.items():
        req = urllib.request.Request(f"{fake}/_admin/revoke", data=json.dumps({"refreshToken": f"rt-{i}"}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        urllib.request.urlopen(req).read()
threading.Thread(target=revoke, daemon=True).start()
per_second, last, start = [], stats(), time.monotonic()
for second in range(1, 2 * wave + 1):
    time.sleep(max(0, start + second - time.monotonic()))
    now = stats()
    per_second.append((now[0] - last[0]) + (now[1] - last[1]))
    last = now
deadline = time.monotonic() + wave + 30
while len(inactive) < count and time.monotonic() < deadline:
    time.sleep(0.2)
watch.kill()
total = sum(per_second)
lat = sorted(inactive[n] - revoked_at[0] for n in inactive)
pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
buckets = [sum(per_second[i:i + 10]) for i in range(0, len(per_second), 10)]
ordered = sorted(per_second)
print(f"calls {total} tokens {last[0]} identity {last[1]}")
print(f"persecond {ordered[0]} {ordered[len(ordered) // 2]} {ordered[-1]} {rate}")
print("buckets " + " ".join(str(b) for b in buckets))
print(f"revoke {pick(0.5):.2f} {pick(0.99):.2f} {pick(1.0):.2f} {count - len(lat)} {count}")
print("revoke-deciles " + " ".join(f"{pick(q / 10):.1f}" for q in range(11)))
print(f"revoked-at {revoked_wall[0]:.3f}")
PY

cold_lines
echo "steady state: writes $steady_writes, provider calls $steady_calls (over ${steady}s)"
echo "reauthorize $k at once: p50 $reauth_p50 s, max $reauth_max s, not Active within 300 s: $reauth_missing"
echo "reauthorize p99: $reauth_p99 s"
echo "reauthorize floor: bare writes for $k new connections at once: $reauth_floor s (p99 / floor: $(awk "BEGIN {printf \"%.2f\", $reauth_p99 / $reauth_floor}"))"
wave_calls=$(awk '/^calls/ {print $2" (token "$4", identity "$6")"}' "$state/wave.txt")
read -r _ ps_min ps_median ps_max ps_rate < <(grep '^persecond' "$state/wave.txt")
read -r _ rv_p50 rv_p99 rv_max rv_missing rv_count < <(grep '^revoke' "$state/wave.txt")
echo "revalidation wave (interval ${wave}s, over $((2 * wave))s after the operator's first pass of ${wpass}s): provider calls $wave_calls"
echo "revalidation wave: calls per second min $ps_min, median $ps_median, max $ps_max (provider rate $ps_rate/s)"
echo "revalidation wave: calls per 10 s: $(grep '^buckets' "$state/wave.txt" | cut -d' ' -f2-)"
echo "revoke $rv_count (interval ${wave}s): time to Inactive p50 $rv_p50 s, p99 $rv_p99 s, max $rv_max s, not Inactive: $rv_missing"
echo "restart: first pass (every connection reconciled once): $rpass s"
echo "restart: objects unchanged after it: $(cmp -s "$state/restart-before" "$state/restart-after" && echo yes || echo NO)"
echo "restart: provider requests:          $rcalls"
echo "restart: operator peak RSS:          $((rpeak / 1024)) MiB"
