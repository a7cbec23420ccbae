//! An identity provider's published keys as the whole process shares them: one fetcher writes,
//! every worker reads through `arc-swap`, and a worker that meets an unknown `kid` may ask for a
//! refetch — at most one per `min_refetch` — and wait for it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::keys::KeySet;

/// One provider's current keys and issuer, and the bookkeeping of refetches.
#[derive(Debug)]
pub struct RemoteKeys {
    name: String,
    /// The discovery document's URL: a provider of the same name and URL keeps its keys across
    /// reloads.
    url: String,
    keys: ArcSwap<KeySet>,
    issuer: ArcSwapOption<String>,
    /// Whether keys were ever published.
    loaded: AtomicBool,
    /// Completed fetch attempts, successful or not: a waiter watches it move.
    attempts: AtomicU64,
    /// When a refetch was last granted (ms since `created`, a monotonic clock): grants are
    /// `min_refetch` apart.
    granted_at: AtomicI64,
    created: Instant,
    /// A granted refetch the fetcher has not finished yet.
    wanted: AtomicBool,
    /// A fetch is under way (a scheduled one, or the first): a demand joins it.
    fetching: AtomicBool,
    min_refetch: Duration,
    /// How long a request waits for a refetch it asked for.
    refetch_wait: Duration,
    /// The fetcher's thread, woken when a refetch is wanted.
    fetcher: OnceLock<Thread>,
}

impl RemoteKeys {
    pub fn new(name: &str, url: &str, min_refetch: Duration, refetch_wait: Duration) -> Arc<RemoteKeys> {
        Arc::new(RemoteKeys {
            name: name.to_owned(),
            url: url.to_owned(),
            keys: ArcSwap::from_pointee(KeySet::empty()),
            issuer: ArcSwapOption::empty(),
            loaded: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
            granted_at: AtomicI64::new(i64::MIN / 2),
            created: Instant::now(),
            wanted: AtomicBool::new(false),
            fetching: AtomicBool::new(false),
            min_refetch,
            refetch_wait,
            fetcher: OnceLock::new(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn min_refetch(&self) -> Duration {
        self.min_refetch
    }

    /// How long a request whose token named an unknown `kid` waits for the refetch.
    pub fn refetch_wait(&self) -> Duration {
        self.refetch_wait
    }

    /// The current keys (empty until the first fetch succeeds).
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.keys.load()
    }

    /// The current set's id, for telling whether a verdict was reached with today's keys.
    pub fn keys_id(&self) -> u64 {
        self.keys.load().id()
    }

    /// The issuer the discovery document names.
    pub fn issuer(&self) -> Option<Arc<String>> {
        self.issuer.load_full()
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    /// Asks for a refetch (a token named a `kid` the keys lack). Granted at most once per
    /// `min_refetch`; `Some(attempts)` then means "wait until [`attempts`](Self::attempts) moves
    /// past this", `None` that no refetch is coming (one was granted too recently and is done).
    pub fn demand_refetch(&self) -> Option<u64> {
        let now_ms = i64::try_from(self.created.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.demand_refetch_at(now_ms)
    }

    fn demand_refetch_at(&self, now_ms: i64) -> Option<u64> {
        let seen = self.attempts();
        // A fetch under way, or a refetch already granted: wait for it too, at no cost.
        if self.wanted.load(Ordering::Acquire) || self.fetching.load(Ordering::Acquire) {
            return Some(seen);
        }
        let last = self.granted_at.load(Ordering::Acquire);
        let gap = i64::try_from(self.min_refetch.as_millis()).unwrap_or(i64::MAX);
        if now_ms.saturating_sub(last) < gap {
            return None;
        }
        if self.granted_at.compare_exchange(last, now_ms, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // Another worker was granted it just now.
            return Some(self.attempts());
        }
        // Read again: a fetch may have ended since `seen`; the one granted now comes after it.
        let before = self.attempts();
        self.wanted.store(true, Ordering::Release);
        if let Some(t) = self.fetcher.get() {
            t.unpark();
        }
        Some(before)
    }

    // The fetcher's side.

    /// Records the thread that fetches for this provider (woken by [`demand_refetch`]).
    ///
    /// [`demand_refetch`]: Self::demand_refetch
    pub fn set_fetcher(&self, thread: Thread) {
        let _ = self.fetcher.set(thread);
    }

    /// Whether a granted refetch waits for the fetcher (until [`attempt_done`] or [`publish`]).
    ///
    /// [`attempt_done`]: Self::attempt_done
    /// [`publish`]: Self::publish
    pub fn is_wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// Marks a fetch as under way (from before the fetcher starts, so that requests made while
    /// the first keys are on their way join that fetch).
    pub fn fetch_started(&self) {
        self.fetching.store(true, Ordering::Release);
    }

    /// Takes over another's keys and issuer (a provider whose fetch settings changed on reload
    /// keeps serving with the keys it had).
    pub fn seed_from(&self, other: &RemoteKeys) {
        if other.is_loaded() {
            self.keys.store(other.keys.load_full());
            self.issuer.store(other.issuer.load_full());
            self.loaded.store(true, Ordering::Release);
        }
    }

    /// Publishes a fetched set and the issuer, and counts the attempt.
    pub fn publish(&self, keys: KeySet, issuer: Option<String>) {
        self.keys.store(Arc::new(keys));
        self.issuer.store(issuer.map(Arc::new));
        self.loaded.store(true, Ordering::Release);
        self.attempt_done();
    }

    /// Counts a fetch attempt that is over (the keys stay as they were on failure), and ends a
    /// wanted refetch.
    pub fn attempt_done(&self) {
        self.wanted.store(false, Ordering::Release);
        self.fetching.store(false, Ordering::Release);
        self.attempts.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refetches_are_granted_once_per_interval() {
        let r = RemoteKeys::new(
            "p",
            "https://idp/.well-known/openid-configuration",
            Duration::from_secs(300),
            Duration::from_secs(2),
        );
        assert!(!r.is_loaded() && r.keys().is_empty());
        // A demand while a fetch is under way joins it, and takes no grant.
        r.fetch_started();
        assert_eq!(r.demand_refetch_at(999_000), Some(0));
        assert!(!r.is_wanted());
        r.attempt_done();
        // The first demand is granted; others while it is pending wait for the same attempt.
        assert_eq!(r.demand_refetch_at(1_000_000), Some(1));
        assert!(r.is_wanted());
        assert_eq!(r.demand_refetch_at(1_000_001), Some(1));
        r.attempt_done();
        // Done, and too soon for another: nobody waits.
        assert_eq!(r.demand_refetch_at(1_000_002), None);
        assert_eq!(r.demand_refetch_at(1_000_000 + 299_999), None);
        // An interval later, granted again.
        assert_eq!(r.demand_refetch_at(1_000_000 + 300_000), Some(2));
        r.publish(KeySet::empty(), Some("iss".into()));
        assert!(r.is_loaded() && r.attempts() == 3);
        assert_eq!(r.issuer().as_deref().map(String::as_str), Some("iss"));
    }
}
