#!/usr/bin/env bash
# Installs what the tests need from Debian: for the test cluster's node runc, the CNI plugins
# (bridge, host-local, loopback), iptables and iproute2; lua5.4 to run the Argo CD health check
# (integrations/argocd/) against real Connection statuses. Needs root; does nothing when they are
# already there.
set -euo pipefail
need=()
command -v runc >/dev/null || need+=(runc)
command -v iptables >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
[[ -x /usr/lib/cni/bridge || -x /opt/cni/bin/bridge ]] || need+=(containernetworking-plugins)
command -v lua5.4 >/dev/null || need+=(lua5.4)
if ((${#need[@]} == 0)); then
	echo "install-test-deps.sh: runc, iptables, iproute2, the CNI plugins and lua5.4 are installed" >&2
	exit 0
fi
if [[ $EUID != 0 ]]; then
	echo "install-test-deps.sh: missing ${need[*]}; install them as root: apt-get install ${need[*]}" >&2
	exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "install-test-deps.sh: installed ${need[*]}" >&2
