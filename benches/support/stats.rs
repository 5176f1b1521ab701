//! Timing series, their medians, and the printed tables, ratio lines and verdict lines.
//!
//! Shared by the benchmarks (each loads it with `#[path = "support/stats.rs"]`).

use std::time::Duration;

/// The timings of one operation, in seconds.
#[derive(Debug, Clone)]
pub struct Series {
    /// What was timed, as printed.
    pub label: String,
    runs: Vec<f64>,
}

impl Series {
    /// An empty series.
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            runs: Vec::new(),
        }
    }

    /// Adds one run.
    pub fn push(&mut self, d: Duration) {
        self.runs.push(d.as_secs_f64());
    }

    /// Adds one run given in milliseconds.
    pub fn push_ms(&mut self, ms: f64) {
        self.runs.push(ms / 1e3);
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.runs.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// Median in seconds (mean of the middle two for an even count; NaN if empty).
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// Fastest run in seconds.
    pub fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }

    /// Slowest run in seconds.
    pub fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
}

/// Seconds in a readable unit: µs, ms or s.
pub fn human(secs: f64) -> String {
    if secs < 1e-3 {
        format!("{:.1} µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.2} ms", secs * 1e3)
    } else {
        format!("{secs:.2} s")
    }
}

// Sizes print as velo prints them: its own helper, not a copy.
#[path = "../../src/output.rs"]
mod output;
#[allow(unused_imports)] // not every benchmark prints sizes
pub use output::bytes;

/// Prints the table of medians (and min/max) of every series.
pub fn print_table(series: &[&Series]) {
    let width = series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0)
        .max("operation".len());
    println!(
        "  {:<width$}  {:>4}  {:>10}  {:>10}  {:>10}",
        "operation", "runs", "median", "min", "max"
    );
    for s in series {
        println!(
            "  {:<width$}  {:>4}  {:>10}  {:>10}  {:>10}",
            s.label,
            s.len(),
            human(s.median()),
            human(s.min()),
            human(s.max())
        );
    }
}

/// A ratio of two medians, optionally held to a target (`value ≤ target`).
#[derive(Debug, Clone)]
pub struct Ratio {
    /// What is divided by what.
    pub label: String,
    /// The ratio.
    pub value: f64,
    /// The highest acceptable value, if there is a target.
    pub target: Option<f64>,
    /// Extra words printed after the figure.
    pub note: String,
}

impl Ratio {
    /// `num / den` held to `value ≤ target`.
    pub fn target(label: &str, num: f64, den: f64, target: f64) -> Self {
        Self {
            label: label.to_owned(),
            value: num / den,
            target: Some(target),
            note: String::new(),
        }
    }

    /// `num / den`, for information.
    pub fn info(label: &str, num: f64, den: f64, note: &str) -> Self {
        Self {
            label: label.to_owned(),
            value: num / den,
            target: None,
            note: note.to_owned(),
        }
    }

    /// "PASS"/"MISS" against the target, or "info".
    pub fn verdict(&self) -> &'static str {
        match self.target {
            Some(t) if self.value <= t => "PASS",
            Some(_) => "MISS",
            None => "info",
        }
    }
}

/// Prints ratio lines: figure, target, verdict.
pub fn print_ratios(ratios: &[Ratio]) {
    let width = ratios
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    for r in ratios {
        let target = r
            .target
            .map(|t| format!("target ≤ {t}×"))
            .unwrap_or_default();
        println!(
            "  {:<width$}  {:>9}  {:<12}  {}{}",
            r.label,
            format!("{:.3}×", r.value),
            target,
            r.verdict(),
            note(&r.note)
        );
    }
}

/// A figure held to a target, printed with PASS/MISS (or "info" without a target).
#[derive(Debug, Clone)]
pub struct Verdict {
    /// What the figure is.
    pub label: String,
    /// The figure as printed (`"63.2× faster"`, `"+4.1%"`).
    pub figure: String,
    /// The target as printed, if there is one.
    pub target: Option<String>,
    /// Whether the target is met (ignored without a target).
    pub pass: bool,
    /// Extra words.
    pub note: String,
}

impl Verdict {
    /// `peer / velo` as "N× faster", held to `≥ target`.
    pub fn speedup(label: &str, velo: f64, peer: f64, target: f64, note: &str) -> Self {
        let x = peer / velo;
        Self {
            label: label.to_owned(),
            figure: format!("{x:.1}× faster"),
            target: Some(format!("≥ {target}×")),
            pass: x >= target,
            note: note.to_owned(),
        }
    }

    /// `mount / local − 1` as a signed percentage, held to `≤ target` percent.
    pub fn overhead(label: &str, mount: f64, local: f64, target: f64, note: &str) -> Self {
        let pct = (mount / local - 1.0) * 100.0;
        Self {
            label: label.to_owned(),
            figure: format!("{pct:+.1}%"),
            target: Some(format!("≤ +{target}%")),
            pass: pct <= target,
            note: note.to_owned(),
        }
    }

    /// `value − base` in milliseconds (both in seconds), held to `≤ target_ms`.
    pub fn extra_ms(label: &str, value: f64, base: f64, target_ms: f64, note: &str) -> Self {
        let ms = (value - base) * 1e3;
        Self {
            label: label.to_owned(),
            figure: format!("{ms:+.2} ms"),
            target: Some(format!("≤ +{target_ms} ms")),
            pass: ms <= target_ms,
            note: note.to_owned(),
        }
    }

    /// `value / base` as "N×", held to `≤ target`.
    pub fn ratio(label: &str, value: f64, base: f64, target: f64, note: &str) -> Self {
        let x = value / base;
        Self {
            label: label.to_owned(),
            figure: format!("{x:.2}×"),
            target: Some(format!("≤ {target}×")),
            pass: x <= target,
            note: note.to_owned(),
        }
    }

    /// `mount / local − 1` as a signed percentage, for information.
    pub fn info_overhead(label: &str, mount: f64, local: f64, note: &str) -> Self {
        let pct = (mount / local - 1.0) * 100.0;
        Self {
            label: label.to_owned(),
            figure: format!("{pct:+.1}%"),
            target: None,
            pass: true,
            note: note.to_owned(),
        }
    }

    /// "PASS"/"MISS" against the target, or "info".
    pub fn word(&self) -> &'static str {
        match (&self.target, self.pass) {
            (None, _) => "info",
            (Some(_), true) => "PASS",
            (Some(_), false) => "MISS",
        }
    }
}

/// Prints verdict lines: figure, target, PASS/MISS, note.
pub fn print_verdicts(verdicts: &[Verdict]) {
    let width = verdicts
        .iter()
        .map(|v| v.label.chars().count())
        .max()
        .unwrap_or(0);
    for v in verdicts {
        println!(
            "  {:<width$}  {:>14}  {:<10}  {}{}",
            v.label,
            v.figure,
            v.target.as_deref().unwrap_or(""),
            v.word(),
            note(&v.note)
        );
    }
}

/// `"  (NOTE)"`, or nothing for an empty note.
fn note(note: &str) -> String {
    if note.is_empty() {
        String::new()
    } else {
        format!("  ({note})")
    }
}
