//! Download progress on stderr: a bar with bytes, rate and time left on a terminal
//! (`indicatif`), a plain line every tenth of the way when stderr is a file or a pipe.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    label: String,
    total: u64,
    bar: Option<ProgressBar>,
    start: Instant,
    /// Tenths already reported as plain lines.
    reported: u64,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: u64) -> Self {
        let label = label.into();
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total);
            if let Ok(style) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, {eta} left",
            ) {
                b.set_style(style.progress_chars("=> "));
            }
            b.set_message(label.clone());
            b
        });
        Self {
            label,
            total,
            bar,
            start: Instant::now(),
            reported: 0,
        }
    }

    /// `done` bytes of `total` so far.
    pub fn set(&mut self, done: u64) {
        if let Some(b) = &self.bar {
            b.set_position(done);
            return;
        }
        let tenth = (done * 10).checked_div(self.total).unwrap_or(10).min(10);
        if tenth > self.reported {
            self.reported = tenth;
            let secs = self.start.elapsed().as_secs_f64().max(1e-3);
            eprintln!(
                "{}: {:.1} of {:.1} MB ({:.1} MB/s)",
                self.label,
                done as f64 / 1e6,
                self.total as f64 / 1e6,
                done as f64 / 1e6 / secs
            );
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish_and_clear();
        }
    }
}
