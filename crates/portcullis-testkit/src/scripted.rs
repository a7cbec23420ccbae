//! A backend that answers each request path with exact bytes: the odd, broken and hostile
//! responses a proxy must survive. It parses nothing but the request line and the end of the
//! head, so that it can send what no well-behaved server would.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the backend does after writing its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Reads the next request on the same connection.
    KeepOpen,
    /// Closes the connection.
    Close,
    /// Writes the same bytes again and again until the peer goes away.
    Repeat,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub then: Then,
    /// Written one byte at a time, each in its own segment (a short pause after each), so that
    /// the peer reads it in as many pieces as the network allows.
    pub dribble: bool,
}

impl Reply {
    pub fn new(bytes: impl Into<Vec<u8>>, then: Then) -> Reply {
        Reply { bytes: bytes.into(), then, dribble: false }
    }

    /// As [`Reply::new`], written byte by byte.
    pub fn dribbled(bytes: impl Into<Vec<u8>>, then: Then) -> Reply {
        Reply { bytes: bytes.into(), then, dribble: true }
    }
}

/// The answer to every path without a script: a plain, valid response.
pub const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// A running scripted backend; stopped when dropped.
#[derive(Debug)]
pub struct ScriptedBackend {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ScriptedBackend {
    /// Starts a backend answering `path` with its reply; other paths get [`OK`].
    pub fn start(script: Vec<(String, Reply)>) -> ScriptedBackend {
        ScriptedBackend::start_with(|_| script)
    }

    /// As [`ScriptedBackend::start`], with a script that may name the backend's own address
    /// (in a `Location`, say).
    pub fn start_with(script: impl FnOnce(SocketAddr) -> Vec<(String, Reply)>) -> ScriptedBackend {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let script: Arc<HashMap<String, Reply>> = Arc::new(script(addr).into_iter().collect());
        let connections = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (connections.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                c.fetch_add(1, Ordering::AcqRel);
                let script = script.clone();
                std::thread::spawn(move || {
                    let _ = serve(stream, &script);
                });
            }
        });
        ScriptedBackend { addr, connections, stop, thread: Some(thread) }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }
}

impl Drop for ScriptedBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut stream: TcpStream, script: &HashMap<String, Reply>) -> io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = Vec::new();
    loop {
        // One request head (requests through the proxy in these tests carry no body).
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let path = head
            .split(|&b| b == b' ')
            .nth(1)
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let reply = script.get(&path).cloned().unwrap_or_else(|| Reply::new(OK, Then::KeepOpen));
        if reply.dribble {
            stream.set_nodelay(true)?;
            for b in &reply.bytes {
                stream.write_all(std::slice::from_ref(b))?;
                std::thread::sleep(Duration::from_micros(200));
            }
        } else {
            stream.write_all(&reply.bytes)?;
        }
        match reply.then {
            Then::KeepOpen => {}
            Then::Close => return Ok(()),
            Then::Repeat => loop {
                stream.write_all(&reply.bytes)?;
            },
        }
    }
}
