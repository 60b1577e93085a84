//! The cost of the OpenTelemetry layers, in one run: the in-process domain bus end to end
//! (publish, keyed pool, handler, acknowledgement) without layers, with the tracing and
//! metrics layers and sampling off, and with sampling on and spans handed to an exporter
//! that drops them (a batch processor on its own thread, as in production).
//!
//! `cargo bench -p dualbus-otel --bench overhead` (`-- --quick` for a short run). Each
//! round runs the three sides one after the other, in a rotating order; the median of each
//! side is reported with its ratio to the bare bus and the added time per event.

#![allow(clippy::unwrap_used, clippy::expect_used)] // A benchmark binary.

// mimalloc, as many services use: with glibc's allocator, the in-process broker's growing
// log makes glibc consolidate its free lists over and over, at a cost that grows with the
// number of small allocations, and the figures of every side swing by tens of percent
// from one run to the next.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    TracingOff,
    Metrics,
    SamplingOff,
    SamplingOn,
    /// A hook that adds a constant `traceparent` and nothing else: what carrying one more
    /// header costs the bus, without OpenTelemetry.
    HeaderOnly,
    /// A hook that does nothing: what the publish pipeline and a handler layer cost.
    EmptyHook,
}

/// Does nothing.
struct Nothing;

impl dualbus_core::middleware::Hook for Nothing {}

/// Writes a fixed `traceparent`.
struct FixedHeader;

impl dualbus_core::middleware::Hook for FixedHeader {
    fn on_publish(
        &self,
        _info: &dualbus_core::middleware::PublishInfo<'_>,
        headers: &mut dualbus_core::Headers,
    ) -> Option<Box<dyn dualbus_core::middleware::PublishScope>> {
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
        );
        None
    }
}

/// Events published ahead of the handler at most.
const WINDOW: u64 = 1024;

async fn run(side: Side, envelopes: &[Envelope]) -> Duration {
    let mut b = DomainBusBuilder::new(Memory::new());
    let mut providers = None;
    if matches!(side, Side::HeaderOnly) {
        b = b.hook(Arc::new(FixedHeader));
    } else if matches!(side, Side::EmptyHook) {
        b = b.hook(Arc::new(Nothing));
    } else if !matches!(side, Side::Bare) {
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
        match side {
            Side::TracingOff => b = b.layer(otel.tracing()),
            Side::Metrics => b = b.layer(otel.metrics()),
            _ => b = b.layer(otel.tracing()).layer(otel.metrics()),
        }
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
    let n = envelopes.len() as u64;
    let start = Instant::now();
    // At most `WINDOW` events published ahead of the handler: a steady state, as in a
    // service, rather than a backlog of the whole run.
    for (i, e) in envelopes.iter().enumerate() {
        bus.publish("bench", e).await.unwrap();
        while i as u64 + 1 - handled.load(Ordering::Relaxed) >= WINDOW {
            tokio::task::yield_now().await;
        }
    }
    while handled.load(Ordering::Relaxed) < n {
        tokio::task::yield_now().await;
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
    // `--only=N` runs side N (0 to 4, in the order printed) alone, for profiling.
    let only: Option<usize> =
        std::env::args().find_map(|a| a.strip_prefix("--only=")?.parse().ok());
    let (n, rounds) = if quick { (20_000, 3) } else { (200_000, 9) };
    // One thread: the figures are the work each event costs, without the noise of
    // hand-offs between threads on a shared machine.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "OpenTelemetry layers on the memory domain bus: {n} events over 1,000 aggregates, 16 B, publish -> pool -> handler -> ack (one runtime thread, median of {rounds} rounds)"
    );
    let sides = [
        Side::Bare,
        Side::TracingOff,
        Side::Metrics,
        Side::SamplingOff,
        Side::SamplingOn,
        Side::HeaderOnly,
        Side::EmptyHook,
    ];
    let mut times: [Vec<Duration>; 7] = Default::default();
    // The same events for every run (each run has a broker of its own).
    let envelopes: Vec<Envelope> = (0..n)
        .map(|i| {
            Envelope::new(
                format!("agg-{}", i % 1_000),
                "Ticked",
                i / 1_000 + 1,
                &b"0123456789abcdef"[..],
            )
            .unwrap()
        })
        .collect();
    if let Some(i) = only {
        rt.block_on(async {
            for _ in 0..rounds {
                let d = run(sides[i], &envelopes).await;
                println!("  side {i}: {:.0} events/s", n as f64 / d.as_secs_f64());
            }
        });
        return;
    }
    rt.block_on(async {
        // Warm-up.
        for s in sides {
            run(s, &envelopes[..envelopes.len() / 10]).await;
        }
        for r in 0..rounds {
            for k in 0..sides.len() {
                let i = (r + k) % sides.len();
                times[i].push(run(sides[i], &envelopes).await);
            }
        }
    });
    let bare = median(times[0].clone());
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    for (i, name) in [
        "no layers",
        "tracing layer alone, sampling off",
        "metrics layer alone",
        "both layers, sampling off",
        "both layers, sampling on (spans dropped by the exporter)",
        "no OpenTelemetry, a fixed traceparent header added",
        "no OpenTelemetry, a hook that does nothing",
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
