//! What the workers count for the operator: one set of counters per worker, written only by that
//! worker (relaxed atomics on its own cache lines: no contention on the data path), summed when
//! `/metrics` is scraped. A worker adds with [`bump`]: a load and a store, no locked instruction.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why the proxy refused a request itself, by the step (or check) that said no.
pub(crate) const REFUSAL_KINDS: [&str; 10] = [
    "client_certificate",
    "subscription",
    "jwt",
    "ip_filter",
    "check_header",
    "rate_limit",
    "quota",
    "callout",
    "return_response",
    "other",
];

/// The refusal kind of a policy refusal's reason (its log text).
pub(crate) fn refusal_kind(reason: &str) -> usize {
    let r = reason.to_ascii_lowercase();
    let kind = if r.contains("rate limit") {
        "rate_limit"
    } else if r.contains("quota") {
        "quota"
    } else if r.contains("ip filter") {
        "ip_filter"
    } else if r.contains("check header") {
        "check_header"
    } else if r.contains("callout") {
        "callout"
    } else if r.contains("return_response") {
        "return_response"
    } else if r.contains("subscription key") {
        "subscription"
    } else if r.contains("jwt") || r.contains("token") {
        "jwt"
    } else if r.contains("certificate") {
        "client_certificate"
    } else {
        "other"
    };
    REFUSAL_KINDS.iter().position(|k| *k == kind).unwrap_or(REFUSAL_KINDS.len() - 1)
}

/// TLS handshakes: completed in full, resumed, failed.
pub(crate) const HANDSHAKE_RESULTS: [&str; 3] = ["full", "resumed", "failed"];

/// The protocol versions of completed handshakes.
pub(crate) const TLS_VERSIONS: [&str; 3] = ["TLSv1.2", "TLSv1.3", "other"];

pub(crate) fn tls_version_index(version: &str) -> usize {
    TLS_VERSIONS.iter().position(|v| *v == version).unwrap_or(TLS_VERSIONS.len() - 1)
}

/// Why handshakes failed.
pub(crate) const HANDSHAKE_FAILURES: [&str; 9] = [
    "certificate_rejected",
    "no_shared_cipher",
    "no_shared_group",
    "unsupported_version",
    "not_tls",
    "protocol",
    "closed",
    "timeout",
    "other",
];

/// The index in [`HANDSHAKE_FAILURES`] of a handshake error.
pub(crate) fn handshake_failure(e: &portcullis_tls::HandshakeError) -> usize {
    use portcullis_tls::{HandshakeError, TlsFault};
    let name = match e {
        HandshakeError::CertificateRejected(_) => "certificate_rejected",
        HandshakeError::Protocol { fault, .. } => match fault {
            TlsFault::NoSharedCipher => "no_shared_cipher",
            TlsFault::NoSharedGroup => "no_shared_group",
            TlsFault::UnsupportedVersion => "unsupported_version",
            TlsFault::NotTls => "not_tls",
            _ => "protocol",
        },
        HandshakeError::Closed | HandshakeError::Io(_) => "closed",
        _ => "other",
    };
    handshake_failure_named(name)
}

/// The index in [`HANDSHAKE_FAILURES`] of reason `name` (`other` for one it does not list).
pub(crate) fn handshake_failure_named(name: &str) -> usize {
    HANDSHAKE_FAILURES.iter().position(|f| *f == name).unwrap_or(HANDSHAKE_FAILURES.len() - 1)
}

/// Adds `n` to a counter that only the calling worker writes (every per-worker counter here).
///
/// With one writer, a relaxed load and store lose no count, and a scrape still reads each value
/// whole. A locked add (`fetch_add`) would be as correct, but it also waits until every store the
/// worker made before it has reached its cache: a few counters per request, each a wait as long
/// as the slowest store in flight (a record written into memory the log thread read last).
#[inline]
pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

/// Takes one off a gauge that only the calling worker writes (see [`bump`]).
#[inline]
pub(crate) fn unbump(counter: &AtomicU64) {
    counter.store(counter.load(Ordering::Relaxed).wrapping_sub(1), Ordering::Relaxed);
}

/// Upper bounds of the duration histograms' buckets, in microseconds (0.5 ms to 10 s).
pub(crate) const BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000,
];

/// A duration histogram: a count per bucket (the last for longer than the last bound) and the
/// sum.
#[derive(Debug, Default)]
pub(crate) struct Histogram {
    pub(crate) buckets: [AtomicU64; BUCKETS_US.len() + 1],
    pub(crate) sum_us: AtomicU64,
}

