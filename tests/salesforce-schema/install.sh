#!/usr/bin/env bash
# Installs Salesforce's metadata library for tests/crm_schema.rs (npm ci from the lock file, into
# tests/salesforce-schema/node_modules; needs Node.js 20+ and the npm registry). A no-op when it was
# installed after the lock file last changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if ! command -v npm >/dev/null; then
	echo "salesforce-schema/install.sh: npm (Node.js 20+) is needed to check crm/salesforce with Salesforce's own library" >&2
	exit 1
fi
if [[ -d node_modules/@salesforce/source-deploy-retrieve && node_modules/.installed -nt package-lock.json ]]; then
	exit 0
fi
npm ci --no-audit --no-fund --loglevel=error >&2
touch node_modules/.installed
echo "salesforce-schema/install.sh: installed @salesforce/source-deploy-retrieve" >&2
