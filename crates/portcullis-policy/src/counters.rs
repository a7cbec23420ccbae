//! Rate-limit and quota counters for the whole host: fixed tables of atomics shared by every
//! worker (no mutex on the data path), kept across reloads.
//!
//! A rate limit counts in a sliding window of `N + 1` slots of `period / N` each: a call is
//! admitted while the calls of the last `N + 1` slots stay within the limit, so the window
//! counted is never shorter than the period (the limit is never exceeded) and at most one slot
//! longer. Increment-then-check makes admission exact across workers. A quota counts in fixed
//! periods from its start. Entries are found by a 64-bit hash of (kind, period, key) with a
//! short linear probe; an entry whose counts have all left their window is taken over.

use std::sync::atomic::{AtomicU64, Ordering};

/// Slots per renewal period.
pub(crate) const N: u64 = 10;
/// Slots kept per key: the current one and the `N` before it.
const SLOTS: usize = N as usize + 1;
/// Entries tried from a key's home position.
const PROBE: usize = 16;

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Admitted; `remaining` calls are left in the window (after this one, when it was counted).
    Yes { remaining: u64 },
    /// Over the limit: calls free up in `retry_after` seconds.
    No { retry_after: u64 },
    /// No room in the table for this key (every entry near its home is in use): not counted.
    Untracked,
}

fn pack(epoch: u64, count: u64) -> u64 {
    (epoch << 32) | (count & 0xFFFF_FFFF)
}

fn unpack(v: u64) -> (u64, u64) {
    (v >> 32, v & 0xFFFF_FFFF)
}

struct Window {
    key: AtomicU64,
    /// (slot epoch: 32 bits, calls: 32 bits).
    slots: [AtomicU64; SLOTS],
}

struct Period {
    key: AtomicU64,
    /// (period index: 24 bits, calls: 40 bits).
    calls: AtomicU64,
    /// (period index: 24 bits, bytes: 40 bits).
    bytes: AtomicU64,
}

fn pack40(period: u64, value: u64) -> u64 {
    ((period & 0xFF_FFFF) << 40) | value.min((1 << 40) - 1)
}

fn unpack40(v: u64) -> (u64, u64) {
    (v >> 40, v & ((1 << 40) - 1))
}

/// The process's counters.
pub struct Counters {
    windows: Box<[Window]>,
    periods: Box<[Period]>,
    hasher: ahash::RandomState,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counters").field("capacity", &self.windows.len()).finish_non_exhaustive()
    }
}

impl Default for Counters {
    fn default() -> Self {
        Counters::with_capacity(1 << 14)
    }
}

/// Adds `delta` to the slot for `epoch`, starting it over when it held an older epoch; returns
/// the slot's count after.
fn add_to(slot: &AtomicU64, epoch: u64, delta: i64) -> u64 {
    let mut current = slot.load(Ordering::Acquire);
    loop {
        let (e, c) = unpack(current);
        let base = if e == epoch & 0xFFFF_FFFF { c } else { 0 };
        let next = base.saturating_add_signed(delta).min(0xFFFF_FFFF);
        match slot.compare_exchange_weak(current, pack(epoch, next), Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return next,
            Err(seen) => current = seen,
        }
    }
}

impl Counters {
    /// Tables for about `keys` keys of each kind (rounded up to a power of two).
    pub fn with_capacity(keys: usize) -> Counters {
        let n = keys.max(64).next_power_of_two();
        let window = || Window { key: AtomicU64::new(0), slots: std::array::from_fn(|_| AtomicU64::new(0)) };
        let period = || Period { key: AtomicU64::new(0), calls: AtomicU64::new(0), bytes: AtomicU64::new(0) };
        Counters {
            windows: (0..n).map(|_| window()).collect(),
            periods: (0..n).map(|_| period()).collect(),
            hasher: ahash::RandomState::new(),
        }
    }

    /// The hash a key is filed under (never 0, the empty mark).
    pub(crate) fn hash(&self, kind: u8, period: u64, key: &[u8]) -> u64 {
        self.hasher.hash_one((kind, period, key)).max(1)
    }

    fn window(&self, hash: u64, epoch: u64) -> Option<&Window> {
        let mask = self.windows.len() - 1;
        let home = hash as usize & mask;
        for i in 0..PROBE {
            let w = &self.windows[(home + i) & mask];
            let k = w.key.load(Ordering::Acquire);
            if k == hash {
                return Some(w);
            }
            // Empty, or every count older than the window: take it.
            let stale = k == 0
                || w.slots.iter().all(|s| {
                    let (e, c) = unpack(s.load(Ordering::Relaxed));
                    c == 0 || e + N < epoch & 0xFFFF_FFFF
                });
            if stale && w.key.compare_exchange(k, hash, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Some(w);
            }
        }
        None
    }

