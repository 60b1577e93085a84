#!/usr/bin/env bash
# The whole test suite: formatting, lints (all features and no default features), docs,
# workspace tests and doc tests, and packaging. Installs and starts whatever it needs.
set -euo pipefail
cd "$(dirname "$0")/.."

# One build cache outside the clone, so that later runs on this machine reuse it.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/dualbus/target"
fi
mkdir -p "$CARGO_TARGET_DIR"

step() { printf '\n==> %s\n' "$*"; }

# Test servers, on loopback ports, stopped when this script exits.
servers_dir="$(mktemp -d)"
cleanup() {
  if [ -f "$servers_dir/nats.pid" ]; then kill "$(cat "$servers_dir/nats.pid")" 2>/dev/null || true; fi
  if [ -f "$servers_dir/kafka.pid" ]; then kill "$(cat "$servers_dir/kafka.pid")" 2>/dev/null || true; fi
  if [ -f "$servers_dir/redis.pid" ]; then kill "$(cat "$servers_dir/redis.pid")" 2>/dev/null || true; fi
  rm -rf "$servers_dir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server on port $1 did not start" >&2
  return 1
}

step "tools"
# openssl makes the certificates of the TLS tests.
if ! command -v openssl > /dev/null; then
  if command -v apt-get > /dev/null; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -q && $sudo_cmd apt-get install -y -q openssl
  else
    echo "openssl is needed by the TLS tests; install it" >&2
    exit 1
  fi
fi
openssl version

# kcat and Python's confluent-kafka with the CloudEvents SDK: other clients of the Kafka
# tests (tests/interop.rs), in a virtual environment kept between runs.
if ! command -v kcat > /dev/null; then
  if command -v apt-get > /dev/null; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get install -y -q kcat > /dev/null 2>&1 \
      || { $sudo_cmd apt-get update -q > /dev/null && $sudo_cmd apt-get install -y -q kcat; }
  else
    echo "kcat is needed by the Kafka interop tests; install it" >&2
    exit 1
  fi
