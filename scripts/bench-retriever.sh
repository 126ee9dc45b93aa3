#!/usr/bin/env bash
# What one retriever pod costs on the real node (issue 13's arithmetic for 10,000 connections).
# Needs the demo running (`make demo`: the cluster with its node, the operator from the chart, the
# simulated CRMs). For one connection (default acme-prod), its org's pollInterval is set to 1m (the
# shortest allowed) so the window holds several polls; the retriever rolls, and once its new pod is
# Ready its process is read from /proc for WINDOW seconds (default 300):
# - RSS now and its peak (VmRSS, VmHWM), and the pod's cgroup memory (usage, which includes page cache);
# - CPU time (utime + stime) over the window, per poll and per hour at the default 5m polling;
# - the baseline, in the same run: the pod's pause container and its containerd shim (what any pod
#   costs, retriever or not).
# The org's pollInterval is put back afterwards.
# Usage: scripts/bench-retriever.sh [WINDOW]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
window=${1:-300}
ns=demo
conn=${BENCH_CONNECTION:-acme-prod}
# shellcheck disable=SC1091
source target/demo/env
hz=$(getconf CLK_TCK)

org=$(kubectl get conn -n "$ns" "$conn" -o jsonpath='{.status.orgSettings}')
[[ -n $org ]] || { echo "bench-retriever: $conn has no OrgSettings yet (is the demo running and $conn Active?)" >&2; exit 1; }
before=$(kubectl get orgsettings -n "$ns" "$org" -o jsonpath='{.spec.pollInterval}')
restore() { kubectl patch orgsettings -n "$ns" "$org" --type merge -p "{\"spec\":{\"pollInterval\":\"${before:-5m}\"}}" >/dev/null || true; }
trap restore EXIT
old_pod=$(kubectl get pods -n "$ns" -l "crmconnect.io/connection=$conn" -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
kubectl patch orgsettings -n "$ns" "$org" --type merge -p '{"spec":{"pollInterval":"1m"}}' >/dev/null
# The new pod (the settings roll the retriever), Ready, and the old one gone.
for _ in $(seq 1 120); do
	pods=$(kubectl get pods -n "$ns" -l "crmconnect.io/connection=$conn" -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.phase}{"\n"}{end}')
	if [[ $(wc -l <<<"$pods") == 1 ]] && ! grep -q "^$old_pod " <<<"$pods" && grep -q ' Running$' <<<"$pods"; then break; fi
	sleep 1
done
pod=$(kubectl get pods -n "$ns" -l "crmconnect.io/connection=$conn" -o jsonpath='{.items[0].metadata.name}')
kubectl wait pod -n "$ns" "$pod" --for=condition=Ready --timeout=120s >/dev/null
uid=$(kubectl get pod -n "$ns" "$pod" -o jsonpath='{.metadata.uid}')

# The pod's cgroup (v1 or v2, cgroupfs driver: .../pod<uid>/<container>) and its processes.
podcg=$(find /sys/fs/cgroup/memory /sys/fs/cgroup -maxdepth 6 -type d -name "pod$uid" 2>/dev/null | head -1)
[[ -n $podcg ]] || { echo "bench-retriever: no cgroup for pod $uid (this reads the node's /sys/fs/cgroup: run as root on the node)" >&2; exit 1; }
pids=$(cat "$podcg"/*/cgroup.procs 2>/dev/null | sort -u)
retriever= pause=
for p in $pids; do
	case "$(tr '\0' ' ' <"/proc/$p/cmdline")" in
	*retrieve*) retriever=$p ;;
	*pause*) pause=$p ;;
	esac
done
[[ -n $retriever ]] || { echo "bench-retriever: no retriever process in $podcg" >&2; exit 1; }
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

start_cpu=$(cpu "$retriever")
sleep "$window"
end_cpu=$(cpu "$retriever")
rss=$(kib "$retriever" VmRSS)
hwm=$(kib "$retriever" VmHWM)
pause_rss=$([[ -n $pause ]] && kib "$pause" VmRSS || echo 0)
# The pod's containerd shim (the retriever's parent): per-pod cost outside the pod's cgroup.
shim=$(awk '{print $4}' "/proc/$retriever/stat")
shim_rss=$(kib "$shim" VmRSS)
shim_name=$(tr '\0' ' ' <"/proc/$shim/cmdline" | cut -c1-40)
usage=$(cat "$podcg/memory.usage_in_bytes" 2>/dev/null || cat "$podcg/memory.current")
polls=$((window / 60))
cpu_s=$(awk "BEGIN {printf \"%.3f\", ($end_cpu - $start_cpu) / $hz}")

echo "retriever pod: $ns/$pod (connection $conn, org $org, pollInterval 1m for the measurement)"
echo "retriever RSS: $((rss / 1024)) MiB now, $((hwm / 1024)) MiB peak (VmRSS/VmHWM, ${rss}/${hwm} KiB)"
echo "baseline, the pod's pause container: $((pause_rss)) KiB RSS (ratio retriever / pause: $(awk "BEGIN {printf \"%.1f\", $rss / ($pause_rss > 0 ? $pause_rss : 1)}"))"
echo "pod cgroup memory (incl. page cache): $((usage / 1048576)) MiB"
echo "its shim ($shim_name...): $((shim_rss / 1024)) MiB RSS"
echo "per retriever pod, RSS of retriever + pause + shim: $(((rss + pause_rss + shim_rss) / 1024)) MiB"
echo "retriever CPU over ${window}s (~$polls polls): ${cpu_s} s, $(awk "BEGIN {printf \"%.1f\", 1000 * $cpu_s / ($polls > 0 ? $polls : 1)}") ms per poll"
echo "at the default 5m polling: $(awk "BEGIN {printf \"%.2f\", 12 * 1000 * $cpu_s / ($polls > 0 ? $polls : 1) / 1000}") CPU-seconds per hour per retriever"
