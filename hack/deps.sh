#!/usr/bin/env bash
# Installs the Debian packages the tests, the local cluster and the local Triton need,
# if missing. Go >= 1.25 is not among them: Debian's golang-go is older; hack/tools.sh
# says what to install when Go is missing or too old.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v sysctl >/dev/null 2>&1 || need+=(procps)
# `make bench-gateway` loads the speech gateway with wrk (HTTP keep-alive, one core).
command -v wrk >/dev/null 2>&1 || need+=(wrk)
# The gateway's rate limits are shared through a real Redis (the tests start it in the
# foreground; the package's systemd unit is disabled below).
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# The gateway's page is tested in a real headless browser (Playwright drives Debian's).
[ -x /usr/lib/chromium/chromium ] || need+=(chromium)
if command -v python3.11 >/dev/null 2>&1; then
  # venv needs ensurepip (Debian's python3.11-venv); Triton's Python backend stub
  # links libpython3.11.so.1.0 (Debian's libpython3.11, or the interpreter's own LIBDIR).
  python3.11 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3.11-venv)
  libdir=$(python3.11 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR") or "")')
  if [ ! -e "$libdir/libpython3.11.so.1.0" ] && ! ldconfig -p | grep -q 'libpython3.11.so.1.0'; then
    need+=(libpython3.11)
  fi
else
  need+=(python3.11 python3.11-venv libpython3.11)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing Debian packages: ${need[*]}: install them (sudo apt-get install ${need[*]})" >&2
    exit 1
  fi
  echo ">> installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now redis-server >/dev/null 2>&1 || true
  fi
fi