fi
kcat -V | head -1
# redis-server (Debian's, 7.0) for the Redis tests; the package starts no service by itself.
if ! command -v redis-server > /dev/null; then
  if command -v apt-get > /dev/null; then
    sudo_cmd=""; [ "$(id -u)" -eq 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get install -y -q redis-server > /dev/null 2>&1 \
      || { $sudo_cmd apt-get update -q > /dev/null && $sudo_cmd apt-get install -y -q redis-server; }
  else
    echo "redis-server is needed by the Redis tests; install it" >&2
    exit 1
  fi
fi
redis-server --version
# Python clients of the interop tests: confluent-kafka with the CloudEvents SDK (Kafka),
# redis-py (Redis).
py_env="${XDG_CACHE_HOME:-$HOME/.cache}/dualbus/py"
if ! "$py_env/bin/python" -c "import confluent_kafka, cloudevents.v1.kafka, redis" 2> /dev/null; then
  python3 -m venv "$py_env"
  "$py_env/bin/pip" install -q confluent-kafka==2.16.1 cloudevents==2.2.0 redis==8.1.0
fi
export DUALBUS_PYTHON="$py_env/bin/python"

step "nats-server"
nats_server="$(./scripts/nats-server.sh)"
"$nats_server" --version
nats_port="$(free_port)"
"$nats_server" -js -sd "$servers_dir/nats" -a 127.0.0.1 -p "$nats_port" > "$servers_dir/nats.log" 2>&1 &
echo $! > "$servers_dir/nats.pid"
wait_port "$nats_port"
export DUALBUS_TEST_NATS_URL="nats://127.0.0.1:$nats_port"
export DUALBUS_NATS_SERVER="$nats_server"
echo "nats-server on $DUALBUS_TEST_NATS_URL"

step "Kafka broker"
# Java and Maven come with the machine; the broker's jars are fetched once (scripts/kafka.sh).
kafka_port="$(free_port)"
kafka_cport="$(free_port)"
./scripts/kafka-broker.sh "$servers_dir/kafka" "$kafka_port" "$kafka_cport" > "$servers_dir/kafka.pid"
export DUALBUS_TEST_KAFKA_BOOTSTRAP="127.0.0.1:$kafka_port"
echo "Kafka broker on $DUALBUS_TEST_KAFKA_BOOTSTRAP (pid $(cat "$servers_dir/kafka.pid"))"
step "redis-server"
redis_port="$(free_port)"
mkdir -p "$servers_dir/redis"
redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$servers_dir/redis" --save "" --appendonly no \
  > "$servers_dir/redis.log" 2>&1 &
echo $! > "$servers_dir/redis.pid"
wait_port "$redis_port"
export DUALBUS_TEST_REDIS_URL="redis://127.0.0.1:$redis_port"
echo "redis-server on $DUALBUS_TEST_REDIS_URL"

export RUSTFLAGS="${RUSTFLAGS:-} -D warnings"
export RUSTDOCFLAGS="${RUSTDOCFLAGS:-} -D warnings"
# Network tests fail instead of skipping when their server is missing.
export DUALBUS_TEST_REQUIRE_SERVERS=1

step "MSRV: no dependency needs a newer Rust than rust-version"
python3 scripts/check-msrv.py

step "cargo fmt --check"
cargo fmt --all -- --check

step "clippy, all features"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "clippy, no default features"
cargo clippy --workspace --all-targets --no-default-features -- -D warnings

step "cargo doc"
cargo doc --workspace --all-features --no-deps

step "tests"
cargo test --workspace --all-features --no-fail-fast

step "facade unit tests without the backends"
cargo test -p dualbus --lib --no-default-features --features config

# Examples run with their output piped: it must be plain text (no colour escapes).
no_escapes() {
  if grep -q $'\x1b' "$1"; then
    echo "$1: terminal escape codes in piped output" >&2
    return 1
  fi
}

step "example on memory, output piped"
cargo run -q -p dualbus --example dual_bus > "$servers_dir/dual_bus.out" 2>&1 || { cat "$servers_dir/dual_bus.out"; exit 1; }
cat "$servers_dir/dual_bus.out"
no_escapes "$servers_dir/dual_bus.out"

step "example of a layer on every write"
cargo run -q -p dualbus --example write_audit > "$servers_dir/write_audit.out" 2>&1 || { cat "$servers_dir/write_audit.out"; exit 1; }
cat "$servers_dir/write_audit.out"

step "example: one trace through two handlers (OpenTelemetry, spans on stdout), output piped"
cargo run -q -p dualbus --features otel --example tracing > "$servers_dir/tracing.out" 2>&1 || { cat "$servers_dir/tracing.out"; exit 1; }
cat "$servers_dir/tracing.out"
no_escapes "$servers_dir/tracing.out"
grep -q "^one trace " "$servers_dir/tracing.out" || { echo "the tracing example did not finish its trace" >&2; exit 1; }

step "example on NATS, output piped"
NATS_URL="$DUALBUS_TEST_NATS_URL" cargo run -q -p dualbus --features nats --example nats_domain_events > "$servers_dir/nats_example.out" 2>&1 || { cat "$servers_dir/nats_example.out"; exit 1; }
cat "$servers_dir/nats_example.out"
no_escapes "$servers_dir/nats_example.out"

step "example on Kafka: event sourcing with two group members, output piped"
KAFKA_BOOTSTRAP="$DUALBUS_TEST_KAFKA_BOOTSTRAP" cargo run -q -p dualbus --features kafka --example kafka_event_sourcing > "$servers_dir/kafka_example.out" 2>&1 || { cat "$servers_dir/kafka_example.out"; exit 1; }
cat "$servers_dir/kafka_example.out"
no_escapes "$servers_dir/kafka_example.out"

step "example: domain events on Redis Streams (then on NATS), notifications on Redis pub/sub, output piped"
for domain in redis nats; do
  NATS_URL="$DUALBUS_TEST_NATS_URL" REDIS_URL="$DUALBUS_TEST_REDIS_URL" cargo run -q -p dualbus --features nats,redis --example redis_notifications -- --domain "$domain" > "$servers_dir/redis_example.out" 2>&1 || { cat "$servers_dir/redis_example.out"; exit 1; }
  cat "$servers_dir/redis_example.out"
  no_escapes "$servers_dir/redis_example.out"
done

step "example: replicas across processes on NATS (one killed, one joining)"
cargo build -q -p dualbus --features nats --example nats_scale_out
scale="$CARGO_TARGET_DIR/debug/examples/nats_scale_out"
export NATS_URL="$DUALBUS_TEST_NATS_URL"
"$scale" replica a --idle 6 > "$servers_dir/scale_a.out" 2>&1 &
a_pid=$!
"$scale" replica b --idle 6 > "$servers_dir/scale_b.out" 2>&1 &
b_pid=$!
sleep 1
"$scale" publish 1200 --rate 400 > "$servers_dir/scale_pub.out" 2>&1 &
pub_pid=$!
sleep 1
kill -9 "$b_pid"
"$scale" replica c --idle 6 > "$servers_dir/scale_c.out" 2>&1 &
c_pid=$!
scale_ok=1
wait "$pub_pid" || scale_ok=0
wait "$a_pid" || scale_ok=0
wait "$c_pid" || scale_ok=0
unset NATS_URL
for f in scale_a scale_b scale_c scale_pub; do echo "--- $f"; cat "$servers_dir/$f.out"; done
no_escapes "$servers_dir/scale_a.out"
grep -q "all 1200 events handled" "$servers_dir/scale_pub.out" || scale_ok=0
grep -q "broken orders 0," "$servers_dir/scale_a.out" || scale_ok=0
grep -q "broken orders 0," "$servers_dir/scale_c.out" || scale_ok=0
if grep -q "ORDER BROKEN" "$servers_dir"/scale_*.out; then scale_ok=0; fi
[ "$scale_ok" = 1 ] || { echo "the scale-out example failed" >&2; exit 1; }

step "benchmarks build"
cargo build --workspace --all-features --benches --examples

step "cargo package"
# Packaging verifies each crate against its siblings through a local overlay registry.
# cargo treats registry crates as immutable: it keeps an extracted copy under CARGO_HOME
# and the compiled artifacts in the target directory while the version number stays the
# same. Drop both for our own crates, so that the siblings are verified as they are now.
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
rm -rf "$CARGO_TARGET_DIR/package" "$cargo_home"/registry/src/*/dualbus-* "$cargo_home"/registry/cache/*/dualbus-*
cargo clean -p dualbus-core -p dualbus-memory -p dualbus-nats -p dualbus-kafka -p dualbus-redis -p dualbus-otel -p dualbus
cargo package --workspace --allow-dirty

echo
echo "all checks passed"
