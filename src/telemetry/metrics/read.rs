//! The one reader of a metrics file: Prometheus text back into typed samples. The daemon (a
//! VM's exit reason, the merged endpoint) and the Firecracker personality (its metrics lines)
//! read a supervisor's metrics only through this, by [`Family`] and [`Label`]. A line this
//! reader does not know (another program's family, a label bulkhead never writes) is counted
//! and left out, never guessed at.

use std::fmt::Write;

use super::names::{Family, Kind, Label};

/// One sample as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadSample {
    pub family: Family,
    pub labels: Vec<(Label, String)>,
    pub value: f64,
}

impl ReadSample {
    /// The value of label `l`, if the sample has it.
    pub fn label(&self, l: Label) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == l)
            .map(|(_, v)| v.as_str())
    }

    /// `name{label="value",...}`, as the sample's line has it.
    pub fn series(&self) -> String {
        let mut out = self.family.sample_name();
        if !self.labels.is_empty() {
            out.push('{');
            for (i, (l, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{}=\"{}\"", l.name(), escape(v));
            }
            out.push('}');
        }
        out
    }
}

/// A metrics file, read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    pub samples: Vec<ReadSample>,
    /// Sample lines that named no family or label bulkhead writes, or did not parse.
    pub unknown: usize,
}

impl Exposition {
    pub fn parse(text: &str) -> Exposition {
        let mut e = Exposition::default();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match sample(line) {
                Some(s) => e.samples.push(s),
                None => e.unknown += 1,
            }
        }
        e
    }

    /// The samples of `family`.
    pub fn of(&self, family: Family) -> impl Iterator<Item = &ReadSample> {
        self.samples.iter().filter(move |s| s.family == family)
    }

    /// The sum of `family`'s samples that `keep` takes.
    pub fn sum(&self, family: Family, keep: impl Fn(&ReadSample) -> bool) -> f64 {
        self.of(family).filter(|s| keep(s)).map(|s| s.value).sum()
    }

    /// Why the VM ended: the `reason` of the `bulkhead_vm_exit` sample set to 1.
    pub fn exit_reason(&self) -> Option<&str> {
        self.of(Family::VmExit)
            .find(|s| s.value == 1.0)
            .and_then(|s| s.label(Label::Reason))
    }

    /// Many VMs' expositions as one (OpenMetrics text): each family's `# HELP` and `# TYPE`
    /// once, in bulkhead's order, with every VM's samples under it.
    pub fn merge<'a>(expositions: impl IntoIterator<Item = &'a Exposition> + Clone) -> String {
        let mut out = String::new();
        for &family in Family::ALL {
            let mut samples = expositions
                .clone()
                .into_iter()
                .flat_map(|e| e.of(family))
                .peekable();
            if samples.peek().is_none() {
                continue;
            }
            let name = family.sample_name();
            let kind = match family.kind() {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
            };
            let _ = writeln!(out, "# HELP {name} {}", family.help());
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for s in samples {
                let _ = writeln!(out, "{} {}", s.series(), s.value);
            }
        }
        out.push_str("# EOF\n");
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One sample line: `name value` or `name{label="value",...} value`.
fn sample(line: &str) -> Option<ReadSample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, mut rest) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let family = Family::of_sample(name)?;
    let mut labels = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        let label = Label::of_name(key)?;
        // The value runs to the first quote not escaped by a backslash.
        let mut text = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => text.push('\n'),
                    c => text.push(c),
                },
                (i, '"') => break i,
                (_, c) => text.push(c),
            }
        };
        labels.push((label, text));
        rest = after.get(end + 1..)?;
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some(ReadSample {
        family,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{MetricsSnapshot, Region, RequestViolation, SupervisorFacts};

    #[test]
    fn what_the_supervisor_writes_reads_back_sample_for_sample() {
        let r = Region::anonymous().unwrap();
        r.device(0)
            .unwrap()
            .refuse(RequestViolation::ForeignSourceMac.into());
        let facts = SupervisorFacts {
            vcpus: 2,
            devices: vec!["virtio-net0".into()],
            exit: Some(("seccomp_violation", 159)),
            boot_complete_seconds: Some(0.5),
            ..Default::default()
        };
        let text = MetricsSnapshot::collect(&r, &facts)
            .encode("vm-1", "acme")
            .unwrap();
        let e = Exposition::parse(&text);
        assert_eq!(e.unknown, 0, "{text}");
        let lines = text.lines().filter(|l| !l.starts_with('#')).count();
        assert_eq!(e.samples.len(), lines);
        assert_eq!(e.exit_reason(), Some("seccomp_violation"));
        let spoofed = e.sum(Family::VirtioViolations, |s| {
            s.label(Label::Reason) == Some("foreign_source_mac")
                && s.label(Label::Device) == Some("virtio-net0")
        });
        assert_eq!(spoofed, 1.0);
        assert_eq!(e.sum(Family::BootCompleteSeconds, |_| true), 0.5);
        // Each sample's series is its line's, so the merge writes the series read.
        for s in &e.samples {
            let found = text.lines().any(|l| {
                l.rsplit_once(' ')
                    .is_some_and(|(series, v)| series == s.series() && v.parse() == Ok(s.value))
            });
            assert!(found, "{}", s.series());
        }
    }

    #[test]
    fn lines_that_are_not_bulkheads_are_counted_not_guessed_at() {
        let e = Exposition::parse(
            "bulkhead_vm_exit{reason=\"guest_exit\"} 0\n\
             other_total 3\n\
             bulkhead_vcpus{colour=\"red\"} 1\n\
             bulkhead_vcpus{vm_id=\"a\\\"b\"} 2\n\
             garbage\n",
        );
        assert_eq!(e.unknown, 3);
        assert_eq!(e.exit_reason(), None, "a reason set to 0 is no exit");
        assert_eq!(
            e.of(Family::Vcpus)
                .next()
                .and_then(|s| s.label(Label::VmId)),
            Some("a\"b")
        );
    }

    #[test]
    fn a_merge_names_each_family_once_with_every_vms_samples() {
        let a = Exposition::parse(
            "bulkhead_vcpus{vm_id=\"a\"} 1\nbulkhead_vm_running{vm_id=\"a\"} 1\n",
        );
        let b = Exposition::parse("bulkhead_vcpus{vm_id=\"b\"} 2\n");
        let text = Exposition::merge([&a, &b]);
        assert_eq!(
            text.matches("# TYPE bulkhead_vcpus gauge").count(),
            1,
            "{text}"
        );
        assert!(text.contains("bulkhead_vcpus{vm_id=\"a\"} 1\nbulkhead_vcpus{vm_id=\"b\"} 2\n"));
        assert!(text.ends_with("# EOF\n"));
        assert_eq!(Exposition::parse(&text).samples.len(), 3);
    }
}
