//! Per-worker keep-alive pool of backend connections. No locks: each worker has its own.

use std::time::Instant;

use ahash::AHashMap;

use crate::upstream::{BackendStream, PoolKey, Target};

struct Idle {
    stream: BackendStream,
    /// Closed once idle this long (its target's `idle_timeout`, kept with it: a callout's
    /// target is no configured backend to look the value up in).
    until: Instant,
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
    }
}
