//! `ledger replay rebuild`: the CLI over `ledger_replay::rebuild`, with a progress bar on a TTY
//! and a one-line summary per projection.

use indicatif::{ProgressBar, ProgressStyle};
use ledger_replay::rebuild::{rebuild, Progress, RebuildError, RebuildReport};
use sqlx::PgPool;
use std::io::IsTerminal;

/// Rebuilds `projections` one after the other (all of them for an empty list), printing each
/// one's summary to stdout. A bar is drawn on stderr only when it is a terminal.
pub async fn run(
    pool: &PgPool,
    projections: &[String],
) -> Result<Vec<RebuildReport>, RebuildError> {
    let mut names: Vec<&'static str> = Vec::new();
    for name in projections {
        let name = ledger_replay::rebuild::projection_named(name)?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.is_empty() {
        names = ledger_projections::PROJECTIONS.to_vec();
    }
    let tty = std::io::stderr().is_terminal();
    let mut reports = Vec::new();
    for name in names {
        let bar = if tty {
            ProgressBar::new(0).with_style(
                ProgressStyle::with_template(
                    "{prefix:>14} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
        } else {
            ProgressBar::hidden()
        };
        bar.set_prefix(name);
        let mut progress = {
            let bar = bar.clone();
            move |p: Progress| {
                bar.set_length(u64::try_from(p.head).unwrap_or(0));
                bar.set_position(u64::try_from(p.position).unwrap_or(0));
            }
        };
        let report = rebuild(pool, name, &mut progress).await;
        bar.finish_and_clear();
        let report = report?;
        println!("{}", report.summary());
        reports.push(report);
    }
    Ok(reports)
}
