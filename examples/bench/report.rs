//! Figures, their medians and ratios, the goals they are held to, and the three outputs: a
//! Markdown table and the JSON behind it (one file), and an SVG chart of the ratios.

use std::fmt::Write as _;

/// A goal on the ratio of two VMMs' medians, or on one VMM's spread (max/min).
pub enum Goal {
    /// `a`'s median over `b`'s: at most `limit` (`at_most`) or at least.
    Ratio {
        a: &'static str,
        b: &'static str,
        limit: f64,
        at_most: bool,
    },
    Spread {
        vmm: &'static str,
        limit: f64,
    },
}

impl Goal {
    pub fn at_most(a: &'static str, b: &'static str, limit: f64) -> Goal {
        Goal::Ratio {
            a,
            b,
            limit,
            at_most: true,
        }
    }

    pub fn at_least(a: &'static str, b: &'static str, limit: f64) -> Goal {
        Goal::Ratio {
            a,
            b,
            limit,
            at_most: false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Goal::Ratio {
                a,
                b,
                limit,
                at_most,
            } => format!("{a}/{b} {} {limit}", if *at_most { "≤" } else { "≥" }),
            Goal::Spread { vmm, limit } => format!("{vmm} max/min < {limit}"),
        }
    }
}

pub struct Figure {
    pub key: &'static str,
    pub label: String,
    pub unit: &'static str,
    pub higher_is_better: bool,
    /// Samples per VMM, in the order the VMMs ran.
    pub samples: Vec<(&'static str, Vec<f64>)>,
    pub goals: Vec<Goal>,
    /// How it was measured, for the JSON and the table's footnotes.
    pub method: String,
}

pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(v: &[f64]) -> Option<Stats> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: s[0],
        max: s[n - 1],
    })
}

impl Figure {
    fn stats(&self, vmm: &str) -> Option<Stats> {
        self.samples
            .iter()
            .find(|(n, _)| *n == vmm)
            .and_then(|(_, v)| stats(v))
    }

    /// `a`'s median over `b`'s.
    pub fn ratio(&self, a: &str, b: &str) -> Option<f64> {
        let (a, b) = (self.stats(a)?, self.stats(b)?);
        (b.median != 0.0).then(|| a.median / b.median)
    }

    /// The goal's measured value and whether it was met; None when a side was not measured.
    fn check(&self, goal: &Goal) -> Option<(f64, bool)> {
        match goal {
            Goal::Ratio {
                a,
                b,
                limit,
                at_most,
            } => {
                let r = self.ratio(a, b)?;
                Some((r, if *at_most { r <= *limit } else { r >= *limit }))
            }
            Goal::Spread { vmm, limit } => {
                let s = self.stats(vmm)?;
                let spread = s.max / s.min;
                Some((spread, spread < *limit))
            }
        }
    }

    /// Every ratio between the VMMs measured, as (pair, value).
    fn pairs(&self) -> Vec<(String, f64)> {
        let names: Vec<&str> = self.samples.iter().map(|(n, _)| *n).collect();
        let mut out = Vec::new();
        for (i, a) in names.iter().enumerate() {
            for b in &names[i + 1..] {
                if let Some(r) = self.ratio(a, b) {
                    out.push((format!("{a}/{b}"), r));
                }
            }
        }
        out
    }
}

