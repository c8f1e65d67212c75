//! The progress bar: events processed and their rate on stderr when stderr is a terminal, and
//! nothing at all when it is piped or redirected (a log file is no place for redraws).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// A bar for `what` (a verb like "exported"), with a known maximum when the id range gives one.
pub fn bar(what: &str, len: Option<u64>) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(len) => ProgressBar::new(len).with_style(
            ProgressStyle::with_template(
                "{spinner} {msg} {pos}/{len} events [{bar:30}] {rate} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key("rate", rate)
            .progress_chars("=> "),
        ),
        None => ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {msg} {pos} events, {rate}, {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner())
                .with_key("rate", rate),
        ),
    };
    bar.set_message(what.to_owned());
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Events per second, whole (indicatif's own `{per_sec}` prints four decimals).
fn rate(state: &ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = write!(w, "{:.0} events/s", state.per_sec());
}
