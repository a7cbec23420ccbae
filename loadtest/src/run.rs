//! The load itself: tasks that connect, handshake, send and time requests.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hdrhistogram::Histogram;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio::time::{Instant, sleep_until, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::options::{Group, Mode, Options, TlsVersions};
use crate::report::Report;

/// The pause after a keep-alive connection could not be made, before the next attempt.
const CONNECT_RETRY: Duration = Duration::from_millis(10);

/// What one task measured.
struct Stats {
    latency: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    handshakes: u64,
    resumed: u64,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency: Histogram::new_with_bounds(1, 60_000_000, 3)
                .unwrap_or_else(|e| panic!("histogram: {e}")),
            ok: 0,
            errors: BTreeMap::new(),
            handshakes: 0,
            resumed: 0,
        }
    }

    fn error(&mut self, kind: String) {
        *self.errors.entry(kind).or_default() += 1;
    }

    fn merge(&mut self, other: Stats) {
        let _ = self.latency.add(&other.latency);
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.handshakes += other.handshakes;
        self.resumed += other.resumed;
    }
}

/// Why one request failed, in the words of the report.
fn classify(e: &io::Error, stage: &str) -> String {
    if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        return match tls {
            rustls::Error::AlertReceived(alert) => format!("tls_alert_{alert:?}").to_lowercase(),
            other => format!("tls_{stage}: {other}"),
        };
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect_refused".to_owned(),
        io::ErrorKind::UnexpectedEof => format!("closed_during_{stage}"),
        io::ErrorKind::ConnectionReset => format!("reset_during_{stage}"),
        io::ErrorKind::TimedOut => format!("timeout_{stage}"),
        other => format!("io_{stage}: {other}"),
    }
}

fn client_config(opts: &Options) -> anyhow::Result<ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    let group = match opts.group {
        Group::X25519 => rustls::crypto::ring::kx_group::X25519,
        Group::P256 => rustls::crypto::ring::kx_group::SECP256R1,
        Group::P384 => rustls::crypto::ring::kx_group::SECP384R1,
    };
    provider.kx_groups = vec![group];
    let versions: &[&rustls::SupportedProtocolVersion] = match opts.tls {
        TlsVersions::Tls12 => &[&rustls::version::TLS12],
        TlsVersions::Tls13 => &[&rustls::version::TLS13],
        TlsVersions::Both => &[&rustls::version::TLS13, &rustls::version::TLS12],
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(&opts.ca).with_context(|| format!("{}", opts.ca.display()))? {
        roots.add(cert.with_context(|| format!("{}", opts.ca.display()))?)?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(versions)?
        .with_root_certificates(roots);
    let mut config = match (&opts.cert, &opts.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("{}", cert.display()))?
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("{}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("{}", key.display()))?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    config.resumption = match opts.mode {
        Mode::Handshake => Resumption::disabled(),
        Mode::Resume | Mode::KeepAlive | Mode::Idle => Resumption::in_memory_sessions(16),
    };
    Ok(config)
}

/// What one response said about itself.
struct Response {
    status: u16,
    /// The server will close the connection after it (`Connection: close`, HTTP/1.0).
    closes: bool,
}

/// How a response's body is delimited (RFC 9112 §6.3).
enum Body {
    None,
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads more of the response into `buf`; the end of the stream is an error.
async fn more(tls: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>) -> io::Result<()> {
    buf.reserve(8 * 1024);
    if tls.read_buf(buf).await? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

fn invalid(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads one response (interim ones skipped). `buf` keeps bytes beyond it.
async fn read_response(tls: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>) -> io::Result<Response> {
    let (response, head_len, body) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut res = httparse::Response::new(&mut headers);
        match res.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = res.code.unwrap_or(0);
                if (100..200).contains(&status) {
                    buf.drain(..n);
                    continue;
                }
                let (mut length, mut coding) = (None, None);
                let (mut says_close, mut says_keep_alive) = (false, false);
                for h in res.headers.iter() {
                    let value = std::str::from_utf8(h.value).map_err(|_| invalid("header value"))?;
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = Some(value.trim().parse::<usize>().map_err(|_| invalid("Content-Length"))?);
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        coding = value.rsplit(',').next().map(|c| c.trim().eq_ignore_ascii_case("chunked"));
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        for token in value.split(',').map(str::trim) {
                            says_close |= token.eq_ignore_ascii_case("close");
                            says_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                        }
                    }
                }
                let close = says_close || (res.version == Some(0) && !says_keep_alive);
                // Transfer-Encoding overrides Content-Length; 204 and 304 never have a body.
                let body = match (status, coding, length) {
                    (204 | 304, _, _) => Body::None,
                    (_, Some(true), _) => Body::Chunked,
                    (_, Some(false), _) => Body::UntilClose,
                    (_, None, Some(len)) => Body::Length(len),
                    (_, None, None) => Body::UntilClose,
                };
                break (Response { status, closes: close }, n, body);
            }
            Ok(httparse::Status::Partial) => more(tls, buf).await?,
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    };
    buf.drain(..head_len);
    match body {
        Body::None => {}
        Body::Length(len) => skip(tls, buf, len).await?,
        Body::Chunked => skip_chunked(tls, buf).await?,
        Body::UntilClose => {
            while more(tls, buf).await.is_ok() {
                buf.clear();
            }
            buf.clear();
            return Ok(Response { closes: true, ..response });
        }
    }
    Ok(response)
}

/// Reads a line ending in CRLF from the front of `buf`, and removes it.
async fn line(tls: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>) -> io::Result<Vec<u8>> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf[..end].to_vec();
            buf.drain(..end + 2);
            return Ok(line);
        }
        if buf.len() > 64 * 1024 {
            return Err(invalid("line too long in chunked body"));
        }
        more(tls, buf).await?;
    }
}

