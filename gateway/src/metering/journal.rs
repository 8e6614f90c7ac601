//! The usage journal: what sessions metered and no batch holds yet, in memory-mapped
//! files under `<data_dir>/usage/journal/`, so a gateway killed with SIGKILL loses none of
//! it: pages written to a shared file mapping outlive the process, and the next start sends
//! them. (A crash of the host itself can still lose what the kernel had not written back.)
//!
//! Each session has a [`Slot`] for its cache and the current minute. Its `total` counters
//! only grow, and only the session writes them; `taken` says how much of them batches hold
//! already. Every second the batcher ([`Journal::take`], then [`Journal::commit`]):
//! 1. copies each slot's `total` to its `taking`, and writes the batch's seq in the head;
//! 2. has the batch (the sums of `taking - taken`) written to the spool;
//! 3. sets `taken = taking`, frees the slots of ended sessions, and clears the head.
//!
//! A start after a kill ends an unfinished step 3 if the head's batch reached the spool,
//! and undoes it if not; then it seals every slot (their sessions are gone), and the first
//! batch takes what they hold. So every counted command is in exactly one batch.
//!
//! Without a data dir the same slots live in anonymous memory.

use memmap2::{MmapMut, MmapOptions};
use shoal_types::{CacheId, UsageCounters};
use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

const COUNTERS: usize = UsageCounters::NAMES.len();
/// Slots per segment file (256 bytes each: 1 MiB a segment).
const SEGMENT_SLOTS: usize = 4096;
const CACHE_BYTES: usize = 32;

const FREE: u32 = 0;
const LIVE: u32 = 1;
const SEALED: u32 = 2;

/// One session's counters of one cache and minute, as laid out in the file.
#[repr(C, align(256))]
struct SlotData {
    state: AtomicU32,
    cache_len: AtomicU32,
    minute: AtomicI64,
    cache: [AtomicU64; CACHE_BYTES / 8],
    total: [AtomicU64; COUNTERS],
    taken: [AtomicU64; COUNTERS],
    taking: [AtomicU64; COUNTERS],
}

/// The journal's head: which layout the files have, and the seq of the batch being taken,
/// plus one (0: none).
#[repr(C)]
struct Head {
    layout: AtomicU64,
    taking_seq: AtomicU64,
}

/// "shoalJ" and the layout's version: a change to [`SlotData`] needs a new one.
const LAYOUT: u64 = 0x7368_6f61_6c4a_0001;

const _: () = assert!(std::mem::size_of::<SlotData>() == 256);

/// A mapping of slots (all zeros: all free).
struct Segment {
    map: MmapMut,
}

impl Segment {
    fn open(path: Option<&Path>, bytes: usize) -> std::io::Result<Segment> {
        let map = match path {
            Some(path) => {
                let file =
                    OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
                if file.metadata()?.len() < bytes as u64 {
                    file.set_len(bytes as u64)?;
                }
                // SAFETY: the file is this gateway's own (one gateway per data dir); its
                // bytes are only ever read and written through the atomics below.
                unsafe { MmapOptions::new().len(bytes).map_mut(&file)? }
            }
            None => MmapOptions::new().len(bytes).map_anon()?,
        };
        Ok(Segment { map })
    }

    fn slots(&self) -> &[SlotData] {
        // SAFETY: the mapping is page-aligned, SEGMENT_SLOTS slots long, and any bytes are
        // valid atomics; it lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const SlotData, SEGMENT_SLOTS) }
    }

    fn head(&self) -> &Head {
        // SAFETY: as for `slots`: page-aligned, long enough, any bytes are valid.
        unsafe { &*(self.map.as_ptr() as *const Head) }
    }
}

/// A session's place in the journal for one cache and minute; sealed when dropped.
pub struct Slot {
    segment: Arc<Segment>,
    index: usize,
}

impl Slot {
    fn data(&self) -> &SlotData {
        &self.segment.slots()[self.index]
    }

