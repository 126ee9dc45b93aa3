#!/usr/bin/env bash
# Builds (or reuses) the test control plane binaries into target/cluster/bin:
#   kubecluster (etcd + kube-apiserver + kube-controller-manager + kube-scheduler
#   + kubelet + kubectl), kubectl (symlink to kubecluster), helm,
#   containerd + containerd-shim-runc-v2 + ctr, and pause.tar (the node's sandbox image).
# Everything comes from the Go module proxy; the result is cached, keyed by a
# hash of this directory's sources, and rebuilt only when they change.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
bin="${CLUSTER_BIN:-$root/target/cluster/bin}"
mkdir -p "$bin"
if [[ "${CLUSTER_NO_BUILD:-0}" == 1 ]]; then
	echo "build.sh: CLUSTER_NO_BUILD=1, using the binaries in $bin as they are" >&2
	exit 0
fi

k8s_version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' "$here/versions.txt")"
helm_module="$(awk '$1 ~ /^helm\.sh\/helm\// { print $1 }' "$here/versions.txt")"
helm_version="$(awk '$1 ~ /^helm\.sh\/helm\// { print $2 }' "$here/versions.txt")"

containerd_version="$(awk '$1 == "github.com/containerd/containerd/v2" { print $2 }' "$here/versions.txt")"

stamp="$(cd "$here" && cat go.mod go.sum ./*.go pause/*.go versions.txt build.sh "$root/scripts/image.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "$bin/.stamp" && "$(cat "$bin/.stamp")" == "$stamp" &&
	-x "$bin/kubecluster" && -x "$bin/helm" && -L "$bin/kubectl" && -x "$bin/containerd" && -f "$bin/pause.tar" ]]; then
	echo "build.sh: binaries up to date in $bin" >&2
	exit 0
fi
rm -f "$bin/.stamp"

export GOFLAGS="${GOFLAGS:--buildvcs=false}"
build() { nice -n 10 "$@"; }

echo "build.sh: building kubecluster (k8s.io/kubernetes $k8s_version) into $bin ..." >&2
start=$SECONDS
minor="${k8s_version#v1.}"; minor="${minor%%.*}"
ver_pkg=k8s.io/component-base/version
cg_ver_pkg=k8s.io/client-go/pkg/version
ldflags="-s -w"
for p in "$ver_pkg" "$cg_ver_pkg"; do
	ldflags+=" -X $p.gitVersion=$k8s_version -X $p.gitMajor=1 -X $p.gitMinor=$minor"
	ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done
(cd "$here" && go mod download && build go build -trimpath -ldflags "$ldflags" -o "$bin/kubecluster.new" .)
mv -f "$bin/kubecluster.new" "$bin/kubecluster"
ln -sfn kubecluster "$bin/kubectl"
echo "build.sh: kubecluster built in $((SECONDS - start))s" >&2

echo "build.sh: building helm ($helm_module $helm_version) ..." >&2
start=$SECONDS
# helm has its own dependency graph (other k8s.io versions): build it as its
# own main module with `go install pkg@version`, never mixed into ours.
# Same ldflags as helm's Makefile: its version, and the Kubernetes version that
# `helm lint/template` assume offline (1 + major, minor of its k8s.io/client-go).
helm_gomod="$(go mod download -json "$helm_module@$helm_version" |
	sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
helm_k8s_minor="$(awk '$1 == "k8s.io/client-go" { split($2, v, "."); print v[2] }' "$helm_gomod")"
helm_ldflags="-s -w -X $helm_module/internal/version.version=$helm_version -X $helm_module/internal/version.gitTreeState=clean"
for p in lint/rules chartutil; do
	helm_ldflags+=" -X $helm_module/pkg/$p.k8sVersionMajor=1 -X $helm_module/pkg/$p.k8sVersionMinor=$helm_k8s_minor"
done
GOBIN="$bin" build go install -trimpath -ldflags "$helm_ldflags" "$helm_module/cmd/helm@$helm_version"
echo "build.sh: helm built in $((SECONDS - start))s" >&2

echo "build.sh: building containerd $containerd_version ..." >&2
start=$SECONDS
# Its own main module too (go install pkg@version). The shim must sit next to
# containerd (kubecluster puts this directory first in containerd's PATH).
GOBIN="$bin" build go install -trimpath -ldflags "-s -w" -tags "no_btrfs urfave_cli_no_docs" \
	"github.com/containerd/containerd/v2/cmd/containerd@$containerd_version" \
	"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$containerd_version" \
	"github.com/containerd/containerd/v2/cmd/ctr@$containerd_version"
echo "build.sh: containerd built in $((SECONDS - start))s" >&2

# The pod sandbox ("pause") image: a static binary in a one-layer image, no registry.
pause_root="$(mktemp -d)"
trap 'rm -rf "$pause_root"' EXIT
(cd "$here" && CGO_ENABLED=0 build go build -trimpath -ldflags "-s -w" -o "$pause_root/pause" ./pause)
"$root/scripts/image.sh" pack "$pause_root" registry.k8s.io/pause:kubecluster "$bin/pause.tar" /pause

echo "$stamp" >"$bin/.stamp"
# In CI (a one-shot machine) the Go build and module caches (several GB) have served their purpose.
# CLUSTER_KEEP_GO_CACHE=1 keeps them (several fresh-clone CI runs in a row on one workstation).
if [[ "${CI:-}" == true && "${CLUSTER_KEEP_GO_CACHE:-0}" != 1 ]]; then
	go clean -cache -modcache
fi
"$bin/kubectl" version --client >&2
"$bin/helm" version >&2
