#!/usr/bin/env bash
# Optional tools the test suite uses when present: Debian's docker-compose validates
# docker-compose.yml (no engine needed). Installed when we are root; never fatal, since the
# test that needs it skips with a reason when it is missing.
set -uo pipefail
if ! command -v docker-compose >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
    && command -v apt-get >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  # --no-install-recommends: without it apt pulls the docker daemon (~280 MB) we do not use.
  (apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }) \
    || echo "note: could not install docker-compose; the compose validation test will skip" >&2
fi
exit 0
