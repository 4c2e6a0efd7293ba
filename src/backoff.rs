//! Pauses between attempts to reach Postgres again after losing it (relay leadership, the vault's
//! erasure listener): doubling from 100 ms, at most 1 s. An attempt a second costs nothing, and
//! the service uses Postgres again within a second of it being back.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(100);
const MOST: Duration = Duration::from_secs(1);

pub struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(FIRST)
    }
}

impl Backoff {
    /// No attempt has failed since the last success (or ever).
    pub fn is_first(&self) -> bool {
        self.0 == FIRST
    }

    /// The pause before the next attempt; the one after it doubles, up to a second.
    pub fn next_pause(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(MOST);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_a_second() {
        let mut b = Backoff::default();
        assert!(b.is_first());
        let pauses: Vec<u64> = (0..6).map(|_| b.next_pause().as_millis() as u64).collect();
        assert_eq!(pauses, [100, 200, 400, 800, 1000, 1000]);
        assert!(!b.is_first());
    }
}
