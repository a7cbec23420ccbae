//! A worker: one thread, one monoio runtime, its own listening sockets and backend pool.

use std::cell::{Cell, RefCell};
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, Cache};
use monoio::net::{TcpListener, TcpStream};
use portcullis_config::Driver;

use crate::event::{Event, Nudge, Rounds};
use crate::pool::Pool;
use crate::snapshot::Snapshot;

/// State shared by all workers and the control thread.
pub(crate) struct Shared {
    pub(crate) snapshot: Arc<ArcSwap<Snapshot>>,
    pub(crate) draining: AtomicBool,
    /// Workers that ended while the server was not stopping (a panic outside any connection,
    /// a runtime failure): the process must not serve on with fewer.
    pub(crate) lost_workers: AtomicUsize,
    /// Told when a worker is lost (set once, by whoever runs the process).
    pub(crate) on_lost_worker: OnceLock<Box<dyn Fn() + Send + Sync>>,
    /// The host's rate-limit and quota counts (also reached through the snapshot's policies).
    pub(crate) counters: Arc<portcullis_policy::Counters>,
    /// This process's field in the counts shared through Redis.
    pub(crate) host_field: String,
    /// Syncs with Redis that failed (unreachable, refusing, or answering nonsense), host-wide.
    pub(crate) failed_syncs: AtomicU64,
    /// Each worker's counters, by worker id (the admin endpoint sums them).
    pub(crate) stats: Vec<Arc<crate::stats::WorkerStats>>,
    /// The control side's record: reloads that took and that failed, the last one's result, and
    /// when the running configuration was loaded (Unix seconds).
    pub(crate) reloads: [AtomicU64; 2],
    pub(crate) last_reload: std::sync::Mutex<String>,
    pub(crate) loaded_at: AtomicU64,
    /// The process has stopped serving (workers joined): the admin endpoint goes too.
    pub(crate) stopped: AtomicBool,
    /// The access log's queue to the log thread.
    pub(crate) access: crate::accesslog::Sink,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("draining", &self.draining)
            .field("lost_workers", &self.lost_workers)
            .finish_non_exhaustive()
    }
}

/// Lives on a worker thread's stack: when the thread ends — by returning or by unwinding — while
/// the server is not stopping, the loss is counted, logged and reported at once.
pub(crate) struct ExitWatch {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
}

impl Drop for ExitWatch {
    fn drop(&mut self) {
        if self.shared.draining.load(Ordering::Acquire) {
            return;
        }
        self.shared.lost_workers.fetch_add(1, Ordering::AcqRel);
        let how = if std::thread::panicking() { "panicked" } else { "returned" };
        tracing::error!(worker = self.id, how, "worker thread exited while serving");
        if let Some(notify) = self.shared.on_lost_worker.get() {
            notify();
        }
    }
}

/// At most one "connection limit reached" line per worker per this interval.
const FULL_LOG_EVERY: Duration = Duration::from_secs(10);

/// How often a worker looks at the shared shutdown flag and sweeps its pool.
const TICK: Duration = Duration::from_millis(50);

pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    cache: RefCell<Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>>,
    pub(crate) pool: RefCell<Pool>,
    /// Tokens this worker verified, and its limited calls not yet shared with other hosts.
    pub(crate) local: Rc<RefCell<portcullis_policy::WorkerLocal>>,
    pub(crate) shutdown: Event,
    /// Wakes the sync task early: a key this worker had not noted came up.
    pub(crate) fleet_nudge: Nudge,
    /// Set once the sync task's first round is over (connected, and the host registered with the
    /// fleet), or there is no fleet: the worker serves after it.
    pub(crate) fleet_ready: Event,
    /// The sync task's rounds: a request whose limit key is new to the host waits for the end of
    /// the next one.
    pub(crate) fleet_rounds: Rounds,
    /// Which server of a backend takes the next request.
    pub(crate) picker: crate::balance::Picker,
    /// What this worker logged and has not handed over yet.
    pub(crate) outbox: crate::accesslog::Outbox,
    /// This worker's counters (`shared.stats[id]`).
    pub(crate) stats: Arc<crate::stats::WorkerStats>,
    active: Cell<usize>,
    /// Accept loops waiting for a connection to end (the worker is at `max_connections`).
    room_waiters: RefCell<Vec<Waker>>,
    requests: Cell<u64>,
    request_id_base: u64,
    /// Connections ended by a panic while serving them (the worker served on).
    pub(crate) panics: Cell<u64>,
    /// Set by the fault-injection hook: the worker's own loop panics at its next tick.
    #[cfg(feature = "fault-injection")]
    pub(crate) doomed: Cell<bool>,
    /// The fault-injection hook answers only when the process was started with
    /// `PORTCULLIS_FAULT_INJECTION=1` as well: a binary that a test build left behind with the
    /// feature does not obey the header.
    #[cfg(feature = "fault-injection")]
    pub(crate) faults: bool,
}

