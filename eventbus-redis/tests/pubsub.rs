//! Redis pub/sub specifics against real servers: subscriptions restored after a server
//! restart, messages of other clients (plain payloads, broken frames, Python's redis-py
//! writing and reading the frame), the size limit at its edge, a full subscription
//! buffer, and an unreachable server.

#![allow(clippy::expect_used, clippy::panic, clippy::unwrap_used)] // Test code.

mod support;

use std::time::Duration;

use bytes::Bytes;
use dualbus_core::conformance::unique_topic;
use dualbus_core::{
    ErrorKind, Headers, Message, SimpleCapabilities, SimpleOutbound, SimpleTransport,
};
use dualbus_redis::frame::{self, FRAME_ERROR};
use dualbus_redis::{RedisConfig, RedisPubSub};
use futures::StreamExt as _;
use futures::stream::BoxStream;

fn outbound(caps: &SimpleCapabilities, m: Message) -> SimpleOutbound {
    SimpleOutbound::new(m, caps).expect("a valid message")
}

async fn next(stream: &mut BoxStream<'static, Message>) -> Message {
    tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("a message within 30 s")
        .expect("stream open")
}

/// Publishes raw bytes with a client of its own (another producer).
async fn publish_raw(url: &str, channel: &str, bytes: &[u8]) {
    let client = redis::Client::open(url).expect("client");
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg(bytes)
        .query_async(&mut c)
        .await
        .expect("publish");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_come_back_after_a_server_restart() {
    if support::shared_url().is_none() {
        return;
    }
    let mut server = tokio::task::spawn_blocking(|| support::Server::start(&[]))
        .await
        .expect("start");
    let url = server.url();
    let t = RedisPubSub::connect(support::fast_config(&url))
        .await
        .expect("connect");
    let caps = t.capabilities().clone();
    let topic = unique_topic("redis-restart");
    let mut stream = t.subscribe(&topic, None).await.expect("subscribe");
    t.publish(outbound(&caps, Message::new(topic.as_str(), "before")))
        .await
        .expect("publish");
    assert_eq!(next(&mut stream).await.payload, "before");
    let server = tokio::task::spawn_blocking(move || {
        server.kill();
        std::thread::sleep(Duration::from_millis(500));
        server.run();
        server
    })
    .await
    .expect("restart");
    // Until the subscriber is back, messages are lost (pub/sub keeps none): publish until
    // one arrives. Publishes fail while the publishing connection reconnects.
    let (mut published, mut failed) = (0u32, 0u32);
    let got = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            published += 1;
            let m = Message::new(topic.as_str(), format!("after-{published}"));
            if t.publish(outbound(&caps, m)).await.is_err() {
                failed += 1;
            }
            if let Ok(Some(m)) =
                tokio::time::timeout(Duration::from_millis(200), stream.next()).await
            {
                return m;
            }
        }
    })
    .await
    .expect("the subscription came back after the restart");
    println!("after the restart: {published} published ({failed} refused) until one arrived");
    assert!(got.payload.starts_with(b"after-"), "{got:?}");
    // And it stays: the next message arrives.
    t.publish(outbound(&caps, Message::new(topic.as_str(), "settled")))
        .await
        .expect("publish");
    loop {
        if next(&mut stream).await.payload == "settled" {
            break;
        }
    }
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_payloads_and_broken_frames_of_other_clients_are_delivered_whole() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let t = RedisPubSub::connect(support::fast_config(&url))
        .await
        .expect("connect");
    let topic = unique_topic("redis-foreign");
    let mut stream = t.subscribe(&topic, None).await.expect("subscribe");
    let broken = {
        let mut f = frame::encode(&Headers::new(), None, b"x").unwrap().to_vec();
        f[3] = 9; // A version this reader does not know.
        f
    };
    publish_raw(&url, topic.as_str(), b"plain text").await;
    publish_raw(&url, topic.as_str(), &[0xff, 0x00, 0xfe]).await;
    publish_raw(&url, topic.as_str(), &broken).await;
    publish_raw(&url, topic.as_str(), b"").await;
    let plain = next(&mut stream).await;
    assert_eq!(plain.payload, "plain text");
    assert!(plain.headers.is_empty() && plain.reply_to.is_none());
    assert_eq!(next(&mut stream).await.payload.as_ref(), [0xff, 0x00, 0xfe]);
    let b = next(&mut stream).await;
    assert_eq!(b.payload.as_ref(), broken.as_slice(), "delivered whole");
    assert!(
        b.headers.get(FRAME_ERROR).unwrap().contains("version 9"),
        "{:?}",
        b.headers
    );
    let empty = next(&mut stream).await;
    assert!(empty.payload.is_empty() && empty.headers.is_empty());
    t.close().await.expect("close");
}

