//! Starting the proxy for a test: in-process (a real `Server` with real sockets), or as the real
//! binary in a child process (for signals).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_config::ConfigErrors;
use portcullis_server::{Server, StartError};

use crate::pki::PkiPaths;

/// The usual configuration: one listener on 127.0.0.1:0 with the test server certificate and a
/// client-certificate mode, one backend, one API on `/`. `extra` is appended verbatim (more
/// `[[api]]` tables, policy steps, a `[server]` table…).
pub fn config(paths: &PkiPaths, backend: SocketAddr, mode: &str, extra: &str) -> String {
    let p = |p: &Path| p.display().to_string();
    format!(
        r#"
[[listener]]
bind = "127.0.0.1:0"
certificate = {{ cert = "{server}", key = "{server_key}" }}
client_certificate = "{mode}"
client_ca = ["{root}", "{intermediate}"]
crl = ["{crl}"]

[[backend]]
name = "app"
url = "http://{backend}"

{extra}
"#,
        server = p(&paths.server_chain),
        server_key = p(&paths.server_key),
        root = p(&paths.root),
        intermediate = p(&paths.intermediate),
        crl = p(&paths.crl),
    )
}

/// The `[[api]]` table that sends everything to the `app` backend.
pub const DEFAULT_API: &str = r#"
[[api]]
name = "app"
path = "/"
backend = "app"
"#;

/// A proxy running in this process.
#[derive(Debug)]
pub struct TestProxy {
    server: Option<Server>,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
}

impl TestProxy {
    /// Writes `config` to `<dir>/portcullis.toml` and starts a server on it; panics on error.
    pub fn start(dir: &Path, config: &str) -> TestProxy {
        TestProxy::try_start(dir, config).unwrap_or_else(|e| panic!("proxy did not start:\n{e}"))
    }

    pub fn try_start(dir: &Path, config: &str) -> Result<TestProxy, StartError> {
        let config_path = dir.join("portcullis.toml");
        std::fs::write(&config_path, config).map_err(|e| StartError::Io(e.to_string()))?;
        let parsed = portcullis_config::load(&config_path).map_err(StartError::Config)?;
        let server = Server::start(&parsed)?;
        let addr = server.local_addrs()[0];
        Ok(TestProxy { server: Some(server), addr, config_path })
    }

    /// Where the admin endpoint listens (`[server] admin`), when it does.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().and_then(Server::admin_addr)
    }

    /// All listener addresses.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.server.as_ref().map(|s| s.local_addrs().to_vec()).unwrap_or_default()
    }

    /// Rewrites the configuration file and reloads it.
    pub fn reload(&mut self, config: &str) -> Result<u64, ConfigErrors> {
        std::fs::write(&self.config_path, config).unwrap_or_else(|e| panic!("writing config: {e}"));
        let parsed = portcullis_config::load(&self.config_path)?;
        match &mut self.server {
            Some(s) => s.reload(&parsed),
            None => panic!("reload after shutdown"),
        }
    }

    /// Graceful shutdown; returns once the workers are gone.
    pub fn shutdown(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown().unwrap_or_else(|e| panic!("shutdown: {e}"));
        }
    }
}

/// The real binary in a child process; killed when dropped.
#[derive(Debug)]
pub struct ProxyProcess {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl ProxyProcess {
    /// Runs `<bin> run -c <config>` and waits until it says where it listens.
    pub fn spawn(bin: &Path, config: &Path) -> ProxyProcess {
        ProxyProcess::spawn_with_env(bin, config, &[])
    }

    /// As [`ProxyProcess::spawn`], with more environment variables (`NOTIFY_SOCKET`, say).
    pub fn spawn_with_env(bin: &Path, config: &Path, env: &[(&str, &str)]) -> ProxyProcess {
        let mut child = Command::new(bin)
            .args(["run", "-c"])
            .arg(config)
            .envs(env.iter().copied())
            .env("PORTCULLIS_LOG", "info")
            // Lets the fault-injection hook of a test build answer (ignored otherwise).
            .env("PORTCULLIS_FAULT_INJECTION", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            let found = log.lock().unwrap_or_else(|e| e.into_inner()).iter().find_map(|l| {
                l.split("listening on ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next()?.parse::<SocketAddr>().ok())
            });
            if let Some(a) = found {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "proxy exited with {status}:\n{}",
                    log.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
                );
            }
            assert!(Instant::now() < deadline, "proxy did not start in time");
            std::thread::sleep(Duration::from_millis(20));
        };
        ProxyProcess { child, addr, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`libc::SIGHUP`, `libc::SIGTERM`…).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we own and a valid signal number has no memory effects.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// What the process has logged so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until a log line contains `needle`, up to `within`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.log().into_iter().find(|l| l.contains(needle)) {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Counts log lines containing `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits for the process to exit, up to `within`; returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
