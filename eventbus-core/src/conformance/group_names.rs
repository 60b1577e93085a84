//! Group names: checked once, in core, for every backend.

use crate::domain::{DomainBus, DomainBusBuilder};
use crate::error::{ErrorKind, HandleError};
use crate::handler::{Event, handler_fn};
use crate::message::Message;

use super::{Backend, unique_topic};

/// Names no group may have: not a valid topic-style name (`[A-Za-z0-9_-]` tokens separated
/// by single dots, at most 200 bytes).
pub const BAD_GROUP_NAMES: &[&str] = &[
    "", "a b", "*", ">", "a\nb", "a\r\nb", "a..b", ".a", "a.", "ü", "a/b", "a:b",
];

fn ok() -> impl tower::Service<Event, Response = (), Error = HandleError, Future = impl Send>
+ Clone
+ Send
+ Sync {
    handler_fn(|_e: Event| async { Ok::<_, HandleError>(()) })
}

async fn bus(
    backend: &dyn Backend,
    f: impl FnOnce(DomainBusBuilder) -> DomainBusBuilder,
) -> DomainBus {
    let t = backend.domain().await.expect("connect domain transport");
    f(DomainBusBuilder::from_dyn(t))
        .build()
        .expect("build domain bus")
}

/// A domain subscription with a bad group name, or a bus with a bad default group, is
/// refused with a clear `InvalidInput` error naming the setting; a source that is not a
/// valid group name (a URI) gives a valid default group (mapped as documented on
/// [`group_from_source`](crate::group_from_source)), under which subscribing works.
pub async fn bad_group_names(backend: &dyn Backend) {
    let bus = bus(backend, |b| b.source("conformance")).await;
    let topic = unique_topic("domain-bad-group");
    for name in BAD_GROUP_NAMES {
        let e = bus
            .subscribe(&topic)
            .group(*name)
            .start(ok())
            .await
            .expect_err("a bad group name was accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name:?}: {e}");
        let text = e.to_string();
        assert!(text.contains("`group`"), "{name:?}: {text}");
        assert!(text.contains("invalid group name"), "{name:?}: {text}");
        let e = DomainBusBuilder::from_dyn(bus.transport().clone())
            .default_group(*name)
            .build()
            .expect_err("a bad default group was accepted");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name:?}: {e}");
        assert!(e.to_string().contains("domain.group.name"), "{name:?}: {e}");
    }
    bus.close().await.expect("close");

    // A URI as the source: the default group is derived from it.
    let uri = bus_with_source(backend, "https://shop.example/orders:eu").await;
    let sub = uri
        .subscribe(&topic)
        .start(ok())
        .await
        .expect("subscribe under the derived default group");
    assert_eq!(sub.group(), "https___shop_example_orders_eu");
    drop(sub);
    uri.close().await.expect("close");
}

async fn bus_with_source(backend: &dyn Backend, source: &str) -> DomainBus {
    bus(backend, |b| b.source(source)).await
}

/// A queue group with a bad name is refused with a clear `InvalidInput` error naming
/// `queue_group` (a backend without queue groups refuses them first).
pub async fn bad_queue_group_names(backend: &dyn Backend) {
    let t = backend.simple().await.expect("connect simple transport");
    let bus = crate::simple::SimpleBusBuilder::from_dyn(t)
        .build()
        .expect("build simple bus");
    let topic = unique_topic("simple-bad-group");
    for name in BAD_GROUP_NAMES {
        let e = bus
            .subscribe(&topic)
            .queue_group(*name)
            .start(handler_fn(|_m: Message| async { Ok::<_, HandleError>(()) }))
            .await
            .expect_err("a bad queue group name was accepted");
        if !bus.capabilities().queue_groups {
            assert_eq!(e.kind(), ErrorKind::NotSupported, "{e}");
            continue;
        }
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{name:?}: {e}");
        assert!(e.to_string().contains("queue_group"), "{name:?}: {e}");
    }
    bus.close().await.expect("close");
}
