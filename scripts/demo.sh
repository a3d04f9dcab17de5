#!/usr/bin/env bash
# The demo: a throwaway PostgreSQL, the example pipeline run by `philotes run`, a few changes in the
# source, and the replicated rows in the sink. Leaves nothing running (KEEP=1 keeps it all up).
set -euo pipefail
cd "$(dirname "$0")/.."
export PHILOTES_CACHE=${PHILOTES_CACHE:-$HOME/.cache/philotes}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PHILOTES_CACHE/target}
HEALTH=127.0.0.1:${DEMO_HEALTH_PORT:-18081}
LOG=/tmp/philotes-demo.log

command -v curl >/dev/null || { apt-get -q update >&2 && apt-get -q install -y curl >&2; }
echo "== building philotes"
cargo build --quiet --bin philotes
PHILOTES=$CARGO_TARGET_DIR/debug/philotes

echo "== starting a throwaway PostgreSQL (wal_level=logical) with databases shop and warehouse"
scripts/demo-db.sh stop 2>/dev/null || true
scripts/demo-db.sh start
cleanup() {
  [ -n "${PID:-}" ] && kill -TERM "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  [ "${KEEP:-0}" = 1 ] || scripts/demo-db.sh stop
}
trap cleanup EXIT

echo "== philotes run -f examples/demo-pipeline.yaml   (log: $LOG)"
"$PHILOTES" run -f examples/demo-pipeline.yaml --health-addr "$HEALTH" > "$LOG" 2>&1 &
PID=$!
for _ in $(seq 1 60); do
  curl -sf "http://$HEALTH/health/ready" >/dev/null && break
  kill -0 "$PID" 2>/dev/null || { cat "$LOG"; exit 1; }
  sleep 0.5
done
curl -sf "http://$HEALTH/health/ready"; echo

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
echo "== metrics"
curl -sf "http://$HEALTH/metrics" | grep -E '^philotes_(events_read|events_delivered|buffer_depth|lag_bytes)_?(total)?\{' || true
echo "== philotes output"
cat "$LOG" | grep -v '^\s*$' | grep '^\[' || true
