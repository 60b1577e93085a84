"""The dualbus pub/sub frame (version 1) in Python, written from docs/backends/redis.md
only, with redis-py as the client.

    frame.py read <url> <channel>    prints the next message of <channel> as JSON
    frame.py write <url> <channel>   publishes one framed message and one plain payload
"""

import json
import struct
import sys

import redis

MAGIC = b"\x00db"


def encode(headers, reply_to, payload):
    out = bytearray(MAGIC)
    out.append(1)
    out += struct.pack(">H", len(headers))
    for name, value in headers:
        n, v = name.encode(), value.encode()
        out += struct.pack(">H", len(n)) + n + struct.pack(">H", len(v)) + v
    r = (reply_to or "").encode()
    out += struct.pack(">H", len(r)) + r
    return bytes(out) + payload


def decode(data):
    if not data.startswith(MAGIC):
        return {"headers": [], "reply_to": None, "payload": data.decode("latin-1")}
    if data[3] != 1:
        raise ValueError("unknown version %d" % data[3])
    at = 4
    (count,) = struct.unpack_from(">H", data, at)
    at += 2
    headers = []
    for _ in range(count):
        (n,) = struct.unpack_from(">H", data, at)
        name = data[at + 2 : at + 2 + n].decode()
        at += 2 + n
        (v,) = struct.unpack_from(">H", data, at)
        value = data[at + 2 : at + 2 + v].decode()
        at += 2 + v
        headers.append([name, value])
    (r,) = struct.unpack_from(">H", data, at)
    reply_to = data[at + 2 : at + 2 + r].decode() or None
    at += 2 + r
    return {"headers": headers, "reply_to": reply_to, "payload": data[at:].decode("latin-1")}


def main():
    mode, url, channel = sys.argv[1:4]
    client = redis.Redis.from_url(url)
    if mode == "read":
        p = client.pubsub()
        p.subscribe(channel)
        p.get_message(timeout=5)  # the subscription's confirmation
        print("ready", flush=True)
        while True:
            m = p.get_message(timeout=30)
            if m is None:
                sys.exit("no message within 30 s")
            if m["type"] == "message":
                print(json.dumps(decode(m["data"])), flush=True)
                return
    elif mode == "write":
        client.publish(
            channel,
            encode([("x-lang", "python"), ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")], "py.replies", "grüße from python".encode()),
        )
        client.publish(channel, b"plain from python")
    else:
        sys.exit("mode: read or write")


if __name__ == "__main__":
    main()
