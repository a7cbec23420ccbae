//! A real Redis (Debian's `redis-server`) on a free loopback port, for the tests of counts
//! shared across hosts: started, stopped and started again on the same port by the test.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process with no persistence; killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    password: Option<String>,
    tls: Option<RedisTls>,
    dir: PathBuf,
}

/// Files for a Redis that speaks TLS only: its certificate chain and key, and the CA that
/// `redis-cli` checks them with.
#[derive(Debug, Clone)]
pub struct RedisTls {
    pub chain: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl RedisServer {
    /// Starts one whose files (none are written) would go in `dir`.
    pub fn start(dir: &Path) -> RedisServer {
        RedisServer::start_with(dir, None)
    }

    /// Starts one that asks for `password` (`requirepass`).
    pub fn start_with(dir: &Path, password: Option<&str>) -> RedisServer {
        RedisServer::start_full(dir, password, None)
    }

    /// Starts one that speaks TLS only (for `rediss://`).
    pub fn start_tls(dir: &Path, tls: RedisTls) -> RedisServer {
        RedisServer::start_full(dir, None, Some(tls))
    }

    fn start_full(dir: &Path, password: Option<&str>, tls: Option<RedisTls>) -> RedisServer {
        let mut r = RedisServer {
            child: None,
            port: crate::idp::free_port(),
            password: password.map(str::to_owned),
            tls,
            dir: dir.to_owned(),
        };
        r.restart();
        r
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:<port>` (no password in it), or `rediss://localhost:<port>`.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    /// Stops it (SIGKILL: no goodbye to its clients, as when a host fails).
    pub fn stop(&mut self) {
        let addr = self.addr();
        kill_until_closed(&mut self.child, addr);
    }

    /// Starts it (again) on the same port, empty, and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new("redis-server");
        let port = self.port.to_string();
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(t) => cmd
                .args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"])
                .arg("--tls-cert-file")
                .arg(&t.chain)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca),
        };
        cmd.args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(pw) = &self.password {
            cmd.args(["--requirepass", pw]);
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start redis-server ({e}); install it: apt-get install redis-server")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer on port {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a command with `redis-cli` and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(pw) = &self.password {
            cmd.env("REDISCLI_AUTH", pw);
        }
        if let Some(t) = &self.tls {
            cmd.args(["--tls", "--sni", "localhost", "--cacert"]).arg(&t.ca);
        }
        let out = cmd.args(args).stderr(Stdio::null()).output().unwrap_or_else(|e| panic!("redis-cli: {e}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// How many times Redis ran `command` (lower case, e.g. `evalsha`), from `INFO commandstats`.
    pub fn calls_of(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]);
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }
}

/// Kills `child` (SIGKILL: no goodbye to its clients, as when a host fails) and waits, at most
/// 5 s, until nothing answers on `addr` any more.
pub(crate) fn kill_until_closed(child: &mut Option<Child>, addr: SocketAddr) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
