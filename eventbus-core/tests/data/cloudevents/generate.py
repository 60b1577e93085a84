#!/usr/bin/env python3
"""Writes the CloudEvents fixtures of dualbus-core's codec tests with the official Python SDK.

    python3 -m venv /tmp/ce && /tmp/ce/bin/pip install cloudevents==2.2.0
    /tmp/ce/bin/python generate.py        # from this directory

Each `sdk-*.json` file holds one message as the SDK's binding writes it: `headers` (name,
value pairs in the SDK's order), `key` (Kafka only) and `body` (UTF-8 text). The SDK's HTTP
binding uses the `ce-` names and percent-encoding of the NATS binding draft 1.0.3, except
that it maps `datacontenttype` to `content-type`; its Kafka binding writes `ce_` names.
"""

import json
import platform
from datetime import datetime, timezone
from importlib.metadata import version

from cloudevents.core.bindings import http, kafka
from cloudevents.core.v1.event import CloudEvent

GENERATOR = (
    f"generate.py with cloudevents {version('cloudevents')} "
    f"(Python {platform.python_version()})"
)
TIME = datetime(2026, 3, 1, 12, 30, 5, 120000, tzinfo=timezone.utc)


def attributes(**extra):
    """The attributes every fixture shares (dualbus-core's envelope fields)."""
    return {
        "specversion": "1.0",
        "id": "0195a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
        "source": "orders-service",
        "type": "OrderCreated",
        "subject": "order-1",
        "time": TIME,
        "aggregateversion": 3,
        "correlationid": 'checkout 7 "ü" 100%',
        "causationid": "cmd-1",
        "tenantid": "42",
        **extra,
    }


def json_event():
    return CloudEvent(
        attributes(datacontenttype="application/json", partitionkey="order-1"),
        {"total": 42, "note": "a<b"},
    )


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def write(name, binding, headers, body, key=None):
    pairs = ",\n".join(
        "  " + json.dumps([n, text(v)], ensure_ascii=False) for n, v in headers.items()
    )
    with open(name, "w", encoding="utf-8") as f:
        f.write(f'{{\n "generator": {json.dumps(GENERATOR)},\n')
        f.write(f' "binding": {json.dumps(binding)},\n')
        f.write(f' "headers": [\n{pairs}\n ],\n')
        f.write(f' "key": {json.dumps(text(key))},\n')
        f.write(f' "body": {json.dumps(text(body), ensure_ascii=False)}\n}}\n')


def main():
    m = http.to_binary_event(json_event())
    write("sdk-http-binary.json", "HTTP binary (http.to_binary_event)", m.headers, m.body)
    m = http.to_structured_event(json_event())
    write("sdk-http-structured.json", "HTTP structured (http.to_structured_event)", m.headers, m.body)
    m = kafka.to_binary_event(json_event())
    write("sdk-kafka-binary.json", "Kafka binary (kafka.to_binary_event)", m.headers, m.value, m.key)
    m = kafka.to_structured_event(json_event())
    write("sdk-kafka-structured.json", "Kafka structured (kafka.to_structured_event)", m.headers, m.value, m.key)
    # Data that is not JSON: text as a JSON string, bytes as `data_base64`.
    text = CloudEvent(attributes(datacontenttype="text/plain"), "hello ü")
    m = http.to_structured_event(text)
    write("sdk-http-structured-text.json", "HTTP structured, text data", m.headers, m.body)
    raw = CloudEvent(attributes(datacontenttype="application/octet-stream"), b"\x00\x01\xfe\xff")
    m = http.to_structured_event(raw)
    write("sdk-http-structured-bytes.json", "HTTP structured, binary data", m.headers, m.body)


if __name__ == "__main__":
    main()