    /// Adds a command's counters (the session is this slot's one writer).
    pub fn add(&self, c: &UsageCounters) {
        for (counter, v) in self.data().total.iter().zip(c.values()) {
            if v > 0 {
                counter.store(counter.load(Ordering::Relaxed) + v, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.data().state.store(SEALED, Ordering::Release);
    }
}

/// What one [`Journal::take`] found: the counters per (cache, minute) not in a batch yet,
/// and the slots to update when the batch is safe.
pub struct Taking {
    pub usage: HashMap<(CacheId, i64), UsageCounters>,
    slots: Vec<(Arc<Segment>, usize, bool)>,
}

pub struct Journal {
    dir: Option<PathBuf>,
    /// Held while the journal is open: two gateways on one data dir would count into the
    /// same slots.
    _lock: Option<std::fs::File>,
    head: Segment,
    segments: Mutex<Segments>,
    free: Mutex<Vec<(Arc<Segment>, usize)>>,
}

#[derive(Default)]
struct Segments {
    all: Vec<Arc<Segment>>,
    /// How many of them are files (`0000`, `0001`…; the rest are in memory).
    files: usize,
}

impl Journal {
    /// A journal in memory only (nothing survives the process).
    pub fn in_memory() -> Journal {
        Journal::open(None, |_| false).expect("anonymous memory maps")
    }

    /// Opens the journal in `dir` (created if need be), finishing or undoing what a killed
    /// predecessor left half done: `written(seq)` says whether batch `seq` reached the spool.
    pub fn open(dir: Option<&Path>, written: impl Fn(u64) -> bool) -> std::io::Result<Journal> {
        let lock = match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let file =
                    OpenOptions::new().write(true).create(true).truncate(false).open(dir.join("lock"))?;
                file.try_lock().map_err(|_| {
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!("the usage journal in {} is in use by another gateway: give each its own data_dir", dir.display()),
                    )
                })?;
                Some(file)
            }
            None => None,
        };
        let head = Segment::open(dir.map(|d| d.join("head")).as_deref(), 4096)?;
        match head.head().layout.load(Ordering::Acquire) {
            0 => head.head().layout.store(LAYOUT, Ordering::Release),
            LAYOUT => {}
            other => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("usage journal in {dir:?} has layout {other:#x}, not {LAYOUT:#x}: written by another version"),
                ))
            }
        }
        let mut segments = Segments::default();
        if let Some(dir) = dir {
            while dir.join(format!("{:04}", segments.files)).exists() {
                let path = dir.join(format!("{:04}", segments.files));
                segments.all.push(Arc::new(Segment::open(Some(&path), SEGMENT_SLOTS * 256)?));
                segments.files += 1;
            }
        }
        let journal = Journal {
            dir: dir.map(Path::to_path_buf),
            _lock: lock,
            head,
            segments: Mutex::new(segments),
            free: Default::default(),
        };
        journal.recover(written);
        Ok(journal)
    }

    fn recover(&self, written: impl Fn(u64) -> bool) {
        let taking_seq = self.head.head().taking_seq.load(Ordering::Acquire);
        let finish = taking_seq > 0 && written(taking_seq - 1);
        let segments = self.segments.lock().unwrap().all.clone();
        let mut free = self.free.lock().unwrap();
        let mut left = 0;
        for segment in &segments {
            for (index, slot) in segment.slots().iter().enumerate() {
                if slot.state.load(Ordering::Acquire) == FREE {
                    free.push((segment.clone(), index));
                    continue;
                }
                if finish {
                    for (taken, taking) in slot.taken.iter().zip(&slot.taking) {
                        taken.store(taking.load(Ordering::Relaxed), Ordering::Relaxed);
                    }
                }
                slot.state.store(SEALED, Ordering::Release);
                left += 1;
            }
        }
        self.head.head().taking_seq.store(0, Ordering::Release);
        if left > 0 {
            tracing::info!(sessions = left, "usage left by the last run found; it goes in the next batch");
        }
    }

    /// A slot for a session's counters of `cache` in `minute`.
    pub fn slot(&self, cache: &CacheId, minute: i64) -> Slot {
        let free = self.free.lock().unwrap().pop();
        let (segment, index) = free.unwrap_or_else(|| self.grow());
        let slot = &segment.slots()[index];
        for c in slot.total.iter().chain(&slot.taken).chain(&slot.taking) {
            c.store(0, Ordering::Relaxed);
        }
        let bytes = cache.as_str().as_bytes();
        let mut padded = [0u8; CACHE_BYTES];
        let len = bytes.len().min(CACHE_BYTES);
        padded[..len].copy_from_slice(&bytes[..len]);
        for (word, chunk) in slot.cache.iter().zip(padded.chunks(8)) {
            word.store(u64::from_le_bytes(chunk.try_into().unwrap()), Ordering::Relaxed);
        }
        slot.cache_len.store(len as u32, Ordering::Relaxed);
        slot.minute.store(minute, Ordering::Relaxed);
        slot.state.store(LIVE, Ordering::Release);
        Slot { segment, index }
    }

    /// A new segment's slots on the free list, but one, returned. Without room for another
    /// file, a segment in memory (not kept past a kill, loudly).
    fn grow(&self) -> (Arc<Segment>, usize) {
        let mut segments = self.segments.lock().unwrap();
        let path = self.dir.as_ref().map(|d| d.join(format!("{:04}", segments.files)));
        let segment = match Segment::open(path.as_deref(), SEGMENT_SLOTS * 256) {
            Ok(s) => {
                segments.files += path.is_some() as usize;
                Arc::new(s)
            }
            Err(e) => {
                tracing::error!(error = %e, "usage journal cannot grow on disk; counting in memory");
                Arc::new(Segment::open(None, SEGMENT_SLOTS * 256).expect("anonymous memory maps"))
            }
        };
        segments.all.push(segment.clone());
        self.free.lock().unwrap().extend((1..SEGMENT_SLOTS).rev().map(|i| (segment.clone(), i)));
        (segment, 0)
    }

    /// Step 1: what the slots hold beyond the last batch, to go in batch `seq`.
    pub fn take(&self, seq: u64) -> Taking {
        self.head.head().taking_seq.store(seq + 1, Ordering::Release);
        let mut usage: HashMap<(CacheId, i64), UsageCounters> = HashMap::new();
        let mut slots = Vec::new();
        let segments = self.segments.lock().unwrap().all.clone();
        for segment in &segments {
            for (index, slot) in segment.slots().iter().enumerate() {
                let state = slot.state.load(Ordering::Acquire);
                if state == FREE {
                    continue;
                }
                let delta: [u64; COUNTERS] = std::array::from_fn(|i| {
                    let total = slot.total[i].load(Ordering::Relaxed);
                    slot.taking[i].store(total, Ordering::Relaxed);
                    total.saturating_sub(slot.taken[i].load(Ordering::Relaxed))
                });
                slots.push((segment.clone(), index, state == SEALED));
                let delta = UsageCounters::from_values(delta);
                if delta.is_zero() {
                    continue;
                }
                match read_cache(slot) {
                    Some(cache) => {
                        let minute = slot.minute.load(Ordering::Relaxed);
                        usage.entry((cache, minute)).or_default().add(&delta);
                    }
                    None => tracing::error!("usage journal slot with an unreadable cache id skipped"),
                }
            }
        }
        Taking { usage, slots }
    }

    /// Step 3: the batch of [`Self::take`] is safe (spooled, or in memory without a data dir).
    pub fn commit(&self, taking: Taking) {
        let mut free = Vec::new();
        for (segment, index, sealed) in taking.slots {
            let slot = &segment.slots()[index];
            for (taken, taking) in slot.taken.iter().zip(&slot.taking) {
                taken.store(taking.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            if sealed {
                slot.state.store(FREE, Ordering::Release);
                free.push((segment, index));
            }
        }
        self.head.head().taking_seq.store(0, Ordering::Release);
        self.free.lock().unwrap().extend(free);
    }

    /// The batch of [`Self::take`] could not be made: its counters wait for the next one.
    pub fn abort(&self, _taking: Taking) {
        self.head.head().taking_seq.store(0, Ordering::Release);
    }
}

fn read_cache(slot: &SlotData) -> Option<CacheId> {
    let mut bytes = [0u8; CACHE_BYTES];
    for (chunk, word) in bytes.chunks_mut(8).zip(&slot.cache) {
        chunk.copy_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    let len = (slot.cache_len.load(Ordering::Relaxed) as usize).min(CACHE_BYTES);
    CacheId::parse(std::str::from_utf8(&bytes[..len]).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(n: u64) -> UsageCounters {
        UsageCounters { commands: n, ..Default::default() }
    }

    #[test]
    fn ended_sessions_slots_are_reused_once_their_counters_are_taken() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(Some(dir.path()), |_| false).unwrap();
        let cache = CacheId::generate();
        // More sessions than a segment holds: a second file.
        let slots: Vec<Slot> = (0..SEGMENT_SLOTS + 1).map(|_| journal.slot(&cache, 60)).collect();
        slots.iter().for_each(|s| s.add(&commands(1)));
        assert!(dir.path().join("0001").exists());
        drop(slots);
        let taking = journal.take(0);
        assert_eq!(taking.usage[&(cache.clone(), 60)], commands(SEGMENT_SLOTS as u64 + 1));
        journal.commit(taking);
        assert!(journal.take(1).usage.is_empty(), "taken once");
        // Freed: new sessions take those slots instead of growing the journal.
        let again: Vec<Slot> = (0..SEGMENT_SLOTS + 1).map(|_| journal.slot(&cache, 120)).collect();
        assert!(!dir.path().join("0002").exists());
        drop(again);
    }

    #[test]
    fn one_journal_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = Journal::open(Some(dir.path()), |_| false).unwrap();
        let second = Journal::open(Some(dir.path()), |_| false).err().expect("a second gateway is refused");
        assert!(second.to_string().contains("in use by another gateway"), "{second}");
        drop(first);
        Journal::open(Some(dir.path()), |_| false).expect("free again once the first is gone");
    }

    #[test]
    fn a_live_sessions_counters_go_out_as_they_grow_per_cache_and_minute() {
        let journal = Journal::in_memory();
        let (a, b) = (CacheId::generate(), CacheId::generate());
        let (a60, b60) = (journal.slot(&a, 60), journal.slot(&b, 60));
        a60.add(&commands(2));
        b60.add(&commands(3));
        let taking = journal.take(0);
        assert_eq!(taking.usage.len(), 2);
        assert_eq!(taking.usage[&(a.clone(), 60)], commands(2));
        journal.commit(taking);
        a60.add(&commands(5));
        drop(a60);
        let a120 = journal.slot(&a, 120);
        a120.add(&commands(7));
        let taking = journal.take(1);
        assert_eq!(taking.usage.len(), 2, "b had nothing new");
        assert_eq!(taking.usage[&(a.clone(), 60)], commands(5));
        assert_eq!(taking.usage[&(a.clone(), 120)], commands(7));
        // Not committed (the batch could not be kept): the next batch has it all again.
        journal.abort(taking);
        let taking = journal.take(1);
        assert_eq!(taking.usage[&(a.clone(), 60)], commands(5));
        assert_eq!(taking.usage[&(a, 120)], commands(7));
    }
}
