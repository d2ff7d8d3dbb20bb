# shellcheck shell=bash
# Shared by provision-controller.sh and provision-agent.sh (sourced, not run).
#
# Settings every provisioning script takes from its environment:
#   ROOT       prefix for every path written (default: empty, the real system); the
#              tests provision into a temporary directory with it
#   SYSTEMCTL  the systemctl command (default: systemctl; the tests use `true`)
#   VENV       where Bulkhead is installed, below ROOT (default: /opt/bulkhead/venv)
#   REPO       the Bulkhead checkout (default: the directory above this file; Vagrant
#              copies scripts to /tmp before running them, so the Vagrantfile passes it)
#   BULKHEAD_SKIP_INSTALL=1  no apt-get, no pip: Bulkhead is in VENV already
#   BULKHEAD_REINSTALL=1     reinstall into an existing VENV (needs PyPI)

ROOT=${ROOT:-}
SYSTEMCTL=${SYSTEMCTL:-systemctl}
VENV=${VENV:-/opt/bulkhead/venv}
REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
VENV_BIN="$ROOT$VENV/bin"
# Set to 1 by install_bulkhead when it (re)installed Bulkhead: running services restart.
BULKHEAD_INSTALLED=0

say() {
  echo "==> $*"
}

die() {
  echo "error: $*" >&2
  exit 1
}

# systemctl, or whatever SYSTEMCTL names. Word-split on purpose: SYSTEMCTL may carry
# arguments of its own (e.g. "systemctl --no-ask-password").
run_systemctl() {
  # shellcheck disable=SC2086
  $SYSTEMCTL "$@"
}

# install_bulkhead PACKAGE...: the Debian packages, then Bulkhead from REPO into VENV.
# Skipped entirely with BULKHEAD_SKIP_INSTALL=1. An existing VENV is kept unless
# BULKHEAD_REINSTALL=1: on a workload, the agent's default-deny blocks PyPI once it runs.
install_bulkhead() {
  if [ "${BULKHEAD_SKIP_INSTALL:-0}" = 1 ]; then
    say "BULKHEAD_SKIP_INSTALL=1: using the Bulkhead already in $ROOT$VENV"
  else
    local missing=() pkg
    for pkg in "$@"; do
      dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      say "installing Debian packages: ${missing[*]}"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
    if [ ! -x "$VENV_BIN/python" ]; then
      say "creating $ROOT$VENV"
      python3 -m venv "$ROOT$VENV"
    fi
    if [ ! -x "$VENV_BIN/bulkhead" ] || [ "${BULKHEAD_REINSTALL:-0}" = 1 ]; then
      say "installing Bulkhead from $REPO into $ROOT$VENV"
      "$VENV_BIN/python" -m pip install -q --upgrade pip
      "$VENV_BIN/python" -m pip install -q "$REPO"
      BULKHEAD_INSTALLED=1
    fi
  fi
  [ -x "$VENV_BIN/bulkhead" ] || die "$VENV_BIN/bulkhead is missing: Bulkhead is not installed"
}

# link_programs PROGRAM...: into ROOT/usr/local/bin, so `sudo PROGRAM` finds them. The
# links point at VENV as the machine sees it (without ROOT).
link_programs() {
  local program
  install -d -m 0755 "$ROOT/usr/local/bin"
  for program in "$@"; do
    ln -sfn "$VENV/bin/$program" "$ROOT/usr/local/bin/$program"
  done
}

# start_service UNIT: enable and start it, restarting it if Bulkhead was just (re)installed.
start_service() {
  run_systemctl daemon-reload
  if [ "$BULKHEAD_INSTALLED" = 1 ]; then
    run_systemctl enable "$1"
    run_systemctl restart "$1"
  else
    run_systemctl enable --now "$1"
  fi
}

# install_unit NAME: systemd/NAME from the checkout into ROOT/etc/systemd/system.
install_unit() {
  local source="$REPO/systemd/$1"
  [ -f "$source" ] || die "$source is missing: is REPO ($REPO) a Bulkhead checkout?"
  install -D -m 0644 "$source" "$ROOT/etc/systemd/system/$1"
}
