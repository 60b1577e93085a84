//! The cost of the OpenTelemetry layers, in one run: the in-process domain bus end to end
//! (publish, keyed pool, handler, acknowledgement) without layers, with the tracing and
//! metrics layers and sampling off, and with sampling on and spans handed to an exporter
//! that drops them (a batch processor on its own thread, as in production).
//!
//! `cargo bench -p dualbus-otel --bench overhead` (`-- --quick` for a short run). Each
//! round runs the three sides one after the other, in a rotating order; the median of each
//! side is reported with its ratio to the bare bus and the added time per event.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dualbus_core::{DomainBusBuilder, Envelope, Event, HandleError, handler_fn};
use dualbus_memory::Memory;
use dualbus_otel::{Otel, OtelConfig, SamplerKind};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

/// Spans handed over and dropped.
#[derive(Debug, Default)]
struct Drop;

impl SpanExporter for Drop {
    async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
        Ok(())
    }
}

#[derive(Clone, Copy, Debug)]
enum Side {
    Bare,
    SamplingOff,
    SamplingOn,
}

async fn run(side: Side, n: u64, aggregates: u64) -> Duration {
    let mut b = DomainBusBuilder::new(Memory::new());
    let mut providers = None;
    if !matches!(side, Side::Bare) {
        let config = OtelConfig {
            sampler: if matches!(side, Side::SamplingOn) {
                SamplerKind::AlwaysOn
            } else {
                SamplerKind::AlwaysOff
            },
            ..OtelConfig::default()
        };
        let tp = SdkTracerProvider::builder()
            .with_sampler(dualbus_otel::sampler(config.sampler, 1.0))
            .with_batch_exporter(Drop)
            .build();
        let mp = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(InMemoryMetricExporter::default()).build())
            .build();
        let otel = Otel::with_providers(&tp, &mp, &config);
        b = b.layer(otel.tracing()).layer(otel.metrics());
        providers = Some((tp, mp));
    }
    let bus = b.build().unwrap();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let sub = bus
        .subscribe("bench")
        .start(handler_fn(move |_e: Event| {
            h.fetch_add(1, Ordering::Relaxed);
            async { Ok::<_, HandleError>(()) }
        }))
        .await
        .unwrap();
    let envelopes: Vec<Envelope> = (0..n)
        .map(|i| {
            Envelope::new(
                format!("agg-{}", i % aggregates),
                "Ticked",
                i / aggregates + 1,
                &b"0123456789abcdef"[..],
            )
            .unwrap()
        })
        .collect();
    let start = Instant::now();
    for e in &envelopes {
        bus.publish("bench", e).await.unwrap();
    }
    while handled.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = start.elapsed();
    sub.shutdown().await;
    bus.close().await.unwrap();
    if let Some((tp, mp)) = providers {
        tokio::task::spawn_blocking(move || {
            tp.shutdown().ok();
            mp.shutdown().ok();
        })
        .await
        .unwrap();
    }
    elapsed
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (n, rounds) = if quick { (20_000, 3) } else { (100_000, 5) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "OpenTelemetry layers on the memory domain bus: {n} events over 1,000 aggregates, 16 B, publish -> pool -> handler -> ack ({} worker threads, median of {rounds} rounds)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let sides = [Side::Bare, Side::SamplingOff, Side::SamplingOn];
    let mut times: [Vec<Duration>; 3] = Default::default();
    rt.block_on(async {
        // Warm-up.
        for s in sides {
            run(s, n / 10, 1_000).await;
        }
        for r in 0..rounds {
            for k in 0..3 {
                let i = (r + k) % 3;
                times[i].push(run(sides[i], n, 1_000).await);
            }
        }
    });
    let bare = median(times[0].clone());
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    for (i, name) in [
        "no layers",
        "layers, sampling off",
        "layers, sampling on (spans dropped by the exporter)",
    ]
    .iter()
    .enumerate()
    {
        let d = median(times[i].clone());
        let extra_ns = (d.as_secs_f64() - bare.as_secs_f64()) * 1e9 / n as f64;
        println!(
            "  {name:<52} {:>10.0} events/s   ratio {:.2}   {:+.0} ns/event",
            rate(d),
            rate(d) / rate(bare),
            extra_ns
        );
    }
}
