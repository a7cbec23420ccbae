//! Per-worker keep-alive pool of backend connections. No locks: each worker has its own.

use std::time::{Duration, Instant};

use ahash::AHashMap;
use bytes::Bytes;

use crate::upstream::{BackendStream, PoolKey};

struct Idle {
    stream: BackendStream,
    since: Instant,
}

#[derive(Default)]
pub(crate) struct Pool {
    idle: AHashMap<PoolKey, Vec<Idle>>,
    /// New connections opened, for tests and metrics.
    pub(crate) opened: u64,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("keys", &self.idle.len()).field("opened", &self.opened).finish()
    }
}

impl Pool {
    /// The most recently used idle connection for `key` that has not been idle too long.
    pub(crate) fn take(&mut self, key: &PoolKey, idle_timeout: Duration) -> Option<BackendStream> {
        let list = self.idle.get_mut(key)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < idle_timeout {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Keeps a connection for reuse, unless `max_idle` are already kept.
    pub(crate) fn put(&mut self, key: &PoolKey, stream: BackendStream, max_idle: usize) {
        let list = match self.idle.get_mut(key) {
            Some(list) => list,
            None => self.idle.entry(key.clone()).or_default(),
        };
        if list.len() < max_idle {
            list.push(Idle { stream, since: Instant::now() });
        }
    }

    /// Closes connections idle for longer than their backend's idle timeout.
    pub(crate) fn sweep(&mut self, idle_timeout: impl Fn(&PoolKey) -> Duration) {
        for (key, list) in self.idle.iter_mut() {
            let limit = idle_timeout(key);
            list.retain(|i| i.since.elapsed() < limit);
        }
        self.idle.retain(|_, list| !list.is_empty());
    }

    pub(crate) fn clear(&mut self) {
        self.idle.clear();
    }
}

/// Key of the pooled connections for one backend.
pub(crate) fn key_of(addr: std::net::SocketAddr, authority: &Bytes) -> PoolKey {
    PoolKey { addr, authority: authority.clone() }
}
