//! Rate-limit and quota counts shared with the other hosts of a fleet through Redis
//! (`[server.redis]`).
//!
//! Requests do not wait for Redis, but for a key's first call on this host. Each worker notes
//! what its limited calls added (per key, in its own `Deltas`) and a task of the worker sends
//! them every `sync_interval` over the worker's one connection: one script call per batch
//! (`EVALSHA`, `EVAL` when Redis does not have the script yet), several pipelined when a batch
//! is large. The script adds this host's counts and answers what the other hosts counted, which
//! the host's counters then add to their own, and this host's claim on the key. A key new to the
//! host (or not synced within its window) is synced at once (at most one sync a millisecond, many
//! new keys in one call) and its first call waits for that sync ([`synced`]), so that no host
//! spends what another was granted. Should the sync not answer within the store's timeout, the
//! key may use its share of the limit among the hosts that synced lately: the first worker sends
//! a heartbeat every interval, and every worker connects (and the host registers) before it
//! serves.
//!
//! When Redis cannot be reached, every worker's limits count on this host alone
//! (`redis_failure = "local"`) or refuse (`"deny"`), with one log line per change of state; the
//! connection is retried with a growing pause (100 ms, doubling, at most 5 s).

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use monoio::net::TcpStream;
use portcullis_config::{ConfigErrors, Redis, RedisFailure};
use portcullis_policy::{Batch, FLEET_SCRIPT};
use portcullis_tls::{ClientTls, PlainStream, Stream};

use crate::event::Rounds;
use crate::resp::{Reply, encode_command, next_reply};
use crate::upstream::BackendStream;
use crate::worker::Worker;

/// Longest pause between attempts to reach Redis.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Least time between two syncs of a worker when new keys or refusals bring one forward.
const NUDGED_GAP: Duration = Duration::from_millis(1);
/// Largest reply buffered (a batch's answers are three integers per key).
const MAX_REPLY: usize = 8 << 20;

/// How to reach Redis, compiled from `[server.redis]` (password read, address resolved, TLS
/// trust loaded). Two configurations with equal settings keep the workers' connections.
pub(crate) struct FleetLink {
    pub(crate) redis: Redis,
    addr: SocketAddr,
    password: Option<String>,
    tls: Option<ClientTls>,
    /// The script's SHA-1, in hex (for `EVALSHA`).
    sha: String,
}

impl std::fmt::Debug for FleetLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLink").field("url", &self.redis.url.value).field("addr", &self.addr).finish()
    }
}

impl PartialEq for FleetLink {
    fn eq(&self, other: &FleetLink) -> bool {
        self.redis == other.redis && self.addr == other.addr && self.password == other.password
    }
}

impl FleetLink {
    pub(crate) fn compile(redis: &Redis) -> Result<FleetLink, ConfigErrors> {
        let password = match &redis.password_file {
            None => redis.password.clone(),
            Some(file) => {
                let text = std::fs::read_to_string(&file.value)
                    .map_err(|e| file.loc.error(format!("{}: {e}", file.value.display())))?;
                let pw = text.trim_end_matches(['\r', '\n']);
                if pw.is_empty() {
                    return Err(file
                        .loc
                        .error(format!("{}: the file is empty", file.value.display()))
                        .into());
                }
                Some(pw.to_owned())
            }
        };
        let authority = if redis.host.contains(':') {
            format!("[{}]:{}", redis.host, redis.port)
        } else {
            format!("{}:{}", redis.host, redis.port)
        };
        let addr = crate::snapshot::resolve(&authority)
            .ok()
            .flatten()
            .ok_or_else(|| redis.url.loc.error(format!("cannot resolve \"{}\"", redis.host)))?;
        let tls = if redis.tls {
            let loc = redis.ca.first().map_or(&redis.url.loc, |c| &c.loc);
            Some(ClientTls::new(&redis.ca).map_err(|e| loc.error(e))?)
        } else {
            None
        };
        let digest = boring::sha::sha1(FLEET_SCRIPT.as_bytes());
        let sha = digest.iter().map(|b| format!("{b:02x}")).collect();
        Ok(FleetLink { redis: redis.clone(), addr, password, tls, sha })
    }
}

