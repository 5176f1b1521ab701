//! A progress bar for snapshots of large trees (stderr, only on a terminal, not with --json/-q).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Snapshot progress shown with indicatif.
pub struct Bar {
    bar: Option<ProgressBar>,
}

impl Bar {
    /// A bar, or nothing if output is not for a person.
    pub fn new(enabled: bool) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_message("scanning");
            b
        });
        Self { bar }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl velo_image::Progress for Bar {
    fn scanned(&self, entries: u64) {
        if let Some(b) = &self.bar {
            b.set_message(format!("scanning: {entries} entries"));
            b.tick();
        }
    }

    fn storing(&self, _files: u64, bytes: u64) {
        if let Some(b) = &self.bar {
            b.set_length(bytes);
            b.set_position(0);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message("storing");
        }
    }

    fn stored(&self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
}
