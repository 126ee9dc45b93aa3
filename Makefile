# The README's commands. `make test` is what CI runs (through .ci/run).
.PHONY: test unit crds lint fmt

# All tests (unit + integration).
test:
	cargo test --all-targets

# Unit tests only (no cluster).
unit:
	cargo test --lib --test crd_schema

# Regenerate the CRD from the Rust types.
crds:
	cargo run -q -- crd > crds/connection.yaml
	cp crds/connection.yaml charts/connection-operator/crds/connection.yaml

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt
