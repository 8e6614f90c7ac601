//! How many failed password checks each gateway may ask the control plane for a minute.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Failed password checks per gateway credential in the current minute: a gateway (or
/// whoever holds its credential) that names a new source for every guess still gets only
/// `per_minute` wrong guesses a minute.
pub struct FailureBudget {
    per_minute: u32,
    spent: HashMap<String, (Instant, u32)>,
}

const MINUTE: Duration = Duration::from_secs(60);

impl FailureBudget {
    pub fn new(per_minute: u32) -> Self {
        FailureBudget { per_minute, spent: HashMap::new() }
    }

    /// None while `gateway` may ask; else how long until it may again.
    pub fn exhausted(&self, gateway: &str, now: Instant) -> Option<Duration> {
        let (start, spent) = self.spent.get(gateway)?;
        let left = MINUTE.saturating_sub(now.saturating_duration_since(*start));
        (!left.is_zero() && self.per_minute > 0 && *spent >= self.per_minute).then_some(left)
    }

    /// Counts one failed check by `gateway`.
    pub fn spend(&mut self, gateway: &str, now: Instant) {
        let entry = self.spent.entry(gateway.to_owned()).or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= MINUTE {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateways_failed_checks_are_bounded_per_minute_whatever_the_source() {
        let mut budget = FailureBudget::new(3);
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(budget.exhausted("edge", t0), None, "check {i}");
            budget.spend("edge", t0);
        }
        let wait = budget.exhausted("edge", t0 + Duration::from_secs(10)).expect("spent");
        assert_eq!(wait, Duration::from_secs(50));
        assert_eq!(budget.exhausted("other", t0), None, "per gateway");
        // A new minute, a new budget.
        assert_eq!(budget.exhausted("edge", t0 + MINUTE), None);
        budget.spend("edge", t0 + MINUTE);
        assert_eq!(budget.exhausted("edge", t0 + MINUTE), None);
        // 0: no bound.
        let mut open = FailureBudget::new(0);
        for _ in 0..100 {
            open.spend("edge", t0);
        }
        assert_eq!(open.exhausted("edge", t0), None);
    }
}
