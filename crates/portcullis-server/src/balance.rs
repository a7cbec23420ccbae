//! Backends with several servers: which server a request goes to (round robin, or the less busy
//! of two picked at random), and which are out of rotation — passively, after consecutive
//! failures (as Envoy's outlier detection ejects them), or actively, when a health check fails.
//!
//! A server's health is the process's (every worker sees a failure any worker saw) and outlives
//! reloads that keep the server. It is written only when something changes (a failure, the first
//! success after failures), so the data path reads it and seldom writes it. What is busy is each
//! worker's own count of its requests in flight.

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use portcullis_config::Balance;

use crate::snapshot::Backend;
use crate::upstream::PoolKey;

/// The most a repeated ejection multiplies `eject_for` by.
const MOST_EJECTION_FACTOR: u32 = 10;

/// One server's health, shared by the workers.
#[derive(Debug, Default)]
pub(crate) struct Health {
    /// Consecutive failures since the last success.
    failures: AtomicU32,
    /// Ejections since the last success (each next one lasts longer).
    ejections: AtomicU32,
    /// Out of rotation until then (ms since the Unix epoch).
    ejected_until_ms: AtomicU64,
    /// The last active check failed.
    pub(crate) checked_down: AtomicBool,
}

impl Health {
    /// The health of server `key` of backend `backend`: the one the server already keeps for
    /// it (a reload that keeps the server keeps what is known of it), or a new one. Two backends
    /// that share a server judge it each on its own (their checks may differ), and so do two
    /// servers in one process.
    pub(crate) fn of(kept: &crate::stats::Kept, backend: &str, key: &PoolKey) -> Arc<Health> {
        kept.health.get_or(
            |(b, k)| b == backend && k == key,
            || (backend.to_owned(), key.clone()),
            Health::default,
        )
    }

    pub(crate) fn available(&self, now_ms: u64) -> bool {
        !self.checked_down.load(Ordering::Relaxed) && self.ejected_until_ms.load(Ordering::Relaxed) <= now_ms
    }

    /// A response came (not a 502, 503 or 504).
    pub(crate) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// The server failed a request; after `eject_after` in a row it is out of rotation for
    /// `eject_for`, times the ejections since its last success (at most ten times). Returns for
    /// how long when this failure ejected it.
    pub(crate) fn failed(&self, eject_after: u32, eject_for: Duration, now_ms: u64) -> Option<Duration> {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if eject_after == 0 || n < eject_after {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        let k = (self.ejections.fetch_add(1, Ordering::Relaxed) + 1).min(MOST_EJECTION_FACTOR);
        let out = eject_for * k;
        self.ejected_until_ms.store(now_ms + out.as_millis() as u64, Ordering::Relaxed);
        Some(out)
    }
}

/// Resolves a server's name again (`resolve` does the lookup); returns the new address when it
/// changed. The old address's pooled connections are used until they idle out.
pub(crate) fn refresh(
    name: &str,
    current: &arc_swap::ArcSwap<std::net::SocketAddr>,
    resolve: impl Fn(&str) -> Option<std::net::SocketAddr>,
) -> Option<std::net::SocketAddr> {
    let found = resolve(name)?;
    (found != **current.load()).then(|| {
        current.store(Arc::new(found));
        found
    })
}

/// A worker's state for picking servers.
#[derive(Debug)]
pub(crate) struct Picker {
    next: Cell<u64>,
    random: Cell<u64>,
}

impl Default for Picker {
    fn default() -> Picker {
        let mut seed = [0u8; 8];
        let _ = boring::rand::rand_bytes(&mut seed);
        Picker { next: Cell::new(0), random: Cell::new(u64::from_le_bytes(seed) | 1) }
    }
}

impl Picker {
    fn random(&self) -> u64 {
        // xorshift64
        let mut x = self.random.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.random.set(x);
        x
    }

