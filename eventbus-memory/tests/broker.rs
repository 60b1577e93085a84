//! Memory-broker specifics beyond the conformance suite.

#![allow(clippy::expect_used)] // Test code.

use dualbus_core::conformance::{event, next_raw};
use dualbus_core::{Codec, DomainTransport, OutboundMessage, SubscriptionSpec, Topic, Write};
use dualbus_memory::Memory;

/// A message an earlier owner left unacknowledged keeps its delivery count when the next
/// owner rewinds to it: the count says how often it was delivered, not to whom.
#[tokio::test(start_paused = true)]
async fn delivery_count_survives_a_takeover() {
    let broker = Memory::new();
    let style = DomainTransport::capabilities(&broker).header_style;
    let wire = Codec::CloudEvents
        .encode(&event("a", 1), style, "tests")
        .expect("encode");
    let t = Topic::new("t").expect("topic");
    let wire = OutboundMessage::new(wire, DomainTransport::capabilities(&broker), Write::Publish)
        .expect("checked");
    DomainTransport::publish(&broker, &t, wire)
        .await
        .expect("publish");

    let first = broker.connect();
    let mut sub = first
        .subscribe(SubscriptionSpec::new(t.clone(), "g"))
        .await
        .expect("subscribe");
    let d = next_raw(&mut sub).await.expect("delivery").expect("ok");
    assert_eq!(d.delivery_count, 1);
    drop(d);
    drop(sub); // leaves without acknowledging

    let second = broker.connect();
    let mut sub = second
        .subscribe(SubscriptionSpec::new(t.clone(), "g"))
        .await
        .expect("subscribe");
    let d = next_raw(&mut sub).await.expect("redelivery").expect("ok");
    assert_eq!(
        d.delivery_count, 2,
        "the takeover redelivered it: its second delivery"
    );
    d.ack().await.expect("ack");
    assert_eq!(second.pending(&t, "g").await.expect("pending"), Some(0));
}
