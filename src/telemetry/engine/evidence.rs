//! What an alert about a device refusal says: the sentence and the evidence fields, by layer.

use serde_json::{json, Value};

use crate::telemetry::alert::{hex, mac};
use crate::telemetry::events::request_evidence;
use crate::telemetry::vocabulary::{ImageFormat, Rule, Violation};

/// The alert fields of a refusal by `device` for `violation`, with its two evidence words.
pub fn violation_fields(
    device: &str,
    violation: Violation,
    queue: Option<u16>,
    a: u64,
    b: u64,
) -> Vec<(&'static str, Value)> {
    let mut fields = vec![
        ("device", json!(device)),
        ("layer", json!(violation.layer())),
        ("reason", json!(violation.name())),
    ];
    if let Some(q) = queue {
        fields.push(("queue", json!(q)));
    }
    match violation {
        Violation::Transport(_) => {
            fields.push(("register", hex(a)));
            fields.push(("value", hex(b)));
        }
        Violation::Chain(_) => {
            fields.push(("guest_address", hex(a)));
            fields.push(("length", json!(b)));
        }
        Violation::Request(r) => {
            let (ka, kb) = request_evidence(r);
            let va = match ka {
                "source_mac" => mac(a),
                "format" => json!(usize::try_from(a)
                    .ok()
                    .and_then(ImageFormat::from_index)
                    .map_or("unknown", ImageFormat::name)),
                _ => json!(a),
            };
            fields.push((ka, va));
            fields.push((kb, json!(b)));
        }
    }
    fields
}

/// The sentence of a refusal alert.
pub fn violation_output(
    device: &str,
    violation: Violation,
    queue: Option<u16>,
    rule: Rule,
) -> String {
    let on_queue = queue.map(|q| format!(" on queue {q}")).unwrap_or_default();
    format!(
        "{device} refused {}.{}{on_queue}: {}",
        violation.layer(),
        violation.name(),
        rule.description()
    )
}