/// The Python side of the interop tests (`DUALBUS_PYTHON`, set by `scripts/test.sh`, with
/// redis-py installed).
fn python() -> Option<String> {
    match std::env::var("DUALBUS_PYTHON") {
        Ok(p) => Some(p),
        Err(_) if std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_some() => {
            panic!("DUALBUS_PYTHON is not set but DUALBUS_TEST_REQUIRE_SERVERS is")
        }
        Err(_) => {
            eprintln!("skipped: DUALBUS_PYTHON is not set");
            None
        }
    }
}

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/frame.py");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_reads_our_frames_and_writes_its_own() {
    let (Some(url), Some(py)) = (support::shared_url(), python()) else {
        return;
    };
    let t = RedisPubSub::connect(support::fast_config(&url))
        .await
        .expect("connect");
    let caps = t.capabilities().clone();
    // Python reads ours.
    let topic = unique_topic("redis-py-read");
    let mut reader = tokio::process::Command::new(&py)
        .args([SCRIPT, "read", url.as_str(), topic.as_str()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python");
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(
        reader.stdout.take().expect("stdout"),
    ));
    let ready = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("python subscribed within 30 s")
        .expect("read")
        .expect("a line");
    assert_eq!(ready, "ready");
    let mut h = Headers::new();
    h.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    h.insert("x-empty", "");
    let m = Message::new(topic.as_str(), "grüße, \u{1F980}")
        .with_headers(h)
        .with_reply_to("_inbox.rust");
    t.publish(outbound(&caps, m)).await.expect("publish");
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("python read it within 30 s")
        .expect("read")
        .expect("a line");
    let got: serde_json::Value = serde_json::from_str(&line).expect(&line);
    assert_eq!(
        got["headers"],
        serde_json::json!([
            [
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            ],
            ["x-empty", ""]
        ]),
        "{line}"
    );
    assert_eq!(got["reply_to"], "_inbox.rust");
    // Python printed the payload's bytes as Latin-1 code points.
    let bytes: Vec<u8> = got["payload"]
        .as_str()
        .unwrap()
        .chars()
        .map(|c| u8::try_from(u32::from(c)).unwrap())
        .collect();
    assert_eq!(bytes, "grüße, \u{1F980}".as_bytes());
    assert!(reader.wait().await.expect("python").success());

    // We read Python's.
    let topic = unique_topic("redis-py-write");
    let mut stream = t.subscribe(&topic, None).await.expect("subscribe");
    let status = tokio::process::Command::new(&py)
        .args([SCRIPT, "write", url.as_str(), topic.as_str()])
        .status()
        .await
        .expect("python");
    assert!(status.success());
    let framed = next(&mut stream).await;
    assert_eq!(framed.payload, Bytes::from("grüße from python"));
    assert_eq!(framed.headers.get("x-lang"), Some("python"));
    assert_eq!(
        framed.headers.get("traceparent"),
        Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
    );
    assert_eq!(framed.reply_to.as_deref(), Some("py.replies"));
    let plain = next(&mut stream).await;
    assert_eq!(plain.payload, "plain from python");
    assert!(plain.headers.is_empty());
    t.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_size_limit_at_its_edge() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let limit = 4096;
    let t = RedisPubSub::connect(support::fast_config(&url).with_max_message_bytes(limit))
        .await
        .expect("connect");
    let caps = t.capabilities().clone();
    let max = caps.max_payload;
    assert!(max < limit, "{max}");
    let topic = unique_topic("redis-size");
    let mut stream = t.subscribe(&topic, None).await.expect("subscribe");
    // A raw subscriber sees the frames as they are on the wire.
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut raw = client.get_async_pubsub().await.expect("pubsub");
    raw.subscribe(topic.as_str()).await.expect("subscribe");
    let mut raw = raw.into_on_message();
    let mut h = Headers::new();
    h.insert("x-h", "v");
    // Headers count as name + value + 4; the longest reply topic is kept out of the limit.
    let reply = "r".repeat(dualbus_core::MAX_TOPIC_LEN);
    let header_cost = "x-h".len() + "v".len() + 4;
    for size in [max - 1, max, max + 1] {
        let m = Message::new(topic.as_str(), vec![b'p'; size - header_cost])
            .with_headers(h.clone())
            .with_reply_to(reply.as_str());
        match SimpleOutbound::new(m, &caps) {
            Ok(m) => {
                assert!(size <= max, "{size} accepted over {max}");
                t.publish(m).await.expect("publish");
                let got = next(&mut stream).await;
                assert_eq!(got.payload.len(), size - header_cost);
                let wire = tokio::time::timeout(Duration::from_secs(30), raw.next())
                    .await
                    .expect("raw")
                    .expect("raw open");
                let n = wire.get_payload_bytes().len();
                assert!(n <= limit, "frame of {n} bytes over the limit {limit}");
                if size == max {
                    assert_eq!(n, limit, "the limit is reached exactly");
                }
            }
            Err(e) => {
                assert!(size > max, "{size} refused: {e}");
                assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
                assert!(
                    matches!(e, dualbus_core::Error::PayloadTooLarge { .. }),
                    "{e}"
                );
            }
        }
    }
    t.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_subscription_buffer_drops_and_counts() {
    let Some(url) = support::shared_url() else {
        return;
    };
    let mut c = support::fast_config(&url);
    c.subscription_buffer = 10;
    let t = RedisPubSub::connect(c).await.expect("connect");
    let caps = t.capabilities().clone();
    let topic = unique_topic("redis-buffer");
    // Not read until everything is published: 10 wait, the rest are dropped.
    let mut stream = t.subscribe(&topic, None).await.expect("subscribe");
    let n = 1000u64;
    for i in 0..n {
        t.publish(outbound(&caps, Message::new(topic.as_str(), i.to_string())))
            .await
            .expect("publish");
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        while t.dropped() < n - 10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("dropped {} of {n}", t.dropped()));
    let mut kept = Vec::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        kept.push(String::from_utf8(m.payload.to_vec()).unwrap());
    }
    assert_eq!(t.dropped(), n - 10);
    let first: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(kept, first, "the first ten were kept, in order");
    t.close().await.expect("close");
}

