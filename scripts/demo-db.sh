#!/usr/bin/env bash
# A throwaway PostgreSQL for the demo: wal_level=logical on 127.0.0.1:${DEMO_PORT:-55432}, user philotes
# (password philotes), databases shop (with tables orders and customers) and warehouse.
#   scripts/demo-db.sh start | stop | psql DB [ARGS]
set -euo pipefail
PORT=${DEMO_PORT:-55432}
DIR=${DEMO_DIR:-/tmp/philotes-demo-pg}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
bindir() {
  if command -v pg_config >/dev/null && [ -x "$(pg_config --bindir)/initdb" ]; then pg_config --bindir; return; fi
  local b; b=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -n "$b" ] && { echo "$b"; return; }
  as_root apt-get -q update >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends postgresql >&2
  ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1
}
# PostgreSQL will not run as root: run its tools as the postgres user then.
pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "${1:-}" in
  start)
    BIN=$(bindir)
    if [ -f "$DIR/data/postmaster.pid" ]; then echo "demo database already running in $DIR" >&2; exit 0; fi
    rm -rf "$DIR"; mkdir -p "$DIR/data"
    echo philotes > "$DIR/pw"
    [ "$(id -u)" = 0 ] && chown -R postgres:postgres "$DIR"
    pg "$BIN/initdb" -D "$DIR/data" -U philotes --pwfile "$DIR/pw" --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
    cat >> "$DIR/data/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$DIR'
wal_level = logical
max_replication_slots = 20
max_wal_senders = 20
CONF
    pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/log" -w start >/dev/null
    pg "$BIN/psql" -h "$DIR" -p "$PORT" -U philotes -d postgres -qc "CREATE DATABASE shop" -c "CREATE DATABASE warehouse"
    pg "$BIN/psql" -h "$DIR" -p "$PORT" -U philotes -d shop -q <<'SQL'
CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text);
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int REFERENCES customers, amount numeric(12,2),
                     status text, items jsonb, created_at timestamptz DEFAULT now());
SQL
    echo "demo PostgreSQL on 127.0.0.1:$PORT (data in $DIR)"
    ;;
  stop)
    BIN=$(bindir)
    [ -f "$DIR/data/postmaster.pid" ] && pg "$BIN/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null
    rm -rf "$DIR"
    ;;
  psql)
    BIN=$(bindir); db=$2; shift 2
    pg "$BIN/psql" -h "$DIR" -p "$PORT" -U philotes -d "$db" "$@"
    ;;
  *) echo "usage: $0 start|stop|psql DB [ARGS]" >&2; exit 2 ;;
esac
