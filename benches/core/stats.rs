//! Timing series, their medians, and the printed table and ratio lines.

use std::time::Duration;

/// The timings of one operation.
#[derive(Debug, Clone)]
pub struct Series {
    /// What was timed, as printed.
    pub label: String,
    runs: Vec<Duration>,
}

impl Series {
    /// An empty series.
    pub fn new(label: &str) -> Self {
        Self {
            label: label.to_owned(),
            runs: Vec::new(),
        }
    }

    /// Adds one run.
    pub fn push(&mut self, d: Duration) {
        self.runs.push(d);
    }

    /// Number of runs.
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.runs.iter().map(Duration::as_secs_f64).collect();
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

/// Bytes in a readable binary unit.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Prints the table of medians (and min/max) of every series.
pub fn print_table(series: &[&Series]) {
    let width = series
        .iter()
        .map(|s| s.label.chars().count())
        .max()
        .unwrap_or(0);
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
            if r.note.is_empty() {
                String::new()
            } else {
                format!("  ({})", r.note)
            }
        );
    }
}
