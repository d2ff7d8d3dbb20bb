#!/usr/bin/env bash
# Provisions the controller VM of the Vagrant lab (as root): installs Bulkhead from the
# checkout, runs bulkhead-controller under systemd (listening on every address, port
# 50151; enrollment on 50152), issues the operator certificate into /etc/bulkhead/operator
# (the `bulkhead` CLI's default), creates one enrollment token per workload and applies
# the example policy. Safe to run again: it keeps the operator certificate and issues
# fresh tokens.
#
# Settings (environment), besides ROOT, SYSTEMCTL, VENV, REPO and BULKHEAD_SKIP_INSTALL
# described in common.sh:
#   WORKLOADS   "NAME:LABELS ..." one token per entry, e.g. "web:app=web db:app=db,env=x"
#   ALLOWED_RANGES  "CIDR,..." the workloads' addresses must fall in (e.g. the private
#               network's /24): others they report, such as Vagrant's NAT address that every
#               VM shares, are refused (default: none, any workload address)
#   TOKEN_DIR   where NAME.token files go, below ROOT (default: /var/lib/bulkhead/enrollment)
#   TOKEN_TTL   how long a token is valid (default: 1h)
#   POLICY      applied last (default: REPO/examples/web-db.yaml)
#   CONTROLLER_PORT  the controller's mTLS port as the unit sets it (default: 50151)
#   READY_WAIT  seconds to wait for the controller to answer (default: 60)
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/vagrant/common.sh"

WORKLOADS=${WORKLOADS:-}
ALLOWED_RANGES=${ALLOWED_RANGES:-}
TOKEN_DIR=${TOKEN_DIR:-/var/lib/bulkhead/enrollment}
TOKEN_TTL=${TOKEN_TTL:-1h}
POLICY=${POLICY:-$REPO/examples/web-db.yaml}
CONTROLLER_PORT=${CONTROLLER_PORT:-50151}
READY_WAIT=${READY_WAIT:-60}
STATE_DIR="$ROOT/var/lib/bulkhead/controller"
OPERATOR_DIR="$ROOT/etc/bulkhead/operator"

[ -n "$WORKLOADS" ] || die "WORKLOADS is empty: give \"NAME:LABELS ...\", e.g. \"web:app=web\""
for entry in $WORKLOADS; do
  # NAME is the workload's agent id and a file name here: the agent-id rule keeps it safe.
  [[ "$entry" =~ ^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?:.+$ ]] \
    || die "WORKLOADS: '$entry' is not NAME:LABELS with NAME an agent id (e.g. web:app=web)"
done
[ -f "$POLICY" ] || die "POLICY: $POLICY does not exist"

install_bulkhead python3-venv
link_programs bulkhead bulkhead-controller
install_unit bulkhead-controller.service

# Before the service's first start, so the CA is created once, by one process. systemd
# then hands the state dir to the service's dynamic user (it moves and chowns a plain
# directory into /var/lib/private on first start).
if [ ! -s "$OPERATOR_DIR/operator.crt" ]; then
  say "issuing the operator certificate into $OPERATOR_DIR"
  "$VENV_BIN/bulkhead-controller" admin-cert --state-dir "$STATE_DIR" \
    --name vagrant --role admin --out "$OPERATOR_DIR"
  # A later run finds the dir owned by the service: keep what admin-cert added its own.
  chown -R --reference="$STATE_DIR" "$STATE_DIR/"
fi

say "starting bulkhead-controller"
start_service bulkhead-controller.service

bulkhead() {
  "$VENV_BIN/bulkhead" --controller "127.0.0.1:$CONTROLLER_PORT" \
    --credentials "$OPERATOR_DIR" "$@"
}

say "waiting for the controller to answer (at most $READY_WAIT s)"
waited=0
until bulkhead get agents >/dev/null 2>&1; do
  if [ "$waited" -ge "$READY_WAIT" ]; then
    bulkhead get agents || true
    die "the controller does not answer on 127.0.0.1:$CONTROLLER_PORT after $READY_WAIT s"
  fi
  sleep 1
  waited=$((waited + 1))
done

install -d -m 0700 "$ROOT$TOKEN_DIR"
for entry in $WORKLOADS; do
  name=${entry%%:*}
  labels=${entry#*:}
  say "enrollment token for $name ($labels), valid $TOKEN_TTL, one use"
  ranges=()
  [ -z "$ALLOWED_RANGES" ] || ranges=(--addresses "$ALLOWED_RANGES")
  token=$(bulkhead token create --labels "$labels" --ttl "$TOKEN_TTL" --uses 1 "${ranges[@]}")
  (umask 077 && printf '%s\n' "$token" >"$ROOT$TOKEN_DIR/$name.token")
done

say "applying $POLICY"
bulkhead apply -f "$POLICY"
