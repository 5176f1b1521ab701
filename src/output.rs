//! Human-readable formatting helpers.

/// Bytes as KiB/MiB/GiB.
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

/// Prints a serialisable value as one line of JSON.
pub fn json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    stdout(format_args!("{}\n", serde_json::to_string(value)?));
    Ok(())
}

/// Writes to stdout. A reader that went away (`velo ls | head -1`) ends velo quietly, with
/// success, as other command-line tools do; any other failure to write (a full disk) ends it
/// with an error. (`println!` panics in both cases.)
pub fn stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("velo: error: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}
