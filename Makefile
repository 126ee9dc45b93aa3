# The README's commands. `make test` is what CI runs (through .ci/run).
.PHONY: demo demo-down test unit crds lint fmt image cluster-up cluster-down install bench-smoke

# The local demo: control plane + fake Salesforce/Dynamics + operator + example connections.
demo:
	scripts/demo.sh

# Stop everything the demo started.
demo-down:
	scripts/demo.sh down

# All tests (unit + integration + e2e) against a real cluster with a node (root), started and
# stopped around them; the operator image is built and loaded into the node first.
# CLUSTER_NODE=0 make test: control plane only (no root needed; the e2e tests then say they are skipped).
# Salesforce's metadata library (npm) is installed first, for tests/crm_schema.rs.
test:
	tests/salesforce-schema/install.sh
	tests/cluster/with-cluster.sh sh -c 'scripts/image.sh --load && cargo test --workspace --all-targets'

# The operator image (target/image/connection-operator.tar) from the release binary, without a
# registry or container engine; loaded into the test node when one is running.
image:
	scripts/image.sh --load


# Tests that need no cluster.
unit:
	tests/salesforce-schema/install.sh
	cargo test --workspace --lib --test crm_schema --test crd_schema --test cli --test providers_salesforce --test providers_dynamics --test providers_tls --test worker

# Regenerate the CRDs (and the chart's copies) from the Rust types.
crds:
	cargo build -q
	for crd in connection orgsettings jobrun jobtemplate orgclaim; do \
		target/debug/connection-operator crd $$crd > crds/$$crd.yaml && \
		cp crds/$$crd.yaml charts/connection-operator/crds/$$crd.yaml || exit 1; \
	done

lint:
	cargo fmt --check
	cargo clippy --workspace --all-targets -- -D warnings
	scripts/hadolint.sh Containerfile

fmt:
	cargo fmt

# Start / stop the test control plane by hand (prints the export lines to eval).
cluster-up:
	@tests/cluster/up.sh

cluster-down:
	tests/cluster/down.sh

# connection-operator and the kubectl plugin kubectl-crm on your PATH (~/.cargo/bin): `kubectl crm connect`, ...
install:
	cargo install --path . --locked

# The scale benchmark at a small N, so the script cannot rot (not part of `make test`; the real runs:
# scripts/bench-scale.sh 1000 / 3000 / 10000, see BENCHMARKS.md).
bench-smoke:
	BENCH_STEADY=20 BENCH_WAVE=20 scripts/bench-scale.sh 200
