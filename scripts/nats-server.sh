#!/usr/bin/env bash
# Installs nats-server (pinned) once and prints its path. Built from source with the Go
# toolchain through the Go module proxy; cached under ~/.cache/dualbus/bin, so a second
# run costs nothing.
set -euo pipefail
NATS_SERVER_VERSION="${NATS_SERVER_VERSION:-v2.14.9}"
bin_dir="${XDG_CACHE_HOME:-$HOME/.cache}/dualbus/bin/nats-server-$NATS_SERVER_VERSION"
if [ ! -x "$bin_dir/nats-server" ]; then
  command -v go >/dev/null || { echo "nats-server: the Go toolchain is needed to build it" >&2; exit 1; }
  mkdir -p "$bin_dir"
  echo "building nats-server $NATS_SERVER_VERSION (once)..." >&2
  GOBIN="$bin_dir" GOFLAGS=-mod=mod go install "github.com/nats-io/nats-server/v2@$NATS_SERVER_VERSION" >&2
fi
echo "$bin_dir/nats-server"