impl Drop for Worker {
    /// What the worker logged last (connections closed at the end of a drain, or a panic) is
    /// handed over too.
    fn drop(&mut self) {
        self.outbox.flush(&self.shared.access);
    }
}

impl Worker {
    /// The current snapshot (a lock-free read of a per-worker cache).
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.cache.borrow_mut().load().clone()
    }

    /// True once shutdown has begun: answer the request at hand, then close.
    pub(crate) fn draining(&self) -> bool {
        self.shutdown.is_set()
    }

    /// A process-unique id for a request, as 16 hex digits.
    pub(crate) fn next_request_id(&self, out: &mut [u8; 16]) {
        let n = self.requests.get().wrapping_add(1);
        self.requests.set(n);
        let id = self.request_id_base ^ n;
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in out.iter_mut().enumerate() {
            *b = HEX[((id >> (60 - 4 * i)) & 15) as usize];
        }
    }
}

/// Counts a connection as active for as long as it lives.
pub(crate) struct ActiveGuard(Rc<Worker>);

impl ActiveGuard {
    pub(crate) fn new(worker: &Rc<Worker>) -> ActiveGuard {
        worker.active.set(worker.active.get() + 1);
        crate::stats::WorkerStats::add(&worker.stats.connections_total);
        worker.stats.connections_active.store(worker.active.get() as u64, Ordering::Relaxed);
        ActiveGuard(worker.clone())
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.set(self.0.active.get() - 1);
        self.0.stats.connections_active.store(self.0.active.get() as u64, Ordering::Relaxed);
        // Only full workers have waiters: the common case is one empty-Vec check.
        if !self.0.room_waiters.borrow().is_empty() {
            for w in std::mem::take(&mut *self.0.room_waiters.borrow_mut()) {
                w.wake();
            }
        }
    }
}

