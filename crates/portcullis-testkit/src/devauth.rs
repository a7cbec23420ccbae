//! A device-authorisation service on 127.0.0.1 over HTTPS (rustls): it knows which certificate
//! (by thumbprint) belongs to which device, as the services API Management's device scenario
//! calls. `GET /check?certificateThumbprint=T&deviceId=D` answers `200` with
//! `{"deviceId":D,"certificateThumbprint":T,"owner":{"name":"contoso"}}` for a known pair and
//! `404` with `{"error":"unknown device"}` otherwise. Some device ids misbehave on purpose:
//! `slow` (answers after 2 s), `error` (`500`), `html` (a `200` that is not JSON), `huge` (a
//! 100 KiB JSON answer), `hangup` (closes without answering).

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::backend::{Duplex, Input, handshake, read_body, read_request, server_config};
use crate::pki::Identity;

/// A running device-authorisation service; stopped when dropped.
pub struct DeviceAuth {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    /// The last request head, and the common name of the client certificate of its connection.
    last: Arc<Mutex<(String, Option<String>)>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuth").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// Pairs of (certificate thumbprint, device id) the service knows.
type Known = Arc<Vec<(String, String)>>;

impl DeviceAuth {
    /// Serves `server`'s certificate; with `client_ca` (PEM), only to clients with a certificate
    /// from it. `known`: (SHA-1 thumbprint, device id) pairs.
    pub fn start(server: &Identity, client_ca: Option<&str>, known: &[(&str, &str)]) -> DeviceAuth {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = server_config(server, client_ca);
        let known: Known =
            Arc::new(known.iter().map(|(t, d)| (t.to_ascii_uppercase(), d.to_string())).collect());
        let calls = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let last = Arc::new(Mutex::new((String::new(), None)));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (calls, connections, last, stop) =
                (calls.clone(), connections.clone(), last.clone(), stop.clone());
            move || {
                let unused = Arc::new(AtomicUsize::new(0));
                for tcp in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(tcp) = tcp else { continue };
                    connections.fetch_add(1, Ordering::AcqRel);
                    let (config, known, calls, last, unused) =
                        (config.clone(), known.clone(), calls.clone(), last.clone(), unused.clone());
                    std::thread::spawn(move || {
                        let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
                        if let Some((tls, peer)) = handshake(config, tcp, &unused, &unused) {
                            serve(tls, peer, &known, &calls, &last);
                        }
                    });
                }
            }
        });
        DeviceAuth { addr, calls, connections, last, stop, thread: Some(thread) }
    }

    /// `https://localhost:PORT` (the test PKI's server certificate is for `localhost`).
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// Requests answered (or hung up on) so far.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::Acquire)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// The last request's head, as received.
    pub fn last_request(&self) -> String {
        self.last.lock().unwrap().0.clone()
    }

    /// The common name of the client certificate the last request came with.
    pub fn last_client(&self) -> Option<String> {
        self.last.lock().unwrap().1.clone()
    }
}

impl Drop for DeviceAuth {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value of query parameter `name` in `path` (no decoding beyond `%2F`-style escapes of
/// hex digits, which thumbprints and ids do not need).
fn query<'a>(path: &'a str, name: &str) -> Option<&'a str> {
    let q = path.split_once('?')?.1;
    q.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

fn serve<S: Duplex>(
    stream: S,
    peer: Option<String>,
    known: &Known,
    calls: &AtomicUsize,
    last: &Mutex<(String, Option<String>)>,
) {
    let mut input = Input { stream, buf: Vec::new(), pos: 0 };
    while let Ok(Some(req)) = read_request(&mut input) {
        if read_body(&mut input, &req, |_| {}).is_err() {
            return;
        }
        calls.fetch_add(1, Ordering::AcqRel);
        *last.lock().unwrap() = (req.head_text.clone(), peer.clone());
        let thumb = query(&req.path, "certificateThumbprint").unwrap_or("").to_ascii_uppercase();
        let device = query(&req.path, "deviceId").unwrap_or("");
        let (status, body) = match device {
            "slow" => {
                std::thread::sleep(Duration::from_secs(2));
                (200, format!("{{\"deviceId\":\"slow\",\"certificateThumbprint\":\"{thumb}\"}}"))
            }
            "error" => (500, "{\"error\":\"database down\"}".to_owned()),
            "html" => (200, "<html>maintenance</html>".to_owned()),
            "huge" => (200, format!("{{\"deviceId\":\"huge\",\"pad\":\"{}\"}}", "x".repeat(100 * 1024))),
            "hangup" => {
                input.stream.close();
                return;
            }
            d if known.iter().any(|(t, kd)| *t == thumb && kd == d) => (
                200,
                format!(
                    "{{\"deviceId\":\"{d}\",\"certificateThumbprint\":\"{thumb}\",\"owner\":{{\"name\":\"contoso\"}}}}"
                ),
            ),
            _ => (404, "{\"error\":\"unknown device\"}".to_owned()),
        };
        let head = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        if input
            .stream
            .write_all(head.as_bytes())
            .and_then(|()| input.stream.write_all(body.as_bytes()))
            .is_err()
        {
            return;
        }
        let _ = input.stream.flush();
    }
}
