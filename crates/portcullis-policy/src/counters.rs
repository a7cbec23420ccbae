//! Rate-limit and quota counters for the whole host: fixed tables of atomics shared by every
//! worker (no mutex on the data path), kept across reloads.
//!
//! A rate limit counts in a sliding window of `N + 1` slots of `period / N` each: a call is
//! admitted while the calls of the last `N + 1` slots stay within the limit, so the window
//! counted is never shorter than the period (the limit is never exceeded) and at most one slot
//! longer. Increment-then-check makes admission exact across workers. A quota counts in fixed
//! periods from its start. Entries are found by a 64-bit hash of (kind, period, key) with a
//! short linear probe; an entry whose counts have all left their window is taken over.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Slots per renewal period.
pub(crate) const N: u64 = 10;
/// Slots kept per key: the current one and the `N` before it.
const SLOTS: usize = N as usize + 1;
/// Entries tried from a key's home position.
const PROBE: usize = 16;

/// How long an entry a worker is taking over counts as in use before its key is swapped in
/// (ms). Another worker looking for room for another key, that finds the entry with its new key
/// in the moment before its first count, must find it in use; a take that loses the swap leaves
/// no more than this on an entry that is now another key's. A request's time is read when it
/// starts and again after each wait (a callout, a sync): only a count settled once its response
/// is known, more than this after its step, marks too little, and that race is open again for
/// it.
const HELD: u64 = 10_000;

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Admitted; `remaining` calls are left in the window (after this one, when it was counted).
    Yes { remaining: u64 },
    /// Over the limit: calls free up in `retry_after` seconds.
    No { retry_after: u64 },
    /// No room in the table for this key (every entry near its home is in use): not counted.
    Untracked,
    /// The fleet's store is unreachable and limits are set to refuse then.
    Unavailable,
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
    /// Calls of the other hosts in the window, as the last sync found them: (slot epoch of the
    /// sync: 32 bits, calls: 32 bits).
    others: AtomicU64,
    /// This host's claim, granted by the latest sync: (second of the sync since the origin: 32
    /// bits, the most calls this host may count in the window until the next one: 32 bits).
    claim: AtomicU64,
    /// Which of this host's syncs it was (see [`Synced`]).
    synced: Synced,
    /// When every count in it will have left its window (ms since the origin), or a moment after
    /// it was taken (see [`HELD`]): until then the entry is its key's. Kept in time, not in
    /// slots: keys of limits with other periods share the table, and one's slots mean nothing to
    /// another's clock.
    ends: AtomicU64,
}

struct Period {
    key: AtomicU64,
    /// (period index: 24 bits, calls: 40 bits).
    calls: AtomicU64,
    /// (period index: 24 bits, bytes: 40 bits).
    bytes: AtomicU64,
    /// The other hosts' calls and bytes in the period, as the last sync found them.
    others_calls: AtomicU64,
    others_bytes: AtomicU64,
    /// This host's claim on the period's calls, granted by the latest sync: (second of the sync
    /// since the origin: 32 bits, calls: 32 bits).
    claim: AtomicU64,
    /// Which of this host's syncs it was (see [`Synced`]).
    synced: Synced,
    /// When the latest period counted here ends (ms since the origin; `u64::MAX`: never), or a
    /// moment after it was taken (see [`HELD`]), whichever is later: until
    /// then the entry is its key's.
    ends: AtomicU64,
}

/// A quota's period, as a check sees it: its index, the time (ms since the origin), and when the
/// period ends (`u64::MAX` for a quota for ever).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QuotaAt {
    pub(crate) index: u64,
    pub(crate) now_ms: u64,
    pub(crate) ends_ms: u64,
}

fn pack40(period: u64, value: u64) -> u64 {
    ((period & 0xFF_FFFF) << 40) | value.min((1 << 40) - 1)
}

fn unpack40(v: u64) -> (u64, u64) {
    (v >> 40, v & ((1 << 40) - 1))
}

/// Whether period `i` (24 bits, as [`pack40`] keeps it) comes after period `index`: within half
/// the 24-bit range ahead of it, as the numbers wrap.
fn is_later(i: u64, index: u64) -> bool {
    (1..1 << 23).contains(&(i.wrapping_sub(index) & 0xFF_FFFF))
}

/// Swaps `hash` in for `k` as the key of an entry found empty or stale (`key` and `ends` are its
/// own): the entry is marked in use until `mark` first (see [`HELD`]), and once taken, its
/// `counts` are emptied where they still hold what they held before the take: a worker that found
/// the key there the moment it was taken may have counted a call already, which the key's count
/// keeps. `Err` with the key the entry had instead.
fn take_over<'a>(
    (key, ends): (&AtomicU64, &AtomicU64),
    counts: impl Iterator<Item = &'a AtomicU64> + Clone,
    (k, hash): (u64, u64),
    mark: u64,
) -> Result<(), u64> {
    // A window's slots and sync, the most an entry has.
    let mut seen = [0; SLOTS + 2];
    for (was, a) in seen.iter_mut().zip(counts.clone()) {
        *was = a.load(Ordering::Acquire);
    }
    ends.fetch_max(mark, Ordering::AcqRel);
    key.compare_exchange(k, hash, Ordering::AcqRel, Ordering::Acquire)?;
    for (a, was) in counts.zip(seen) {
        let _ = a.compare_exchange(was, 0, Ordering::AcqRel, Ordering::Relaxed);
    }
    Ok(())
}