    /// Calls counted for `w` in the window ending in `epoch`, and the oldest epoch with calls.
    fn sum(w: &Window, epoch: u64) -> (u64, Option<u64>) {
        let epoch = epoch & 0xFFFF_FFFF;
        let mut total = 0;
        let mut oldest: Option<u64> = None;
        for s in &w.slots {
            let (e, c) = unpack(s.load(Ordering::Acquire));
            if c > 0 && e <= epoch && e + N >= epoch {
                total += c;
                oldest = Some(oldest.map_or(e, |o| o.min(e)));
            }
        }
        (total, oldest)
    }

    /// A sliding-window rate limit: `limit` calls per `period_ms`, at `now_ms`. With `count`, this
    /// call is counted (`count` times) when admitted; without, it is only checked (the count
    /// comes later, with [`Counters::count`], once the response is known).
    pub(crate) fn rate(&self, hash: u64, period_ms: u64, limit: u64, now_ms: u64, count: u64) -> Admit {
        let slot_ms = (period_ms / N).max(1);
        let epoch = now_ms / slot_ms;
        let Some(w) = self.window(hash, epoch) else { return Admit::Untracked };
        let retry = |oldest: Option<u64>| {
            // The oldest calls leave once their slot is N + 1 slots old.
            let free_at = (oldest.unwrap_or(epoch) + N + 1) * slot_ms;
            free_at.saturating_sub(now_ms).div_ceil(1000).max(1)
        };
        if count == 0 {
            let (total, oldest) = Counters::sum(w, epoch);
            return if total >= limit {
                Admit::No { retry_after: retry(oldest) }
            } else {
                Admit::Yes { remaining: limit - total }
            };
        }
        let slot = &w.slots[(epoch % SLOTS as u64) as usize];
        add_to(slot, epoch, count as i64);
        let (total, oldest) = Counters::sum(w, epoch);
        if total > limit {
            add_to(slot, epoch, -(count as i64));
            return Admit::No { retry_after: retry(oldest) };
        }
        Admit::Yes { remaining: limit - total }
    }

    /// Counts `count` calls for a rate limit after the fact (an `increment_condition` held).
    pub(crate) fn count(&self, hash: u64, period_ms: u64, now_ms: u64, count: u64) {
        let slot_ms = (period_ms / N).max(1);
        let epoch = now_ms / slot_ms;
        if let Some(w) = self.window(hash, epoch) {
            add_to(&w.slots[(epoch % SLOTS as u64) as usize], epoch, count as i64);
        }
    }

    fn period(&self, hash: u64, index: u64) -> Option<&Period> {
        let mask = self.periods.len() - 1;
        let home = hash as usize & mask;
        let index = index & 0xFF_FFFF;
        for i in 0..PROBE {
            let p = &self.periods[(home + i) & mask];
            let k = p.key.load(Ordering::Acquire);
            if k == hash {
                return Some(p);
            }
            let stale = k == 0 || {
                let (a, _) = unpack40(p.calls.load(Ordering::Relaxed));
                let (b, _) = unpack40(p.bytes.load(Ordering::Relaxed));
                a != index && b != index
            };
            if stale && p.key.compare_exchange(k, hash, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Some(p);
            }
        }
        None
    }

    /// The calls and bytes of a quota in period `index`.
    pub(crate) fn quota_used(&self, hash: u64, index: u64) -> Option<(u64, u64)> {
        let p = self.period(hash, index)?;
        let read = |a: &AtomicU64| {
            let (i, v) = unpack40(a.load(Ordering::Acquire));
            if i == index & 0xFF_FFFF { v } else { 0 }
        };
        Some((read(&p.calls), read(&p.bytes)))
    }

