//! The admin endpoint (`[server] admin`): `/metrics` (Prometheus text), `/healthz`, `/ready`,
//! `/config`, on a thread of its own (never a worker's loop), GET only. It reads what the workers
//! count (summed per scrape) and what the control side records.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::stats::{
    BUCKETS_US, HANDSHAKE_FAILURES, HANDSHAKE_RESULTS, Histogram, POOL_EVENTS, REFUSAL_KINDS, TLS_VERSIONS,
    WorkerStats, refusal_kind, sum,
};
use crate::worker::Shared;

/// A worker whose loop has not turned for this long is not healthy.
pub(crate) const STALL: Duration = Duration::from_secs(2);
/// Longest request head read, and how long one may take.
const MOST_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// The admin endpoint's thread, and what tells it to stop.
pub(crate) struct Admin {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    thread: Option<JoinHandle<()>>,
    /// An eventfd the thread polls along with its listener: written once the process stops
    /// serving. (Polling on a timer to look at the stop flag would wake it ten times a second
    /// for nothing, each wake-up on a core the workers may be using.)
    stop: OwnedFd,
}

impl Admin {
    /// Tells the thread to stop, and waits for it to end (after the answer it may be giving).
    pub(crate) fn stop(mut self) {
        self.wake();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    fn wake(&self) {
        // An eventfd's counter takes a write of 1 until it is near u64::MAX: this cannot fail.
        let _ = rustix::io::write(&self.stop, &1u64.to_ne_bytes());
    }
}

impl Drop for Admin {
    /// Dropped without [`Admin::stop`] (the server failed to start after it): the thread ends
    /// too, and lets go of the port; it is not waited for.
    fn drop(&mut self) {
        self.wake();
    }
}

/// Binds `addr` and serves it until [`Admin::stop`].
pub(crate) fn start(addr: SocketAddr, shared: Arc<Shared>) -> std::io::Result<Admin> {
    use rustix::event::{EventfdFlags, PollFd, PollFlags, eventfd, poll};
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let stop = eventfd(0, EventfdFlags::CLOEXEC)?;
    let stopping = stop.try_clone()?;
    let thread = std::thread::Builder::new().name("portcullis-admin".to_owned()).spawn(move || {
        // Waits for a connection or for the stop, which only the eventfd says. Not accept() on
        // a timer: with nothing pending, each try would still cost the kernel a socket allocated
        // and freed.
        loop {
            let mut fds = [PollFd::new(&listener, PollFlags::IN), PollFd::new(&stopping, PollFlags::IN)];
            match poll(&mut fds, None) {
                Ok(_) if fds[1].revents().contains(PollFlags::IN) => break,
                Ok(_) => {}
                Err(_) => {
                    std::thread::sleep(RETRY);
                    continue;
                }
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    let _ = answer(stream, &shared);
                }
                // Gone before it was taken, or out of descriptors for now.
                Err(_) => std::thread::sleep(RETRY),
            }
        }
    })?;
    Ok(Admin { addr: local, thread: Some(thread), stop })
}

/// The pause after a failed poll or accept (out of descriptors, say).
const RETRY: Duration = Duration::from_millis(20);

fn answer(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk)?;
        if n == 0 || head.len() + n > MOST_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, target) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    let (status, content_type, body) = if method != b"GET" {
        (405, "text/plain", "only GET\n".to_owned())
    } else {
        match path {
            b"/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", metrics(shared)),
            b"/healthz" => match unhealthy(shared) {
                None => (200, "text/plain", "ok\n".to_owned()),
                Some(why) => (503, "text/plain", format!("{why}\n")),
            },
            b"/ready" => match unready(shared) {
                None => (200, "text/plain", "ready\n".to_owned()),
                Some(why) => (503, "text/plain", format!("{why}\n")),
            },
            b"/config" => (200, "application/json", config(shared)),
            _ => (404, "text/plain", "not found\n".to_owned()),
        }
    };
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let allow = if status == 405 { "Allow: GET\r\n" } else { "" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Cache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes())
}

