//! Progress of a long command (`replay`, `import`, `backfill`, `reconcile --all`,
//! `dlq retry`) for the person or the log that watches it, on standard error.
//!
//! On a terminal it is an indicatif bar with the rate and the time left (a spinner with
//! the rate when the total is unknown, as in a backfill: Stripe gives no count). Anywhere
//! else (a pipe, a file, a CI log, journald) a bar's carriage returns and escape codes
//! are noise, so it prints a plain line instead: one when the work starts, then at most
//! one every `every` (default a few seconds, `SUBLEDGER_PROGRESS_SECS`), and one when it
//! ends, each with the count, the rate and, when the total is known, the share done and
//! the time left.
//!
//! It must never write to standard output (commands print their results there, for
//! scripts) and never decide anything: it only shows counts a caller hands it.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{HumanDuration, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// One long piece of work being shown.
pub struct Progress {
    label: String,
    unit: &'static str,
    total: Option<u64>,
    position: u64,
    detail: String,
    started: Instant,
    shown: Show,
}

enum Show {
    Bar(ProgressBar),
    Lines {
        every: Duration,
        printed: Instant,
        /// The last line printed, so the closing one never repeats it.
        last: String,
    },
}

impl Progress {
    /// A bar when standard error is a terminal, plain lines every `every` otherwise.
    pub fn new(label: &str, unit: &'static str, total: Option<u64>, every: Duration) -> Self {
        Self::since(label, unit, total, every, Instant::now())
    }

    /// [`Progress::new`] for work that began at `started`, shown only once it has been
    /// going a while: the rate and the time left count from `started`.
    pub fn since(
        label: &str,
        unit: &'static str,
        total: Option<u64>,
        every: Duration,
        started: Instant,
    ) -> Self {
        if std::io::stderr().is_terminal() {
            let mut progress = Self::bar(label, unit, total);
            progress.started = started;
            if let Show::Bar(bar) = progress.shown {
                progress.shown = Show::Bar(bar.with_elapsed(started.elapsed()));
            }
            progress
        } else {
            Self::lines_since(label, unit, total, every, started)
        }
    }

    /// Plain lines, whatever standard error is.
    pub fn lines(label: &str, unit: &'static str, total: Option<u64>, every: Duration) -> Self {
        Self::lines_since(label, unit, total, every, Instant::now())
    }

    fn lines_since(
        label: &str,
        unit: &'static str,
        total: Option<u64>,
        every: Duration,
        started: Instant,
    ) -> Self {
        let mut progress = Self::with(
            label,
            unit,
            total,
            Show::Lines {
                every,
                printed: Instant::now(),
                last: String::new(),
            },
        );
        progress.started = started;
        progress.print_line();
        progress
    }

