//! Active health checks (`health_check = { … }`), on a thread of their own, never on a worker:
//! each server of a backend that asks for checks gets `GET path` every `interval` (over TLS as
//! its requests are, with the gateway's certificate), and is out of rotation while the answer is
//! not in `expect_status`. The checks follow the running configuration (reloads included).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::snapshot::Server;
use crate::worker::Shared;

/// How often the thread looks for checks that are due (and whether to stop).
const TICK: Duration = Duration::from_millis(100);
/// How often servers named by a host name are resolved again.
const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// Longest answer head read.
const MOST_HEAD: usize = 16 * 1024;

/// Starts the checker; it ends when the server drains.
pub(crate) fn start(shared: Arc<Shared>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("portcullis-health".to_owned()).spawn(move || run(&shared))
}

fn run(shared: &Shared) {
    // When each server of each backend is next due.
    let mut due: Vec<((String, crate::upstream::PoolKey), Instant)> = Vec::new();
    let mut resolve_at = Instant::now() + RESOLVE_EVERY;
    while !shared.draining.load(Ordering::Acquire) {
        let snapshot = shared.snapshot.load_full();
        let now = Instant::now();
        if now >= resolve_at {
            resolve_at = now + RESOLVE_EVERY;
            for backend in &snapshot.backends {
                for server in &backend.servers {
                    let Some(current) = &server.target.resolved else { continue };
                    let lookup = |name: &str| std::net::ToSocketAddrs::to_socket_addrs(name).ok()?.next();
                    if let Some(addr) = crate::balance::refresh(&server.name, current, lookup) {
                        tracing::info!(backend = %backend.name, server = %server.name, %addr, "server's name resolves to another address: new connections go there");
                    }
                }
            }
        }
        for backend in &snapshot.backends {
            let Some(check) = &backend.health_check else { continue };
            for server in &backend.servers {
                if shared.draining.load(Ordering::Acquire) {
                    return;
                }
                let key = (backend.name.clone(), server.target.key.clone());
                let next = due.iter_mut().find(|(k, _)| *k == key);
                match next {
                    Some((_, at)) if *at > now => continue,
                    Some((_, at)) => *at = now + check.interval,
                    None => due.push((key, now + check.interval)),
                }
                let verdict = probe(server, &check.path, check.timeout);
                let healthy = verdict.as_ref().is_ok_and(|&status| check.expect_status.contains(status));
                let was_down = server.health.checked_down.swap(!healthy, Ordering::Relaxed);
                match (was_down, healthy) {
                    (false, false) => {
                        let why = verdict.map_or_else(|e| e, |s| format!("answered {s}"));
                        tracing::warn!(backend = %backend.name, server = %server.name, path = %check.path, why, "health check failed: server out of rotation");
                    }
                    (true, true) => {
                        tracing::info!(backend = %backend.name, server = %server.name, "health check passed: server back in rotation");
                    }
                    _ => {}
                }
            }
        }
        // Servers no longer configured are forgotten.
        due.retain(|((name, k), _)| {
            snapshot.backends.iter().any(|b| &b.name == name && b.servers.iter().any(|s| &s.target.key == k))
        });
        drop(snapshot);
        std::thread::sleep(TICK);
    }
}

/// One check: the answer's status, or why there was none, all within `timeout`.
fn probe(server: &Server, path: &str, timeout: Duration) -> Result<u16, String> {
    let deadline = Instant::now() + timeout;
    let tcp =
        TcpStream::connect_timeout(&server.target.addr(), timeout).map_err(|e| format!("connect: {e}"))?;
    tcp.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let host = &server.name;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portcullis-health\r\nConnection: close\r\n\r\n"
    );
    let mut head = Vec::with_capacity(512);
    let mut exchange = |stream: &mut dyn ReadWrite| -> Result<(), String> {
        stream.write_all(request.as_bytes()).map_err(|e| format!("write: {e}"))?;
        let mut chunk = [0u8; 1024];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < MOST_HEAD {
            if Instant::now() >= deadline {
                return Err("no status line in time".to_owned());
            }
            match stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => head.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(())
    };
    match &server.target.tls {
        None => {
            let mut tcp = tcp;
            exchange(&mut tcp)?;
        }
        Some(tls) => {
            let mut stream = tls.client.connect(&tls.server_name, tcp)?;
            exchange(&mut stream)?;
        }
    }
    // `HTTP/1.1 200 …`
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let status = line
        .strip_prefix(b"HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| std::str::from_utf8(code).ok()?.parse::<u16>().ok())
        .filter(|s| (100..600).contains(s));
    status.ok_or_else(|| "the answer is not HTTP".to_owned())
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