/// Why the process is not healthy: a worker lost, or one whose loop stopped turning.
fn unhealthy(shared: &Shared) -> Option<String> {
    if shared.lost_workers.load(Ordering::Acquire) > 0 {
        return Some("a worker exited".to_owned());
    }
    let now = portcullis_tls::now_unix_ms();
    shared.stats.iter().enumerate().find_map(|(id, s)| {
        let last = s.last_turn_ms.load(Ordering::Relaxed);
        (now.saturating_sub(last) > STALL.as_millis() as u64)
            .then(|| format!("worker {id} has not turned for {} ms", now.saturating_sub(last)))
    })
}

/// Why the process should not be sent traffic: draining, or an identity provider's keys not
/// loaded yet.
fn unready(shared: &Shared) -> Option<String> {
    if shared.draining.load(Ordering::Acquire) {
        return Some("draining".to_owned());
    }
    let snapshot = shared.snapshot.load();
    snapshot
        .providers
        .iter()
        .find(|(_, keys)| !keys.is_loaded())
        .map(|(name, _)| format!("the keys of identity provider \"{name}\" are not loaded yet"))
}

fn config(shared: &Shared) -> String {
    let snapshot = shared.snapshot.load();
    let last = shared.last_reload.lock().map(|l| l.clone()).unwrap_or_default();
    let mut out = format!(
        "{{\"generation\":{},\"loaded_at\":{},\"reloads\":{},\"failed_reloads\":{},\"last_reload\":",
        snapshot.generation,
        shared.loaded_at.load(Ordering::Relaxed),
        shared.reloads[0].load(Ordering::Relaxed),
        shared.reloads[1].load(Ordering::Relaxed),
    );
    crate::accesslog::json_str(&mut out, last.as_bytes());
    out.push_str("}\n");
    out
}

/// One metric family: its HELP and TYPE lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// One sample per name of `names` (`LABEL="name"`): counter `pick(worker)[i]` summed over
/// the workers.
fn by_label(
    stats: &[Arc<WorkerStats>],
    label_name: &str,
    names: &[&str],
    pick: impl Fn(&WorkerStats) -> &[std::sync::atomic::AtomicU64],
) -> Vec<(String, u64)> {
    names
        .iter()
        .enumerate()
        .map(|(i, n)| (format!("{label_name}=\"{n}\""), sum(stats, |s: &WorkerStats| &pick(s)[i])))
        .collect()
}

