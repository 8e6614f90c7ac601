//! The daily snapshot, as ElastiCache's snapshot window: a cache with a `snapshot_window`
//! ("HH:MM", UTC) gets one automatic snapshot a day, begun within the hour after that time,
//! and keeps its newest `snapshot_retention_limit` automatic snapshots; older ones are
//! deleted. Manual and final snapshots are kept until deleted. Run under the
//! snapshot-scheduler lease ([`crate::lease::SNAPSHOT_SCHEDULER`]): one control plane at a
//! time. It also fails snapshots left `creating` by a control plane that stopped.

use crate::routes::snapshots::{begin_snapshot, default_name, remove};
use crate::state::AppState;
use crate::store::audit::AuditEvent;
use crate::store::snapshots::{SnapshotKind, SnapshotStatus};
use crate::store::CacheRecord;
use std::sync::Arc;
use std::time::Duration;

/// How long after its start a window still begins a snapshot.
pub const WINDOW_MS: i64 = 3_600_000;
/// A snapshot `creating` for longer than this was left by a control plane that stopped.
const STALE_MS: i64 = 6 * 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// Most automatic snapshots a cache may keep (ElastiCache's limit).
pub const MAX_RETENTION: u32 = 35;

/// Checks every `interval` for caches whose window is open and snapshots to expire.
pub async fn run(state: Arc<AppState>, interval: Duration) {
    loop {
        if let Err(e) = tick(&state, super::now_ms()).await {
            tracing::warn!(error = %e, "snapshot schedule: will try again");
        }
        tokio::time::sleep(interval).await;
    }
}

/// A window's start as milliseconds after midnight UTC ("HH:MM").
pub fn parse_window(window: &str) -> Option<i64> {
    let (h, m) = window.split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    ((0..24).contains(&h) && (0..60).contains(&m)).then_some((h * 60 + m) * 60_000)
}

/// The start of the window that is open at `now_ms`, if one is.
pub fn open_window(window: &str, now_ms: i64) -> Option<i64> {
    let offset = parse_window(window)?;
    let midnight = now_ms - now_ms.rem_euclid(DAY_MS);
    // Today's window, or yesterday's when it runs past midnight.
    [midnight + offset, midnight - DAY_MS + offset]
        .into_iter()
        .find(|&start| (start..start + WINDOW_MS).contains(&now_ms))
}

/// One round: stale snapshots failed, due snapshots taken, expired ones deleted.
pub async fn tick(state: &AppState, now_ms: i64) -> Result<(), String> {
    state.store.fail_stale_snapshots(now_ms - STALE_MS, now_ms).await.map_err(|e| e.to_string())?;
    for cache in state.store.caches_with_snapshot_window().await.map_err(|e| e.to_string())? {
        let automatic: Vec<_> = state
            .store
            .snapshots(None, Some(&cache.id))
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|s| s.kind == SnapshotKind::Automatic)
            .collect();
        if let Some(start) = open_window(&cache.snapshot_window, now_ms) {
            if !automatic.iter().any(|s| s.created_at_ms >= start) {
                take_automatic(state, &cache).await;
            }
        }
        let keep = cache.snapshot_retention.max(1) as usize;
        let done: Vec<_> = automatic.iter().filter(|s| s.status != SnapshotStatus::Creating).collect();
        for old in done.iter().skip(keep) {
            let mut event = scheduler_event(&cache, "snapshot.delete", &old.id);
            event.details = serde_json::json!({ "name": old.name, "reason": "retention" });
            if let Err(e) = remove(state, old, &event).await {
                tracing::warn!(snapshot = %old.id, error = %e, "could not expire a snapshot");
            }
        }
    }
    Ok(())
}

async fn take_automatic(state: &AppState, cache: &CacheRecord) {
    let event = scheduler_event(cache, "snapshot.create", cache.id.as_str());
    let name = default_name(cache, SnapshotKind::Automatic);
    match begin_snapshot(state, cache, name, SnapshotKind::Automatic, event).await {
        Ok(mut record) => {
            let _ = super::take(state, cache, &mut record).await;
        }
        Err(e) => tracing::warn!(cache = %cache.id, error = %e, "could not begin a daily snapshot"),
    }
}

fn scheduler_event(cache: &CacheRecord, action: &str, target: &str) -> AuditEvent {
    AuditEvent {
        actor: "snapshot-schedule".into(),
        account_id: Some(cache.account_id.to_string()),
        source: "control-plane".into(),
        action: action.into(),
        target: target.into(),
        cache_id: Some(cache.id.to_string()),
        outcome: "success".into(),
        details: serde_json::json!({}),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_open_for_an_hour_from_their_start_across_midnight_too() {
        let day = 20_000 * DAY_MS;
        assert_eq!(parse_window("05:30"), Some(19_800_000));
        for bad in ["5:30", "24:00", "05:60", "", "05-30", "ab:cd"] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
        assert_eq!(open_window("05:30", day + 19_800_000), Some(day + 19_800_000));
        assert_eq!(open_window("05:30", day + 19_800_000 + WINDOW_MS - 1), Some(day + 19_800_000));
        assert_eq!(open_window("05:30", day + 19_800_000 + WINDOW_MS), None);
        assert_eq!(open_window("05:30", day + 19_800_000 - 1), None);
        let late = 23 * 3_600_000 + 30 * 60_000;
        assert_eq!(
            open_window("23:30", day + DAY_MS + 60_000),
            Some(day + late),
            "yesterday's window, past midnight"
        );
    }
}