impl Worker {
    /// Resolves once fewer than `cap` connections are open.
    async fn room(&self, cap: usize) {
        poll_fn(|cx| {
            if self.active.get() < cap {
                return Poll::Ready(());
            }
            self.room_waiters.borrow_mut().push(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }
}

/// Runs a worker until shutdown has drained (or the drain timeout passed).
pub(crate) fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<(usize, std::net::TcpListener)>,
    driver: Driver,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> std::io::Result<()> {
    let base = {
        let mut b = [0u8; 8];
        boring::rand::rand_bytes(&mut b).map_err(std::io::Error::other)?;
        u64::from_le_bytes(b) & !0xffff_ffff | ((id as u64) << 24)
    };
    let stats = shared.stats.get(id).cloned().unwrap_or_default();
    let worker = Rc::new(Worker {
        id,
        cache: RefCell::new(Cache::new(shared.snapshot.clone())),
        shared,
        pool: RefCell::new(Pool::for_worker(id)),
        local: portcullis_policy::WorkerLocal::shared(),
        shutdown: Event::default(),
        fleet_nudge: Nudge::default(),
        fleet_ready: Event::default(),
        fleet_rounds: Rounds::default(),
        picker: crate::balance::Picker::default(),
        outbox: crate::accesslog::Outbox::default(),
        stats,
        active: Cell::new(0),
        room_waiters: RefCell::new(Vec::new()),
        requests: Cell::new(0),
        request_id_base: base,
        panics: Cell::new(0),
        #[cfg(feature = "fault-injection")]
        doomed: Cell::new(false),
        #[cfg(feature = "fault-injection")]
        faults: std::env::var_os("PORTCULLIS_FAULT_INJECTION").is_some_and(|v| v == "1"),
    });
    let fut = serve(worker, listeners, ready.clone());
    let use_uring = match driver {
        Driver::Epoll => false,
        Driver::IoUring => true,
        Driver::Auto => monoio::utils::detect_uring(),
    };
    if use_uring {
        // One thread submits to its ring and reaps its completions when it asks for them
        // (SINGLE_ISSUER + DEFER_TASKRUN, kernel 6.1+): completions are not pushed at the worker
        // by interrupting it. Older kernels refuse the flags; the ring is then built without.
        let mut tuned = io_uring::IoUring::builder();
        tuned.setup_single_issuer().setup_defer_taskrun();
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(1024)
            .uring_builder(tuned)
            .enable_timer()
            .build()
            .or_else(|e| {
                if id == 0 {
                    tracing::info!(error = %e, "io_uring without DEFER_TASKRUN (kernel before 6.1?)");
                }
                monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(1024)
                    .enable_timer()
                    .build()
            });
        match built {
            Ok(mut rt) => return rt.block_on(fut),
            Err(e) if driver == Driver::Auto => log_fallback(id, &e.to_string()),
            Err(e) => {
                let msg = format!("io_uring driver unavailable: {e}");
                let _ = ready.send(Err(msg.clone()));
                return Err(std::io::Error::new(e.kind(), msg));
            }
        }
    } else if driver == Driver::Auto {
        log_fallback(id, "the kernel does not offer it");
    }
    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => rt.block_on(fut),
        Err(e) => {
            let _ = ready.send(Err(format!("epoll driver unavailable: {e}")));
            Err(e)
        }
    }
}

fn log_fallback(worker: usize, why: &str) {
    if worker == 0 {
        tracing::warn!(reason = why, "io_uring unavailable; workers run on the epoll driver");
    }
}

async fn serve(
    worker: Rc<Worker>,
    listeners: Vec<(usize, std::net::TcpListener)>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> std::io::Result<()> {
    // With counts shared through Redis, the worker connects (and the host registers with the
    // fleet) before it serves, so that its first calls on a limit know of the other hosts;
    // Redis unreachable delays the start by its timeout at most.
    drop(monoio::spawn(crate::fleet::run(worker.clone())));
    drop(monoio::spawn(crate::accesslog::flush_task(worker.clone())));
    if let Some(link) = worker.snapshot().fleet.clone() {
        monoio::select! {
            _ = worker.fleet_ready.wait() => {}
            _ = monoio::time::sleep(link.redis.timeout + Duration::from_millis(100)) => {}
        }
    }
    for (index, std_listener) in listeners {
        let listener = match TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("cannot register listener: {e}")));
                return Err(e);
            }
        };
        drop(monoio::spawn(accept_loop(worker.clone(), listener, index)));
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    // Watch the shared flag; keep the pool tidy.
    loop {
        worker.stats.last_turn_ms.store(portcullis_tls::now_unix_ms(), Ordering::Relaxed);
        monoio::time::sleep(TICK).await;
        if worker.shared.draining.load(Ordering::Acquire) {
            break;
        }
        #[cfg(feature = "fault-injection")]
        if worker.doomed.get() {
            panic!("fault injection: worker {} dies", worker.id);
        }
        worker.pool.borrow_mut().sweep();
    }
    worker.shutdown.set();
    worker.pool.borrow_mut().clear();
    let deadline = Instant::now() + worker.snapshot().server.drain_timeout;
    while worker.active.get() > 0 {
        if Instant::now() >= deadline {
            tracing::warn!(
                worker = worker.id,
                connections = worker.active.get(),
                "drain timeout; closing what is left"
            );
            break;
        }
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.outbox.flush(&worker.shared.access);
    Ok(())
}

async fn accept_loop(worker: Rc<Worker>, listener: TcpListener, index: usize) {
    let mut full_since: Option<Instant> = None;
    loop {
        // Back-pressure: at the cap, stop accepting; new connections wait in the kernel's accept
        // queue (and past it, their SYNs are retried by the client) until one ends here.
        let cap = worker.snapshot().max_connections;
        if worker.active.get() >= cap {
            if full_since.is_none_or(|t| t.elapsed() >= FULL_LOG_EVERY) {
                tracing::warn!(
                    worker = worker.id,
                    max_connections = cap,
                    "connection limit reached; accepting paused"
                );
                full_since = Some(Instant::now());
            }
            let room = monoio::select! {
                _ = worker.room(cap) => true,
                _ = worker.shutdown.wait() => false,
            };
            if !room {
                break;
            }
            continue;
        }
        let accepted = monoio::select! {
            r = listener.accept() => Some(r),
            _ = worker.shutdown.wait() => None,
        };
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => {
                spawn_connection(&worker, stream, peer, index);
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(worker = worker.id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

fn spawn_connection(worker: &Rc<Worker>, stream: TcpStream, peer: SocketAddr, listener: usize) {
    let guard = ActiveGuard::new(worker);
    let worker = worker.clone();
    // Detached: the task runs to completion on its own; its handle is not needed.
    drop(monoio::spawn(async move {
        let request_id = Rc::new(Cell::new(None));
        let mut conn = pin!(crate::conn::serve(worker.clone(), stream, peer, listener, request_id.clone()));
        // A panic while serving one connection ends that connection, never the worker: each
        // poll runs under `catch_unwind`, and the future is dropped (its sockets closed) when one
        // unwinds. Whatever it held in the worker (a pool borrow, a counter) is released by the
        // unwinding itself.
        let outcome = poll_fn(|cx| match catch_unwind(AssertUnwindSafe(|| conn.as_mut().poll(cx))) {
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(payload)),
        })
        .await;
        if let Err(payload) = outcome {
            worker.panics.set(worker.panics.get() + 1);
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".to_owned());
            let id = request_id.get().map(|id: [u8; 16]| String::from_utf8_lossy(&id).into_owned());
            tracing::error!(
                worker = worker.id,
                %peer,
                request_id = id.as_deref().unwrap_or("-"),
                panic = %message,
                panics = worker.panics.get(),
                "connection ended by a panic; the worker serves on"
            );
        }
        drop(guard);
    }));
}
