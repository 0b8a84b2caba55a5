#!/usr/bin/env bash
# Make sure a mosquitto binary exists: install Debian's package when we are root, otherwise
# say exactly what to run. Idempotent.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "mosquitto not found: installing Debian's mosquitto package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
  exit 0
fi
echo "fedge: error: mosquitto not found; install it with: sudo apt-get install -y mosquitto" >&2
exit 1
