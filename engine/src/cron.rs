//! Valkey's cron and nodes with many databases.
//!
//! Every cron tick (`hz` a second) Valkey's active expiry looks for 16 databases holding keys
//! with a TTL, and then for 16 holding hash fields with a TTL, walking the databases in turn
//! from where the last tick stopped. When few databases hold any, each walk goes through
//! every database ever selected, and the node answers nobody meanwhile. That cost 0.05–2.4 µs
//! per database on the test VM (it varied that much over a day): on an idle Valkey 9.1 with
//! 100,000 selected, empty databases, 10–28% of a core at `hz 10`, walks of 10–240 ms.
//!
//! Two things keep the walks short:
//! - **Anchors.** Every [`ANCHOR_SPACING`]th database of a node is the platform's (no cache is
//!   placed there), and on a shared standalone node holds a key and a hash field that expire
//!   in about a century, so a walk finds its 16 within 16 × [`ANCHOR_SPACING`] databases
//!   (1,024), whatever the node's size. Same idle node, measured side by side: 18–21% of a
//!   core and PING p99 23–28 ms at `hz 10` without anchors; 4.1–4.4% and 1.6–2.0 ms with
//!   anchors every 64 databases; 7.1% and 7.1 ms every 256; 11.8% and 15.6 ms every 1,024.
//!   Sparser anchors do not hold up: a walk that runs past Valkey's time limit for one tick
//!   (25 ms at `hz 10`) makes the next tick walk every database.
//! - **A lower `hz`** where the databases would still make an unanchored walk take over
//!   about 1% of the node's time ([`cron_hz`]): a cluster pool's nodes have no anchors
//!   (their keys belong to slots), and a node full of memory may have evicted them (least
//!   recently used among keys with a TTL) until they are written again. With anchors, `hz 1`
//!   took 1.4% of a core, PING at most 7.6 ms (102 ms without).

/// Every this many databases, one is an anchor (64, 128, …): 1.6% of a node's databases.
pub const ANCHOR_SPACING: u32 = 64;

/// The anchors' key and hash: never in a cache's database.
const ANCHOR_KEY: &str = "shoal:cron-anchor";
const ANCHOR_HASH: &str = "shoal:cron-anchor-fields";

/// About a century, in seconds: the anchors never expire in practice.
const ANCHOR_TTL_SECS: &str = "3000000000";

/// Databases Valkey's cron may walk per second when nothing shortens its walks.
const CRON_DATABASES_PER_SECOND: u32 = 80_000;

/// The node's `hz`: Valkey's default, 10, unless its databases would make the cron's walk
/// take more than about 1% of the node's time ([`CRON_DATABASES_PER_SECOND`]); at least 1.
pub fn cron_hz(databases: u32) -> u32 {
    (CRON_DATABASES_PER_SECOND / databases.max(1)).clamp(1, 10)
}

/// Whether database `db` is an anchor (never a cache's).
pub fn is_anchor(db: u32) -> bool {
    db > 0 && db.is_multiple_of(ANCHOR_SPACING)
}

/// The anchors of a node with `databases` databases.
pub fn anchors(databases: u32) -> impl Iterator<Item = u32> {
    (ANCHOR_SPACING..databases).step_by(ANCHOR_SPACING as usize)
}

/// How many databases a node needs for `usable` databases of caches: database 0 and the
/// anchors are the platform's.
pub fn databases_for(usable: u32) -> u32 {
    let mut databases = usable.saturating_add(1);
    while databases - 1 - (databases - 1) / ANCHOR_SPACING < usable && databases < u32::MAX {
        databases += 1;
    }
    databases
}

/// Writes the anchors that are missing (each command does nothing where they exist, so
/// nothing reaches the AOF then), ending in database 0.
pub fn anchor_pipeline(databases: u32) -> Option<redis::Pipeline> {
    let mut pipe = redis::pipe();
    let mut any = false;
    for db in anchors(databases) {
        any = true;
        pipe.cmd("SELECT").arg(db).ignore();
        pipe.cmd("SET").arg(ANCHOR_KEY).arg(1).arg("EX").arg(ANCHOR_TTL_SECS).arg("NX").ignore();
        pipe.cmd("HSETNX").arg(ANCHOR_HASH).arg("f").arg(1).ignore();
        pipe.cmd("HEXPIRE")
            .arg(ANCHOR_HASH)
            .arg(ANCHOR_TTL_SECS)
            .arg("NX")
            .arg("FIELDS")
            .arg(1)
            .arg("f")
            .ignore();
    }
    pipe.cmd("SELECT").arg(0).ignore();
    any.then_some(pipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_with_many_databases_run_their_cron_less_often() {
        assert_eq!(cron_hz(16), 10, "Valkey's default");
        assert_eq!(cron_hz(1024), 10, "shoal dev's default");
        assert_eq!(cron_hz(8_000), 10);
        assert_eq!(cron_hz(16_000), 5);
        assert_eq!(cron_hz(100_001), 1, "never below 1");
        assert_eq!(cron_hz(0), 10);
    }

    #[test]
    fn anchors_are_every_64th_database_but_0() {
        assert_eq!(anchors(64).count(), 0, "the tests' nodes have none");
        assert_eq!(anchors(65).collect::<Vec<_>>(), vec![64]);
        assert_eq!(anchors(1024).count(), 15, "shoal dev's default");
        assert_eq!(anchors(100_001).count(), 1562);
        assert!(anchors(100_001).all(is_anchor));
        assert!(!is_anchor(0) && !is_anchor(1) && !is_anchor(63) && is_anchor(128));
        assert!(anchor_pipeline(64).is_none());
        assert_eq!(databases_for(63), 64);
        assert_eq!(databases_for(64), 66, "database 64 is an anchor");
        assert_eq!(databases_for(100_000), 101_588);
        for usable in [0, 1, 63, 64, 1023, 5000, 100_000] {
            let n = databases_for(usable);
            assert_eq!((1..n).filter(|&db| !is_anchor(db)).count() as u32, usable, "{usable}");
        }
    }
}
