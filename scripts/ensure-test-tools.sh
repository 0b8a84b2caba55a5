#!/usr/bin/env bash
# Optional tools the test suite uses when present, installed from Debian's packages when we are
# root; never fatal, since each test that needs one skips with a reason when it is missing:
# - docker-compose validates docker-compose.yml (no engine needed);
# - chromium (headless) loads the aggregator's dashboard and takes its screenshot.
# Idempotent: a tool already installed is left alone, and apt-get update runs only when an
# install from the current package lists fails.
set -uo pipefail

install_deb() {  # install_deb COMMAND PACKAGE WHAT-SKIPS
  local cmd=$1 pkg=$2 what=$3
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: $cmd not found and not root: $what will skip (sudo apt-get install -y $pkg)" >&2
    return 0
  fi
  export DEBIAN_FRONTEND=noninteractive
  # --no-install-recommends: without it apt pulls e.g. the docker daemon (~280 MB) we do not use.
  (apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null; }) \
    || echo "note: could not install $pkg; $what will skip" >&2
}

install_deb docker-compose docker-compose "the compose validation test"
install_deb chromium chromium "the dashboard browser test"
exit 0