/// Skips a chunked body: each chunk by its size, then the trailer section (RFC 9112 §7.1).
async fn skip_chunked(tls: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let size_line = line(tls, buf).await?;
        let digits = size_line.split(|&b| b == b';').next().unwrap_or_default();
        let size = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| usize::from_str_radix(d.trim(), 16).ok())
            .ok_or_else(|| invalid("chunk size"))?;
        if size == 0 {
            while !line(tls, buf).await?.is_empty() {}
            return Ok(());
        }
        skip(tls, buf, size).await?;
        if !line(tls, buf).await?.is_empty() {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

/// Drops the next `n` bytes of the stream (`buf` first), without holding them all at once.
async fn skip(tls: &mut TlsStream<TcpStream>, buf: &mut Vec<u8>, mut n: usize) -> io::Result<()> {
    while buf.len() < n {
        n -= buf.len();
        buf.clear();
        more(tls, buf).await?;
    }
    buf.drain(..n);
    Ok(())
}

async fn connect(
    connector: &TlsConnector,
    opts: &Options,
    name: &ServerName<'static>,
    stats: &mut Stats,
) -> Result<TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(opts.target).await.map_err(|e| classify(&e, "connect"))?;
    let _ = tcp.set_nodelay(true);
    let tls = connector.connect(name.clone(), tcp).await.map_err(|e| classify(&e, "handshake"))?;
    stats.handshakes += 1;
    if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
        stats.resumed += 1;
    }
    Ok(tls)
}

struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

/// Runs `work` under the per-request `timeout`, and cuts it at the end of the run: a request
/// still going then would not count anyway. `Err(Some(kind))`: it failed, or timed out
/// (`timed_out`); `Err(None)`: the run ended first.
async fn bounded<T>(
    work: impl std::future::Future<Output = Result<T, String>>,
    timeout: Duration,
    end: Instant,
    timed_out: &str,
) -> Result<T, Option<String>> {
    let own = Instant::now() + timeout;
    match timeout_at(own.min(end), work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(kind)) => Err(Some(kind)),
        Err(_) if own < end => Err(Some(timed_out.to_owned())),
        Err(_) => Err(None),
    }
}

