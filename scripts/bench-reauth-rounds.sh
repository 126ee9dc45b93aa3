#!/usr/bin/env bash
# Re-authorization rounds on a namespace kept by the scale bench, to look at one latency closely
# (no baseline: for comparing builds or settings round by round, on the same control plane).
#
#   BENCH_KEEP=1 BENCH_TAG=ab BENCH_COLD_ONLY=1 scripts/bench-scale.sh 3000   # once: bench-3000-ab
#   scripts/bench-reauth-rounds.sh bench-3000-ab 3000 ROUND BINARY[:CONCURRENCY]...
#
# For each binary (alternate two to compare them), in turn: start the operator on the namespace,
# wait for its first pass, revoke the tokens of c0..c99 (the fake forgets them; the operator is
# asked to check now), wait until all 100 are Inactive, then put new tokens in their 100 Secrets at
# once and time each to Active from a watch (as `bench-scale.sh` does). Prints p50 / p99 / max, the
# mean time per re-authorization of each reconcile step (the operator's
# connection_operator_reconcile_step_duration_seconds), the API requests in that window by verb
# and resource, and the CPU each process used in it.
# ROUND numbers the tokens: start at 0 on a fresh namespace, then at the next round printed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ns=$1 n=$2 round=$3
shift 3
state=target/bench/rounds
mkdir -p "$state"
export CLUSTER_NODE=${CLUSTER_NODE:-0}
eval "$(tests/cluster/up.sh 2>/dev/null)"
export KUBECONFIG OPERATOR_KUBECONFIG PATH
port=${BENCH_FAKE_PORT:-18189}
fake=http://127.0.0.1:$port
target/release/fake-providers --listen "127.0.0.1:$port" --seed target/bench/seed.yaml >"$state/fake.log" 2>&1 &
fk=$!
trap 'kill $fk 2>/dev/null; [[ -n ${op:-} ]] && kill $op 2>/dev/null; true' EXIT
sleep 1
k=100
names=$(seq -f 'c%g' 0 $((k - 1)) | tr '\n' ' ')
# CPU ticks (1/100 s) of every process, by name (the control plane's by component).
cpu() {
	python3 - "$1" <<'PY'
import json, os, sys
out = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        stat = open(f"/proc/{pid}/stat").read()
        cmd = open(f"/proc/{pid}/cmdline").read().split("\0")
    except OSError:
        continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    if "kubecluster" in name and len(cmd) > 1:
        name += "/" + cmd[1]
    fields = stat[stat.rindex(")") + 2:].split()
    out[pid] = (name, int(fields[11]) + int(fields[12]))
json.dump(out, open(sys.argv[1], "w"))
PY
}
requests() { kubectl get --raw /metrics | awk '/^apiserver_request_total\{/ {print}' >"$1"; }
steps() { curl -fsS 127.0.0.1:18091/metrics | grep '^connection_operator_reconcile_step_duration_seconds_sum' >"$1" || true; }
for run in "$@"; do
	bin=${run%%:*}
	concurrency=32
	[[ $run == *:* ]] && concurrency=${run##*:}
	KUBECONFIG=$OPERATOR_KUBECONFIG RUST_LOG=${BENCH_LOG:-warn} "$bin" run --namespace "$ns" \
		--allow-loopback-providers --provider-rate 500 --provider-burst 100 --concurrency "$concurrency" \
		--metrics-addr 127.0.0.1:18091 >"$state/operator-$round.log" 2>&1 &
	op=$!
	reconciled() { { curl -fsS 127.0.0.1:18091/metrics 2>/dev/null || true; } | awk '/^connection_operator_reconciles_total\{result="ok"\}/ {s = int($2)} END {print s + 0}'; }
	until (($(reconciled) >= n)); do sleep 0.5; done
	sleep 5
	# The tokens in use are rt-<i> (round 0) or rt<round>-<i>: revoked; rt<round+1>-<i> issued.
	now=rt${round/#0/}
	next=$((round + 1))
	for i in $(seq 0 $((k - 1))); do
		curl -fsS -X POST "$fake/_admin/revoke" -H 'content-type: application/json' -d "{\"refreshToken\":\"$now-$i\"}" >/dev/null || true
		curl -fsS -X POST "$fake/_admin/tokens" -H 'content-type: application/json' \
			-d "{\"remoteId\":\"00D$(printf '%012d' "$i")AAA\",\"refreshToken\":\"rt$next-$i\"}" >/dev/null
	done
	# shellcheck disable=SC2086
	kubectl annotate conn -n "$ns" $names crmconnect.io/revalidate=round-$round --overwrite >/dev/null
	# shellcheck disable=SC2086
	inactive() { kubectl get conn -n "$ns" $names -o jsonpath='{range .items[*]}{.status.state}{"\n"}{end}' | grep -c '^Inactive$' || true; }
	until (($(inactive) == k)); do sleep 0.5; done
	sleep 2
	steps "$state/steps-before"
	requests "$state/requests-before"
	cpu "$state/cpu-before"
	window=$(date +%s.%N)
	latency=$(python3 - "$ns" "$k" "$next" <<'PY'
import sys
sys.path.insert(0, "scripts")
from bench_watch import reauthorize
round = sys.argv[3]
p50, p99, most, missing = reauthorize(sys.argv[1], int(sys.argv[2]), lambda i: f"rt{round}-{i}", timeout=120)
print(f"p50 {p50:.2f} s, p99 {p99:.2f} s, max {most:.2f} s, not Active: {missing}")
PY
)
	cpu "$state/cpu-after"
	window=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $window}")
	sleep 1
	requests "$state/requests-after"
	steps "$state/steps-after"
	echo "round $round, $(basename "$bin"), concurrency $concurrency: reauthorize $k: $latency"
	paste "$state/steps-before" "$state/steps-after" |
		awk -v k=$k '{split($1, a, "\""); printf "%s%s %.0f ms", (NR > 1 ? ", " : "  mean per re-authorization: "), a[2], ($4 - $2) * 1000 / k} END {print ""}'
	python3 - "$state" "$window" <<'PY'
import json, re, sys
state, window = sys.argv[1], sys.argv[2]
def counts(path):
    d = {}
    for line in open(path):
        m = re.match(r'apiserver_request_total\{(.*)\} (\S+)', line)
        if m:
            l = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            if l.get("verb") != "WATCH":
                key = f'{l.get("verb")} {l.get("resource")}' + (f'/{l["subresource"]}' if l.get("subresource") else "")
                d[key] = d.get(key, 0) + float(m.group(2))
    return d
a, b = counts(f"{state}/requests-before"), counts(f"{state}/requests-after")
diff = sorted(((v - a.get(k, 0), k) for k, v in b.items() if v - a.get(k, 0) >= 1), reverse=True)
print(f"  API requests in the window: {sum(d for d, _ in diff):.0f}: " + ", ".join(f"{k} {d:.0f}" for d, k in diff))
a, b = json.load(open(f"{state}/cpu-before")), json.load(open(f"{state}/cpu-after"))
use = {}
for pid, (name, t) in b.items():
    use[name] = use.get(name, 0) + t - a.get(pid, (name, 0))[1]
top = sorted(use.items(), key=lambda x: -x[1])[:6]
print(f"  CPU in the {window} s window (2 cores): " + ", ".join(f"{n} {t / 100:.2f} s" for n, t in top))
PY
	kill $op
	wait $op 2>/dev/null || true
	op=
	round=$next
done
echo "next round: $round"
