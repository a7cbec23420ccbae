//! The control side: start workers, swap snapshots on reload, drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::{fmt, io};

use arc_swap::ArcSwap;
use portcullis_config::{Config, ConfigErrors};
use portcullis_tls::TicketKeys;
use socket2::{Domain, Protocol, Socket, Type};

use crate::keys::KeyFetchers;
use crate::snapshot::Snapshot;
use crate::worker::{self, Shared};
use portcullis_policy::Counters;

/// Why the server did not start.
#[derive(Debug)]
pub enum StartError {
    /// The configuration, or a file it names, is wrong.
    Config(ConfigErrors),
    /// A socket could not be bound, a thread or runtime not started.
    Io(String),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "{e}"),
            StartError::Io(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for StartError {}

/// How long stopping waits for the access log to be written out.
const LOG_FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Has the access log file opened again, from the control thread.
#[derive(Debug, Clone)]
pub struct LogReopener(Arc<Shared>);

impl LogReopener {
    pub fn reopen(&self) {
        self.0.access.reopen();
    }
}

/// A running proxy: its workers, and the handle to reload or stop them.
pub struct Server {
    shared: Arc<Shared>,
    /// The identity providers' key fetchers (they outlive reloads that keep a provider).
    fetchers: KeyFetchers,
    /// Rate-limit and quota counts (kept across reloads).
    counters: Arc<Counters>,
    /// The metrics kept across reloads.
    kept: crate::stats::Kept,
    workers: Vec<JoinHandle<io::Result<()>>>,
    /// Active health checks of backends' servers.
    health: Option<JoinHandle<()>>,
    /// The admin endpoint, when `[server] admin` is set, and where it listens.
    admin: Option<crate::admin::Admin>,
    /// The access log's writer.
    log: Option<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    configured_binds: Vec<SocketAddr>,
    /// `[server] background_cpus` as the server started with them (a reload cannot move
    /// threads already running).
    background_cpus: Vec<usize>,
    /// `[server] admin` and the access log's `queue` as the server started with them (the
    /// endpoint's socket and the queue are made once).
    admin_configured: Option<SocketAddr>,
    access_queue: usize,
    keys: TicketKeys,
    generation: u64,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("workers", &self.workers.len())
            .field("local_addrs", &self.local_addrs)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// Fails when another socket already listens on `addr`. The workers' own sockets share the
/// address through SO_REUSEPORT, which would also let a second instance (another config, an
/// old binary) join in silently, and requests would land on either at random. A socket that
/// does not ask for SO_REUSEPORT cannot bind beside such listeners: that is the probe.
fn ensure_unclaimed(addr: SocketAddr) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Connections of an earlier run in TIME_WAIT do not count.
    probe.set_reuse_address(true)?;
    if addr.is_ipv6() {
        probe.set_only_v6(true)?;
    }
    match probe.bind(&addr.into()) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "another process already listens there (is another instance running?)",
        )),
        other => other,
    }
}

/// A listening socket with SO_REUSEPORT, so every worker can have its own.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux: no setsockopt per
    // connection (responses are written whole; Nagle would only delay them).
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Records the access log's queue holds (`[server] access_log.queue`, or its default).
fn access_queue(config: &Config) -> usize {
    config.server.access_log.as_ref().map_or(65_536, |a| a.queue)
}

/// `[server] background_cpus`, the numbers alone, in order.
fn cpu_numbers(config: &Config) -> Vec<usize> {
    let mut cpus: Vec<usize> = config.server.background_cpus.iter().map(|c| c.value).collect();
    cpus.sort_unstable();
    cpus
}

/// Tells the counters whether counts are shared through Redis, and what to do without it.
fn share_counts(counters: &Counters, config: &Config) {
    match &config.server.redis {
        Some(r) => counters.set_fleet(true, r.failure == portcullis_config::RedisFailure::Deny),
        None => counters.set_fleet(false, false),
    }
}

impl Server {
    /// Compiles `config`, binds every listener once per worker and starts the workers.
    pub fn start(config: &Config) -> Result<Server, StartError> {
        // First: every thread started from here on, but the workers, runs on these CPUs. A
        // start that fails gives the calling thread its CPUs back.
        let worker_cpus = crate::cpus::narrow(&config.server.background_cpus).map_err(StartError::Io)?;
        let started = Server::start_narrowed(config, worker_cpus.clone());
        if let (Err(_), Some(cpus)) = (&started, &worker_cpus) {
            crate::cpus::widen(cpus);
        }
        started
    }

