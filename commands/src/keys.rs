//! Where a command's keys are, by its row (first, last, step).

use crate::CommandSpec;

impl CommandSpec {
    /// The keys of a command; commands whose keys move (`EVAL`, `XREAD` …) give none.
    pub fn keys<'a>(&self, argv: &[&'a [u8]]) -> Vec<&'a [u8]> {
        if self.first_key <= 0 || self.step <= 0 {
            return Vec::new();
        }
        let last = if self.last_key < 0 { argv.len() as i32 + self.last_key } else { self.last_key };
        (self.first_key..=last.min(argv.len() as i32 - 1))
            .step_by(self.step as usize)
            .map(|i| argv[i as usize])
            .collect()
    }
}
