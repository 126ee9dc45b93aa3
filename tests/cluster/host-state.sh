#!/usr/bin/env bash
# Prints what a node-enabled test cluster could leave behind on this host, in a
# stable form: with-cluster.sh compares its output before up and after down.
#   processes of the node, mounts, network links, iptables rules (without
#   counters), the sysctl the bridge plugin changes, top-level cgroups, and the
#   fixed host paths the components use.
set -uo pipefail
# Processes this cluster could leave: its own (they name its state dir) and the node's (containerd,
# its shims, runc, pause: they name the node's fixed directories or are those programs). Another
# cluster on this machine with its own state dir is none of ours.
state="${CLUSTER_STATE:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/cluster/state}"
echo "# processes"
ps -eo args= | grep -v -e grep -e host-state.sh |
	grep -E -e "$state" -e '/run/kubecluster|/var/lib/kubecluster' -e '(^|/)(containerd-shim-runc-v2|runc|pause)( |$)' | sort
echo "# mounts"
awk '{ print $5 }' /proc/self/mountinfo | sort
echo "# links"
ip -o link show 2>/dev/null | awk -F': ' '{ print $2 }' | sed 's/@.*//' | sort
for ipt in iptables-save ip6tables-save; do
	echo "# $ipt"
	# Rules and chains only: an empty table that iptables-nft created (and cannot remove) is no rule.
	if command -v "$ipt" >/dev/null; then
		"$ipt" 2>/dev/null | sed 's/ *\[[0-9]*:[0-9]*\]//' |
			grep -Ev '^(#|\*|COMMIT$|:(PREROUTING|INPUT|FORWARD|OUTPUT|POSTROUTING) ACCEPT)'
	fi
done
echo "# sysctl"
echo "net.ipv4.ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)"
echo "# cgroups"
find /sys/fs/cgroup -mindepth 1 -maxdepth 2 -type d 2>/dev/null | sort
echo "# paths"
for p in /run/kubecluster /var/lib/kubecluster /run/containerd /var/lib/cni /var/lib/kubelet /var/log/containers /var/log/pods; do
	[[ -e "$p" ]] && echo "$p"
done
exit 0
