#!/usr/bin/env bash
# Installs what the test cluster's node needs from Debian: runc, the CNI plugins (bridge, host-local,
# loopback), iptables and iproute2. Needs root; does nothing when they are already there.
set -euo pipefail
need=()
command -v runc >/dev/null || need+=(runc)
command -v iptables >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
[[ -x /usr/lib/cni/bridge || -x /opt/cni/bin/bridge ]] || need+=(containernetworking-plugins)
if ((${#need[@]} == 0)); then
	echo "install-node-deps.sh: runc, iptables, iproute2 and the CNI plugins are installed" >&2
	exit 0
fi
if [[ $EUID != 0 ]]; then
	echo "install-node-deps.sh: missing ${need[*]}; install them as root: apt-get install ${need[*]}" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install-node-deps.sh: installed ${need[*]}" >&2