#[tokio::test]
async fn an_unreachable_server_and_bad_settings_are_clear_errors() {
    let port = support::free_port();
    let mut c = RedisConfig::new(format!("redis://127.0.0.1:{port}"));
    c.connect_timeout = Duration::from_secs(1);
    let e = RedisPubSub::connect(c).await.expect_err("nobody listens");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    let e = RedisPubSub::connect(RedisConfig::new("not a url at all"))
        .await
        .expect_err("bad url");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_permanent_error() {
    if support::shared_url().is_none() {
        return;
    }
    let server =
        tokio::task::spawn_blocking(|| support::Server::start(&["--requirepass", "right-s3cret"]))
            .await
            .expect("start");
    let e = RedisPubSub::connect(support::fast_config(&server.url()).with_password("wrong-s3cret"))
        .await
        .expect_err("a wrong password");
    assert!(!e.is_retryable(), "{e}");
    assert!(!e.to_string().contains("s3cret"), "{e}");
    let none = RedisPubSub::connect(support::fast_config(&server.url()))
        .await
        .expect_err("no password");
    assert!(!none.is_retryable(), "{none}");
    let t = RedisPubSub::connect(support::fast_config(&server.url()).with_password("right-s3cret"))
        .await
        .expect("the right password");
    assert!(!format!("{t:?}").contains("s3cret"));
}
