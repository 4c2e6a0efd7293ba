//! Logging: `RUST_LOG` filters (default `info`); JSON lines when `LEDGER_LOG_FORMAT=json`.
//!
//! Nothing logged carries personal data, tokens or keys: handlers log ids and outcomes only, and
//! request spans name the route template, never the raw path or query string.

use std::io::IsTerminal;
use tracing_subscriber::{fmt, EnvFilter};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LEDGER_LOG_FORMAT").is_ok_and(|v| v == "json");
    // Colours only on a terminal: logs sent to a file or a collector stay plain text.
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