fn fmt_value(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The Markdown table: one row per figure, medians with their range, ratios, goals.
pub fn markdown(figures: &[Figure], header: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{header}\n");
    // Every VMM and every ratio any figure has, in the order they first appear.
    let mut vmms: Vec<&str> = Vec::new();
    let mut pairs: Vec<String> = Vec::new();
    for f in figures {
        for (n, _) in &f.samples {
            if !vmms.contains(n) {
                vmms.push(n);
            }
        }
        for (p, _) in f.pairs() {
            if !pairs.contains(&p) {
                pairs.push(p);
            }
        }
    }
    let mut cols: Vec<String> = vmms.iter().map(|v| v.to_string()).collect();
    cols.extend(pairs.iter().cloned());
    let _ = writeln!(md, "| figure | {} | goal | met |", cols.join(" | "));
    let _ = writeln!(md, "|---|{}---|---|", "---|".repeat(cols.len()));
    for f in figures {
        let mut row = format!("| {} ({}) |", f.label, f.unit);
        for v in &vmms {
            match f.stats(v) {
                Some(s) => {
                    let _ = write!(
                        row,
                        " {} ({}–{}) |",
                        fmt_value(s.median),
                        fmt_value(s.min),
                        fmt_value(s.max)
                    );
                }
                None => row.push_str(" – |"),
            }
        }
        let ratios = f.pairs();
        for p in &pairs {
            match ratios.iter().find(|(n, _)| n == p) {
                Some((_, r)) => {
                    let _ = write!(row, " {r:.2} |");
                }
                None => row.push_str(" – |"),
            }
        }
        let goals: Vec<String> = f.goals.iter().map(Goal::describe).collect();
        let met: Vec<String> = f
            .goals
            .iter()
            .map(|g| match f.check(g) {
                Some((v, true)) => format!("yes ({v:.2})"),
                Some((v, false)) => format!("**no** ({v:.2})"),
                None => "not measured".to_string(),
            })
            .collect();
        let _ = writeln!(
            row,
            " {} | {} |",
            if goals.is_empty() {
                "–".to_string()
            } else {
                goals.join("; ")
            },
            if met.is_empty() {
                "–".to_string()
            } else {
                met.join("; ")
            }
        );
        md.push_str(&row);
    }
    let _ = writeln!(
        md,
        "\nMedians, with the lowest and highest run in brackets. How each was measured:\n"
    );
    for f in figures {
        let _ = writeln!(md, "- **{}**: {}", f.label, f.method);
    }
    md
}

pub fn json(figures: &[Figure], meta: serde_json::Value) -> serde_json::Value {
    let figs: Vec<serde_json::Value> = figures
        .iter()
        .map(|f| {
            let mut values = serde_json::Map::new();
            for (vmm, samples) in &f.samples {
                if let Some(s) = stats(samples) {
                    values.insert(
                        vmm.to_string(),
                        serde_json::json!({
                            "median": s.median, "min": s.min, "max": s.max,
                            "samples": samples,
                        }),
                    );
                }
            }
            let ratios: serde_json::Map<String, serde_json::Value> =
                f.pairs().into_iter().map(|(p, r)| (p, r.into())).collect();
            let goals: Vec<serde_json::Value> = f
                .goals
                .iter()
                .map(|g| {
                    let (value, met) = match f.check(g) {
                        Some((v, m)) => (Some(v), Some(m)),
                        None => (None, None),
                    };
                    serde_json::json!({"goal": g.describe(), "value": value, "met": met})
                })
                .collect();
            serde_json::json!({
                "key": f.key, "label": f.label, "unit": f.unit,
                "higher_is_better": f.higher_is_better,
                "values": values, "ratios": ratios, "goals": goals, "method": f.method,
            })
        })
        .collect();
    serde_json::json!({"meta": meta, "figures": figs})
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A chart row: label, ratio, and the goal's limit with whether it was met.
type ChartRow = (String, f64, Option<(f64, bool)>);

/// Horizontal bars of bulkhead's ratio to each other VMM, per figure, on a log scale centred on
/// 1 (level), with each goal's limit marked; green where the goal is met, red where it is not,
/// grey where the figure has no goal for that pair.
pub fn svg(figures: &[Figure], title: &str) -> String {
    let mut rows: Vec<ChartRow> = Vec::new();
    for f in figures {
        for (pair, r) in f.pairs() {
            if !pair.starts_with("bulkhead/") {
                continue;
            }
            let goal = f.goals.iter().find_map(|g| match g {
                Goal::Ratio {
                    a,
                    b,
                    limit,
                    at_most,
                } if format!("{a}/{b}") == pair => {
                    Some((*limit, if *at_most { r <= *limit } else { r >= *limit }))
                }
                _ => None,
            });
            rows.push((format!("{} — {pair}", f.label), r, goal));
        }
    }
    let (label_w, bar_w, row_h, top) = (440.0, 380.0, 24.0, 48.0);
    let width = label_w + bar_w + 70.0;
    let height = top + row_h * rows.len() as f64 + 40.0;
    // log2 scale from 1/8 to 8.
    let x = |r: f64| label_w + bar_w / 2.0 + r.clamp(0.125, 8.0).log2() / 3.0 * (bar_w / 2.0);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="10" y="38" fill="#555">ratio of medians, log scale; left of 1 is less (better for time and memory), right is more (better for VMs/s and MiB/s); | marks the goal</text>"##
    );
    for (i, (label, r, goal)) in rows.iter().enumerate() {
        let y = top + row_h * i as f64;
        let colour = match goal {
            Some((_, true)) => "#2e7d32",
            Some((_, false)) => "#c62828",
            None => "#9e9e9e",
        };
        let (x0, x1) = (x(1.0).min(x(*r)), x(1.0).max(x(*r)));
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{x0:.1}" y="{}" width="{:.1}" height="{}" fill="{colour}"/><text x="{}" y="{}">{r:.2}</text>"#,
            label_w - 8.0,
            y + 15.0,
            escape(label),
            y + 4.0,
            (x1 - x0).max(1.0),
            row_h - 8.0,
            label_w + bar_w + 6.0,
            y + 15.0
        );
        if let Some((limit, _)) = goal {
            let gx = x(*limit);
            let _ = writeln!(
                s,
                r#"<line x1="{gx:.1}" x2="{gx:.1}" y1="{}" y2="{}" stroke="black" stroke-width="2"/>"#,
                y + 1.0,
                y + row_h - 1.0
            );
        }
    }
    let bottom = top + row_h * rows.len() as f64;
    for (r, text) in [
        (0.125, "1/8"),
        (0.25, "1/4"),
        (0.5, "1/2"),
        (1.0, "1"),
        (2.0, "2"),
        (4.0, "4"),
        (8.0, "8"),
    ] {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{top}" y2="{bottom}" stroke="#bbb" stroke-dasharray="{1}"/><text x="{0:.1}" y="{2}" text-anchor="middle" fill="#555">{text}</text>"##,
            x(r),
            if r == 1.0 { "none" } else { "3,3" },
            bottom + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}