/// A label value escaped as the exposition format wants (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A histogram family in seconds, summed over workers.
fn histogram(
    out: &mut String,
    name: &str,
    help: &str,
    stats: &[Arc<WorkerStats>],
    pick: impl Fn(&WorkerStats) -> &Histogram,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    let mut cumulative = 0u64;
    for (i, bound) in BUCKETS_US.iter().enumerate() {
        cumulative += stats.iter().map(|s| pick(s).buckets[i].load(Ordering::Relaxed)).sum::<u64>();
        let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
    }
    cumulative +=
        stats.iter().map(|s| pick(s).buckets[BUCKETS_US.len()].load(Ordering::Relaxed)).sum::<u64>();
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
    let sum: u64 = stats.iter().map(|s| pick(s).sum_us.load(Ordering::Relaxed)).sum();
    let _ = writeln!(out, "{name}_sum {}", sum as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {cumulative}");
}

fn metrics(shared: &Shared) -> String {
    let stats = &shared.stats;
    let mut out = String::with_capacity(4096);
    let classes = ["1xx", "2xx", "3xx", "4xx", "5xx"];
    let requests = by_label(stats, "class", &classes, |s| &s.requests);
    family(
        &mut out,
        "portcullis_requests_total",
        "counter",
        "Requests answered, by status class.",
        &requests,
    );
    let by_api: Vec<(String, u64)> = shared
        .snapshot
        .load()
        .router
        .routes()
        .iter()
        .flat_map(|r| {
            classes.iter().enumerate().map(move |(i, c)| {
                (format!("api=\"{}\",class=\"{c}\"", label(&r.name)), r.counters.requests(i))
            })
        })
        .collect();
    family(
        &mut out,
        "portcullis_api_requests_total",
        "counter",
        "Requests answered on each API, by status class.",
        &by_api,
    );
    let mut by_operation: Vec<(String, u64)> = Vec::new();
    for r in shared.snapshot.load().router.routes() {
        let api = label(&r.name);
        for (op, counts) in r.counters.by_operation() {
            let op = label(op);
            for (c, n) in classes.iter().zip(counts) {
                by_operation.push((format!("api=\"{api}\",operation=\"{op}\",class=\"{c}\""), n));
            }
        }
    }
    family(
        &mut out,
        "portcullis_operation_requests_total",
        "counter",
        "Requests answered on each operation of the APIs that declare operations, by status class.",
        &by_operation,
    );
    let refusals = by_label(stats, "step", &REFUSAL_KINDS, |s| &s.refusals);
    family(
        &mut out,
        "portcullis_refusals_total",
        "counter",
        "Requests the proxy refused by policy, by the step that refused them.",
        &refusals,
    );
    // Each worker's reasons, merged (a reason's first count names it).
    let mut reasons: Vec<(&'static str, u64)> = Vec::new();
    for s in stats.iter() {
        let mine = s.refusal_reasons.lock().map(|r| r.clone()).unwrap_or_default();
        for (reason, n) in mine {
            match reasons.iter_mut().find(|(r, _)| *r == reason) {
                Some((_, total)) => *total += n,
                None => reasons.push((reason, n)),
            }
        }
    }
    reasons.sort_unstable();
    let reasons: Vec<(String, u64)> = reasons
        .into_iter()
        .map(|(r, n)| (format!("step=\"{}\",reason=\"{}\"", REFUSAL_KINDS[refusal_kind(r)], label(r)), n))
        .collect();
    family(
        &mut out,
        "portcullis_refusal_reasons_total",
        "counter",
        "Requests the proxy refused by policy, by the step and the reason (an expired certificate, a JWT failure kind, a missing subscription key, ...).",
        &reasons,
    );
    let handshakes = by_label(stats, "result", &HANDSHAKE_RESULTS, |s| &s.handshakes);
    family(
        &mut out,
        "portcullis_tls_handshakes_total",
        "counter",
        "TLS handshakes with clients, by result.",
        &handshakes,
    );
    let versions = by_label(stats, "version", &TLS_VERSIONS, |s| &s.tls_versions);
    family(
        &mut out,
        "portcullis_tls_handshake_versions_total",
        "counter",
        "TLS handshakes with clients that completed, by protocol version.",
        &versions,
    );
    let failures = by_label(stats, "reason", &HANDSHAKE_FAILURES, |s| &s.handshake_failures);
    family(
        &mut out,
        "portcullis_tls_handshake_failures_total",
        "counter",
        "TLS handshakes with clients that failed, by reason.",
        &failures,
    );
    let upstream = by_label(stats, "status", &["502", "504"], |s| &s.upstream_errors);
    family(
        &mut out,
        "portcullis_upstream_errors_total",
        "counter",
        "The proxy's own 502 and 504 answers: a backend unreachable, failing or too slow.",
        &upstream,
    );
    let snapshot_now = shared.snapshot.load();
    let mut pool = Vec::new();
    let servers =
        snapshot_now.backends.iter().flat_map(|b| b.servers.iter().map(move |s| (b.name.as_str(), s)));
    for (backend, server) in servers {
        let Some(c) = &server.target.counters else { continue };
        for (i, event) in POOL_EVENTS.iter().enumerate() {
            let labels = format!(
                "backend=\"{}\",server=\"{}\",event=\"{event}\"",
                label(backend),
                label(&server.name)
            );
            pool.push((labels, c.total(i)));
        }
    }
    for callout in &snapshot_now.callouts {
        let Some(c) = &callout.target.counters else { continue };
        for (i, event) in POOL_EVENTS.iter().enumerate() {
            let labels = format!("backend=\"callout\",server=\"{}\",event=\"{event}\"", label(&callout.name));
            pool.push((labels, c.total(i)));
        }
    }
    family(
        &mut out,
        "portcullis_backend_connections_total",
        "counter",
        "Connections to each backend server (and callout service): opened, reused from the pool, found stale in the pool, opened by resuming a TLS session, failed (refused, timed out, or the TLS handshake failed).",
        &pool,
    );
    family(
        &mut out,
        "portcullis_connections_total",
        "counter",
        "Client connections accepted.",
        &[(String::new(), sum(stats, |s: &WorkerStats| &s.connections_total))],
    );
    family(
        &mut out,
        "portcullis_connections_active",
        "gauge",
        "Client connections open now.",
        &[(String::new(), sum(stats, |s: &WorkerStats| &s.connections_active))],
    );
    family(
        &mut out,
        "portcullis_connections_idle",
        "gauge",
        "Client connections waiting for a request (keep-alive between requests, or before the first).",
        &[(String::new(), sum(stats, |s: &WorkerStats| &s.connections_idle))],
    );
    family(
        &mut out,
        "portcullis_callout_cache_hits_total",
        "counter",
        "send_request steps answered from their cache (no callout made).",
        &[(String::new(), sum(stats, |s: &WorkerStats| &s.callout_cache_hits))],
    );
    family(
        &mut out,
        "portcullis_reloads_total",
        "counter",
        "Configuration reloads, by result.",
        &[
            ("result=\"success\"".to_owned(), shared.reloads[0].load(Ordering::Relaxed)),
            ("result=\"failure\"".to_owned(), shared.reloads[1].load(Ordering::Relaxed)),
        ],
    );
    let snapshot = shared.snapshot.load();
    family(
        &mut out,
        "portcullis_config_generation",
        "gauge",
        "The running configuration's generation (1 at start, one more per reload that took).",
        &[(String::new(), snapshot.generation)],
    );
    family(
        &mut out,
        "portcullis_workers",
        "gauge",
        "Worker threads serving.",
        &[(
            String::new(),
            (stats.len() - shared.lost_workers.load(Ordering::Relaxed).min(stats.len())) as u64,
        )],
    );
    let expiry: Vec<(String, u64)> = snapshot
        .expiry
        .iter()
        .map(|(kind, listener, file, at)| {
            (
                format!("kind=\"{kind}\",listener=\"{}\",file=\"{}\"", label(listener), label(file)),
                (*at).max(0) as u64,
            )
        })
        .collect();
    family(
        &mut out,
        "portcullis_certificate_expiry_timestamp_seconds",
        "gauge",
        "When each listener's server certificate and client CAs expire (Unix seconds).",
        &expiry,
    );
    // The soonest client certificate expiry seen per listener, over workers.
    let listeners = stats.first().map_or(0, |s| s.client_cert_soonest.len());
    let soonest: Vec<(String, u64)> = (0..listeners)
        .filter_map(|l| {
            let min = stats.iter().map(|s| s.client_cert_soonest[l].load(Ordering::Relaxed)).min()?;
            (min != u64::MAX).then(|| (format!("listener=\"{l}\""), min))
        })
        .collect();
    family(
        &mut out,
        "portcullis_client_certificate_soonest_expiry_timestamp_seconds",
        "gauge",
        "The soonest expiry (Unix seconds) of the client certificates presented on each listener (by its index in the configuration).",
        &soonest,
    );
    let providers: Vec<(String, u64)> = snapshot
        .providers
        .iter()
        .map(|(name, keys)| (format!("provider=\"{}\"", label(name)), keys.keys().len() as u64))
        .collect();
    family(
        &mut out,
        "portcullis_jwks_keys",
        "gauge",
        "Signing keys each OpenID Connect provider's key set holds now.",
        &providers,
    );
    let fetches: Vec<(String, u64)> = snapshot
        .providers
        .iter()
        .map(|(name, keys)| (format!("provider=\"{}\"", label(name)), keys.attempts()))
        .collect();
    family(
        &mut out,
        "portcullis_jwks_fetches_total",
        "counter",
        "Fetches of each OpenID Connect provider's keys (discovery and key set) attempted.",
        &fetches,
    );
    histogram(
        &mut out,
        "portcullis_request_duration_seconds",
        "From a request's head to the end of its answer.",
        stats,
        |s| &s.request_duration,
    );
    histogram(
        &mut out,
        "portcullis_upstream_duration_seconds",
        "From sending a request to a backend to the head of its answer.",
        stats,
        |s| &s.upstream_duration,
    );
    histogram(
        &mut out,
        "portcullis_tls_handshake_duration_seconds",
        "TLS handshakes with clients that completed.",
        stats,
        |s| &s.handshake_duration,
    );
    histogram(
        &mut out,
        "portcullis_callout_duration_seconds",
        "Callouts (send_request) that got an answer, from sending to the whole answer (cached answers are not counted).",
        stats,
        |s| &s.callout_duration,
    );
    family(
        &mut out,
        "portcullis_callout_failures_total",
        "counter",
        "Callouts that got no answer: unreachable, timed out, broken.",
        &[(String::new(), sum(stats, |s: &WorkerStats| &s.callout_failures))],
    );
    histogram(
        &mut out,
        "portcullis_redis_sync_duration_seconds",
        "Syncs of shared counts with Redis that were answered, from sending to the last answer.",
        stats,
        |s| &s.redis_sync_duration,
    );
    family(
        &mut out,
        "portcullis_access_log_records_total",
        "counter",
        "Access-log records written, and dropped (the queue was full, or the file could not be written).",
        &[
            ("result=\"written\"".to_owned(), shared.access.written.load(Ordering::Relaxed)),
            ("result=\"dropped\"".to_owned(), shared.access.dropped.load(Ordering::Relaxed)),
        ],
    );
    family(
        &mut out,
        "portcullis_redis_failed_syncs_total",
        "counter",
        "Syncs of shared rate-limit and quota counts with Redis that failed.",
        &[(String::new(), shared.failed_syncs.load(Ordering::Relaxed))],
    );
    loggers(&mut out, &shared.snapshot.load().loggers);
    out
}

/// The `[[logger]]` producers' counts, by logger.
fn loggers(out: &mut String, loggers: &[Arc<portcullis_kafka::Producer>]) {
    if loggers.is_empty() {
        return;
    }
    let mut messages = Vec::new();
    let (mut buffered, mut up, mut errors, mut requests) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut truncated = Vec::new();
    for p in loggers {
        let name = label(&p.settings().name);
        let st = p.stats();
        for (result, counter) in [("sent", &st.sent), ("dropped", &st.dropped), ("failed", &st.failed)] {
            messages
                .push((format!("logger=\"{name}\",result=\"{result}\""), counter.load(Ordering::Relaxed)));
        }
        let logger = format!("logger=\"{name}\"");
        buffered.push((logger.clone(), st.buffered.load(Ordering::Relaxed)));
        up.push((logger.clone(), u64::from(st.up.load(Ordering::Relaxed))));
        errors.push((logger.clone(), st.errors.load(Ordering::Relaxed)));
        truncated.push((logger.clone(), st.truncated.load(Ordering::Relaxed)));
        requests.push((logger, st.requests.load(Ordering::Relaxed)));
    }
    family(
        out,
        "portcullis_logger_messages_total",
        "counter",
        "Messages for each [[logger]]: sent (acknowledged by the broker), dropped (queue or buffer full, or unsent at stop), failed (refused by the broker).",
        &messages,
    );
    family(
        out,
        "portcullis_logger_truncated_total",
        "counter",
        "Messages cut to 200 KB before they were handed to the logger.",
        &truncated,
    );
    family(
        out,
        "portcullis_logger_buffered_bytes",
        "gauge",
        "Bytes of messages each logger holds for the broker.",
        &buffered,
    );
    family(out, "portcullis_logger_up", "gauge", "1 when the logger's last attempt reached its broker.", &up);
    family(
        out,
        "portcullis_logger_errors_total",
        "counter",
        "Attempts to send that failed (no connection, no answer, a retriable refusal).",
        &errors,
    );
    family(
        out,
        "portcullis_logger_requests_total",
        "counter",
        "Produce requests the broker answered.",
        &requests,
    );
}
