#!/usr/bin/env bash
# Generates the `replace` directives that pin every k8s.io staging module
# required by k8s.io/kubernetes to the matching published v0.X.Y version.
#
# k8s.io/kubernetes's own go.mod replaces its staging modules with local
# paths (./staging/src/k8s.io/...), which the go command ignores for a
# dependency, and requires them as v0.0.0: a consumer must pin them itself.
#
# Usage: gen-replace.sh [--apply]   (run from anywhere)
#   without --apply: prints the replace block on stdout
#   with --apply:    rewrites the replace directives of tests/cluster/go.mod
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

k8s_version="$(awk '$1 == "k8s.io/kubernetes" { print $2 }' versions.txt)"
# v1.37.2 -> v0.37.2
staging_version="v0.${k8s_version#v1.}"

modfile="$(go mod download -json "k8s.io/kubernetes@${k8s_version}" |
	sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -f "$modfile" ]] || { echo "gen-replace: go.mod of k8s.io/kubernetes@${k8s_version} not found" >&2; exit 1; }

# every module that k8s.io/kubernetes both requires and replaces with a
# ./staging path (sample-* staging modules are replaced but never required)
mods="$(awk '
	/^require[[:space:]]*\(/ { inreq = 1; next }
	inreq && /^\)/ { inreq = 0; next }
	inreq && NF >= 2 { req[$1] = 1 }
	/^require[[:space:]]+[^(]/ { req[$2] = 1 }
	$2 == "=>" && $3 ~ /^\.\/staging\// { staged[$1] = 1 }
	END { for (m in staged) if (m in req) print m }
' "$modfile" | sort -u)"
[[ -n "$mods" ]] || { echo "gen-replace: no staging replaces found in $modfile" >&2; exit 1; }

if [[ "${1:-}" == "--apply" ]]; then
	args=()
	# drop previous k8s.io replaces, then add the generated ones
	for m in $(go mod edit -json | sed -n 's/.*"Path": "\(k8s\.io\/[^"]*\)".*/\1/p' | sort -u); do
		args+=("-dropreplace=$m")
	done
	for m in $mods; do
		args+=("-replace=$m=$m@$staging_version")
	done
	go mod edit "${args[@]}"
else
	echo "replace ("
	for m in $mods; do
		printf '\t%s => %s %s\n' "$m" "$m" "$staging_version"
	done
	echo ")"
fi
