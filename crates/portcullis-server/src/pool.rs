//! Per-worker keep-alive pool of backend connections. No locks: each worker has its own.

use std::time::Instant;

use ahash::AHashMap;
use portcullis_tls::SslSession;

use crate::upstream::{BackendStream, PoolKey, Target};

struct Idle {
    stream: BackendStream,
    /// Closed once idle this long (its target's `idle_timeout`, kept with it: a callout's
    /// target is no configured backend to look the value up in).
    until: Instant,
}

/// TLS sessions kept per worker (one per target).
const MAX_SESSIONS: usize = 4096;

#[derive(Default)]
pub(crate) struct Pool {
    idle: AHashMap<PoolKey, Vec<Idle>>,
    /// The latest TLS session granted for each key, offered when the next connection opens,
    /// with the TLS context it was made under (a session is offered only to that context).
    sessions: AHashMap<PoolKey, (usize, SslSession)>,
    /// New connections opened, for tests and metrics.
    pub(crate) opened: u64,
    /// TLS connections opened by resuming a session.
    pub(crate) resumed: u64,
    /// Requests in flight on each server, on this worker (for `least_requests`).
    in_flight: AHashMap<PoolKey, u32>,
    /// The worker that owns the pool (its block in shared counters).
    pub(crate) worker: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("keys", &self.idle.len()).field("opened", &self.opened).finish()
    }
}

impl Pool {
    /// The pool of worker `id`.
    pub(crate) fn for_worker(id: usize) -> Pool {
        Pool { worker: id, ..Pool::default() }
    }

    /// The most recently used idle connection for `key` that has not been idle too long.
    pub(crate) fn take(&mut self, key: &PoolKey) -> Option<BackendStream> {
        let list = self.idle.get_mut(key)?;
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            if now < idle.until {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Keeps a connection for reuse, unless `target.max_idle` are already kept.
    pub(crate) fn put(&mut self, target: &Target, stream: BackendStream) {
        let list = match self.idle.get_mut(&target.key) {
            Some(list) => list,
            None => self.idle.entry(target.key.clone()).or_default(),
        };
        if list.len() < target.max_idle {
            list.push(Idle { stream, until: Instant::now() + target.idle_timeout });
        }
    }

    pub(crate) fn in_flight(&self, key: &PoolKey) -> u32 {
        self.in_flight.get(key).copied().unwrap_or(0)
    }

    /// One more (or one fewer) request in flight on the server `key`.
    pub(crate) fn count_in_flight(&mut self, key: &PoolKey, more: bool) {
        if more {
            *self.in_flight.entry(key.clone()).or_default() += 1;
        } else if let Some(n) = self.in_flight.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(key);
            }
        }
    }

    /// The session for `key` made under context `context` (an address that names it).
    pub(crate) fn session(&self, key: &PoolKey, context: usize) -> Option<SslSession> {
        self.sessions.get(key).filter(|(c, _)| *c == context).map(|(_, s)| s.clone())
    }

    pub(crate) fn keep_session(&mut self, key: &PoolKey, context: usize, session: SslSession) {
        let session = (context, session);
        match self.sessions.get_mut(key) {
            Some(s) => *s = session,
            None => {
                // Keys of contexts replaced by reloads are not pruned one by one: past a bound,
                // all go (and the next connections make full handshakes).
                if self.sessions.len() >= MAX_SESSIONS {
                    self.sessions.clear();
                }
                self.sessions.insert(key.clone(), session);
            }
        }
    }

    pub(crate) fn forget_session(&mut self, key: &PoolKey) {
        self.sessions.remove(key);
    }

    /// Closes connections idle for longer than their target's idle timeout.
    pub(crate) fn sweep(&mut self) {
        let now = Instant::now();
        for list in self.idle.values_mut() {
            list.retain(|i| now < i.until);
        }
        self.idle.retain(|_, list| !list.is_empty());
    }

    pub(crate) fn clear(&mut self) {
        self.idle.clear();
        self.sessions.clear();
    }
}
