#!/usr/bin/env bash
# Make sure a mosquitto binary exists and runs: install Debian's package when we are root,
# otherwise say exactly what to run. Idempotent.
set -euo pipefail

find_mosquitto() {
  # The order of simulation.broker.find_mosquitto: PATH first, then Debian's sbin.
  command -v mosquitto 2>/dev/null && return 0
  for p in /usr/sbin/mosquitto /usr/local/sbin/mosquitto; do
    if [ -x "$p" ]; then echo "$p"; return 0; fi
  done
  return 1
}

# `mosquitto -h` prints its usage and exits 3; a binary that cannot run (missing library,
# wrong architecture, not executable) exits otherwise (126, 127 …) and prints no usage.
runs() {
  local out rc=0
  out=$("$1" -h 2>&1) || rc=$?
  [ "$rc" = 3 ] && [[ "$out" == *"mosquitto version"* ]]
}

if bin=$(find_mosquitto); then
  if runs "$bin"; then
    exit 0
  fi
  echo "fedge: error: $bin does not run ('$bin -h' fails); reinstall it: sudo apt-get install --reinstall -y mosquitto" >&2
  exit 1
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "mosquitto not found: installing Debian's mosquitto package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends mosquitto >/dev/null
  bin=$(find_mosquitto) && runs "$bin" && exit 0
  echo "fedge: error: installed Debian's mosquitto, but it does not run ('mosquitto -h' fails)" >&2
  exit 1
fi
echo "fedge: error: mosquitto not found; install it with: sudo apt-get install -y mosquitto" >&2
exit 1
