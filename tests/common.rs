//! What every test starts from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use portcullis_testkit::proxy::{DEFAULT_API, config};
use portcullis_testkit::{Backend, Identity, Pki, PkiPaths, TestProxy, TlsClient};

/// A PKI written to a temporary directory, and a backend.
pub(crate) struct Env {
    pub(crate) pki: Pki,
    pub(crate) paths: PkiPaths,
    pub(crate) dir: tempfile::TempDir,
    pub(crate) backend: Backend,
}

impl Env {
    pub(crate) fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate();
        let paths = pki.write(dir.path()).unwrap();
        Env { pki, paths, dir, backend: Backend::start() }
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A configuration with one listener in `mode`, the backend, and `extra`; the catch-all API
    /// is added unless `extra` declares its own.
    pub(crate) fn config(&self, mode: &str, extra: &str) -> String {
        let api = if extra.contains("[[api]]") { "" } else { DEFAULT_API };
        config(&self.paths, self.backend.addr(), mode, &format!("{extra}\n{api}"))
    }

    pub(crate) fn proxy(&self, mode: &str, extra: &str) -> TestProxy {
        TestProxy::start(self.dir(), &self.config(mode, extra))
    }

    pub(crate) fn client(&self, id: Option<&Identity>) -> TlsClient {
        TlsClient::new(&self.pki, id)
    }

    pub(crate) fn write_config(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// The path of the real binary, built by cargo for these tests.
pub(crate) fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_portcullis"))
}

/// `portcullis check -c config` by the real binary: whether it passed, its stdout and stderr.
pub(crate) fn check_config(config: &Path) -> (bool, String, String) {
    let out = std::process::Command::new(binary()).args(["check", "-c"]).arg(config).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `text` (a command's output) says every one of `needles`.
pub(crate) fn says(text: &str, needles: &[&str]) -> bool {
    needles.iter().all(|n| text.contains(n))
}

/// [`check_config`] of `text` written as `name` that must pass (`ok`, with nothing or warnings on
/// stderr): its stderr.
pub(crate) fn check_passes(env: &Env, name: &str, text: &str) -> String {
    let (ok, stdout, stderr) = check_config(&env.write_config(name, text));
    assert!(ok && stdout.trim() == "ok", "{name}: {stdout}{stderr}");
    stderr
}

/// Sends raw bytes on a fresh connection and returns everything the proxy sends back before it
/// closes (or the error that ended the read).
pub(crate) fn raw_exchange(
    client: &TlsClient,
    addr: SocketAddr,
    raw: &[u8],
) -> Result<String, std::io::Error> {
    Ok(String::from_utf8_lossy(&raw_exchange_bytes(client, addr, raw)?).into_owned())
}

pub(crate) fn raw_exchange_bytes(
    client: &TlsClient,
    addr: SocketAddr,
    raw: &[u8],
) -> Result<Vec<u8>, std::io::Error> {
    let mut c = client.connect(addr)?;
    c.write_raw(raw)?;
    c.read_to_close()
}

/// The status code of the first response in `text`, if any.
pub(crate) fn status_of(text: &str) -> Option<u16> {
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Requests `GET /` from `connections` keep-alive connections to each of `addrs` for `run`; every
/// answer's status with the time it came.
pub(crate) fn hammer(
    env: &Env,
    addrs: &[SocketAddr],
    connections: usize,
    run: std::time::Duration,
) -> Vec<(std::time::Instant, SocketAddr, u16)> {
    // Hammering tests take turns: each measures its own proxies, not them starved by another's
    // load on the same two cores.
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let until = std::time::Instant::now() + run;
    std::thread::scope(|s| {
        let threads: Vec<_> = addrs
            .iter()
            .flat_map(|&addr| std::iter::repeat_n(addr, connections))
            .map(|addr| {
                s.spawn(move || {
                    let mut c = env.client(None).connect(addr).unwrap();
                    let mut seen = Vec::new();
                    while std::time::Instant::now() < until {
                        let status = c.request("GET", "/", &[], b"").map_or(0, |r| r.status);
                        seen.push((std::time::Instant::now(), addr, status));
                    }
                    seen
                })
            })
            .collect();
        let mut all: Vec<_> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        all.sort_by_key(|e| e.0);
        all
    })
}

/// The most answers with status 200 in any stretch of `span` (the answers sorted by time).
pub(crate) fn most_admitted_within(
    answers: &[(std::time::Instant, SocketAddr, u16)],
    span: std::time::Duration,
) -> usize {
    most_within(answers, span, |status| status == 200)
}

/// The most answers whose status `counts` seen within any stretch of `span`.
pub(crate) fn most_within(
    answers: &[(std::time::Instant, SocketAddr, u16)],
    span: std::time::Duration,
    counts: impl Fn(u16) -> bool,
) -> usize {
    let ok: Vec<std::time::Instant> = answers.iter().filter(|a| counts(a.2)).map(|a| a.0).collect();
    let mut most = 0;
    let mut first = 0;
    for (last, t) in ok.iter().enumerate() {
        while *t - ok[first] >= span {
            first += 1;
        }
        most = most.max(last + 1 - first);
    }
    most
}

/// The address the proxy's admin endpoint says it serves on (`admin = "127.0.0.1:0"`).
pub(crate) fn admin_of(p: &portcullis_testkit::ProxyProcess) -> SocketAddr {
    let line = p.wait_for_log("admin endpoint serving ", std::time::Duration::from_secs(10)).unwrap();
    line.rsplit("serving ").next().unwrap().split_whitespace().next().unwrap().parse().unwrap()
}

/// A raw HTTP/1.1 exchange with the admin endpoint: (status, body).
pub(crate) fn admin(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    std::io::Write::write_fmt(&mut s, format_args!("{method} {path} HTTP/1.1\r\nHost: admin\r\n\r\n"))
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// A scrape of the admin endpoint taken once `sample` has reached `least`: a request is counted
/// once it is over, which may be just after its client has the answer.
pub(crate) fn metrics_once(addr: SocketAddr, sample: &str, least: u64) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let m = admin(addr, "GET", "/metrics").1;
        if metric(&m, sample) >= least {
            // A scrape renders one counter after another while requests end: the next one has
            // every counter of the requests that `sample` saw over.
            return admin(addr, "GET", "/metrics").1;
        }
        assert!(std::time::Instant::now() < deadline, "{sample} never reached {least}:\n{m}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

pub(crate) fn metric(metrics: &str, sample: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in:\n{metrics}"))
}

/// The `[server]` line that sends the access log, as JSON lines, to `access.log` in `dir`.
pub(crate) fn access_log_to(dir: &std::path::Path) -> String {
    format!("access_log = {{ path = \"{}\" }}", dir.join("access.log").display())
}

/// The first access-log line in `dir`'s `access.log` that holds every one of `needles`, waiting
/// for it up to 10 s (the log thread writes a little after the answer).
pub(crate) fn access_line(dir: &std::path::Path, needles: &[&str]) -> Option<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Some(line.to_owned());
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
