//! `Telemetry::install` with OTLP over HTTP really exports: a collector stand-in on a
//! loopback port receives the protobuf requests at `/v1/traces` and `/v1/metrics`, and the
//! spans of a publish and its handler are in them.

#![cfg(feature = "otlp")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use dualbus_core::DomainBusBuilder;
use dualbus_memory::Memory;
use dualbus_otel::{ExporterKind, Otel, OtelConfig, Protocol, SamplerKind, Telemetry};
use support::*;

/// One request the stand-in received: its path, content type and body.
type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

/// Accepts connections and answers every HTTP/1.1 request with `200 OK`, recording it.
fn collector() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let received: Received = Arc::default();
    let r = received.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let r = r.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut h = String::new();
                        reader.read_line(&mut h).unwrap();
                        let h = h.trim_end();
                        if h.is_empty() {
                            break;
                        }
                        let (name, value) = h.split_once(':').unwrap_or((h, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "content-type" => content_type = value.trim().to_owned(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    r.lock().unwrap().push((path, content_type, body));
                    conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .unwrap();
                }
            });
        }
    });
    (port, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_reach_an_otlp_http_collector() {
    let (port, received) = collector();
    let config = OtelConfig {
        exporter: ExporterKind::Otlp,
        protocol: Protocol::Http,
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        sampler: SamplerKind::AlwaysOn,
        ..OtelConfig::default()
    };
    let telemetry = Telemetry::install(&config, "otlp-test-service").unwrap();
    let otel = Otel::from_config(&config);
    let bus = DomainBusBuilder::new(Memory::new())
        .layer(otel.tracing())
        .layer(otel.metrics())
        .build()
        .unwrap();
    let topic = unique("otlp-orders");
    let (sub, mut rx) = collecting(&bus, &topic).await;
    let e = dualbus_core::Envelope::new("o-1", "Placed", 1, &b"{}"[..]).unwrap();
    bus.publish(topic.as_str(), &e).await.unwrap();
    tokio::time::timeout(DEADLINE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    sub.shutdown().await;
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap()
        .unwrap();

    let got = received.lock().unwrap().clone();
    let contains = |body: &[u8], text: &str| body.windows(text.len()).any(|w| w == text.as_bytes());
    let traces: Vec<_> = got.iter().filter(|(p, _, _)| p == "/v1/traces").collect();
    assert!(
        !traces.is_empty(),
        "requests: {:?}",
        got.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    assert!(
        traces
            .iter()
            .all(|(_, ct, _)| ct == "application/x-protobuf")
    );
    let spans: Vec<u8> = traces.iter().flat_map(|(_, _, b)| b.clone()).collect();
    assert!(contains(&spans, &format!("send {topic}")));
    assert!(contains(&spans, &format!("process {topic}")));
    assert!(contains(&spans, "otlp-test-service"));
    let metrics: Vec<u8> = got
        .iter()
        .filter(|(p, _, _)| p == "/v1/metrics")
        .flat_map(|(_, _, b)| b.clone())
        .collect();
    assert!(contains(&metrics, "messaging.client.sent.messages"));
    assert!(contains(&metrics, "messaging.process.duration"));
}