async fn task(
    mut slots: Option<UnboundedReceiver<Instant>>,
    opts: Arc<Options>,
    config: Arc<ClientConfig>,
    window: Arc<Window>,
    budget: Arc<std::sync::atomic::AtomicI64>,
) -> Stats {
    // Each task has its own session cache, so that in resume mode it resumes its own session.
    let mut own = (*config).clone();
    if opts.mode == Mode::Resume {
        own.resumption = Resumption::in_memory_sessions(4);
    }
    let connector = TlsConnector::from(Arc::new(own));
    let name = ServerName::try_from(opts.server_name.clone())
        .unwrap_or_else(|_| ServerName::IpAddress(opts.target.ip().into()));
    let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\n", opts.path, opts.server_name).into_bytes();
    for (k, v) in &opts.headers {
        request.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");
    let mut stats = Stats::new();
    let mut conn: Option<TlsStream<TcpStream>> = None;
    let mut buf = Vec::with_capacity(4096);
    // Keep-alive and idle connections are made ahead of their first request: the handshake is
    // no request's latency. In handshake and resume modes it is part of every request.
    let connect_ahead = matches!(opts.mode, Mode::KeepAlive | Mode::Idle);
    // What ends inside the measured window counts (idle mode counts its warm-up too).
    let counts = |started: Instant, done: Instant| {
        (started >= window.measure_from || opts.mode == Mode::Idle) && done <= window.end
    };
    loop {
        // Nothing starts after the end, however far behind its schedule an open loop is.
        if Instant::now() >= window.end {
            break;
        }
        if connect_ahead && conn.is_none() {
            let started = Instant::now();
            let connecting = connect(&connector, &opts, &name, &mut stats);
            match bounded(connecting, opts.timeout, window.end, "timeout_connect").await {
                Ok(c) => conn = Some(c),
                Err(cut) => {
                    if let Some(kind) = cut
                        && counts(started, Instant::now())
                    {
                        stats.error(kind);
                    }
                    // A connect that fails at once (refused, out of descriptors) must not spin.
                    sleep_until((Instant::now() + CONNECT_RETRY).min(window.end)).await;
                }
            }
            continue;
        }
        // Open loop: the pacer's next slot for this connection (it may be past already: the
        // latency counts from it all the same). Closed loop: now.
        let scheduled = match &mut slots {
            Some(rx) => match rx.recv().await {
                Some(t) => t,
                None => break,
            },
            None => Instant::now(),
        };
        if scheduled >= window.end {
            break;
        }
        let measured = scheduled >= window.measure_from;
        if measured && budget.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) <= 0 {
            break;
        }
        let exchange = async {
            if conn.is_none() {
                conn = Some(connect(&connector, &opts, &name, &mut stats).await?);
            }
            let Some(tls) = conn.as_mut() else { return Err("no connection".to_owned()) };
            tls.write_all(&request).await.map_err(|e| classify(&e, "write"))?;
            buf.clear();
            read_response(tls, &mut buf).await.map_err(|e| classify(&e, "response"))
        };
        let result = bounded(exchange, opts.timeout, window.end, "timeout").await;
        let done = Instant::now();
        let counted = counts(scheduled, done);
        match result {
            Ok(r) if (200..400).contains(&r.status) => {
                if counted {
                    stats.ok += 1;
                    stats.latency.saturating_record((done - scheduled).as_micros().max(1) as u64);
                }
                if opts.mode == Mode::Idle {
                    // Hold the connection open, doing nothing, until the end.
                    sleep_until(window.end).await;
                    break;
                }
                if opts.mode != Mode::KeepAlive || r.closes {
                    // A new connection for the next request; say goodbye properly.
                    if let Some(mut tls) = conn.take() {
                        let _ = timeout_at(window.end, tls.shutdown()).await;
                    }
                }
            }
            Ok(r) => {
                if counted {
                    stats.error(format!("http_{}", r.status));
                }
                conn = None;
            }
            Err(cut) => {
                if let Some(kind) = cut
                    && counted
                {
                    stats.error(kind);
                }
                conn = None;
                // Let the other tasks run even when every attempt fails at once.
                tokio::task::yield_now().await;
            }
        }
    }
    stats
}

/// Open loop: a thread that hands out send times at a steady total rate, one connection after
/// the other. The runtime's timers tick in milliseconds, too coarse for the intervals of a
/// constant rate: a sleeping thread wakes within tens of microseconds, and a connection still
/// busy with its previous request finds its slots waiting (their latency counts from them).
struct Pacer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pacer {
    /// Longest sleep between two looks at `stop`.
    const NAP: Duration = Duration::from_millis(10);

