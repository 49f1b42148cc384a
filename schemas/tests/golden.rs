//! Every golden file decodes, forever: that is how old events stay readable.
//!
//! `golden/<EventType>/v<N>.json` holds one payload per event type and schema version.
//! Files of the current version must also be exactly what this build writes.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on unexpected errors")]

use std::collections::BTreeSet;
use std::path::Path;

use keel_domain::Aggregate;
use keel_domain::customer::Customer;
use keel_domain::order::Order;
use keel_domain::product::Product;
use keel_schemas::{EventEnvelope, decode_event, encode_event};
use serde_json::Value;
use uuid::Uuid;

/// Decodes one golden payload with aggregate `A` if it owns the type, and checks that
/// current-version files re-encode to themselves.
fn check<A: Aggregate>(event_type: &str, version: u32, payload: &Value) -> Option<()> {
    let &(_, current) = A::EVENT_TYPES.iter().find(|(t, _)| *t == event_type)?;
    let envelope = EventEnvelope {
        event_id: Uuid::now_v7(),
        version: 1,
        event_type: event_type.to_owned(),
        schema_version: version,
        payload: payload.clone(),
    };
    let event = decode_event::<A>(&envelope)
        .unwrap_or_else(|e| panic!("golden {event_type} v{version} no longer decodes: {e}"));
    let written = encode_event(&event, envelope.event_id, 1);
    assert_eq!(written.schema_version, current);
    if version == current {
        assert_eq!(
            &written.payload, payload,
            "{event_type} v{version}: this build writes a different payload than the golden file"
        );
    }
    Some(())
}

#[test]
fn every_golden_file_decodes_and_every_event_type_has_one() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden");
    let mut seen = BTreeSet::new();
    for dir in std::fs::read_dir(&root).unwrap() {
        let dir = dir.unwrap().path();
        if !dir.is_dir() {
            continue;
        }
        let event_type = dir.file_name().unwrap().to_str().unwrap().to_owned();
        for file in std::fs::read_dir(&dir).unwrap() {
            let file = file.unwrap().path();
            let name = file.file_name().unwrap().to_str().unwrap();
            let version: u32 = name
                .strip_prefix('v')
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("golden file {} is not named v<N>.json", file.display()));
            let payload: Value =
                serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            check::<Product>(&event_type, version, &payload)
                .or_else(|| check::<Customer>(&event_type, version, &payload))
                .or_else(|| check::<Order>(&event_type, version, &payload))
                .unwrap_or_else(|| panic!("golden file for unknown event type {event_type}"));
            seen.insert((event_type.clone(), version));
        }
    }
    let all = Product::EVENT_TYPES
        .iter()
        .chain(Customer::EVENT_TYPES)
        .chain(Order::EVENT_TYPES);
    for &(event_type, version) in all {
        for v in 1..=version {
            assert!(
                seen.contains(&(event_type.to_owned(), v)),
                "missing golden file golden/{event_type}/v{v}.json"
            );
        }
    }
}

#[test]
fn order_placed_v1_reads_as_v2() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/OrderPlaced");
    let read = |v: u32| -> Value {
        serde_json::from_str(&std::fs::read_to_string(root.join(format!("v{v}.json"))).unwrap())
            .unwrap()
    };
    let envelope = |v: u32| EventEnvelope {
        event_id: Uuid::nil(),
        version: 1,
        event_type: "OrderPlaced".into(),
        schema_version: v,
        payload: read(v),
    };
    assert_eq!(
        decode_event::<Order>(&envelope(1)).unwrap(),
        decode_event::<Order>(&envelope(2)).unwrap()
    );
}

/// `golden/commit.json` pins the canonical form and the hash algorithm: its hash was
/// computed independently of this code, and must recompute forever.
#[test]
fn the_golden_commit_decodes_and_its_hash_recomputes() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/commit.json");
    let text = std::fs::read_to_string(path).unwrap();
    let raw: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        keel_schemas::commit_hash_of_value(&raw),
        raw["hash"].as_str().unwrap()
    );
    let keel_schemas::LogRecord::Commit(commit) =
        keel_schemas::LogRecord::decode(text.as_bytes()).unwrap()
    else {
        panic!("not a commit");
    };
    assert!(
        commit.hash_is_valid(),
        "the typed record re-serialises to the same hashed form"
    );
    assert_eq!(commit.next_version(), 4);
    let event = decode_event::<Order>(&commit.events[0]).unwrap();
    assert_eq!(keel_domain::DomainEvent::event_type(&event), "OrderShipped");
}