    /// The server of `backend` for the next request, not `exclude` (a server that just failed
    /// it). `busy(i)`: this worker's requests in flight on server `i`. Servers out of rotation
    /// are passed over, unless all are: then any will do (a request that may fail beats one
    /// that surely does).
    pub(crate) fn pick(
        &self,
        backend: &Backend,
        exclude: Option<usize>,
        now_ms: u64,
        busy: impl Fn(usize) -> u32,
    ) -> usize {
        let n = backend.servers.len();
        if n <= 1 {
            return 0;
        }
        let allowed = |i: usize| Some(i) != exclude;
        let up = |i: usize| allowed(i) && backend.servers[i].health.available(now_ms);
        let start = self.next.get();
        self.next.set(start.wrapping_add(1));
        let ring = |ok: &dyn Fn(usize) -> bool| {
            (0..n as u64).map(|k| ((start + k) % n as u64) as usize).find(|&i| ok(i))
        };
        match backend.balance {
            Balance::RoundRobin => ring(&up),
            Balance::LeastRequests => {
                let candidates: Vec<usize> = (0..n).filter(|&i| up(i)).collect();
                match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    m => {
                        let a = candidates[(self.random() % m as u64) as usize];
                        let mut b = candidates[(self.random() % m as u64) as usize];
                        if b == a {
                            b = candidates[(candidates.iter().position(|&c| c == a).unwrap_or(0) + 1) % m];
                        }
                        Some(if busy(b) < busy(a) { b } else { a })
                    }
                }
            }
        }
        .or_else(|| ring(&allowed))
        .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_config::host_of;

    #[test]
    fn a_server_keeps_what_it_learnt_of_a_backend_and_never_shares_it() {
        let (one, other) = (crate::stats::Kept::default(), crate::stats::Kept::default());
        let key = PoolKey {
            addr: "127.0.0.1:5000".parse().expect("addr"),
            authority: bytes::Bytes::from_static(b"127.0.0.1:5000"),
            tls: 0,
        };
        let health = Health::of(&one, "app", &key);
        assert!(health.failed(1, Duration::from_secs(10), 1_000).is_some());
        // A reload of the same server: the same health, still ejected.
        let again = Health::of(&one, "app", &key);
        assert!(Arc::ptr_eq(&health, &again) && !again.available(2_000));
        // Another server in the process, or another backend of the same server: their own.
        assert!(Health::of(&other, "app", &key).available(2_000));
        assert!(Health::of(&one, "api", &key).available(2_000));
        // Once no configuration holds it, it is forgotten.
        drop((health, again));
        assert!(Health::of(&one, "app", &key).available(2_000));
    }

    #[test]
    fn a_name_that_resolves_elsewhere_moves_its_server() {
        let current = arc_swap::ArcSwap::from_pointee("127.0.0.1:5000".parse().expect("addr"));
        let same = |_: &str| "127.0.0.1:5000".parse().ok();
        assert_eq!(refresh("app.internal:5000", &current, same), None);
        let moved = |_: &str| "127.0.0.2:5000".parse().ok();
        assert_eq!(refresh("app.internal:5000", &current, moved), "127.0.0.2:5000".parse().ok());
        assert_eq!(current.load().to_string(), "127.0.0.2:5000");
        assert_eq!(
            refresh("app.internal:5000", &current, |_| None),
            None,
            "a failed lookup keeps the address"
        );
        assert_eq!(current.load().to_string(), "127.0.0.2:5000");
        assert_eq!(
            (host_of("[::1]:80"), host_of("a.b:1"), host_of("10.0.0.1:5")),
            ("::1", "a.b", "10.0.0.1")
        );
    }

    #[test]
    fn consecutive_failures_eject_for_longer_each_time() {
        let h = Health::default();
        let d = Duration::from_secs(30);
        assert_eq!(h.failed(3, d, 1_000), None);
        assert_eq!(h.failed(3, d, 1_000), None);
        h.succeeded();
        assert_eq!(h.failed(3, d, 1_000), None, "a success starts the count over");
        assert_eq!(h.failed(3, d, 1_000), None);
        assert_eq!(h.failed(3, d, 1_000), Some(d));
        assert!(!h.available(1_000) && h.available(31_000));
        for _ in 0..3 {
            h.failed(3, d, 31_000);
        }
        assert!(!h.available(31_000 + 59_999), "twice as long the second time");
        assert!(h.available(31_000 + 60_000));
        assert_eq!(h.failed(0, d, 0), None, "eject_after = 0: never");
    }
}