    fn bar(label: &str, unit: &'static str, total: Option<u64>) -> Self {
        let bar = match total {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        let template = match total {
            Some(_) => format!(
                "{{prefix}} [{{elapsed_precise}}] [{{wide_bar}}] {{human_pos}}/{{human_len}} {unit} {{per_sec}} ETA {{eta}} {{msg}}"
            ),
            None => format!(
                "{{spinner}} {{prefix}} [{{elapsed_precise}}] {{human_pos}} {unit} {{per_sec}} {{msg}}"
            ),
        };
        bar.set_style(
            ProgressStyle::with_template(&template)
                .expect("the templates are fixed and valid")
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_owned());
        if total.is_none() {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
        Self::with(label, unit, total, Show::Bar(bar))
    }

    fn with(label: &str, unit: &'static str, total: Option<u64>, shown: Show) -> Self {
        Self {
            label: label.to_owned(),
            unit,
            total,
            position: 0,
            detail: String::new(),
            started: Instant::now(),
            shown,
        }
    }

    /// The total, when it is known.
    pub fn total(&self) -> Option<u64> {
        self.total
    }

    /// The total once it is known (or known better).
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        if let Show::Bar(bar) = &self.shown {
            bar.set_length(total);
        }
    }

    /// How much is done so far.
    pub fn set_position(&mut self, position: u64) {
        self.position = position;
        match &mut self.shown {
            Show::Bar(bar) => bar.set_position(position),
            Show::Lines { every, printed, .. } => {
                if printed.elapsed() >= *every {
                    *printed = Instant::now();
                    self.print_line();
                }
            }
        }
    }

    pub fn inc(&mut self, by: u64) {
        self.set_position(self.position + by);
    }

    /// Words after the counts (other counters, what is being worked on).
    pub fn set_detail(&mut self, detail: impl Into<String>) {
        self.detail = detail.into();
        if let Show::Bar(bar) = &self.shown {
            bar.set_message(self.detail.clone());
        }
    }

    /// A line of its own (a failure worth seeing), above the bar on a terminal.
    pub fn println(&self, line: &str) {
        match &self.shown {
            Show::Bar(bar) => bar.println(line),
            Show::Lines { .. } => eprintln!("{line}"),
        }
    }

    /// Ends the display: the bar is cleared, or a last line says what was done.
    pub fn finish(mut self) {
        match &self.shown {
            Show::Bar(bar) => bar.finish_and_clear(),
            Show::Lines { .. } => self.print_line(),
        }
    }

    /// Prints the current line unless it is the one printed last.
    fn print_line(&mut self) {
        let line = self.line();
        if let Show::Lines { last, .. } = &mut self.shown {
            if *last != line {
                eprintln!("{line}");
                *last = line;
            }
        }
    }

    /// `replay: 1200/5000 events (24%), 350/s, about 11 seconds left, redis_cache`.
    fn line(&self) -> String {
        let mut line = format!("{}: {}", self.label, self.position);
        let elapsed = self.started.elapsed();
        let rate = self.position as f64 / elapsed.as_secs_f64().max(0.001);
        match self.total {
            Some(total) => {
                let percent = (self.position.min(total) * 100)
                    .checked_div(total)
                    .unwrap_or(100);
                let _ = write!(line, "/{total} {} ({percent}%)", self.unit);
                if self.position > 0 {
                    let _ = write!(line, ", {rate:.0}/s");
                    if self.position < total {
                        let left = (total - self.position) as f64 / rate;
                        let _ = write!(
                            line,
                            ", about {} left",
                            HumanDuration(Duration::from_secs_f64(left.min(1e7)))
                        );
                    }
                }
            }
            None => {
                let _ = write!(line, " {}", self.unit);
                if self.position > 0 {
                    let _ = write!(line, ", {rate:.0}/s");
                }
            }
        }
        let _ = write!(line, ", {} elapsed", HumanDuration(elapsed));
        if !self.detail.is_empty() {
            let _ = write!(line, ", {}", self.detail);
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_count_share_rate_and_time_left() {
        let mut progress = Progress::lines("replay", "events", Some(10), Duration::MAX);
        progress.position = 5;
        let line = progress.line();
        assert!(line.starts_with("replay: 5/10 events (50%), "), "{line}");
        assert!(
            line.contains("/s, about ") && line.contains(" left"),
            "{line}"
        );
        progress.position = 10;
        assert!(!progress.line().contains("left"), "{}", progress.line());
        progress.set_detail("3 pages");
        assert!(
            progress.line().ends_with(", 3 pages"),
            "{}",
            progress.line()
        );
    }

    #[test]
    fn the_bar_templates_are_valid() {
        for total in [Some(3), None] {
            let mut progress = Progress::bar("replay", "events", total);
            progress.set_position(2);
            progress.set_detail("redis_cache");
            progress.finish();
        }
    }

    #[test]
    fn without_a_total_a_line_says_count_and_rate() {
        let mut progress = Progress::lines("backfill", "subscriptions", None, Duration::MAX);
        assert!(progress.line().starts_with("backfill: 0 subscriptions, "));
        progress.position = 7;
        assert!(progress.line().starts_with("backfill: 7 subscriptions, "));
        assert!(progress.line().contains("/s"), "{}", progress.line());
    }
}
