"""Reads CloudEvents from a Kafka topic with the Python confluent-kafka client and the
CloudEvents SDK's Kafka binding (binary mode), and prints them as JSON: what a Python
service sees of the events the bus publishes.

    python3 read_cloudevents.py BOOTSTRAP TOPIC COUNT
"""

import json
import sys
import time

from cloudevents.v1.kafka import KafkaMessage, from_binary
from confluent_kafka import Consumer


def main() -> None:
    bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"python-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    events = []
    deadline = time.time() + 60
    while len(events) < count and time.time() < deadline:
        m = consumer.poll(0.5)
        if m is None:
            continue
        if m.error():
            raise SystemExit(f"consumer error: {m.error()}")
        headers = {k: v for k, v in (m.headers() or [])}
        # The SDK takes the record key as the `partitionkey` attribute, as given.
        key = m.key().decode()
        event = from_binary(
            KafkaMessage(headers=headers, key=key, value=m.value()),
            data_unmarshaller=json.loads,
        )
        events.append(
            {
                "key": key,
                "attributes": {k: str(v) for k, v in event.get_attributes().items()},
                "data": event.data,
            }
        )
    consumer.close()
    print(json.dumps(events))


if __name__ == "__main__":
    main()
