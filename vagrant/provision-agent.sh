#!/usr/bin/env bash
# Provisions a workload VM of the Vagrant lab (as root): installs Bulkhead from the
# checkout, writes the agent's config, unit and state dir with `bulkhead-agent
# install-service`, and starts the agent, which enrolls with its one-time token and then
# enforces what the controller compiles for it. Its labels come from the token.
#
# Settings (environment), besides ROOT, SYSTEMCTL, VENV, REPO and BULKHEAD_SKIP_INSTALL
# described in common.sh:
#   CONTROLLER  the controller's ADDRESS:PORT, an IP literal (required)
#   AGENT_ID    this workload's agent id (default: the short host name)
#   TOKEN_FILE  file holding the enrollment token from provision-controller.sh (required
#               until the agent has enrolled)
set -euo pipefail
# shellcheck source=common.sh source-path=SCRIPTDIR
source "${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}/vagrant/common.sh"

CONTROLLER=${CONTROLLER:-}
AGENT_ID=${AGENT_ID:-$(hostname -s)}
TOKEN_FILE=${TOKEN_FILE:-}
# The agent's state dir as the unit's StateDirectory= makes it: credentials live here.
ENROLLED_CERT="$ROOT/var/lib/bulkhead/agent/agent.crt"

[ -n "$CONTROLLER" ] || die "CONTROLLER is empty: give the controller's ADDRESS:PORT"

token=""
if [ ! -s "$ENROLLED_CERT" ]; then
  if [ -z "$TOKEN_FILE" ] || [ ! -s "$TOKEN_FILE" ]; then
    die "TOKEN_FILE: '${TOKEN_FILE:-(unset)}' is missing or empty and $AGENT_ID has not" \
      "enrolled yet; provision-controller.sh writes one token per workload"
  fi
  token=$(tr -d '[:space:]' <"$TOKEN_FILE")
fi

install_bulkhead python3-venv nftables libnftables1 conntrack iproute2
link_programs bulkhead-agent

say "installing the agent service for $AGENT_ID (controller $CONTROLLER)"
install_args=(--controller "$CONTROLLER" --agent-id "$AGENT_ID")
if [ -n "$ROOT" ]; then
  install_args+=(--root "$ROOT")
fi
if [ ! -s "$ENROLLED_CERT" ]; then
  # Not enrolled: a config from an earlier attempt may hold a spent token, so replace it.
  install_args+=(--token "$token" --force)
fi
"$VENV_BIN/bulkhead-agent" install-service "${install_args[@]}"

say "starting bulkhead-agent"
start_service bulkhead-agent.service
