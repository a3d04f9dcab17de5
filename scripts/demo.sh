#!/usr/bin/env bash
# The demo: a throwaway PostgreSQL (wal_level=logical) with tables shop.orders/customers, the Philotes
# operator reconciling examples/demo-pipeline.yaml, a few changes in the source, the same rows in the sink,
# and `kubectl get cdcpipelines`. Without a reachable cluster it starts a local kube-apiserver
# (scripts/envtest.sh; built once, about 5 minutes). DEMO_MODE=standalone runs `philotes run -f` instead.
# Leaves nothing running unless KEEP=1.
set -euo pipefail
cd "$(dirname "$0")/.."
export PHILOTES_CACHE=${PHILOTES_CACHE:-$HOME/.cache/philotes}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PHILOTES_CACHE/target}
MODE=${DEMO_MODE:-operator}
HEALTH=127.0.0.1:${DEMO_HEALTH_PORT:-18081}
LOG=/tmp/philotes-demo.log
K8S_DIR=/tmp/philotes-demo-k8s

command -v curl >/dev/null || { apt-get -q update >&2 && apt-get -q install -y curl >&2; }
echo "== building philotes"
cargo build --quiet --bin philotes
PHILOTES=$CARGO_TARGET_DIR/debug/philotes

echo "== starting a throwaway PostgreSQL (wal_level=logical) with databases shop and warehouse"
scripts/demo-db.sh stop 2>/dev/null || true
scripts/demo-db.sh start

PID=
STARTED_K8S=0
KUBECTL=kubectl
cleanup() {
  if [ "${KEEP:-0}" = 1 ]; then echo "KEEP=1: left running (operator pid ${PID:-none}, KUBECONFIG=${KUBECONFIG:-})"; return; fi
  if [ "$MODE" = operator ] && [ -n "$PID" ]; then
    "$KUBECTL" delete -f examples/demo-pipeline.yaml --ignore-not-found --wait=true >/dev/null 2>&1 || true
  fi
  [ -n "$PID" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  [ "$STARTED_K8S" = 1 ] && scripts/envtest.sh stop "$K8S_DIR" >/dev/null 2>&1 || true
  scripts/demo-db.sh stop
}
trap cleanup EXIT

wait_ready() {
  for _ in $(seq 1 120); do
    curl -sf "http://$HEALTH/health/ready" >/dev/null && return 0
    kill -0 "$PID" 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.5
  done
  echo "philotes did not become ready; log:"; cat "$LOG"; exit 1
}

if [ "$MODE" = operator ]; then
  if command -v kubectl >/dev/null && timeout 5 kubectl get --raw /readyz >/dev/null 2>&1; then
    echo "== using the configured cluster ($(kubectl config current-context 2>/dev/null || echo in-cluster))"
  else
    echo "== no cluster configured: starting a local kube-apiserver (first run builds it, ~5 minutes)"
    K8S_BIN=$(scripts/envtest.sh build)
    scripts/envtest.sh stop "$K8S_DIR" >/dev/null 2>&1 || true
    rm -rf "$K8S_DIR"
    scripts/envtest.sh start "$K8S_DIR" >/dev/null
    STARTED_K8S=1
    export KUBECONFIG=$K8S_DIR/kubeconfig
    KUBECTL=$K8S_BIN/kubectl
  fi
  echo "== installing the CRD: philotes crd | kubectl apply -f -"
  "$PHILOTES" crd | "$KUBECTL" apply -f -
  "$KUBECTL" wait --for=condition=Established crd/cdcpipelines.philotes.io --timeout=60s >/dev/null
  echo "== philotes operator --namespace default   (log: $LOG)"
  "$PHILOTES" operator --namespace default --health-addr "$HEALTH" > "$LOG" 2>&1 &
  PID=$!
  echo "== kubectl apply -f examples/demo-pipeline.yaml"
  "$KUBECTL" apply -f examples/demo-pipeline.yaml
  for _ in $(seq 1 120); do
    [ "$("$KUBECTL" get cdcpipeline shop-orders -o jsonpath='{.status.phase}' 2>/dev/null)" = Running ] && break
    sleep 0.5
  done
  "$KUBECTL" get cdcpipelines
else
  echo "== philotes run -f examples/demo-pipeline.yaml   (log: $LOG)"
  "$PHILOTES" run -f examples/demo-pipeline.yaml --health-addr "$HEALTH" > "$LOG" 2>&1 &
  PID=$!
fi
wait_ready

echo "== changes in the source (shop)"
scripts/demo-db.sh psql shop -q -v ON_ERROR_STOP=1 <<'SQL'
INSERT INTO customers VALUES (1, 'Ada Lovelace', 'ada@example.com'), (2, 'Alan Turing', NULL);
INSERT INTO orders (id, customer_id, amount, status, items) VALUES
  (100, 1, 42.50, 'new', '[{"sku": "tea", "qty": 2}]'),
  (101, 2, 7.00, 'new', '[{"sku": "chalk", "qty": 1}]'),
  (102, 1, 99.99, 'new', '[]');
UPDATE orders SET status = 'paid', amount = amount + 0.5 WHERE id = 100;
DELETE FROM orders WHERE id = 102;
UPDATE customers SET email = 'alan@example.com' WHERE id = 2;
SQL
scripts/demo-db.sh psql shop -c "SELECT id, customer_id, amount, status, items FROM orders ORDER BY id"

echo "== the same rows in the sink (warehouse, schema replica)"
for _ in $(seq 1 40); do
  n=$(scripts/demo-db.sh psql warehouse -tAc "SELECT count(*) FROM replica.orders WHERE status = 'paid'" 2>/dev/null || echo 0)
  [ "$n" = 1 ] && break
  sleep 0.5
done
scripts/demo-db.sh psql warehouse -c "SELECT id, customer_id, amount, status, items FROM replica.orders ORDER BY id"
scripts/demo-db.sh psql warehouse -c "SELECT * FROM replica.customers ORDER BY id"

if [ "$MODE" = operator ]; then
  sleep 3   # counters reach the status within a few seconds
  echo "== kubectl get cdcpipelines"
  "$KUBECTL" get cdcpipelines
  "$KUBECTL" get cdcpipelines -o wide
  echo "== kubectl pause: spec.state=Paused"
  "$KUBECTL" patch cdcpipeline shop-orders --type merge -p '{"spec":{"state":"Paused"}}' >/dev/null
  sleep 2
  "$KUBECTL" get cdcpipelines
  "$KUBECTL" patch cdcpipeline shop-orders --type merge -p '{"spec":{"state":"Running"}}' >/dev/null
else
  grep '^\[' "$LOG" || true
fi
echo "== metrics (http://$HEALTH/metrics)"
curl -sf "http://$HEALTH/metrics" | grep -E '^philotes_(events_read|events_delivered|buffer_depth|lag_bytes)_?(total)?\{' || true