impl Histogram {
    pub(crate) fn observe(&self, elapsed: std::time::Duration) {
        let us = elapsed.as_micros().min(u128::from(u64::MAX)) as u64;
        let i = BUCKETS_US.partition_point(|&b| b < us);
        bump(&self.buckets[i], 1);
        bump(&self.sum_us, us);
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct WorkerStats {
    /// When the worker's loop last turned (ms since the Unix epoch): `/healthz` reads it.
    pub(crate) last_turn_ms: AtomicU64,
    /// Requests answered, by status class (1xx … 5xx).
    pub(crate) requests: [AtomicU64; 5],
    /// Requests the proxy refused by policy, by [`REFUSAL_KINDS`].
    pub(crate) refusals: [AtomicU64; REFUSAL_KINDS.len()],
    /// TLS handshakes, by [`HANDSHAKE_RESULTS`].
    pub(crate) handshakes: [AtomicU64; 3],
    /// Completed handshakes by [`TLS_VERSIONS`].
    pub(crate) tls_versions: [AtomicU64; TLS_VERSIONS.len()],
    /// Failed handshakes by [`HANDSHAKE_FAILURES`].
    pub(crate) handshake_failures: [AtomicU64; HANDSHAKE_FAILURES.len()],
    /// Connections waiting for a request (between requests, or before the first).
    pub(crate) connections_idle: AtomicU64,
    /// `send_request` steps answered from the cache (no callout made).
    pub(crate) callout_cache_hits: AtomicU64,
    /// Refusals by their reason (a short fixed text per cause, such as "jwt expired"): a
    /// refusal is not the hot path, and only the admin endpoint's scrape contends for it.
    pub(crate) refusal_reasons: std::sync::Mutex<Vec<(&'static str, u64)>>,
    pub(crate) connections_total: AtomicU64,
    pub(crate) connections_active: AtomicU64,
    /// The proxy's own 502 and 504 answers (a backend unreachable, failing or too slow).
    pub(crate) upstream_errors: [AtomicU64; 2],
    /// From the request's head to the end of its answer.
    pub(crate) request_duration: Histogram,
    /// From sending a request to a backend to its answer's head.
    pub(crate) upstream_duration: Histogram,
    /// TLS handshakes with clients that completed.
    pub(crate) handshake_duration: Histogram,
    /// Callouts (`send_request`) that got an answer, from sending to the whole answer.
    pub(crate) callout_duration: Histogram,
    /// Callouts that got no answer (unreachable, timed out, broken).
    pub(crate) callout_failures: AtomicU64,
    /// Syncs with Redis that were answered, from sending to the last answer.
    pub(crate) redis_sync_duration: Histogram,
    /// Per listener: the soonest expiry (Unix seconds) of the client certificates seen on it
    /// (`u64::MAX`: none yet).
    pub(crate) client_cert_soonest: Vec<AtomicU64>,
}

impl WorkerStats {
    /// Counters for a worker serving `listeners` listeners.
    pub(crate) fn new(listeners: usize) -> WorkerStats {
        WorkerStats {
            client_cert_soonest: (0..listeners).map(|_| AtomicU64::new(u64::MAX)).collect(),
            ..WorkerStats::default()
        }
    }

    /// A client certificate expiring at `not_after` was presented on `listener`.
    pub(crate) fn client_cert_seen(&self, listener: usize, not_after: i64) {
        if let Some(slot) = self.client_cert_soonest.get(listener) {
            let not_after = not_after.max(0) as u64;
            // One writer, as for `bump`.
            if not_after < slot.load(Ordering::Relaxed) {
                slot.store(not_after, Ordering::Relaxed);
            }
        }
    }
}

impl WorkerStats {
    #[inline]
    pub(crate) fn add(counter: &AtomicU64) {
        bump(counter, 1);
    }

    /// A request refused for `reason` (counted by step in `refusals` too).
    pub(crate) fn refused(&self, reason: &'static str) {
        WorkerStats::add(&self.refusals[refusal_kind(reason)]);
        let mut reasons = self.refusal_reasons.lock().unwrap_or_else(|e| e.into_inner());
        match reasons.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => reasons.push((reason, 1)),
        }
    }

    pub(crate) fn request(&self, status: u16) {
        if (100..600).contains(&status) {
            WorkerStats::add(&self.requests[usize::from(status / 100) - 1]);
        }
    }
}

/// What a server keeps across reloads (an API's counters, a backend server's pool's counters and
/// its health), found again by name when the next configuration is compiled. Each server has its
/// own: two servers in one process (tests, or a program embedding the proxy) never share a row,
/// whose one writer must be its worker (see [`bump`]), nor what one learnt of a backend server.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    /// By API name and operations.
    apis: Shelf<(String, Vec<String>), ApiCounters>,
    /// By backend (or `callout`) and server.
    pools: Shelf<(String, String), PoolCounters>,
    /// By backend and server (see [`crate::balance::Health::of`]).
    pub(crate) health: Shelf<(String, crate::upstream::PoolKey), crate::balance::Health>,
}

/// What is kept under a key while a configuration holds it (and forgotten once none does).
#[derive(Debug)]
pub(crate) struct Shelf<K, T>(std::sync::Mutex<Vec<(K, std::sync::Weak<T>)>>);

impl<K, T> Default for Shelf<K, T> {
    fn default() -> Self {
        Shelf(std::sync::Mutex::new(Vec::new()))
    }
}

impl<K, T> Shelf<K, T> {
    /// The one kept under the key `is` finds, or the one `make` makes, kept under `key()`.
    pub(crate) fn get_or(
        &self,
        is: impl Fn(&K) -> bool,
        key: impl FnOnce() -> K,
        make: impl FnOnce() -> T,
    ) -> std::sync::Arc<T> {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|(_, w)| w.strong_count() > 0);
        if let Some(found) = kept.iter().find(|(k, _)| is(k)).and_then(|(_, w)| w.upgrade()) {
            return found;
        }
        let made = std::sync::Arc::new(make());
        kept.push((key(), std::sync::Arc::downgrade(&made)));
        made
    }
}

