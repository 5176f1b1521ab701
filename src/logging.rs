//! Where velo's log lines go: stderr.
//!
//! By default (warnings and errors only) a few lines of subscriber do: they cost nothing at
//! start-up, which `velo run` pays on every command it wraps (tracing-subscriber's formatter
//! costs ~25 µs to set up here). `-v`, `-vv` and `VELO_LOG` (a filter like `debug` or
//! `velo_mount=debug`) switch to tracing-subscriber's.

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::filter::LevelFilter;

/// Installs the global subscriber for `-q` (`quiet`) and `-v` × `verbose`.
pub fn init(quiet: bool, verbose: u8) {
    let level = match (quiet, verbose) {
        (true, _) => LevelFilter::ERROR,
        (false, 0) => LevelFilter::WARN,
        (false, 1) => LevelFilter::INFO,
        (false, _) => LevelFilter::DEBUG,
    };
    let spec = std::env::var("VELO_LOG").ok();
    if spec.is_none() && level <= LevelFilter::WARN {
        let max = if quiet { Level::ERROR } else { Level::WARN };
        let _ = tracing::subscriber::set_global_default(Plain {
            max,
            out: |line| eprintln!("{line}"),
        });
        return;
    }
    let filter = spec
        .and_then(|s| tracing_subscriber::EnvFilter::try_new(s).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(level.to_string()));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .init();
}

/// Prints events at `max` and above as `velo: warning: …` / `velo: error: …`.
struct Plain {
    max: Level,
    out: fn(String),
}

impl Subscriber for Plain {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(LevelFilter::from_level(self.max))
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1) // spans carry nothing at these levels
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut text = Message(String::new());
        event.record(&mut text);
        let what = if *event.metadata().level() == Level::ERROR {
            "error"
        } else {
            "warning"
        };
        (self.out)(format!("velo: {what}: {}", text.0));
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// An event's message and fields as one line.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let sep = if self.0.is_empty() { "" } else { " " };
        let _ = if field.name() == "message" {
            write!(self.0, "{sep}{value:?}")
        } else {
            write!(self.0, "{sep}{}={value:?}", field.name())
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        static LINES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    #[test]
    fn plain_prints_warnings_and_errors_with_their_fields_and_nothing_else() {
        let plain = Plain {
            max: Level::WARN,
            out: |line| LINES.with(|l| l.borrow_mut().push(line)),
        };
        tracing::subscriber::with_default(plain, || {
            tracing::info!("not shown");
            tracing::warn!(path = "/s/x", "could not remove {}", "x");
            tracing::error!("broken");
        });
        let lines = LINES.with(|l| l.borrow().clone());
        assert_eq!(
            lines,
            [
                "velo: warning: could not remove x path=\"/s/x\"",
                "velo: error: broken"
            ]
        );
    }
}