    /// Adds calls (admitted only while within `limit`, when one is given) and bytes to a quota's
    /// period `index`. Returns false when the calls would pass the limit (nothing is added).
    pub(crate) fn quota_add(
        &self,
        hash: u64,
        index: u64,
        calls: u64,
        limit: Option<u64>,
        bytes: u64,
    ) -> bool {
        let Some(p) = self.period(hash, index) else { return true };
        let add = |a: &AtomicU64, delta: u64, cap: Option<u64>| -> bool {
            let mut current = a.load(Ordering::Acquire);
            loop {
                let (i, v) = unpack40(current);
                let base = if i == index & 0xFF_FFFF { v } else { 0 };
                let next = base.saturating_add(delta);
                if cap.is_some_and(|c| next > c) {
                    return false;
                }
                match a.compare_exchange_weak(
                    current,
                    pack40(index, next),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => return true,
                    Err(seen) => current = seen,
                }
            }
        };
        if calls > 0 && !add(&p.calls, calls, limit) {
            return false;
        }
        if bytes > 0 {
            add(&p.bytes, bytes, None);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sliding_window_never_admits_more_than_its_limit() {
        let c = Counters::with_capacity(64);
        let h = c.hash(0, 10_000, b"key");
        // 5 calls per 10 s, in 1 s slots.
        for i in 0..5 {
            assert_eq!(c.rate(h, 10_000, 5, 100_000 + i, 1), Admit::Yes { remaining: 4 - i });
        }
        assert_eq!(c.rate(h, 10_000, 5, 100_010, 1), Admit::No { retry_after: 11 });
        // Still refused just past one period (the window is at least a period long)…
        assert!(matches!(c.rate(h, 10_000, 5, 110_000, 1), Admit::No { .. }));
        // …and free once their slot is out.
        assert_eq!(c.rate(h, 10_000, 5, 111_000, 1), Admit::Yes { remaining: 4 });
        // Another key has its own count.
        let other = c.hash(0, 10_000, b"other");
        assert_eq!(c.rate(other, 10_000, 5, 111_000, 1), Admit::Yes { remaining: 4 });
        // Checking without counting, then counting later.
        let later = c.hash(0, 10_000, b"later");
        assert_eq!(c.rate(later, 10_000, 1, 200_000, 0), Admit::Yes { remaining: 1 });
        c.count(later, 10_000, 200_000, 1);
        assert!(matches!(c.rate(later, 10_000, 1, 200_500, 0), Admit::No { .. }));
    }

    #[test]
    fn calls_spread_over_the_boundary() {
        let c = Counters::with_capacity(64);
        let h = c.hash(0, 10_000, b"k");
        // 4 calls at 0–1 s and 4 at 9–10 s under a limit of 8; at 10.5 s, the first 4 are still
        // within the (at least 10 s) window, at 11.5 s they are not.
        for t in [0, 300, 600, 900, 9_000, 9_300, 9_600, 9_900] {
            assert!(matches!(c.rate(h, 10_000, 8, 1_000_000 + t, 1), Admit::Yes { .. }), "{t}");
        }
        assert!(matches!(c.rate(h, 10_000, 8, 1_010_500, 1), Admit::No { .. }));
        assert!(matches!(c.rate(h, 10_000, 8, 1_011_500, 1), Admit::Yes { remaining: 3 }));
    }

    #[test]
    fn threads_together_stay_within_the_limit() {
        let c = std::sync::Arc::new(Counters::with_capacity(64));
        let h = c.hash(0, 60_000, b"hot");
        let admitted: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let c = c.clone();
                    s.spawn(move || {
                        (0..10_000)
                            .filter(|_| matches!(c.rate(h, 60_000, 1000, 5_000_000, 1), Admit::Yes { .. }))
                            .count() as u64
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert!((990..=1000).contains(&admitted), "{admitted}");
    }

    #[test]
    fn quotas_count_per_period() {
        let c = Counters::with_capacity(64);
        let h = c.hash(1, 300, b"sub");
        assert!(c.quota_add(h, 7, 1, Some(2), 100));
        assert!(c.quota_add(h, 7, 1, Some(2), 50));
        assert!(!c.quota_add(h, 7, 1, Some(2), 0));
        assert_eq!(c.quota_used(h, 7), Some((2, 150)));
        assert_eq!(c.quota_used(h, 8), Some((0, 0)), "a new period starts empty");
        assert!(c.quota_add(h, 8, 1, Some(2), 0));
        assert_eq!(c.quota_used(h, 8), Some((1, 0)));
    }

    #[test]
    fn a_full_table_leaves_keys_untracked_and_stale_entries_are_taken_over() {
        let c = Counters::with_capacity(64);
        let mut untracked = 0;
        for i in 0..200u32 {
            let h = c.hash(0, 1_000, &i.to_be_bytes());
            if c.rate(h, 1_000, 5, 10_000, 1) == Admit::Untracked {
                untracked += 1;
            }
        }
        assert!(untracked >= 200 - 64, "{untracked}");
        // A window later, every entry is stale: new keys find room.
        let h = c.hash(0, 1_000, b"new");
        assert_eq!(c.rate(h, 1_000, 5, 20_000, 1), Admit::Yes { remaining: 4 });
    }
}