/// One API's requests by status class, a block per worker. Kept by name across reloads, so
/// that a reload does not reset an API's counters.
#[derive(Debug)]
pub(crate) struct ApiCounters {
    /// The API's operations' names, in order (row 0 is the API without an operation).
    operations: Vec<String>,
    per_worker: Vec<ApiWorker>,
}

/// One worker's counts of an API: a row per operation (and row 0), by status class.
#[derive(Debug, Default)]
#[repr(align(128))]
struct ApiWorker {
    rows: Box<[[AtomicU64; 5]]>,
}

impl ApiCounters {
    /// The counters of API `name` with `operations` (names in order): the ones already kept for
    /// it, or new ones for `workers`. A reload that changes the operations starts them anew.
    pub(crate) fn of(
        kept: &Kept,
        name: &str,
        operations: Vec<String>,
        workers: usize,
    ) -> std::sync::Arc<ApiCounters> {
        let rows = operations.len() + 1;
        let make = || ApiCounters {
            operations: operations.clone(),
            per_worker: (0..workers.max(1))
                .map(|_| ApiWorker { rows: (0..rows).map(|_| Default::default()).collect() })
                .collect(),
        };
        kept.apis.get_or(
            |(n, o)| n == name && *o == operations,
            || (name.to_owned(), operations.clone()),
            make,
        )
    }

    /// A request answered `status` on operation `slot` (0: the API has no operations).
    pub(crate) fn request(&self, worker: usize, slot: usize, status: u16) {
        if let (Some(row), true) =
            (self.per_worker.get(worker).and_then(|w| w.rows.get(slot)), (100..600).contains(&status))
        {
            // Row `worker` is written by that worker only.
            bump(&row[usize::from(status / 100) - 1], 1);
        }
    }

    /// Requests of status class `class` (0 for 1xx … 4 for 5xx), over workers and operations.
    pub(crate) fn requests(&self, class: usize) -> u64 {
        self.per_worker.iter().flat_map(|w| w.rows.iter()).map(|r| r[class].load(Ordering::Relaxed)).sum()
    }

    /// The operations' names and, for each, its requests by status class over workers.
    pub(crate) fn by_operation(&self) -> impl Iterator<Item = (&str, [u64; 5])> + '_ {
        self.operations.iter().enumerate().map(|(i, name)| {
            let mut classes = [0u64; 5];
            for w in &self.per_worker {
                if let Some(row) = w.rows.get(i + 1) {
                    for (c, n) in classes.iter_mut().zip(row.iter()) {
                        *c += n.load(Ordering::Relaxed);
                    }
                }
            }
            (name.as_str(), classes)
        })
    }
}