/// This process's name in the store: one field per host in every counter's hash.
pub(crate) fn host_field() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let mut random = [0u8; 4];
    let _ = boring::rand::rand_bytes(&mut random);
    format!("{}:{}:{:08x}", name.trim(), std::process::id(), u32::from_le_bytes(random))
}

/// One worker's connection to Redis.
struct Connection {
    io: BackendStream,
    rx: BytesMut,
    tx: BytesMut,
    /// A reply has come since the flag was cleared.
    answered: bool,
}

impl Connection {
    async fn open(link: &FleetLink) -> Result<Connection, String> {
        let tcp = TcpStream::connect(link.addr)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", link.addr))?;
        let _ = tcp.set_nodelay(true);
        let io = match &link.tls {
            None => BackendStream::Plain(PlainStream::new(tcp)),
            Some(tls) => BackendStream::Tls(Box::new(tls.connect_async(&link.redis.host, tcp).await?)),
        };
        let (rx, tx) = (BytesMut::with_capacity(4096), BytesMut::with_capacity(4096));
        let mut conn = Connection { io, rx, tx, answered: false };
        // What was sent, in order: each answer is checked against it.
        let mut sent = Vec::with_capacity(2);
        if let Some(pw) = &link.password {
            match &link.redis.username {
                Some(user) => encode_command(&mut conn.tx, &[b"AUTH", user.as_bytes(), pw.as_bytes()]),
                None => encode_command(&mut conn.tx, &[b"AUTH", pw.as_bytes()]),
            }
            sent.push("AUTH");
        }
        if link.redis.db != 0 {
            encode_command(&mut conn.tx, &[b"SELECT", link.redis.db.to_string().as_bytes()]);
            sent.push("SELECT");
        }
        if !sent.is_empty() {
            conn.send().await?;
            for what in sent {
                match conn.reply().await? {
                    Reply::Simple(_) => {}
                    Reply::Error(e) => return Err(format!("{what} refused: {e}")),
                    other => return Err(format!("{what} answered {other:?}")),
                }
            }
        }
        Ok(conn)
    }

    async fn send(&mut self) -> Result<(), String> {
        self.io.write_all_buf(&mut self.tx).await.map_err(|e| format!("write: {e}"))
    }