    fn start(rate: f64, connections: usize, window: &Window) -> (Pacer, Vec<UnboundedReceiver<Instant>>) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..connections).map(|_| unbounded_channel()).unzip();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (start, end) = (window.start.into_std(), window.end.into_std());
        let every = Duration::from_secs_f64(1.0 / rate);
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut at = start;
            for tx in senders.iter().cycle() {
                if at >= end {
                    break;
                }
                loop {
                    if halt.load(std::sync::atomic::Ordering::Acquire) {
                        return;
                    }
                    let now = std::time::Instant::now();
                    if now >= at {
                        break;
                    }
                    std::thread::sleep((at - now).min(Self::NAP));
                }
                let _ = tx.send(Instant::from_std(at));
                at += every;
            }
        });
        (Pacer { stop, thread: Some(thread) }, receivers)
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Runs the load described by `opts` and reports what happened.
pub fn run(opts: Options) -> anyhow::Result<Report> {
    opts.validate()?;
    let config = Arc::new(client_config(&opts)?);
    let runtime = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(opts.threads).enable_all().build()?
    };
    let opts = Arc::new(opts);
    let stats = runtime.block_on(async {
        let start = Instant::now();
        let window =
            Arc::new(Window { start, measure_from: start + opts.warmup, end: start + opts.duration });
        let budget = Arc::new(std::sync::atomic::AtomicI64::new(
            opts.max_requests.map_or(i64::MAX, |n| i64::try_from(n).unwrap_or(i64::MAX)),
        ));
        let (pacer, mut slots) = match opts.rate {
            Some(rate) => {
                let (pacer, slots) = Pacer::start(rate, opts.connections, &window);
                (Some(pacer), slots.into_iter().map(Some).collect())
            }
            None => (None, Vec::new()),
        };
        let mut handles = Vec::with_capacity(opts.connections);
        for id in 0..opts.connections {
            handles.push(tokio::spawn(task(
                slots.get_mut(id).and_then(Option::take),
                opts.clone(),
                config.clone(),
                window.clone(),
                budget.clone(),
            )));
        }
        // CPU of the watched processes over the measured window (and their memory at its end).
        // A run that ends early (--requests) does not wait for the window's end: what the
        // watcher has not sampled by then is sampled when the last task is done.
        let before = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let watcher = {
            let (opts, window, before) = (opts.clone(), window.clone(), before.clone());
            tokio::spawn(async move {
                sleep_until(window.measure_from).await;
                before.store(cpu_ticks(&opts.watch_pids), std::sync::atomic::Ordering::Release);
                sleep_until(window.end - Duration::from_millis(50).min(opts.duration / 4)).await;
                rss_kib(&opts.watch_pids)
            })
        };
        let mut total = Stats::new();
        for h in handles {
            if let Ok(s) = h.await {
                total.merge(s);
            }
        }
        drop(pacer);
        let after = cpu_ticks(&opts.watch_pids);
        let elapsed = Instant::now().min(window.end) - window.measure_from;
        let rss = if watcher.is_finished() {
            watcher.await.ok().flatten()
        } else {
            watcher.abort();
            rss_kib(&opts.watch_pids)
        };
        let before = match before.load(std::sync::atomic::Ordering::Acquire) {
            u64::MAX => after,
            b => b,
        };
        (total, elapsed, (after.saturating_sub(before)) as f64 / CLOCK_TICKS_PER_SECOND, rss)
    });
    let (stats, elapsed, cpu_seconds, rss) = stats;
    let mut report =
        Report::new(&opts, elapsed, stats.ok, stats.errors, &stats.latency, stats.handshakes, stats.resumed);
    if !opts.watch_pids.is_empty() {
        report.watched_cpu_seconds = Some(cpu_seconds);
        report.watched_rss_kib = rss;
    }
    Ok(report)
}

/// Linux reports process times in USER_HZ, 100 per second on every mainstream configuration.
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;

/// utime + stime of the processes, in clock ticks.
fn cpu_ticks(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name may contain spaces: fields count from the closing parenthesis.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum()
}

/// Resident memory of the processes, in KiB.
fn rss_kib(pids: &[u32]) -> Option<u64> {
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse::<u64>()
            .ok()?;
    }
    Some(total)
}
