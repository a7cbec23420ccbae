//! Per-worker keep-alive pool of backend connections. No locks: each worker has its own.

use std::net::SocketAddr;

use ahash::AHashMap;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;

#[derive(Debug)]
struct Idle {
    stream: TcpStream,
    since: Instant,
}

#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: AHashMap<SocketAddr, Vec<Idle>>,
    /// New connections opened, for tests and metrics.
    pub(crate) opened: u64,
}

impl Pool {
    /// The most recently used idle connection to `addr` that has not been idle too long.
    pub(crate) fn take(&mut self, addr: SocketAddr, idle_timeout: Duration) -> Option<TcpStream> {
        let list = self.idle.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < idle_timeout {
                return Some(idle.stream);
            }
        }
        None
    }

    /// Keeps a connection for reuse, unless `max_idle` are already kept.
    pub(crate) fn put(&mut self, addr: SocketAddr, stream: TcpStream, max_idle: usize) {
        let list = self.idle.entry(addr).or_default();
        if list.len() < max_idle {
            list.push(Idle { stream, since: Instant::now() });
        }
    }

    /// Closes connections idle for longer than `idle_timeout`.
    pub(crate) fn sweep(&mut self, idle_timeout: impl Fn(SocketAddr) -> Duration) {
        for (addr, list) in self.idle.iter_mut() {
            let limit = idle_timeout(*addr);
            list.retain(|i| i.since.elapsed() < limit);
        }
        self.idle.retain(|_, list| !list.is_empty());
    }

    pub(crate) fn clear(&mut self) {
        self.idle.clear();
    }
}
