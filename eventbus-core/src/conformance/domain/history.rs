//! An aggregate's history: replay in order, and appends against an expected version
//! (including the broker-side conditional publish).

use super::support::{SOURCE, bus, publish_interleaved};
use crate::codec::Codec;
use crate::conformance::{Backend, OrderChecker, event, unique_topic};
use crate::error::ErrorKind;
use crate::message::OutboundMessage;
use crate::transport::{DomainTransport, Write};

/// All events of one aggregate can be read back in order (if declared).
pub async fn replay(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-replay");
    if !bus.capabilities().replay {
        let e = bus
            .replay(&topic, "a")
            .await
            .expect_err("replay is not declared");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        return;
    }
    let checker = OrderChecker::new();
    let weird = "order/1 ü.*>%".to_owned();
    let aggs = vec![
        "a".to_owned(),
        "b".to_owned(),
        "a-b".to_owned(),
        weird.clone(),
    ];
    publish_interleaved(&bus, &topic, &checker, &aggs, 5).await;
    for a in &aggs {
        let got = bus.replay(&topic, a).await.expect("replay");
        let versions: Vec<u64> = got.iter().map(|e| e.event_version).collect();
        assert_eq!(versions, vec![1, 2, 3, 4, 5], "replay of {a:?}");
        assert!(
            got.iter().all(|e| &e.aggregate_id == a),
            "replay of {a:?} returned other aggregates"
        );
    }
    assert!(
        bus.replay(&topic, "unknown")
            .await
            .expect("replay")
            .is_empty()
    );
    let e = bus
        .replay(&topic, " ")
        .await
        .expect_err("blank aggregate id");
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    bus.close().await.expect("close");
}

/// Appends checked against an aggregate's expected version: the right version succeeds, a
/// stale one is a conflict naming the current version, and of two racing appends exactly
/// one wins (if declared).
pub async fn expected_version(backend: &dyn Backend) {
    let bus = bus(backend).await;
    let topic = unique_topic("domain-expected");
    if !bus.capabilities().expected_version {
        let e = bus
            .append(&topic, &event("a", 1), 0)
            .await
            .expect_err("not declared");
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        return;
    }
    let v1 = event("acc", 1);
    let first = bus
        .append(&topic, &v1, 0)
        .await
        .expect("v1 on a new aggregate");
    assert!(!first.duplicate);
    // The same append again (an answer lost, a retry): its own event is recognised by
    // its id and its receipt returned, marked duplicate; another v1 is a conflict.
    let again = bus.append(&topic, &v1, 0).await.expect("a repeat of v1");
    assert!(again.duplicate, "{again:?}");
    if let Some(at) = first.position {
        assert_eq!(again.position, Some(at), "the stored event's position");
    }
    let other_v1 = bus.append(&topic, &event("acc", 1), 0).await;
    assert_eq!(
        other_v1.expect_err("another v1").kind(),
        ErrorKind::Conflict
    );
    bus.append(&topic, &event("acc", 2), 1)
        .await
        .expect("v2 after v1");
    // Another aggregate in the same topic does not count.
    bus.append(&topic, &event("other", 1), 0)
        .await
        .expect("v1 of another aggregate");
    let stale = bus
        .append(&topic, &event("acc", 2), 1)
        .await
        .expect_err("v2 exists");
    assert_eq!(stale.kind(), ErrorKind::Conflict, "{stale}");
    assert!(stale.to_string().contains("version 2"), "{stale}");
    let wrong = bus
        .append(&topic, &event("acc", 5), 2)
        .await
        .expect_err("must carry 3");
    assert_eq!(wrong.kind(), ErrorKind::InvalidInput, "{wrong}");
    // Two writers race for v3: exactly one wins.
    let other = self::bus(backend).await;
    let (mine, theirs) = (event("acc", 3), event("acc", 3));
    let (a, b) = tokio::join!(
        bus.append(&topic, &mine, 2),
        other.append(&topic, &theirs, 2)
    );
    let wins = [a.is_ok(), b.is_ok()].iter().filter(|x| **x).count();
    assert_eq!(wins, 1, "racing appends: {a:?} {b:?}");
    for r in [a, b] {
        if let Err(e) = r {
            assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
        }
    }
    // The broker-side check itself: two writers read the same last position, both publish
    // conditioned on it; the second must be refused even though its pre-check passed.
    let t = bus.transport();
    let last = t
        .last_for_key(&topic, "acc")
        .await
        .expect("last")
        .map(|m| m.position);
    assert!(last.is_some());
    // Encoded and checked as `DomainBus::append` does.
    let append = |aggregate: &str, version: u64| {
        let encoded = Codec::CloudEvents
            .encode(
                &event(aggregate, version),
                t.capabilities().header_style,
                SOURCE,
            )
            .expect("encode");
        OutboundMessage::new(encoded, t.capabilities(), Write::Append).expect("checked")
    };
    let (v4, v4b) = (append("acc", 4), append("acc", 4));
    t.publish_if_last(&topic, v4, last)
        .await
        .expect("first conditional publish");
    let e = t
        .publish_if_last(&topic, v4b, last)
        .await
        .expect_err("the position moved");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    let (none, taken) = (append("fresh", 1), append("acc", 1));
    t.publish_if_last(&topic, none, None)
        .await
        .expect("no message of `fresh` yet");
    let e = t
        .publish_if_last(&topic, taken, None)
        .await
        .expect_err("`acc` has messages");
    assert_eq!(e.kind(), ErrorKind::Conflict, "{e}");
    if bus.capabilities().replay {
        let versions: Vec<u64> = bus
            .replay(&topic, "acc")
            .await
            .expect("replay")
            .iter()
            .map(|e| e.event_version)
            .collect();
        assert_eq!(
            versions,
            vec![1, 2, 3, 4],
            "the history has no duplicate or gap"
        );
    }
    bus.close().await.expect("close");
    other.close().await.expect("close");
}
