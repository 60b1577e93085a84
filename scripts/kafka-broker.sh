#!/usr/bin/env bash
# Starts one Apache Kafka broker (combined broker and controller, KRaft) on loopback ports
# with its data in DIR, waits until it serves metadata (an open port is not readiness), and
# prints its pid. The group timeouts are lowered for tests: the broker's minimum session
# timeout of the consumer group protocol is 45 s by default.
#
#   scripts/kafka-broker.sh DIR PORT CONTROLLER_PORT
set -euo pipefail
dir=${1:?usage: scripts/kafka-broker.sh DIR PORT CONTROLLER_PORT}
port=${2:?usage: scripts/kafka-broker.sh DIR PORT CONTROLLER_PORT}
cport=${3:?usage: scripts/kafka-broker.sh DIR PORT CONTROLLER_PORT}
lib="$("$(dirname "$0")/kafka.sh")"
mkdir -p "$dir"
cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.consumer.session.timeout.ms=3000
group.consumer.min.session.timeout.ms=3000
group.consumer.heartbeat.interval.ms=500
group.consumer.min.heartbeat.interval.ms=500
PROPS
if [ ! -d "$dir/data" ]; then
  # A cluster id is a base64 UUID; one starting with '-' reads as an option.
  id=-
  while [ "${id#-}" != "$id" ]; do
    id="$(java -cp "$lib/*" kafka.tools.StorageTool random-uuid)"
  done
  java -cp "$lib/*" kafka.tools.StorageTool format --standalone -t "$id" \
    -c "$dir/server.properties" > "$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; exit 1; }
fi
nohup java -Xmx512m -cp "$lib/*" kafka.Kafka "$dir/server.properties" > "$dir/broker.log" 2>&1 &
pid=$!
for _ in $(seq 1 60); do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "the Kafka broker exited:" >&2
    tail -20 "$dir/broker.log" >&2
    exit 1
  fi
  if java -cp "$lib/*" org.apache.kafka.tools.MetadataQuorumCommand \
      --bootstrap-server "127.0.0.1:$port" describe --status 2>/dev/null | grep -q '^LeaderId:'; then
    echo "$pid"
    exit 0
  fi
  sleep 1
done
echo "the Kafka broker did not serve metadata within a minute" >&2
kill "$pid" 2>/dev/null || true
exit 1