    fn start_narrowed(
        config: &Config,
        worker_cpus: Option<crate::cpus::WorkerCpus>,
    ) -> Result<Server, StartError> {
        let keys = TicketKeys::generate();
        let mut fetchers = KeyFetchers::default();
        let providers = fetchers.prepare(config);
        let counters = Arc::new(Counters::with_capacity(config.server.rate_limit_keys));
        let kept = crate::stats::Kept::default();
        let snapshot =
            Snapshot::compile_keeping(config, &keys, 1, providers.clone(), counters.clone(), &kept)
                .map_err(StartError::Config)?;
        let workers = crate::snapshot::worker_count(&config.server);
        // Bind everything before starting anything, so that an address in use is reported as
        // such. Port 0 is resolved by the first socket and reused by the others.
        let mut per_worker: Vec<Vec<(usize, std::net::TcpListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            ensure_unclaimed(l.bind.value).map_err(|e| {
                StartError::Io(format!("{}: cannot listen on {}: {e}", l.bind.loc, l.bind.value))
            })?;
        }
        for (i, l) in config.listeners.iter().enumerate() {
            let mut addr = l.bind.value;
            for (w, sockets) in per_worker.iter_mut().enumerate() {
                let socket = bind(addr)
                    .map_err(|e| StartError::Io(format!("{}: cannot listen on {addr}: {e}", l.bind.loc)))?;
                if w == 0 {
                    addr = socket.local_addr().map_err(|e| StartError::Io(e.to_string()))?;
                    local_addrs.push(addr);
                }
                sockets.push((i, socket));
            }
        }
        let driver = config.server.driver;
        let shared = Arc::new(Shared {
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            draining: AtomicBool::new(false),
            lost_workers: AtomicUsize::new(0),
            on_lost_worker: OnceLock::new(),
            counters: counters.clone(),
            host_field: crate::fleet::host_field(),
            failed_syncs: AtomicU64::new(0),
            stats: (0..workers)
                .map(|_| Arc::new(crate::stats::WorkerStats::new(config.listeners.len())))
                .collect(),
            reloads: [AtomicU64::new(0), AtomicU64::new(0)],
            last_reload: std::sync::Mutex::new(String::from("none")),
            loaded_at: AtomicU64::new(portcullis_tls::now_unix() as u64),
            stopped: AtomicBool::new(false),
            access: crate::accesslog::Sink::new(access_queue(config)),
        });
        let log = crate::accesslog::start(shared.clone())
            .map_err(|e| StartError::Io(format!("cannot start the log thread: {e}")))?;
        let admin = match config.server.admin {
            None => None,
            Some(addr) => Some(
                crate::admin::start(addr, shared.clone())
                    .map_err(|e| StartError::Io(format!("cannot serve the admin endpoint on {addr}: {e}")))?,
            ),
        };
        if let Some(a) = &admin {
            let addr = a.addr;
            tracing::info!(%addr, "admin endpoint serving {addr}");
        }
        share_counts(&counters, config);
        let (ready_tx, ready_rx) = mpsc::channel();
        let mut handles = Vec::with_capacity(workers);
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let cpus = worker_cpus.clone();
            let handle = std::thread::Builder::new()
                .name(format!("portcullis-w{id}"))
                .spawn(move || {
                    if let Some(cpus) = &cpus {
                        crate::cpus::widen(cpus);
                    }
                    let _watch = worker::ExitWatch { id, shared: shared.clone() };
                    worker::run(id, shared, listeners, driver, ready)
                })
                .map_err(|e| StartError::Io(format!("cannot start worker thread: {e}")))?;
            handles.push(handle);
        }
        drop(ready_tx);
        let health = crate::health::start(shared.clone())
            .map_err(|e| StartError::Io(format!("cannot start the health-check thread: {e}")))?;
        // Keys are fetched from now on; requests do not wait for them (a provider that is down
        // only refuses its tokens).
        fetchers.commit(config, &providers);
        let mut server = Server {
            shared,
            fetchers,
            counters,
            kept,
            workers: handles,
            health: Some(health),
            admin,
            log: Some(log),
            local_addrs,
            configured_binds: config.listeners.iter().map(|l| l.bind.value).collect(),
            background_cpus: cpu_numbers(config),
            admin_configured: config.server.admin,
            access_queue: access_queue(config),
            keys,
            generation: 1,
        };
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let _ = server.stop();
                    return Err(StartError::Io(e));
                }
                Err(_) => {
                    let _ = server.stop();
                    return Err(StartError::Io("a worker exited during start-up".to_owned()));
                }
            }
        }
        tracing::info!(workers, listeners = ?server.local_addrs, generation = 1, "serving");
        Ok(server)
    }

    /// The addresses actually bound, one per `[[listener]]` (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Calls `notify` (from the dying worker's thread) as soon as a worker thread ends while the
    /// server is not stopping — at once if one already has. The process should then exit
    /// non-zero, so that its service manager starts a whole one again. Set once; later calls
    /// are ignored.
    pub fn on_lost_worker(&self, notify: impl Fn() + Send + Sync + 'static) {
        let _ = self.shared.on_lost_worker.set(Box::new(notify));
        if self.lost_workers() > 0
            && let Some(n) = self.shared.on_lost_worker.get()
        {
            n();
        }
    }

    /// Worker threads that ended while the server was not stopping.
    pub fn lost_workers(&self) -> usize {
        self.shared.lost_workers.load(Ordering::Acquire)
    }

    /// The generation of the snapshot being served (1 at start, +1 per successful reload).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Compiles `config` and, if it is sound, makes it current for every request from now on.
    /// On error nothing changes. Listener addresses cannot change without a restart.
    pub fn reload(&mut self, config: &Config) -> Result<u64, ConfigErrors> {
        let result = self.apply(config);
        let text = match &result {
            Ok(generation) => format!("generation {generation} loaded"),
            Err(e) => format!("failed: {e}"),
        };
        self.shared.reloads[usize::from(result.is_err())].fetch_add(1, Ordering::Relaxed);
        if result.is_ok() {
            self.shared.loaded_at.store(portcullis_tls::now_unix() as u64, Ordering::Relaxed);
        }
        if let Ok(mut last) = self.shared.last_reload.lock() {
            *last = text;
        }
        result
    }

    /// Records a reload whose configuration did not even load (`/config` and the reload count
    /// show it as the failed reload it is).
    pub fn note_failed_reload(&self, errors: &ConfigErrors) {
        self.shared.reloads[1].fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.shared.last_reload.lock() {
            *last = format!("failed: {errors}");
        }
    }

    /// A handle that has the access log file opened again (after logrotate moved it: `SIGUSR1`).
    pub fn log_reopener(&self) -> LogReopener {
        LogReopener(self.shared.clone())
    }

    /// Where the admin endpoint listens, when there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.addr)
    }

    fn apply(&mut self, config: &Config) -> Result<u64, ConfigErrors> {
        let binds: Vec<SocketAddr> = config.listeners.iter().map(|l| l.bind.value).collect();
        if binds != self.configured_binds {
            let loc = config
                .listeners
                .iter()
                .find(|l| !self.configured_binds.contains(&l.bind.value))
                .map(|l| l.bind.loc.clone())
                .or_else(|| config.listeners.first().map(|l| l.loc.clone()))
                .unwrap_or_else(|| portcullis_config::Loc::builtin("listener"));
            return Err(loc
                .error(format!(
                    "listener addresses changed ({:?} → {:?}); a reload cannot rebind sockets, restart to apply",
                    self.configured_binds, binds
                ))
                .into());
        }
        let providers = self.fetchers.prepare(config);
        let snapshot = Snapshot::compile_keeping(
            config,
            &self.keys,
            self.generation + 1,
            providers.clone(),
            self.counters.clone(),
            &self.kept,
        )?;
        // A CRL older than the one it replaces (a lower CRL number, RFC 5280 §5.2.3) would
        // un-revoke what the newer one revoked: a stale copy deployed by mistake, or a replay.
        let current = self.shared.snapshot.load();
        let older = snapshot.revoked.older_than(&current.revoked);
        if !older.is_empty() {
            let mut errors = ConfigErrors::default();
            for (new, old) in older {
                // At the `crl` entry that named the file (the first, when several did).
                let loc = config
                    .listeners
                    .iter()
                    .flat_map(|l| l.client.crl.iter().chain(l.sni.iter().flat_map(|s| s.client.crl.iter())))
                    .find(|c| c.value.display().to_string() == new.source)
                    .map_or_else(|| portcullis_config::Loc::builtin("listener.crl"), |c| c.loc.clone());
                errors.push(loc.error(format!(
                    "{}: the CRL of \"{}\" has CRL number {}, older than the loaded {} (from {}); it would un-revoke certificates, so it is refused (publish a newer CRL)",
                    new.source,
                    new.issuer,
                    portcullis_facts::magnitude_text(&new.number),
                    portcullis_facts::magnitude_text(&old.number),
                    old.source,
                )));
            }
            return Err(errors);
        }
        self.warn_of_start_only_changes(config);
        self.generation += 1;
        self.shared.snapshot.store(Arc::new(snapshot));
        share_counts(&self.counters, config);
        self.fetchers.commit(config, &providers);
        Ok(self.generation)
    }

    /// Says which settings of a configuration about to be loaded differ from those the server
    /// started with and cannot change while it runs (the threads' CPUs, the admin endpoint's
    /// socket, the access log's queue): they stay as they are until a restart, and the rest
    /// applies. Said at every reload that loads such a configuration.
    fn warn_of_start_only_changes(&self, config: &Config) {
        let configured = cpu_numbers(config);
        if configured != self.background_cpus {
            tracing::warn!(
                running = ?self.background_cpus,
                ?configured,
                "server.background_cpus changed; the threads keep their CPUs until a restart"
            );
        }
        if config.server.admin != self.admin_configured {
            tracing::warn!(
                running = ?self.admin_addr(),
                configured = ?config.server.admin,
                "server.admin changed; the admin endpoint stays as it is until a restart"
            );
        }
        if access_queue(config) != self.access_queue {
            tracing::warn!(
                running = self.access_queue,
                configured = access_queue(config),
                "server.access_log.queue changed; the queue keeps its size until a restart"
            );
        }
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), and returns
    /// once every worker has exited.
    pub fn shutdown(mut self) -> io::Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> io::Result<()> {
        self.shared.draining.store(true, Ordering::Release);
        self.fetchers.stop();
        // Not waited for: a check in progress may take its whole timeout; the thread ends by
        // itself at its next look at the drain flag.
        drop(self.health.take());
        let mut result = Ok(());
        for handle in self.workers.drain(..) {
            match handle.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(e),
                Err(_) => result = Err(io::Error::other("a worker panicked")),
            }
        }
        self.shared.stopped.store(true, Ordering::Release);
        if let Some(admin) = self.admin.take() {
            admin.stop();
        }
        // What the workers logged is written before the process goes, unless the log cannot
        // be written (a full disk, a pipe nobody reads): then the process goes without it.
        if let Some(log) = self.log.take() {
            let deadline = std::time::Instant::now() + LOG_FLUSH_WAIT;
            while !log.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            if log.is_finished() {
                let _ = log.join();
            } else {
                tracing::warn!(
                    waited_ms = LOG_FLUSH_WAIT.as_millis() as u64,
                    "the access log could not be written out; stopping without it"
                );
            }
        }
        // The loggers send what they hold, each for at most its `drain` (all at once), and so do
        // those a reload replaced that are still at it.
        let loggers = self.shared.snapshot.load().loggers.clone();
        let drain =
            loggers.iter().map(|p| p.settings().drain + p.settings().timeout).max().unwrap_or_default();
        let stopping: Vec<_> = loggers.into_iter().map(|p| std::thread::spawn(move || p.stop())).collect();
        let deadline = std::time::Instant::now() + drain;
        for s in stopping {
            while !s.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        let left =
            portcullis_kafka::wait_for_draining(deadline.max(std::time::Instant::now() + LOG_FLUSH_WAIT));
        if left > 0 {
            tracing::warn!(loggers = left, "stopping before replaced loggers sent what they held");
        }
        result
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.workers.is_empty() {
            let _ = self.stop();
        }
    }
}
