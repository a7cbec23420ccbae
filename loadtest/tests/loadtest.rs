//! The load tool's own tests, against the real proxy on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

use std::process::Command;
use std::time::Duration;

use portcullis_loadtest::{Group, Mode, Options, TlsVersions};
use portcullis_testkit::proxy::{DEFAULT_API, config};
use portcullis_testkit::{Backend, Pki, TestProxy};

struct Setup {
    _dir: tempfile::TempDir,
    pki: Pki,
    dir: std::path::PathBuf,
    _backend: Backend,
    proxy: TestProxy,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate();
    let paths = pki.write(dir.path()).unwrap();
    let backend = Backend::start();
    let proxy = TestProxy::start(dir.path(), &config(&paths, backend.addr(), "require", DEFAULT_API));
    for id in [&pki.client, &pki.wrong_ca] {
        id.write(dir.path()).unwrap();
    }
    Setup { dir: dir.path().to_path_buf(), _dir: dir, pki, _backend: backend, proxy }
}

fn options(s: &Setup, mode: Mode, identity: &str) -> Options {
    Options {
        target: s.proxy.addr,
        server_name: "localhost".to_owned(),
        path: "/".to_owned(),
        mode,
        connections: 4,
        duration: Duration::from_secs(2),
        warmup: Duration::from_millis(100),
        rate: None,
        max_requests: Some(60),
        tls: TlsVersions::Tls13,
        group: Group::P256,
        ca: s.dir.join("root.pem"),
        cert: Some(s.dir.join(format!("{identity}.pem"))),
        key: Some(s.dir.join(format!("{identity}.key"))),
        headers: Vec::new(),
        timeout: Duration::from_secs(5),
        threads: 1,
        watch_pids: vec![std::process::id()],
    }
}

/// Runs the load on a thread; `None` if it has not returned after `limit` (a hang, not a figure).
fn run_within(o: Options, limit: Duration) -> Option<portcullis_loadtest::Report> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(portcullis_loadtest::run(o).unwrap());
    });
    rx.recv_timeout(limit).ok()
}

#[test]
fn a_run_stops_at_its_request_budget() {
    let s = setup();
    for mode in [Mode::KeepAlive, Mode::Handshake, Mode::Resume] {
        // The budget ends the run, not its duration: the longest allowed is not waited for.
        let mut o = options(&s, mode, "client");
        o.duration = Duration::from_secs(600);
        let report = run_within(o, Duration::from_secs(120))
            .unwrap_or_else(|| panic!("{mode:?}: the run went on after its 60 requests"));
        assert_eq!(report.ok, 60, "{mode:?}: {report}");
        assert_eq!(report.error_count(), 0, "{report}");
        assert!(report.latency_us[0] > 0);
        match mode {
            Mode::KeepAlive => assert_eq!(report.handshakes, 4),
            Mode::Handshake => assert_eq!(report.resumed, 0, "{report}"),
            Mode::Resume => assert!(report.resumed > 0, "{report}"),
            Mode::Idle => {}
        }
        let json = report.to_json();
        assert_eq!(json["ok"], 60);
        assert!(json["proxy_cpu_seconds"].is_number());
    }
}

#[test]
fn an_open_loop_run_is_bounded_by_its_duration() {
    let s = setup();
    let mut o = options(&s, Mode::KeepAlive, "client");
    o.max_requests = None;
    o.rate = Some(100.0);
    o.duration = Duration::from_millis(1500);
    o.warmup = Duration::from_millis(500);
    let report = portcullis_loadtest::run(o).unwrap();
    // About 100 requests in the measured second; the bound is what matters, not the figure.
    assert!(report.ok > 0 && report.ok <= 110, "{report}");
    assert_eq!(report.error_count(), 0);
}

/// An open loop behind its schedule (here every answer takes 3 s, at 100 requests a second)
/// stops at the end of its duration, not once every slot it fell behind on has had its turn.
#[test]
fn an_open_loop_run_against_a_slow_server_ends_with_its_duration() {
    let s = setup();
    let mut o = options(&s, Mode::KeepAlive, "client");
    o.path = "/slow/3000".to_owned();
    o.max_requests = None;
    o.rate = Some(100.0);
    o.duration = Duration::from_millis(1500);
    o.warmup = Duration::from_millis(100);
    let report = run_within(o, Duration::from_secs(60)).expect("the run went on past its duration");
    assert_eq!(report.ok, 0);
}

/// Responses framed every way the proxy frames them are read whole, so a keep-alive
/// connection stays in step: chunked bodies, and a 204 that has no length and no body.
#[test]
fn chunked_and_bodiless_responses_keep_the_connection_in_step() {
    let s = setup();
    for path in ["/chunked/100000", "/status/204"] {
        let mut o = options(&s, Mode::KeepAlive, "client");
        o.path = path.to_owned();
        let report = run_within(o, Duration::from_secs(60)).expect("the run did not end");
        assert_eq!((report.ok, report.error_count()), (60, 0), "{path}: {report}");
        assert_eq!(report.handshakes, 4, "{path}: one connection per task, {report}");
    }
}

#[test]
fn refused_certificates_are_counted_as_errors() {
    let s = setup();
    let report = portcullis_loadtest::run(options(&s, Mode::KeepAlive, "wrong-ca")).unwrap();
    assert_eq!(report.ok, 0);
    assert!(report.errors.keys().any(|k| k.contains("unknownca")), "{:?}", report.errors);
    let _ = &s.pki;
}

fn tool(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis-load")).args(args).output().unwrap()
}

#[test]
fn argument_errors_are_reported() {
    let s = setup();
    let ca = s.dir.join("root.pem");
    let ca = ca.to_str().unwrap();
    let cases: [(&[&str], &str); 10] = [
        (&["run", "https://192.0.2.1:443/", "--ca", ca], "only targets loopback"),
        (&["run", "http://127.0.0.1:1/", "--ca", ca], "only https://"),
        (&["run", "https://127.0.0.1:1/", "--ca", "/nonexistent.pem"], "no such file"),
        (&["run", "https://127.0.0.1:1/", "--ca", ca, "-d", "700s"], "--duration"),
        (&["run", "https://127.0.0.1:1/", "--ca", ca, "-d", "1s", "-w", "2s"], "--warmup"),
        (&["run", "https://127.0.0.1:1/", "--ca", ca, "--mode", "fast"], "unknown mode"),
        (&["run", "https://127.0.0.1:1/", "--ca", ca, "--timeout", "0s"], "--timeout"),
        (&["run", "https://127.0.0.1:1/", "--ca", ca, "--timeout", "2m"], "--timeout"),
        (&["run", "https://127.0.0.1:1/", "--ca", ca, "--rate", "0.000001"], "--rate"),
        (&["run", "https://127.0.0.1:1/", "--ca", ca, "-n", "0"], "--requests"),
    ];
    for (args, expected) in cases {
        let out = tool(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn the_cli_prints_a_json_line_with_tags() {
    let s = setup();
    let url = format!("https://localhost:{}/", s.proxy.addr.port());
    let d = |f: &str| s.dir.join(f).display().to_string();
    let out = tool(&[
        "run",
        &url,
        "--ca",
        &d("root.pem"),
        "--cert",
        &d("client.pem"),
        "--key",
        &d("client.key"),
        "-c",
        "2",
        "-n",
        "10",
        "-d",
        "5s",
        "-w",
        "10ms",
        "--json",
        "--tag",
        "proxy=portcullis",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["ok"], 10);
    assert_eq!(line["proxy"], "portcullis");
    assert_eq!(line["mode"], "keepalive");
}
