#!/usr/bin/env bash
# Builds the operator's container image without a registry or a container engine:
# a docker-archive tar (manifest.json + config + one layer) that `ctr images import`,
# `docker load` and `podman load` accept.
#
#   scripts/image.sh            build target/image/connection-operator.tar from the release binary
#   scripts/image.sh --load     ... and import it into the test node's containerd if one runs
#                               (CONTAINERD_ADDRESS, or the node.env that tests/cluster/up.sh writes)
#   scripts/image.sh pack ROOTFS TAG OUT.tar ENTRYPOINT [LABEL=VALUE...]
#                               pack any directory as a one-layer image (used for the test node's pause image)
#
# The layer holds the binary, the shared libraries `ldd` lists, /etc/passwd and /etc/group entries
# for the non-root user 65532, and /tmp: no shell, no package manager. rustls carries its own CA roots.
# Same layout as Containerfile (for docker/podman/buildah users). Tag: IMAGE_TAG, default
# ghcr.io/crmconnect/connection-operator:<crate version> (the chart's default image).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

arch() {
	case "$(uname -m)" in
	x86_64) echo amd64 ;;
	aarch64) echo arm64 ;;
	*) uname -m ;;
	esac
}

# json_str S: S as a JSON string (the values here have no control characters).
json_str() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g')"; }

# pack ROOTFS TAG OUT ENTRYPOINT [LABEL=VALUE...]: a reproducible docker-archive tar.
pack() {
	local rootfs="$1" tag="$2" out="$3" entrypoint="$4"
	shift 4
	local work labels="" sep="" kv
	work="$(mktemp -d)"
	trap 'rm -rf "$work"' RETURN
	for kv in "$@"; do
		labels+="$sep$(json_str "${kv%%=*}"):$(json_str "${kv#*=}")"
		sep=","
	done
	# Reproducible: sorted, fixed times and owners (files are root's, readable by all; /tmp is 1777).
	(cd "$rootfs" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C sort) >"$work/files"
	tar --create --file "$work/layer.tar" --directory "$rootfs" --no-recursion --verbatim-files-from \
		--files-from "$work/files" --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
		--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime
	local layer_sha config_sha
	layer_sha="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
	printf '{"architecture":"%s","os":"linux","config":{"User":"65532:65532","Entrypoint":[%s],"Env":["PATH=/usr/local/bin:/usr/bin:/bin"],"WorkingDir":"/","Labels":{%s}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created_by":"scripts/image.sh"}]}' \
		"$(arch)" "$(json_str "$entrypoint")" "$labels" "$layer_sha" >"$work/config.json"
	config_sha="$(sha256sum "$work/config.json" | cut -d' ' -f1)"
	mkdir -p "$work/out"
	mv "$work/config.json" "$work/out/$config_sha.json"
	mv "$work/layer.tar" "$work/out/$layer_sha.tar"
	printf '[{"Config":"%s.json","RepoTags":[%s],"Layers":["%s.tar"]}]' "$config_sha" "$(json_str "$tag")" "$layer_sha" \
		>"$work/out/manifest.json"
	mkdir -p "$(dirname "$out")"
	tar --create --file "$out.new" --directory "$work/out" --mtime=@0 --owner=0 --group=0 --numeric-owner \
		manifest.json "$config_sha.json" "$layer_sha.tar"
	mv -f "$out.new" "$out"
	echo "image.sh: $tag -> $out (layer sha256:${layer_sha:0:12}, $(du -h "$out" | cut -f1))" >&2
}

# operator_rootfs BINARY DIR: the operator image's files.
operator_rootfs() {
	local bin="$1" dir="$2" lib
	mkdir -p "$dir/usr/local/bin" "$dir/etc" "$dir/tmp"
	chmod 1777 "$dir/tmp"
	install -m 0755 "$bin" "$dir/usr/local/bin/connection-operator"
	# The dynamic loader and every library the binary links, at the paths ldd shows.
	for lib in $(ldd "$bin" | grep -o '/[^ ]*' | sort -u); do
		mkdir -p "$dir$(dirname "$lib")"
		cp -L "$lib" "$dir$lib"
		chmod 0755 "$dir$lib"
	done
	printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$dir/etc/passwd"
	printf 'root:x:0:\nnonroot:x:65532:\n' >"$dir/etc/group"
	chmod 0644 "$dir/etc/passwd" "$dir/etc/group"
}

load() {
	local tar="$1" env="${CLUSTER_STATE:-$root/target/cluster/state}/node.env"
	if [[ -z "${CONTAINERD_ADDRESS:-}" && -f "$env" ]]; then
		# shellcheck source=/dev/null
		source "$env"
	fi
	if [[ -z "${CONTAINERD_ADDRESS:-}" ]]; then
		echo "image.sh: no test node is running (make cluster-up starts one): image not loaded" >&2
		return 0
	fi
	local ctr="${CLUSTER_BIN:-$root/target/cluster/bin}/ctr"
	"$ctr" --address "$CONTAINERD_ADDRESS" -n k8s.io images import "$tar" >&2
	echo "image.sh: loaded into the test node ($CONTAINERD_ADDRESS)" >&2
}

if [[ "${1:-}" == pack ]]; then
	shift
	pack "$@"
	exit 0
fi

do_load=0
for arg in "$@"; do
	case "$arg" in
	--load) do_load=1 ;;
	*)
		echo "usage: $0 [--load] | pack ROOTFS TAG OUT.tar ENTRYPOINT [LABEL=VALUE...]" >&2
		exit 2
		;;
	esac
done

version="$(awk -F'"' '/^version *=/ { print $2; exit }' "$root/Cargo.toml")"
tag="${IMAGE_TAG:-ghcr.io/crmconnect/connection-operator:$version}"
out="$root/target/image/connection-operator.tar"
(cd "$root" && cargo build --release --locked --bin connection-operator)
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
operator_rootfs "$root/target/release/connection-operator" "$rootfs"
revision="$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
pack "$rootfs" "$tag" "$out" /usr/local/bin/connection-operator \
	"org.opencontainers.image.title=connection-operator" \
	"org.opencontainers.image.description=Kubernetes operator for team connections to Salesforce and Dynamics 365" \
	"org.opencontainers.image.version=$version" \
	"org.opencontainers.image.revision=$revision" \
	"org.opencontainers.image.licenses=Apache-2.0" \
	"org.opencontainers.image.ref.name=$tag"
if ((do_load)); then
	load "$out"
fi