/// The process's counters.
pub struct Counters {
    windows: Box<[Window]>,
    periods: Box<[Period]>,
    hasher: ahash::RandomState,
    /// Counts are shared with other hosts through a store (Redis).
    fleet: AtomicBool,
    /// The store answered the last sync.
    fleet_up: AtomicBool,
    /// Refuse calls on limits while the store is unreachable (else count on this host alone).
    deny_when_down: AtomicBool,
    /// Other hosts that synced lately (as the last sync found): a key this host has not synced
    /// yet may use only its part of a limit until it has.
    fleet_hosts: AtomicU64,
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

/// A claim is good for this long after its sync (the store forgets a host's claim once the host
/// has asked for the key for two seconds no more).
const CLAIM_SECS: u64 = 2;
/// No claim (the store answered none: the limit is not known to it).
const NO_CLAIM: u64 = 0xFFFF_FFFF;

/// The number the store gave the sync whose answer a key's entry holds (it counts each host's
/// syncs as it runs them), and a bit set while an answer is being stored.
///
/// A host's workers sync apart, each on its own connection, and the answer to a sync the store
/// ran first can come back after that of one it ran later. Applied in the order they came, the
/// older claim would stand, though the other hosts were granted theirs against the newer one,
/// and the hosts together could admit more than the limit. An answer is therefore stored only
/// when it is the store's latest for the key (or the one held came over two seconds before it:
/// the store may have started counting again), and a claim and the others' counts are stored
/// together (a reader may still see one answer's counts with the next one's claim, for as long
/// as the two stores take).
#[derive(Default)]
struct Synced(AtomicU64);

/// Set while a worker stores an answer.
const STORING: u64 = 1 << 63;

impl Synced {
    /// Stores an answer numbered `sync` with `store` when it is the latest (`held_lapsed`: the one
    /// held, if any, is too old to count). Returns whether it did.
    fn store(&self, sync: u64, held_lapsed: impl Fn() -> bool, store: impl FnOnce()) -> bool {
        let sync = sync & !STORING;
        let mut current = self.0.load(Ordering::Acquire);
        let mut waited = 0;
        loop {
            if current & STORING != 0 {
                // Another worker's answer, a few stores long. Should that worker have been put
                // off the CPU in the middle, this answer is let go: the next sync brings another.
                waited += 1;
                if waited > 1_000 {
                    return false;
                }
                std::hint::spin_loop();
                current = self.0.load(Ordering::Acquire);
                continue;
            }
            if current != 0 && sync <= current && !held_lapsed() {
                return false;
            }
            match self.0.compare_exchange_weak(current, sync | STORING, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
        store();
        self.0.store(sync, Ordering::Release);
        true
    }

    /// Forgets the number held (the entry goes to another key); a store under way finishes.
    fn clear(&self) {
        self.0.fetch_and(STORING, Ordering::AcqRel);
    }
}

/// The most calls this host may have counted in a window or period: what the other hosts left
/// (`limit - others`), and no more than its claim while it holds one.
fn fleet_allowance(limit: u64, others: u64, claim: Option<u64>) -> u64 {
    let left = limit.saturating_sub(others);
    claim.map_or(left, |c| c.min(left))
}

/// Adds `delta` to the slot for `epoch`, starting it over when it held an older epoch. When it
/// holds a later one's count (calls counted once their response is known, more than a window
/// after the call), the calls have left every window that reads the slot and count nowhere:
/// made over as theirs, the slot would lose the later calls.
fn add_to(slot: &AtomicU64, epoch: u64, delta: i64) {
    let epoch = epoch & 0xFFFF_FFFF;
    let mut current = slot.load(Ordering::Acquire);
    loop {
        let (e, c) = unpack(current);
        if c > 0 && (1..1 << 31).contains(&(e.wrapping_sub(epoch) & 0xFFFF_FFFF)) {
            return;
        }
        let base = if e == epoch { c } else { 0 };
        let next = base.saturating_add_signed(delta).min(0xFFFF_FFFF);
        match slot.compare_exchange_weak(current, pack(epoch, next), Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return,
            Err(seen) => current = seen,
        }
    }
}

impl Counters {
    /// Tables for about `keys` keys of each kind (rounded up to a power of two).
    pub fn with_capacity(keys: usize) -> Counters {
        let n = keys.max(64).next_power_of_two();
        let window = || Window {
            key: AtomicU64::new(0),
            slots: std::array::from_fn(|_| AtomicU64::new(0)),
            others: AtomicU64::new(0),
            claim: AtomicU64::new(0),
            synced: Synced::default(),
            ends: AtomicU64::new(0),
        };
        let period = || Period {
            key: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            others_calls: AtomicU64::new(0),
            others_bytes: AtomicU64::new(0),
            claim: AtomicU64::new(0),
            synced: Synced::default(),
            ends: AtomicU64::new(0),
        };
        Counters {
            windows: (0..n).map(|_| window()).collect(),
            periods: (0..n).map(|_| period()).collect(),
            hasher: ahash::RandomState::new(),
            fleet: AtomicBool::new(false),
            // Up until a sync finds otherwise.
            fleet_up: AtomicBool::new(true),
            deny_when_down: AtomicBool::new(false),
            fleet_hosts: AtomicU64::new(0),
        }
    }

    /// Shares counts with other hosts (`deny_when_down`: refuse limited calls while the store is
    /// unreachable), or stops sharing.
    pub fn set_fleet(&self, enabled: bool, deny_when_down: bool) {
        self.fleet.store(enabled, Ordering::Release);
        self.deny_when_down.store(deny_when_down, Ordering::Release);
    }

    pub fn fleet(&self) -> bool {
        self.fleet.load(Ordering::Acquire)
    }

    /// Whether the store answered the last sync; returns what was said before.
    pub fn set_fleet_up(&self, up: bool) -> bool {
        self.fleet_up.swap(up, Ordering::AcqRel)
    }

    pub fn fleet_up(&self) -> bool {
        self.fleet_up.load(Ordering::Acquire)
    }

    /// How many other hosts synced lately, as the last sync found.
    pub fn set_fleet_hosts(&self, hosts: u64) {
        self.fleet_hosts.store(hosts, Ordering::Relaxed);
    }

    /// The part of `limit` a key this host knows nothing of yet may use: an equal share among
    /// the hosts that synced lately (all of it when there are none, or counts are not shared).
    fn unsynced_share(&self, limit: u64) -> u64 {
        let hosts = if self.sharing() { self.fleet_hosts.load(Ordering::Relaxed) } else { 0 };
        limit.div_ceil(hosts + 1)
    }

    /// Whether the other hosts' counts (as the last sync found them) are added to this host's:
    /// counts are shared and the store is reachable. Otherwise each host counts alone.
    fn sharing(&self) -> bool {
        self.fleet() && self.fleet_up()
    }

    /// Whether limited calls are refused because the store is unreachable.
    pub(crate) fn store_refuses(&self) -> bool {
        self.fleet() && !self.fleet_up() && self.deny_when_down.load(Ordering::Acquire)
    }

    /// What a sync found for a rate limit's key at `now_ms` (ms since the counters' origin):
    /// the other hosts' calls in the window, and this host's claim (see [`crate::fleet`]).
    pub fn set_others(
        &self,
        hash: u64,
        period_ms: u64,
        (now_ms, sync): (u64, u64),
        calls: u64,
        claim: Option<u64>,
    ) {
        let slot_ms = (period_ms / N).max(1);
        let epoch = now_ms / slot_ms;
        if let Some(w) = self.window(hash, now_ms) {
            if calls > 0 {
                Counters::counting(w, slot_ms, now_ms);
            }
            let claim = claim.map_or(NO_CLAIM, |c| c.min(NO_CLAIM - 1));
            let lapsed = || !Counters::claim_fresh(&w.claim, now_ms);
            w.synced.store(sync, lapsed, || {
                w.claim.store(pack(now_ms / 1000, claim), Ordering::Release);
                w.others.store(pack(epoch, calls.min(0xFFFF_FFFF)), Ordering::Release);
            });
        }
    }

    /// What a sync found for a quota's key in a period: the other hosts' calls and bytes, and
    /// this host's claim.
    pub(crate) fn set_quota_others(
        &self,
        hash: u64,
        (at, sync): (QuotaAt, u64),
        (calls, bytes): (u64, u64),
        claim: Option<u64>,
    ) {
        let index = at.index;
        if let Some(p) = self.period(hash, at) {
            if calls > 0 || bytes > 0 {
                Counters::counting_period(p, at);
            }
            let claim = claim.map_or(NO_CLAIM, |c| c.min(NO_CLAIM - 1));
            let held = unpack40(p.others_calls.load(Ordering::Acquire)).0;
            if p.claim.load(Ordering::Acquire) != 0 && is_later(held, index) {
                // About a period before the one the entry holds an answer for.
                return;
            }
            // The first answer about a later period is taken whatever its number.
            let lapsed = || {
                !Counters::claim_fresh(&p.claim, at.now_ms)
                    || is_later(index, unpack40(p.others_calls.load(Ordering::Acquire)).0)
            };
            p.synced.store(sync, lapsed, || {
                p.claim.store(pack(at.now_ms / 1000, claim), Ordering::Release);
                p.others_calls.store(pack40(index, calls), Ordering::Release);
                p.others_bytes.store(pack40(index, bytes), Ordering::Release);
            });
        }
    }

    /// A claim still good at `now_ms`.
    fn claim_at(claim: &AtomicU64, now_ms: u64) -> Option<u64> {
        let (at, c) = unpack(claim.load(Ordering::Acquire));
        (c != NO_CLAIM && at + CLAIM_SECS >= (now_ms / 1000) & 0xFFFF_FFFF).then_some(c)
    }

    /// Whether the claim word holds an answer still good at `now_ms` (a claim, or none).
    fn claim_fresh(claim: &AtomicU64, now_ms: u64) -> bool {
        let word = claim.load(Ordering::Acquire);
        word != 0 && unpack(word).0 + CLAIM_SECS >= (now_ms / 1000) & 0xFFFF_FFFF
    }

    /// What the last sync found for a window ending in `epoch`, at `now_ms`: the other hosts'
    /// calls and this host's claim; nothing when that sync is older than the window, or counts
    /// are not shared. A sync of the slot after `epoch` counts too: the worker read its clock
    /// just before the sync task stored that answer, which is about its window as well.
    fn others(&self, w: &Window, epoch: u64, now_ms: u64) -> Option<(u64, Option<u64>)> {
        if !self.sharing() {
            return Some((0, None));
        }
        let (e, c) = unpack(w.others.load(Ordering::Acquire));
        let epoch = epoch & 0xFFFF_FFFF;
        (e > 0 && e <= epoch + 1 && e + N >= epoch).then(|| (c, Counters::claim_at(&w.claim, now_ms)))
    }

    /// Whether this host may decide on a rate limit's key now: counts are not shared, or a sync
    /// has told about the key within its window (or the table has no room for it). Otherwise the
    /// first call waits for a sync, so that no host spends what another was granted.
    pub(crate) fn rate_known(&self, hash: u64, period_ms: u64, now_ms: u64) -> bool {
        let epoch = now_ms / (period_ms / N).max(1);
        !self.sharing() || self.window(hash, now_ms).is_none_or(|w| self.others(w, epoch, now_ms).is_some())
    }

    /// As [`Counters::rate_known`], for a quota's key in its period.
    pub(crate) fn quota_known(&self, hash: u64, at: QuotaAt) -> bool {
        !self.sharing()
            || self.period(hash, at).is_none_or(|p| {
                let (i, _) = unpack40(p.others_calls.load(Ordering::Acquire));
                i == at.index & 0xFF_FFFF && p.claim.load(Ordering::Acquire) != 0
            })
    }

    /// The hash a key is filed under (never 0, the empty mark).
    pub(crate) fn hash(&self, kind: u8, period: u64, key: &[u8]) -> u64 {
        self.hasher.hash_one((kind, period, key)).max(1)
    }

    /// The key's entry; a new one (an empty or stale entry taken over) when it has none. The
    /// whole probe is searched for the key before anything is taken over, so that a key never
    /// gets a second, empty entry in front of its own.
    fn window(&self, hash: u64, now_ms: u64) -> Option<&Window> {
        self.find_window(hash).or_else(|| self.take_window(hash, now_ms))
    }

    /// Keeps `w` its key's while calls counted now (or the other hosts' calls a sync reported
    /// now) are in the window: N + 1 slots of `slot_ms`, and a moment of the slot before (see
    /// `sum`). Before the count, so that an entry is never seen stale with a count in the
    /// window. Pushed back once a slot, not at every call. Only counts keep an entry: a key
    /// only checked leaves its entry to others once [`HELD`] is over, as keys none of whose
    /// calls count (an `increment_condition` that never holds) would otherwise fill the table.
    fn counting(w: &Window, slot_ms: u64, now_ms: u64) {
        let ends = now_ms.saturating_add((N + 2) * slot_ms);
        if w.ends.load(Ordering::Relaxed) < ends - slot_ms {
            w.ends.fetch_max(ends, Ordering::AcqRel);
        }
    }

    /// Takes an entry for `hash`: an empty one, or one whose counts have all left their window
    /// (this host's, and the others' from the last sync, which are its key's too).
    ///
    /// Two races are left, both needing two workers at one instant on a key's first call: a
    /// worker of the new key that counts between the swap and the emptying, on a count whose
    /// slot (a period, for quotas) the old key numbered as the new one does, counts on top of
    /// what the old key left, and the emptying then leaves it (the new key refused early); and
    /// the old key's worker, counting at the very moment its entry goes stale and is taken, loses
    /// that call to the new key.
    fn take_window(&self, hash: u64, now_ms: u64) -> Option<&Window> {
        let mask = self.windows.len() - 1;
        let home = hash as usize & mask;
        for i in 0..PROBE {
            let w = &self.windows[(home + i) & mask];
            let k = w.key.load(Ordering::Acquire);
            if k == hash {
                return Some(w);
            }
            if k != 0 && w.ends.load(Ordering::Acquire) > now_ms {
                continue;
            }
            let counts = w.slots.iter().chain([&w.others, &w.claim]);
            match take_over((&w.key, &w.ends), counts, (k, hash), now_ms.saturating_add(HELD)) {
                Ok(()) => {
                    w.synced.clear();
                    return Some(w);
                }
                // Another worker took it for this key a moment ago: the same window, not a
                // second one further on (whose counts the first would never see).
                Err(now) if now == hash => return Some(w),
                Err(_) => {}
            }
        }
        None
    }

    /// The key's entry, when it has one (nothing is taken over).
    fn find_window(&self, hash: u64) -> Option<&Window> {
        let mask = self.windows.len() - 1;
        let home = hash as usize & mask;
        (0..PROBE).map(|i| &self.windows[(home + i) & mask]).find(|w| w.key.load(Ordering::Acquire) == hash)
    }

    /// This host's own calls (every worker's) on a rate limit's key in the window at `now_ms`.
    /// A sync reports them: the workers sync apart, each with the calls it counted itself, so the
    /// store's count of this host lags what the host has admitted, and a claim granted on that
    /// count alone could fall below it.
    pub(crate) fn rate_own(&self, hash: u64, period_ms: u64, now_ms: u64) -> u64 {
        let epoch = now_ms / (period_ms / N).max(1);
        self.find_window(hash).map_or(0, |w| Counters::sum(w, epoch).0)
    }

    /// As [`Counters::rate_own`], for a quota's key in the period `index`.
    pub(crate) fn quota_own(&self, hash: u64, index: u64) -> u64 {
        self.find_period(hash).map_or(0, |p| {
            let (i, calls) = unpack40(p.calls.load(Ordering::Acquire));
            if i == index & 0xFF_FFFF { calls } else { 0 }
        })
    }

    /// Calls counted for `w` in the window ending in `epoch`, and the oldest epoch with calls.
    ///
    /// The next slot counts too: another worker that read the clock a moment later may have
    /// counted a call there already. Left out, this worker could admit one over the limit.
    fn sum(w: &Window, epoch: u64) -> (u64, Option<u64>) {
        let epoch = epoch & 0xFFFF_FFFF;
        let mut total = 0;
        let mut oldest: Option<u64> = None;
        for s in &w.slots {
            let (e, c) = unpack(s.load(Ordering::Acquire));
            if c > 0 && e <= epoch + 1 && e + N >= epoch {
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
        if self.store_refuses() {
            return Admit::Unavailable;
        }
        let slot_ms = (period_ms / N).max(1);
        let epoch = now_ms / slot_ms;
        let Some(w) = self.window(hash, now_ms) else { return Admit::Untracked };
        // A key no sync has told about yet: its share among the hosts syncing lately.
        let (others, claim) = self.others(w, epoch, now_ms).unwrap_or((0, Some(self.unsynced_share(limit))));
        let allowance = fleet_allowance(limit, others, claim);
        let retry = |oldest: Option<u64>| {
            // The oldest calls leave once their slot is N + 1 slots old.
            let free_at = (oldest.unwrap_or(epoch) + N + 1) * slot_ms;
            free_at.saturating_sub(now_ms).div_ceil(1000).max(1)
        };
        if count == 0 {
            let (own, oldest) = Counters::sum(w, epoch);
            return if own >= allowance {
                Admit::No { retry_after: retry(oldest) }
            } else {
                Admit::Yes { remaining: limit - (own + others).min(limit) }
            };
        }
        Counters::counting(w, slot_ms, now_ms);
        let slot = &w.slots[(epoch % SLOTS as u64) as usize];
        add_to(slot, epoch, count as i64);
        let (own, oldest) = Counters::sum(w, epoch);
        if own > allowance {
            add_to(slot, epoch, -(count as i64));
            return Admit::No { retry_after: retry(oldest) };
        }
        Admit::Yes { remaining: limit - (own + others).min(limit) }
    }

    /// Counts `count` calls for a rate limit after the fact (an `increment_condition` held).
    pub(crate) fn count(&self, hash: u64, period_ms: u64, now_ms: u64, count: u64) {
        let slot_ms = (period_ms / N).max(1);
        let epoch = now_ms / slot_ms;
        if let Some(w) = self.window(hash, now_ms) {
            Counters::counting(w, slot_ms, now_ms);
            add_to(&w.slots[(epoch % SLOTS as u64) as usize], epoch, count as i64);
        }
    }

    /// The key's entry, when it has one (nothing is taken over).
    fn find_period(&self, hash: u64) -> Option<&Period> {
        let mask = self.periods.len() - 1;
        let home = hash as usize & mask;
        (0..PROBE).map(|i| &self.periods[(home + i) & mask]).find(|p| p.key.load(Ordering::Acquire) == hash)
    }

    /// The key's entry, found or taken over as in [`Counters::window`]; an entry is stale once
    /// the period it last counted has ended (a quota for ever's never is), or, when nothing was
    /// counted in it, [`HELD`] after it was taken.
    fn period(&self, hash: u64, at: QuotaAt) -> Option<&Period> {
        let mask = self.periods.len() - 1;
        let home = hash as usize & mask;
        let entry = |i: usize| &self.periods[(home + i) & mask];
        self.find_period(hash).or_else(|| {
            (0..PROBE).map(entry).find(|p| {
                let k = p.key.load(Ordering::Acquire);
                if k == hash {
                    // Taken for the key since it was looked for: its `ends` may not be set yet,
                    // and it is not stale for that.
                    return true;
                }
                let stale = k == 0 || p.ends.load(Ordering::Acquire) <= at.now_ms;
                if !stale {
                    return false;
                }
                // In use for `HELD` once taken, to the period's end once it counts.
                let counts = [&p.calls, &p.bytes, &p.others_calls, &p.others_bytes, &p.claim].into_iter();
                match take_over((&p.key, &p.ends), counts, (k, hash), at.now_ms.saturating_add(HELD)) {
                    Ok(()) => {
                        // What the old key counted since it was read (a response of its settling
                        // as the entry was taken) goes too: whatever is not of the new key's
                        // period is not the new key's.
                        for a in [&p.calls, &p.bytes] {
                            let mut was = a.load(Ordering::Acquire);
                            while was != 0 && unpack40(was).0 != at.index & 0xFF_FFFF {
                                match a.compare_exchange(was, 0, Ordering::AcqRel, Ordering::Acquire) {
                                    Ok(_) => break,
                                    Err(now) => was = now,
                                }
                            }
                        }
                        p.synced.clear();
                        true
                    }
                    // Another worker took it for this key a moment ago (see `take_window`).
                    Err(now) => now == hash,
                }
            })
        })
    }

    /// Keeps `p` its key's until the period counted in ends, as [`Counters::counting`] does for
    /// a window: only counts (this host's, or the others' a sync reports) keep an entry.
    fn counting_period(p: &Period, at: QuotaAt) {
        if p.ends.load(Ordering::Relaxed) < at.ends_ms {
            p.ends.fetch_max(at.ends_ms, Ordering::AcqRel);
        }
    }

    /// The calls and bytes of a quota in its period.
    pub(crate) fn quota_used(&self, hash: u64, at: QuotaAt) -> Option<(u64, u64)> {
        let index = at.index;
        let p = self.period(hash, at)?;
        let read = |a: &AtomicU64| {
            let (i, v) = unpack40(a.load(Ordering::Acquire));
            if i == index & 0xFF_FFFF { v } else { 0 }
        };
        // With counts shared, the other hosts' too, as the last sync found them.
        let sharing = self.sharing();
        let others = |a: &AtomicU64| if sharing { read(a) } else { 0 };
        Some((read(&p.calls) + others(&p.others_calls), read(&p.bytes) + others(&p.others_bytes)))
    }

    /// Adds calls (admitted only while within `limit`, when one is given) and bytes to a quota's
    /// period. Returns false when the calls would pass the limit (nothing is added).
    pub(crate) fn quota_add(
        &self,
        hash: u64,
        at: QuotaAt,
        calls: u64,
        limit: Option<u64>,
        bytes: u64,
    ) -> bool {
        let (index, now_ms) = (at.index, at.now_ms);
        let Some(p) = self.period(hash, at) else { return true };
        if calls > 0 || bytes > 0 {
            Counters::counting_period(p, at);
        }
        // With counts shared, the other hosts take their part of the limit.
        let limit = match limit {
            Some(l) if self.sharing() => {
                let (i, others) = unpack40(p.others_calls.load(Ordering::Acquire));
                if i == index & 0xFF_FFFF && p.claim.load(Ordering::Acquire) != 0 {
                    Some(fleet_allowance(l, others, Counters::claim_at(&p.claim, now_ms)))
                } else {
                    // No sync has told about the key in this period yet.
                    Some(self.unsynced_share(l))
                }
            }
            other => other,
        };
        let add = |a: &AtomicU64, delta: u64, cap: Option<u64>| -> bool {
            let mut current = a.load(Ordering::Acquire);
            loop {
                let (i, v) = unpack40(current);
                // A count for a period that has ended since (a response settled once the next
                // one had begun, a call whose request read the clock before the boundary) counts
                // in neither: never over the running period's count, and the fleet's store
                // books it in its own period. A word that counts nothing (new, or emptied) has
                // no period to compare.
                if v > 0 && is_later(i, index) {
                    return true;
                }
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

    /// Period `index` at `now_ms`, ending an hour later.
    fn at(index: u64, now_ms: u64) -> QuotaAt {
        QuotaAt { index, now_ms, ends_ms: now_ms + 3_600_000 }
    }

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
        // A count settled so late that its slot has held a later one's since (eleven slots on)
        // counts nowhere, and leaves the later one's calls as they are.
        let late = c.hash(0, 10_000, b"late");
        assert!((0..5).all(|_| matches!(c.rate(late, 10_000, 5, 300_000, 1), Admit::Yes { .. })));
        c.count(late, 10_000, 289_000, 1);
        assert!(matches!(c.rate(late, 10_000, 5, 300_100, 1), Admit::No { .. }));
        // One settled in a slot that holds an older one's count makes it over as its own.
        c.count(late, 10_000, 311_000, 1);
        assert!(matches!(c.rate(late, 10_000, 1, 311_100, 0), Admit::No { .. }));
    }

    /// Two threads each run `count` on every key, both on the same key at the same moment.
    fn both_at_once(keys: &[u64], count: impl Fn(u64) + Sync) {
        let go = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            for _ in 0..2 {
                s.spawn(|| {
                    for &h in keys {
                        go.wait();
                        count(h);
                    }
                });
            }
        });
    }

    /// Two workers counting a key's first calls at the same instant share its window: a second
    /// one, further along the probe, would hold calls the first never sees (one more admitted).
    #[test]
    fn workers_racing_on_a_new_key_count_in_one_window() {
        // Tables far from full (a key finds room near its home), filled afresh five times.
        let mut split = 0;
        for _ in 0..5 {
            let c = Counters::with_capacity(1 << 16);
            let keys: Vec<u64> = (0..4_000u32).map(|i| c.hash(0, 60_000, &i.to_le_bytes())).collect();
            both_at_once(&keys, |h| {
                let admit = c.rate(h, 60_000, 100, 1_000_000, 1);
                assert!(matches!(admit, Admit::Yes { .. }), "{admit:?}");
            });
            split += keys.iter().filter(|&&h| c.rate_own(h, 60_000, 1_000_000) != 2).count();
        }
        assert_eq!(split, 0, "keys whose two first calls landed in two windows");
    }

    /// The same for a quota's period: a worker that finds the key's entry the moment another
    /// has taken it, and counts a call there before the taker has emptied it of what it held
    /// before, keeps that call.
    #[test]
    fn workers_racing_on_a_new_key_count_every_call_of_a_period() {
        let mut lost = 0;
        for _ in 0..10 {
            let c = Counters::with_capacity(1 << 16);
            let keys: Vec<u64> = (0..4_000u32).map(|i| c.hash(1, 86_400, &i.to_le_bytes())).collect();
            both_at_once(&keys, |h| assert!(c.quota_add(h, at(3, 1_000_000), 1, Some(100), 10)));
            lost += keys.iter().filter(|&&h| c.quota_used(h, at(3, 1_000_000)) != Some((2, 20))).count();
        }
        assert_eq!(lost, 0, "keys whose period lost a call or its bytes");
    }

    /// An entry taken over is emptied of what its old key counted, even in a period numbered
    /// as the new key's (another quota's periods, numbered from their own start).
    #[test]
    fn a_period_taken_over_starts_empty() {
        let c = Counters::with_capacity(8_192);
        let first = QuotaAt { index: 3, now_ms: 1_000_000, ends_ms: 1_001_000 };
        let then = QuotaAt { index: 3, now_ms: 5_000_000, ends_ms: 5_001_000 };
        let keys = |round: u8| -> Vec<u64> {
            (0..2_000u32).map(|i| c.hash(1, 86_400, &[&[round][..], &i.to_le_bytes()].concat())).collect()
        };
        for h in keys(0) {
            assert!(c.quota_add(h, first, 2, None, 10));
        }
        // A quarter of the table was taken, and is stale by then: about a quarter of the new keys
        // take an old one's entry.
        let found: Vec<_> = keys(1).into_iter().filter(|&h| !c.quota_add(h, then, 1, Some(1), 0)).collect();
        assert!(found.is_empty(), "{} new keys found calls of their period already", found.len());
    }

    /// Two workers each taking room for a new key, the two keys' probes starting on the same
    /// entry: the one that loses the entry finds it in use and goes on, and neither key's first
    /// call lands in the other's entry.
    #[test]
    fn workers_taking_room_for_two_keys_at_once_keep_both() {
        let (mut windows, mut periods) = (0, 0);
        for _ in 0..25 {
            let c = Counters::with_capacity(1 << 16);
            let mask = (1 << 16) - 1;
            // Pairs of keys whose probes start on the same entry.
            let mut first = std::collections::HashMap::new();
            let pairs: Vec<(u32, u32)> = (0u32..)
                .filter_map(|i| {
                    let home = c.hash(0, 60_000, &i.to_le_bytes()) & mask;
                    match first.remove(&home) {
                        Some(j) => Some((j, i)),
                        None => first.insert(home, i).and(None),
                    }
                })
                .take(2_000)
                .collect();
            let go = std::sync::Barrier::new(2);
            let at = at(4, 1_000_000);
            std::thread::scope(|s| {
                for side in 0..2 {
                    let (c, go, pairs) = (&c, &go, &pairs);
                    s.spawn(move || {
                        for &(a, b) in pairs {
                            let key = if side == 0 { a } else { b }.to_le_bytes();
                            go.wait();
                            assert!(matches!(
                                c.rate(c.hash(0, 60_000, &key), 60_000, 100, 1_000_000, 1),
                                Admit::Yes { .. }
                            ));
                            go.wait();
                            assert!(c.quota_add(c.hash(0, 60_000, &key), at, 1, Some(100), 0));
                        }
                    });
                }
            });
            for key in pairs.iter().flat_map(|&(a, b)| [a, b]) {
                let h = c.hash(0, 60_000, &key.to_le_bytes());
                windows += usize::from(c.rate_own(h, 60_000, 1_000_000) != 1);
                periods += usize::from(c.quota_own(h, 4) != 1);
            }
        }
        assert_eq!((windows, periods), (0, 0), "keys whose first call is not in their own entry");
    }

    /// Keys of limits with different periods share the table. A new key of a short period that
    /// probes past the entry of a long period's key, still counting, leaves it be: the entry's
    /// counts are in slots of the long period, which the short period's clock must not read as
    /// old.
    #[test]
    fn a_short_period_s_key_leaves_a_long_period_s_window_alone() {
        let c = Counters::with_capacity(64);
        let mask = 63;
        let long = c.hash(0, 3_600_000, b"long");
        // Two calls an hour, both taken.
        for t in [1_000_000, 1_000_500] {
            assert!(matches!(c.rate(long, 3_600_000, 2, t, 1), Admit::Yes { .. }), "{t}");
        }
        // Keys of a one-second limit whose probe starts on the long key's entry.
        let short: Vec<u64> = (0u32..)
            .map(|i| c.hash(0, 1_000, &i.to_le_bytes()))
            .filter(|h| h & mask == long & mask)
            .take(3)
            .collect();
        for &h in &short {
            assert!(matches!(c.rate(h, 1_000, 5, 1_001_000, 1), Admit::Yes { .. }));
        }
        // A minute later, the long key still has its two calls in its window.
        assert!(matches!(c.rate(long, 3_600_000, 2, 1_060_000, 1), Admit::No { .. }));
        assert_eq!(c.rate_own(long, 3_600_000, 1_060_000), 2);
        // And so for a quota's period: a key of another quota takes no entry still counting.
        let day = QuotaAt { index: 11, now_ms: 1_000_000, ends_ms: 86_400_000 };
        let quota = c.hash(1, 86_400, b"day");
        assert!(c.quota_add(quota, day, 1, Some(1), 0));
        for h in
            (0u32..).map(|i| c.hash(1, 60, &i.to_le_bytes())).filter(|h| h & mask == quota & mask).take(3)
        {
            assert!(c.quota_add(
                h,
                QuotaAt { index: 16_683, now_ms: 1_001_000, ends_ms: 1_020_000 },
                1,
                Some(5),
                0
            ));
        }
        assert!(!c.quota_add(quota, QuotaAt { now_ms: 1_060_000, ..day }, 1, Some(1), 0));

        // Once the long key's counts have left its window, a key of another period takes its
        // entry over, without the counts: five calls of a 10 s limit at 100 s sit in the slot a
        // 20 s limit numbers as its own at 200 s.
        let c = Counters::with_capacity(64);
        let ten = c.hash(0, 10_000, b"ten");
        for _ in 0..5 {
            assert!(matches!(c.rate(ten, 10_000, 5, 100_000, 1), Admit::Yes { .. }));
        }
        let twenty = (0u32..)
            .map(|i| c.hash(0, 20_000, &i.to_le_bytes()))
            .find(|h| h & mask == ten & mask)
            .expect("a key with the same home");
        assert_eq!(c.rate(twenty, 20_000, 5, 200_000, 1), Admit::Yes { remaining: 4 });
        assert_eq!(c.rate_own(ten, 10_000, 200_000), 0, "the entry is the new key's");
    }

    /// A key only checked (its calls counted later, if at all) holds no entry past the moment it
    /// took one: keys none of whose calls ever count leave room for those that do.
    #[test]
    fn keys_only_checked_leave_room_for_keys_that_count() {
        let c = Counters::with_capacity(64);
        let mask = 63;
        let home = c.hash(0, 60_000, b"home") & mask;
        let mut same = (0u32..).map(|i| c.hash(0, 60_000, &i.to_le_bytes())).filter(|h| h & mask == home);
        // As many checked keys as a probe has entries.
        for h in same.by_ref().take(PROBE) {
            assert!(matches!(c.rate(h, 60_000, 5, 1_000_000, 0), Admit::Yes { .. }));
        }
        let counted = same.next().expect("another key");
        assert_eq!(c.rate(counted, 60_000, 5, 1_000_000, 1), Admit::Untracked, "the probe is taken");
        // A moment later, their entries are free.
        assert_eq!(c.rate(counted, 60_000, 5, 1_000_000 + HELD, 1), Admit::Yes { remaining: 4 });

        // So for quotas, a quota for ever included.
        let ever = |now_ms| QuotaAt { index: 0, now_ms, ends_ms: u64::MAX };
        let mut same = (0u32..).map(|i| c.hash(1, 0, &i.to_le_bytes())).filter(|h| h & mask == home);
        for h in same.by_ref().take(PROBE) {
            assert_eq!(c.quota_used(h, ever(1_000_000)), Some((0, 0)));
        }
        let counted = same.next().expect("another key");
        assert_eq!(c.quota_used(counted, ever(1_000_000)), None, "the probe is taken");
        assert!(c.quota_add(counted, ever(1_000_000 + HELD), 1, Some(5), 0));
        assert_eq!(c.quota_used(counted, ever(1_000_000 + HELD)), Some((1, 0)));
    }

    #[test]
    fn a_worker_whose_clock_lags_sees_what_another_counted_in_the_next_slot() {
        let c = Counters::with_capacity(64);
        let h = c.hash(0, 10_000, b"key");
        // Two calls per 10 s, in 1 s slots: one just before a slot boundary, one just after it
        // (another worker, its clock read a moment later).
        assert_eq!(c.rate(h, 10_000, 2, 99_999, 1), Admit::Yes { remaining: 1 });
        assert_eq!(c.rate(h, 10_000, 2, 100_000, 1), Admit::Yes { remaining: 0 });
        // A worker whose reading still falls before the boundary counts the call after it too.
        assert!(matches!(c.rate(h, 10_000, 2, 99_999, 1), Admit::No { .. }));
        assert!(matches!(c.rate(h, 10_000, 2, 99_999, 0), Admit::No { .. }));
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
        assert!(c.quota_add(h, at(7, 0), 1, Some(2), 100));
        assert!(c.quota_add(h, at(7, 0), 1, Some(2), 50));
        assert!(!c.quota_add(h, at(7, 0), 1, Some(2), 0));
        assert_eq!(c.quota_used(h, at(7, 0)), Some((2, 150)));
        assert_eq!(c.quota_used(h, at(8, 0)), Some((0, 0)), "a new period starts empty");
        assert!(c.quota_add(h, at(8, 0), 1, Some(2), 0));
        assert_eq!(c.quota_used(h, at(8, 0)), Some((1, 0)));
    }

    /// A response that settles its quota's count once the next period has begun (a request
    /// across the boundary) does not write over the new period's count, nor does a call whose
    /// request read the clock before the boundary: they count in neither.
    #[test]
    fn a_count_settled_after_its_period_leaves_the_next_one_alone() {
        let c = Counters::with_capacity(64);
        let h = c.hash(1, 60, b"sub");
        assert!(c.quota_add(h, at(7, 0), 1, Some(5), 10));
        for _ in 0..3 {
            assert!(c.quota_add(h, at(8, 60_000), 1, Some(5), 100));
        }
        // The first request's call and body, counted when its response ends.
        assert!(c.quota_add(h, at(7, 0), 1, None, 4_096));
        assert_eq!(c.quota_used(h, at(8, 61_000)), Some((3, 300)));
        // A call whose request read the clock a moment before the boundary.
        assert!(c.quota_add(h, at(7, 59_999), 1, Some(5), 0));
        assert_eq!(c.quota_used(h, at(8, 61_000)), Some((3, 300)));
        assert!(c.quota_add(h, at(8, 61_000), 2, Some(5), 0));
        assert!(!c.quota_add(h, at(8, 61_000), 1, Some(5), 0));
        // Periods numbered in the upper half of the 24 bits count from an empty entry as any.
        let high = c.hash(1, 60, b"high");
        let late = at(0x90_0000, 0);
        assert!(c.quota_add(high, late, 1, Some(1), 0));
        assert!(!c.quota_add(high, late, 1, Some(1), 0));
        assert_eq!(c.quota_used(high, late), Some((1, 0)));
        // The numbers wrap at 24 bits.
        assert!(is_later(0, 0xFF_FFFF) && !is_later(0xFF_FFFF, 0) && !is_later(5, 5));
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

    #[test]
    fn a_key_keeps_its_entry_when_one_before_it_goes_stale() {
        let c = Counters::with_capacity(64);
        // Two keys with the same home (hashes chosen, not computed): `a` there, `k` after it.
        let (a, k) = (5, 5 + 64);
        assert!(matches!(c.rate(a, 1_000, 2, 100_000, 1), Admit::Yes { .. }));
        assert!(matches!(c.rate(k, 1_000, 2, 100_900, 1), Admit::Yes { .. }));
        assert!(matches!(c.rate(k, 1_000, 2, 100_950, 1), Admit::Yes { remaining: 0 }));
        // `a`'s calls have left their window, `k`'s have not: `k` is still over its limit.
        assert!(matches!(c.rate(k, 1_000, 2, 101_200, 1), Admit::No { .. }));
        // Quotas: an entry of a quota for ever is never taken over; one whose period ended is.
        let forever = QuotaAt { index: 0, now_ms: 1_000, ends_ms: u64::MAX };
        assert!(c.quota_add(7, forever, 1, Some(1), 0));
        for (i, h) in (1..=16u64).map(|i| (i, 7 + 64 * i)) {
            let other = QuotaAt { index: i, now_ms: 5_000_000, ends_ms: 5_000_000 + 1 };
            let _ = c.quota_add(h, other, 1, Some(1), 0);
        }
        let later = QuotaAt { now_ms: 9_000_000, ..forever };
        assert!(!c.quota_add(7, later, 1, Some(1), 0), "the lifetime quota kept its count");
        let taken = QuotaAt { index: 3, now_ms: 9_000_000, ends_ms: 9_500_000 };
        assert!(c.quota_add(7 + 64 * 20, taken, 1, Some(1), 0), "an ended period's entry is taken over");
    }

    #[test]
    fn a_key_not_yet_synced_gets_its_share_among_the_hosts() {
        let c = Counters::with_capacity(64);
        c.set_fleet(true, false);
        c.set_fleet_hosts(1);
        let h = c.hash(0, 60_000, b"fresh");
        let now = 7_200_000;
        let admitted =
            (0..10).filter(|i| matches!(c.rate(h, 60_000, 9, now + i, 1), Admit::Yes { .. })).count();
        assert_eq!(admitted, 5, "half of 9, rounded up, before the first sync");
        // The sync: the other host has 1 call; this one may go to 8.
        c.set_others(h, 60_000, (now + 10, 1), 1, Some(8));
        let more =
            (0..10).filter(|i| matches!(c.rate(h, 60_000, 9, now + 11 + i, 1), Admit::Yes { .. })).count();
        assert_eq!(more, 3);
        // Alone in the fleet: all of it.
        c.set_fleet_hosts(0);
        let q = c.hash(1, 9, b"fresh-quota");
        let at = QuotaAt { index: 1, now_ms: now, ends_ms: now + 1_000_000 };
        assert_eq!((0..10).filter(|_| c.quota_add(q, at, 1, Some(4), 0)).count(), 4);
        c.set_fleet_hosts(3);
        let q = c.hash(1, 9, b"other-quota");
        assert_eq!((0..10).filter(|_| c.quota_add(q, at, 1, Some(4), 0)).count(), 1);
    }

    #[test]
    fn a_key_waits_for_its_first_sync_only_while_counts_are_shared() {
        let c = Counters::with_capacity(64);
        let h = c.hash(0, 60_000, b"new");
        let now = 7_200_000;
        assert!(c.rate_known(h, 60_000, now), "not shared: nothing to wait for");
        c.set_fleet(true, false);
        assert!(!c.rate_known(h, 60_000, now));
        c.set_others(h, 60_000, (now, 1), 0, Some(5));
        assert!(c.rate_known(h, 60_000, now + 1));
        // A worker whose clock read came just before the slot of the sync's answer.
        let lag = c.hash(0, 60_000, b"lagging");
        c.set_others(lag, 60_000, (now, 1), 0, Some(5));
        assert!(c.rate_known(lag, 60_000, now - 1));
        assert!(!c.rate_known(h, 60_000, now + 70_000), "a sync older than the window says nothing");
        c.set_fleet_up(false);
        assert!(c.rate_known(h, 60_000, now + 70_000), "the store is down: nothing to wait for");
        c.set_fleet_up(true);
        let q = c.hash(1, 9, b"q");
        assert!(!c.quota_known(q, at(5, now)));
        c.set_quota_others(q, (at(5, now), 2), (0, 0), Some(3));
        assert!(c.quota_known(q, at(5, now)));
        assert!(!c.quota_known(q, at(6, now + 1)), "a new period is synced anew");
    }

    #[test]
    fn a_claim_bounds_what_is_left() {
        assert_eq!(fleet_allowance(100, 30, None), 70);
        assert_eq!(fleet_allowance(100, 30, Some(40)), 40);
        assert_eq!(fleet_allowance(100, 30, Some(90)), 70, "never past what the others left");
        assert_eq!(fleet_allowance(100, 150, None), 0);
    }

    #[test]
    fn an_answer_to_an_earlier_sync_coming_back_late_is_not_applied() {
        let c = Counters::with_capacity(64);
        c.set_fleet(true, false);
        let h = c.hash(0, 2_000, b"hot");
        let now = 3_600_000;
        // Two workers sync: the store ran the second (its sync 2) after the first and granted it
        // 60, with the other host's claim made against that; the first's answer (100) comes last.
        c.set_others(h, 2_000, (now + 40, 2), 0, Some(60));
        c.set_others(h, 2_000, (now, 1), 0, Some(100));
        let admitted =
            (0..100).filter(|i| matches!(c.rate(h, 2_000, 200, now + 50 + i, 1), Admit::Yes { .. }));
        assert_eq!(admitted.count(), 60);
        // The next sync's answer is applied; the others' count comes with it.
        c.set_others(h, 2_000, (now + 100, 3), 30, Some(80));
        let more = (0..100).filter(|i| matches!(c.rate(h, 2_000, 200, now + 150 + i, 1), Admit::Yes { .. }));
        assert_eq!(more.count(), 20);
        // The store counting this host's syncs anew (it restarted): its answers wait until the one
        // held has lapsed.
        c.set_others(h, 2_000, (now + 300, 1), 30, Some(150));
        assert!(matches!(c.rate(h, 2_000, 200, now + 310, 1), Admit::No { .. }), "the claim of 80 holds");
        c.set_others(h, 2_000, (now + 4_000, 2), 0, Some(5));
        let later =
            (0..10).filter(|i| matches!(c.rate(h, 2_000, 200, now + 4_001 + i, 1), Admit::Yes { .. }));
        assert_eq!(later.count(), 5, "the new claim, in a window the earlier calls have left");
        // A quota's claim alike.
        let q = c.hash(1, 7, b"quota");
        c.set_quota_others(q, (at(5, now + 40), 2), (4, 0), Some(5));
        c.set_quota_others(q, (at(5, now), 1), (0, 0), Some(10));
        let quota = (0..10).filter(|_| c.quota_add(q, at(5, now + 50), 1, Some(10), 0));
        assert_eq!(quota.count(), 5, "the later claim, and the others' 4 that came with it");
        // A new period's first answer is taken whatever its number (within the held one's two
        // seconds); one about the period before, after it, is not.
        c.set_quota_others(q, (at(6, now + 1_000), 1), (0, 0), Some(7));
        c.set_quota_others(q, (at(5, now + 1_100), 9), (0, 0), Some(10));
        assert!(c.quota_known(q, at(6, now + 1_200)));
        assert_eq!((0..10).filter(|_| c.quota_add(q, at(6, now + 1_200), 1, Some(10), 0)).count(), 7);
        // Alike where the period numbers wrap at 24 bits: 0 comes after 0xFF_FFFF.
        let w = c.hash(1, 7, b"wrap");
        c.set_quota_others(w, (at(0xFF_FFFF, now + 2_000), 1), (0, 0), Some(3));
        c.set_quota_others(w, (at(0, now + 3_000), 1), (0, 0), Some(4));
        c.set_quota_others(w, (at(0xFF_FFFF, now + 3_100), 9), (0, 0), Some(10));
        assert!(c.quota_known(w, at(0, now + 3_200)));
        assert_eq!((0..10).filter(|_| c.quota_add(w, at(0, now + 3_200), 1, Some(10), 0)).count(), 4);
    }

    #[test]
    fn answers_stored_from_two_threads_keep_the_latest_claim_with_its_counts() {
        let c = std::sync::Arc::new(Counters::with_capacity(64));
        c.set_fleet(true, false);
        let h = c.hash(0, 60_000, b"both");
        let now = 3_600_000;
        // Sync n grants a claim of n and reports n calls of the others: a pair from two answers
        // would show as a claim and a count that differ.
        let threads: Vec<_> = [true, false]
            .into_iter()
            .map(|odd| {
                let c = std::sync::Arc::clone(&c);
                std::thread::spawn(move || {
                    // Both ascending, a step apart: each store races the other thread's.
                    for n in (1..=20_000).filter(|n| (n % 2 == 1) == odd) {
                        c.set_others(h, 60_000, (now, n), n, Some(n));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("no panic");
        }
        let w = c.find_window(h).expect("the key's entry");
        let epoch = now / (60_000 / N);
        // One answer's claim and counts, and its number: the last or, had a store given up
        // waiting for the other thread (put off the CPU mid-store), one just before.
        let held = w.synced.0.load(Ordering::Acquire);
        assert!(held >= 19_990, "{held}");
        assert_eq!(c.others(w, epoch, now), Some((held, Some(held))));
    }

    #[test]
    fn other_hosts_counts_count_while_the_store_is_up() {
        let c = Counters::with_capacity(64);
        let h = c.hash(0, 60_000, b"shared");
        let now = 3_600_000;
        c.set_fleet(true, false);
        assert!(matches!(c.rate(h, 60_000, 10, now, 1), Admit::Yes { remaining: 9 }));
        // The others made 7 calls, and this host may have 2 until its next sync.
        c.set_others(h, 60_000, (now, 1), 7, Some(2));
        assert_eq!(c.rate(h, 60_000, 10, now + 1, 1), Admit::Yes { remaining: 1 });
        assert!(matches!(c.rate(h, 60_000, 10, now + 2, 1), Admit::No { .. }));
        // A claim goes stale with its sync: then all that the others left.
        assert_eq!(c.rate(h, 60_000, 10, now + 3_000, 1), Admit::Yes { remaining: 0 });
        assert!(matches!(c.rate(h, 60_000, 10, now + 3_001, 1), Admit::No { .. }));
        // Store down, "local": this host counts alone.
        c.set_fleet_up(false);
        assert_eq!(c.rate(h, 60_000, 10, now + 3_002, 1), Admit::Yes { remaining: 6 });
        // "deny": refused while down; served again once it is up.
        c.set_fleet(true, true);
        assert_eq!(c.rate(h, 60_000, 10, now + 3_003, 1), Admit::Unavailable);
        assert!(c.store_refuses());
        c.set_fleet_up(true);
        assert!(!c.store_refuses());
        // What a sync found goes stale once its window has passed.
        assert!(matches!(c.rate(h, 60_000, 10, now + 3_004, 1), Admit::No { .. }));
        assert!(matches!(c.rate(h, 60_000, 10, now + 200_000, 1), Admit::Yes { remaining: 9 }));
        // Quotas alike; not shared, the others do not count.
        let q = c.hash(1, 7, b"quota");
        c.set_quota_others(q, (at(5, now), 2), (8, 1000), None);
        assert_eq!(c.quota_used(q, at(5, now)), Some((8, 1000)));
        assert!(c.quota_add(q, at(5, now), 1, Some(10), 0));
        assert!(c.quota_add(q, at(5, now), 1, Some(10), 0));
        assert!(!c.quota_add(q, at(5, now), 1, Some(10), 0), "8 + 2 of 10");
        c.set_quota_others(q, (at(5, now), 3), (6, 1000), Some(2));
        assert!(!c.quota_add(q, at(5, now), 1, Some(10), 0), "2 left, but the claim is 2");
        c.set_fleet(false, false);
        assert_eq!(c.quota_used(q, at(5, now)), Some((2, 0)));
        assert!(c.quota_add(q, at(5, now), 1, Some(10), 0));
    }
}