    async fn reply(&mut self) -> Result<Reply, String> {
        loop {
            match next_reply(&mut self.rx) {
                Ok(Some(r)) => {
                    self.answered = true;
                    return Ok(r);
                }
                Ok(None) => {}
                Err(e) => return Err(format!("Redis sent what is not RESP: {}", e.0)),
            }
            if self.rx.len() > MAX_REPLY {
                return Err(format!("a reply larger than {} MiB", MAX_REPLY >> 20));
            }
            match self.io.read_buf(&mut self.rx).await {
                Ok(0) => return Err("Redis closed the connection".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }

    /// Sends the batch's script calls together, then applies each answer.
    async fn sync(&mut self, link: &FleetLink, worker: &Worker, batch: &Batch) -> Result<(), String> {
        let now_ms = unix_ms();
        let counters = &worker.shared.counters;
        let calls = batch.calls(&worker.shared.host_field, counters, now_ms);
        for args in &calls {
            script_call(&mut self.tx, b"EVALSHA", link.sha.as_bytes(), args);
        }
        self.send().await?;
        let mut unknown = Vec::new();
        for i in 0..calls.len() {
            match self.reply().await? {
                // Stamped when it came: answers are told apart by when they were held.
                Reply::Integers(v) => batch.apply(i, counters, &v, unix_ms()),
                Reply::Error(e) if e.starts_with("NOSCRIPT") => unknown.push(i),
                Reply::Error(e) => return Err(format!("the script failed: {e}")),
                other => return Err(format!("the script answered {other:?}")),
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        // Redis started afresh or flushed its scripts: send the script whole, this once (Redis
        // keeps it for the EVALSHA calls that follow).
        for &i in &unknown {
            script_call(&mut self.tx, b"EVAL", FLEET_SCRIPT.as_bytes(), &calls[i]);
        }
        self.send().await?;
        for &i in &unknown {
            match self.reply().await? {
                Reply::Integers(v) => batch.apply(i, counters, &v, unix_ms()),
                Reply::Error(e) => return Err(format!("the script failed: {e}")),
                other => return Err(format!("the script answered {other:?}")),
            }
        }
        Ok(())
    }
}

/// Appends `EVALSHA sha 0 args…` (or `EVAL script 0 args…`): the script names its keys itself
/// (one Redis, not a cluster).
fn script_call(tx: &mut BytesMut, verb: &[u8], script: &[u8], args: &[Vec<u8>]) {
    let mut all: Vec<&[u8]> = Vec::with_capacity(3 + args.len());
    all.extend([verb, script, b"0"]);
    all.extend(args.iter().map(Vec::as_slice));
    encode_command(tx, &all);
}

/// Milliseconds since the Unix epoch (the store's windows are wall-clock slots, alike on every
/// host of a fleet whose clocks agree).
fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A worker's sync task's state between rounds.
struct SyncState {
    link: Option<Arc<FleetLink>>,
    conn: Option<Connection>,
    failures: u32,
    retry_at: Instant,
}

impl SyncState {
    fn failed(&mut self, worker: &Worker, link: &FleetLink, error: &str) {
        self.conn = None;
        self.failures = self.failures.saturating_add(1);
        let pause = Duration::from_millis(100).saturating_mul(1 << self.failures.min(6).saturating_sub(1));
        self.retry_at = Instant::now() + pause.min(MAX_RETRY);
        let failed_syncs = worker.shared.failed_syncs.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per change of state, host-wide: whichever worker finds it out first.
        if worker.shared.counters.set_fleet_up(false) {
            let then = match link.redis.failure {
                RedisFailure::Local => "limits count on this host alone until it is back",
                RedisFailure::Deny => "calls under rate limits and quotas are refused (503) until it is back",
            };
            tracing::warn!(
                redis = %link.redis.url.value,
                worker = worker.id,
                error,
                failed_syncs,
                "Redis unreachable; {then}"
            );
        } else {
            tracing::debug!(redis = %link.redis.url.value, worker = worker.id, error, "Redis still unreachable");
        }
    }

    fn succeeded(&mut self, worker: &Worker, link: &FleetLink) {
        self.failures = 0;
        if !worker.shared.counters.set_fleet_up(true) {
            let failed_syncs = worker.shared.failed_syncs.load(Ordering::Relaxed);
            tracing::info!(redis = %link.redis.url.value, failed_syncs, "Redis reachable again; counts are shared");
        }
    }

    async fn connect(&mut self, worker: &Worker, link: &FleetLink) -> Result<(), String> {
        let timeout = link.redis.timeout;
        match monoio::time::timeout(timeout, Connection::open(link)).await {
            Ok(Ok(c)) => {
                self.conn = Some(c);
                self.succeeded(worker, link);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("no connection within {timeout:?}")),
        }
    }

    /// One round: (re)connect when due, then send what the worker noted.
    async fn round(&mut self, worker: &Worker, link: &Arc<FleetLink>) {
        if self.link.as_deref() != Some(&**link) {
            self.conn = None;
            self.failures = 0;
            self.retry_at = Instant::now();
            self.link = Some(link.clone());
        }
        let timeout = link.redis.timeout;
        // A connection that sat idle may have been closed by Redis meanwhile: if it fails before
        // any answer, one fresh connection is tried before the sync counts as failed.
        let mut reused = self.conn.is_some();
        if self.conn.is_none() {
            let due = Instant::now() >= self.retry_at;
            let connected = if due { self.connect(worker, link).await } else { Err(String::new()) };
            if let Err(e) = connected {
                // Calls that cannot be sent now would land in a later slot than they were made in.
                worker.local.borrow_mut().deltas.drop_rate_calls();
                if due {
                    self.failed(worker, link, &e);
                }
                return;
            }
        }
        let batch = worker.local.borrow_mut().deltas.take();
        // Requests waiting for a sync of keys this batch holds go on when the round is over,
        // however it ends.
        let _round = RoundEnd(&worker.fleet_rounds, worker.fleet_rounds.begin());
        // With nothing to send, the first worker still says the host is there (and learns how
        // many others are): a heartbeat, one a sync interval per host.
        if batch.is_empty() && worker.id != 0 {
            return;
        }
        loop {
            let Some(conn) = self.conn.as_mut() else { return };
            conn.answered = false;
            let started = std::time::Instant::now();
            let error = match monoio::time::timeout(timeout, conn.sync(link, worker, &batch)).await {
                Ok(Ok(())) => {
                    worker.stats.redis_sync_duration.observe(started.elapsed());
                    return self.succeeded(worker, link);
                }
                Ok(Err(e)) if reused && !conn.answered => {
                    reused = false;
                    self.conn = None;
                    match self.connect(worker, link).await {
                        Ok(()) => continue,
                        Err(again) => format!("{e}; a new connection: {again}"),
                    }
                }
                Ok(Err(e)) => e,
                Err(_) => format!("no answer within {timeout:?}"),
            };
            return self.failed(worker, link, &error);
        }
    }
}

/// Ends a sync round when dropped.
struct RoundEnd<'a>(&'a Rounds, u64);

impl Drop for RoundEnd<'_> {
    fn drop(&mut self) {
        self.0.end(self.1);
    }
}

/// Waits until this worker has synced what it noted so far (a round is started at once), at
/// most the store's timeout and a little: a request whose limit key is new to the host.
pub(crate) async fn synced(worker: &Worker) {
    let Some(link) = worker.snapshot().fleet.clone() else { return };
    let next = worker.fleet_rounds.next();
    worker.fleet_nudge.wake();
    let _ = monoio::time::timeout(link.redis.timeout + NUDGED_GAP, next).await;
}

/// A worker's sync task: runs until the worker shuts down, sending one last batch then.
pub(crate) async fn run(worker: Rc<Worker>) {
    let mut state = SyncState { link: None, conn: None, failures: 0, retry_at: Instant::now() };
    let mut last = monoio::time::Instant::now();
    // The first round at once: the host registers before its first request.
    let mut first = true;
    loop {
        let link = worker.snapshot().fleet.clone();
        let Some(link) = link else {
            // Not shared (or no longer): nothing to send; look again after a reload.
            state = SyncState { link: None, conn: None, failures: 0, retry_at: Instant::now() };
            worker.local.borrow_mut().deltas.clear();
            monoio::select! {
                _ = monoio::time::sleep(Duration::from_secs(1)) => continue,
                _ = worker.shutdown.wait() => return,
            }
        };
        let interval = link.redis.sync_interval;
        let stop = if std::mem::take(&mut first) {
            false
        } else {
            monoio::select! {
            _ = monoio::time::sleep_until(last + interval) => false,
            _ = worker.fleet_nudge.wait() => {
                // A new key (or a refusal): sync at once, but not more than once a millisecond
                // (many new keys then share one call).
                monoio::time::sleep_until(last + NUDGED_GAP).await;
                false
            }
            _ = worker.shutdown.wait() => true,
            }
        };
        last = monoio::time::Instant::now();
        state.round(&worker, &link).await;
        worker.fleet_ready.set();
        if stop {
            return;
        }
    }
}
