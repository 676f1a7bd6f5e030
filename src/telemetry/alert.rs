//! Alerts in Falco's JSON layout, so falcosidekick and SIEM pipelines take them unchanged:
//! `time` (RFC 3339, UTC, nanoseconds), `rule`, `priority`, `source`, `output` (one sentence),
//! `output_fields` (who and the evidence), `tags`, `hostname`.

use std::time::SystemTime;

use serde_json::{json, Map, Value};

use super::vocabulary::Rule;

/// One fired rule, before the supervisor stamps it with the VM's identity and sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    pub time: SystemTime,
    pub rule: Rule,
    /// One human sentence.
    pub output: String,
    /// The evidence: vCPU, device, queue, guest address, port, counts.
    pub fields: Vec<(&'static str, Value)>,
    /// Firings of this rule the rate limit held back since the last alert sent.
    pub suppressed: u64,
}

/// Who an alert is about, and where it was raised.
#[derive(Debug, Clone)]
pub struct AlertContext {
    pub vm_id: String,
    pub tenant: String,
    pub hostname: String,
}

impl Alert {
    /// The alert as one JSON object (a line of the alerts file, or a falcosidekick POST
    /// body). `seq` numbers the VM's alerts from 1.
    pub fn to_json(&self, ctx: &AlertContext, seq: u64) -> Value {
        let mut fields = Map::new();
        fields.insert("vm_id".into(), json!(ctx.vm_id));
        fields.insert("tenant".into(), json!(ctx.tenant));
        fields.insert("seq".into(), json!(seq));
        for (k, v) in &self.fields {
            fields.insert((*k).to_string(), v.clone());
        }
        if self.suppressed > 0 {
            fields.insert("suppressed_since_last".into(), json!(self.suppressed));
        }
        json!({
            "time": humantime::format_rfc3339_nanos(self.time).to_string(),
            "rule": self.rule.name(),
            "priority": self.rule.priority().name(),
            "source": "bulkhead",
            "output": format!("{} (vm_id={} tenant={})", self.output, ctx.vm_id, ctx.tenant),
            "output_fields": Value::Object(fields),
            "tags": self.rule.tags(),
            "hostname": ctx.hostname,
        })
    }
}

/// A guest-physical address or register offset as evidence: hex, as people read them.
pub fn hex(v: u64) -> Value {
    json!(format!("{v:#x}"))
}

/// A 48-bit MAC address held in the low bits of `v`.
pub fn mac(v: u64) -> Value {
    let b = v.to_be_bytes();
    json!(format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        b[2], b[3], b[4], b[5], b[6], b[7]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_alert_has_every_field_falcosidekick_requires() {
        let alert = Alert {
            time: SystemTime::UNIX_EPOCH + std::time::Duration::new(1_764_400_000, 123_456_789),
            rule: Rule::VirtioDescOutOfRam,
            output: "a buffer outside RAM".into(),
            fields: vec![
                ("device", json!("virtio-rng0")),
                ("guest_address", hex(0xc000_0000)),
            ],
            suppressed: 2,
        };
        let ctx = AlertContext {
            vm_id: "vm-1".into(),
            tenant: "acme".into(),
            hostname: "host-a".into(),
        };
        let v = alert.to_json(&ctx, 7);
        assert_eq!(v["time"], "2025-11-29T07:06:40.123456789Z");
        assert_eq!(v["rule"], "virtio_desc_out_of_ram");
        assert_eq!(v["priority"], "Critical");
        assert_eq!(v["source"], "bulkhead");
        assert_eq!(v["hostname"], "host-a");
        let f = &v["output_fields"];
        assert_eq!(
            (f["vm_id"].as_str(), f["tenant"].as_str()),
            (Some("vm-1"), Some("acme"))
        );
        assert_eq!(f["seq"], 7);
        assert_eq!(f["guest_address"], "0xc0000000");
        assert_eq!(f["suppressed_since_last"], 2);
        assert!(v["tags"]
            .as_array()
            .is_some_and(|t| t.iter().any(|x| x == "T1611")));
        assert!(v["output"].as_str().unwrap().contains("vm_id=vm-1"));
    }

    #[test]
    fn macs_print_as_six_bytes() {
        assert_eq!(mac(0x0266_6666_6666), json!("02:66:66:66:66:66"));
    }
}
