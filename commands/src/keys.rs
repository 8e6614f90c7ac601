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

impl CommandSpec {
    /// Every key a command names, those of commands whose keys move (`movablekeys`:
    /// `EVAL`, `XREAD`, `ZUNIONSTORE` …) included: what a cluster routes it by. Channels of
    /// sharded pub/sub count as keys. Malformed commands give what could be found (the node
    /// answers them with its own error).
    pub fn routing_keys<'a>(&self, argv: &[&'a [u8]]) -> Vec<&'a [u8]> {
        if !self.has_flag("movablekeys") {
            return self.keys(argv);
        }
        let numkeys =
            |at: usize| -> Option<usize> { std::str::from_utf8(argv.get(at)?).ok()?.parse::<usize>().ok() };
        let counted = |at: usize, stride: usize| -> Vec<&'a [u8]> {
            let n = numkeys(at).unwrap_or(0);
            argv.iter().skip(at + 1).step_by(stride).take(n).copied().collect()
        };
        let after = |word: &[u8]| argv.iter().position(|a| a.eq_ignore_ascii_case(word));
        match self.name.as_str() {
            "eval" | "eval_ro" | "evalsha" | "evalsha_ro" | "fcall" | "fcall_ro" => counted(2, 1),
            "sintercard" | "zdiff" | "zinter" | "zintercard" | "zunion" | "lmpop" | "zmpop" => counted(1, 1),
            "blmpop" | "bzmpop" => counted(2, 1),
            "msetex" => counted(1, 2),
            "zdiffstore" | "zinterstore" | "zunionstore" => {
                let mut keys = vec![argv.get(1).copied().unwrap_or_default()];
                keys.extend(counted(2, 1));
                keys
            }
            "sort" | "sort_ro" | "georadius" | "georadiusbymember" => {
                let mut keys = self.keys(argv);
                for word in [&b"store"[..], b"storedist"] {
                    if let Some(dest) = after(word).and_then(|i| argv.get(i + 1)) {
                        keys.push(dest);
                    }
                }
                keys
            }
            "xread" | "xreadgroup" => match after(b"streams") {
                Some(i) => {
                    let rest = &argv[i + 1..];
                    rest[..rest.len() / 2].to_vec()
                }
                None => Vec::new(),
            },
            _ => self.keys(argv),
        }
    }
}
