//! Layers given to the `Buses` builder reach both buses: their publish pipelines and
//! their handlers, in the order they were added.

#![allow(clippy::unwrap_used, clippy::expect_used)] // Test code.

use std::sync::Arc;
use std::time::Duration;

use dualbus::middleware::{Hook, PublishInfo, PublishScope};
use dualbus::{Buses, Envelope, Event, HandleError, Headers, Message, handler_fn};
use dualbus_core::conformance::pipeline::Tag;
use parking_lot::Mutex;

type Log = Arc<Mutex<Vec<String>>>;

/// Logs `hook:<kind>` for every message written.
struct KindHook(Log);

impl Hook for KindHook {
    fn on_publish(
        &self,
        info: &PublishInfo<'_>,
        _headers: &mut Headers,
    ) -> Option<Box<dyn PublishScope>> {
        self.0.lock().push(format!("hook:{}", info.kind));
        None
    }
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("in time");
}

#[tokio::test]
async fn builder_layers_reach_both_buses_in_order() {
    let log: Log = Arc::default();
    let tag = |name| Tag::new(name, &log);
    let buses = Buses::builder()
        .layer(tag("both"))
        .publish_layer(tag("pub"))
        .hook(Arc::new(KindHook(log.clone())))
        .handler_layer(tag("handle"))
        .build()
        .unwrap();
    let d = buses
        .domain()
        .subscribe("layered")
        .start(handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) }))
        .await
        .unwrap();
    let s = buses
        .simple()
        .subscribe("layered")
        .start(handler_fn(|_m: Message| async { Ok::<_, HandleError>(()) }))
        .await
        .unwrap();
    buses
        .domain()
        .publish("layered", &Envelope::new("a", "T", 1, "{}").unwrap())
        .await
        .unwrap();
    wait_for(|| d.stats().acked == 1).await;
    assert_eq!(
        log.lock().drain(..).collect::<Vec<_>>(),
        [
            "both:PublishRequest",
            "pub:PublishRequest",
            "hook:event",
            "both:Event",
            "handle:Event"
        ]
    );
    buses.simple().publish("layered", "x").await.unwrap();
    wait_for(|| s.stats().handled == 1).await;
    assert_eq!(
        log.lock().drain(..).collect::<Vec<_>>(),
        [
            "both:PublishRequest",
            "pub:PublishRequest",
            "hook:message",
            "both:Message",
            "handle:Message"
        ]
    );
    buses.close().await.unwrap();
}