/// What happens to the connections to one backend server: opened, taken from the pool, found
/// stale in the pool (closed or talking), opened by resuming a TLS session.
pub(crate) const POOL_EVENTS: [&str; 5] = ["opened", "reused", "stale", "resumed", "failed"];

/// A connection event, in [`POOL_EVENTS`] order; `failed`: a connection that could not be made
/// (refused, timed out, TLS handshake failed).
#[derive(Debug, Clone, Copy)]
pub(crate) enum PoolEvent {
    Opened,
    Reused,
    Stale,
    Resumed,
    Failed,
}

/// One backend server's connection events, a block per worker; kept across reloads by the
/// backend's and the server's names.
#[derive(Debug)]
pub(crate) struct PoolCounters {
    per_worker: Vec<PoolWorker>,
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct PoolWorker {
    events: [AtomicU64; POOL_EVENTS.len()],
}

impl PoolCounters {
    pub(crate) fn of(
        kept: &Kept,
        backend: &str,
        server: &str,
        workers: usize,
    ) -> std::sync::Arc<PoolCounters> {
        kept.pools.get_or(
            |(b, s)| b == backend && s == server,
            || (backend.to_owned(), server.to_owned()),
            || PoolCounters { per_worker: (0..workers.max(1)).map(|_| PoolWorker::default()).collect() },
        )
    }

    /// Event `event` on worker `worker`.
    pub(crate) fn count(&self, worker: usize, event: PoolEvent) {
        let event = event as usize;
        if let Some(w) = self.per_worker.get(worker) {
            // Written by that worker only.
            bump(&w.events[event], 1);
        }
    }

    pub(crate) fn total(&self, event: usize) -> u64 {
        self.per_worker.iter().map(|w| w.events[event].load(Ordering::Relaxed)).sum()
    }
}

/// The sum over workers of one counter.
pub(crate) fn sum(stats: &[std::sync::Arc<WorkerStats>], pick: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
    stats.iter().map(|s| pick(s).load(Ordering::Relaxed)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_finds_its_counters_again_and_never_another_servers() {
        let (one, other) = (Kept::default(), Kept::default());
        let ops = || vec!["getItem".to_owned()];
        let api = ApiCounters::of(&one, "todo", ops(), 2);
        api.request(1, 1, 204);
        // A reload of the same server: the same rows, counts and all.
        let again = ApiCounters::of(&one, "todo", ops(), 2);
        assert!(std::sync::Arc::ptr_eq(&api, &again));
        assert_eq!(again.requests(1), 1);
        // Another server in the process, same API: rows of its own (one writer per row).
        let theirs = ApiCounters::of(&other, "todo", ops(), 2);
        assert!(!std::sync::Arc::ptr_eq(&api, &theirs));
        assert_eq!(theirs.requests(1), 0);
        // Other operations start anew.
        assert!(!std::sync::Arc::ptr_eq(&api, &ApiCounters::of(&one, "todo", Vec::new(), 2)));
        let pool = PoolCounters::of(&one, "app", "10.0.0.1:80", 2);
        assert!(std::sync::Arc::ptr_eq(&pool, &PoolCounters::of(&one, "app", "10.0.0.1:80", 2)));
        assert!(!std::sync::Arc::ptr_eq(&pool, &PoolCounters::of(&other, "app", "10.0.0.1:80", 2)));
    }

    #[test]
    fn events_and_reasons_are_counted_under_their_names() {
        let events =
            [PoolEvent::Opened, PoolEvent::Reused, PoolEvent::Stale, PoolEvent::Resumed, PoolEvent::Failed];
        let names: Vec<&str> = events.iter().map(|&e| POOL_EVENTS[e as usize]).collect();
        assert_eq!(names, POOL_EVENTS);
        assert_eq!(HANDSHAKE_FAILURES[handshake_failure_named("timeout")], "timeout");
        assert_eq!(HANDSHAKE_FAILURES[handshake_failure_named("no such reason")], "other");
    }

    #[test]
    fn refusal_reasons_have_their_kind() {
        for (reason, kind) in [
            ("rate limit exceeded", "rate_limit"),
            ("quota exceeded", "quota"),
            ("ip filter", "ip_filter"),
            ("callout refused the request", "callout"),
            ("Access denied due to missing subscription key", "subscription"),
            ("JWT not present", "jwt"),
            ("certificate expired", "client_certificate"),
            ("something new", "other"),
        ] {
            assert_eq!(REFUSAL_KINDS[refusal_kind(reason)], kind, "{reason}");
        }
    }
}
