#!/usr/bin/env bash
# Builds and runs the demo on embedded defaults: no Redis, no etcd, no other server needed.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cc >/dev/null 2>&1; then
  SUDO=""; if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq build-essential >/dev/null
fi
exec cargo run --release --locked --example demo -- "$@"
