//! The admin endpoint (`[server] admin`): `/metrics` (checked by Prometheus's own `promtool`),
//! `/healthz`, `/ready`, `/config`, GET only; counters that move as the requests say.

use std::io::Write;
use std::time::{Duration, Instant};

use portcullis_testkit::ProxyProcess;

use crate::common::{Env, admin, admin_of, binary, metric as value, metrics_once};

fn config(env: &Env, extra: &str) -> String {
    env.config(
        "request",
        "[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  validate_client_certificate = {}\n",
    )
    .replace("[[listener]]", &format!("[server]\nadmin = \"127.0.0.1:0\"\n{extra}\n\n[[listener]]"))
}

#[test]
fn the_endpoints_answer_and_the_counters_move() {
    let env = Env::new();
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, "")));
    let addr = admin_of(&proxy);
    assert_eq!(admin(addr, "GET", "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(admin(addr, "GET", "/ready"), (200, "ready\n".to_owned()));
    let (status, body) = admin(addr, "GET", "/config");
    assert_eq!(status, 200);
    assert!(body.starts_with("{\"generation\":1,") && body.contains("\"last_reload\":\"none\""), "{body}");
    assert_eq!(admin(addr, "POST", "/metrics").0, 405);
    assert_eq!(admin(addr, "GET", "/nothing").0, 404);
    // Three refused by the certificate step, two let through.
    for _ in 0..3 {
        let r = env.client(None).get(proxy.addr, "/x");
        assert_eq!(r.as_ref().map(|r| r.status).ok(), Some(403), "{r:?} {:#?}", proxy.log());
    }
    for _ in 0..2 {
        assert_eq!(env.client(Some(&env.pki.client)).get(proxy.addr, "/x").unwrap().status, 200);
    }
    let metrics = metrics_once(addr, "portcullis_request_duration_seconds_count", 5);
    assert_eq!(value(&metrics, "portcullis_refusals_total{step=\"client_certificate\"}"), 3);
    assert_eq!(value(&metrics, "portcullis_requests_total{class=\"4xx\"}"), 3);
    assert_eq!(value(&metrics, "portcullis_requests_total{class=\"2xx\"}"), 2);
    assert_eq!(value(&metrics, "portcullis_api_requests_total{api=\"a\",class=\"2xx\"}"), 2);
    assert_eq!(value(&metrics, "portcullis_api_requests_total{api=\"a\",class=\"4xx\"}"), 3);
    assert_eq!(value(&metrics, "portcullis_tls_handshakes_total{result=\"full\"}"), 5);
    assert_eq!(
        value(
            &metrics,
            "portcullis_refusal_reasons_total{step=\"client_certificate\",reason=\"no client certificate\"}"
        ),
        3
    );
    assert_eq!(value(&metrics, "portcullis_tls_handshake_versions_total{version=\"TLSv1.3\"}"), 5);
    assert_eq!(value(&metrics, "portcullis_tls_handshake_versions_total{version=\"TLSv1.2\"}"), 0);
    assert_eq!(value(&metrics, "portcullis_config_generation"), 1);
    // Every answered request is timed; the two let through reached the backend.
    assert_eq!(value(&metrics, "portcullis_request_duration_seconds_count"), 5);
    assert_eq!(value(&metrics, "portcullis_request_duration_seconds_bucket{le=\"+Inf\"}"), 5);
    assert_eq!(value(&metrics, "portcullis_upstream_duration_seconds_count"), 2);
    assert_eq!(value(&metrics, "portcullis_tls_handshake_duration_seconds_count"), 5);
    // When the server certificate expires: the test PKI's, within its validity.
    let expiry = metrics
        .lines()
        .find(|l| l.starts_with("portcullis_certificate_expiry_timestamp_seconds{kind=\"server\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no server certificate expiry:\n{metrics}"));
    let now = portcullis_testkit::idp::now();
    assert!(expiry > now && expiry < now + 20 * 365 * 86_400, "{expiry}");
    assert!(metrics.contains("portcullis_certificate_expiry_timestamp_seconds{kind=\"ca\""), "{metrics}");
    // The client certificate presented twice: its expiry is the soonest seen on listener 0.
    let soonest =
        value(&metrics, "portcullis_client_certificate_soonest_expiry_timestamp_seconds{listener=\"0\"}");
    assert!(soonest as i64 > now, "{soonest}");
    // Plain HTTP on the TLS port: a failure by its reason. A TLS 1.2 client: its version.
    let mut plain = std::net::TcpStream::connect(proxy.addr).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let _ = std::io::Read::read(&mut plain, &mut [0u8; 64]);
    let tls12 = portcullis_testkit::TlsClient::with(&env.pki, None, portcullis_testkit::Versions::Tls12);
    assert_eq!(tls12.get(proxy.addr, "/x").unwrap().status, 403);
    // A keep-alive connection waiting for its next request is idle.
    let mut idle = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(idle.request("GET", "/x", &[], b"").unwrap().status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    let later = loop {
        let m = admin(addr, "GET", "/metrics").1;
        if value(&m, "portcullis_tls_handshake_failures_total{reason=\"not_tls\"}") == 1
            && value(&m, "portcullis_connections_idle") >= 1
        {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(value(&later, "portcullis_tls_handshake_versions_total{version=\"TLSv1.2\"}"), 1);
    drop(idle);
    // A scrape taken under load passes Prometheus's own check.
    let scrape = std::thread::scope(|s| {
        let load = s.spawn(|| {
            let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
            for _ in 0..200 {
                assert_eq!(c.request("GET", "/x", &[], b"").unwrap().status, 200);
            }
        });
        let scrape = admin(addr, "GET", "/metrics").1;
        load.join().unwrap();
        scrape
    });
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) runs; .ci/run installs it");
    promtool.stdin.take().unwrap().write_all(scrape.as_bytes()).unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    metrics_once(addr, "portcullis_requests_total{class=\"2xx\"}", 203);
    // A reload keeps the API's counts (and says so in /config).
    // SAFETY: signalling the child process this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin(addr, "GET", "/config").1.starts_with("{\"generation\":2,") {
        assert!(Instant::now() < deadline, "the reload never took");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, after) = admin(addr, "GET", "/metrics");
    // 2 + 1 (the idle connection's) + 200.
    assert_eq!(value(&after, "portcullis_api_requests_total{api=\"a\",class=\"2xx\"}"), 203);
    assert_eq!(value(&after, "portcullis_reloads_total{result=\"success\"}"), 1);
    // Each forwarded request took one connection to the backend: opened or reused.
    let server = format!("backend=\"app\",server=\"{}\"", env.backend.addr());
    let event =
        |e: &str| value(&after, &format!("portcullis_backend_connections_total{{{server},event=\"{e}\"}}"));
    assert_eq!(event("opened") + event("reused"), 203, "{after}");
    assert!(event("opened") >= 1 && event("reused") >= 150, "pooled: {} opened", event("opened"));
    assert!(admin(addr, "GET", "/config").1.contains("\"last_reload\":\"generation 2 loaded\""));
}

#[test]
fn a_reload_that_moves_the_endpoint_or_resizes_the_log_queue_says_it_waits_for_a_restart() {
    let env = Env::new();
    let log = env.dir().join("access.log");
    let text = |admin_addr: &str, queue: usize| {
        config(&env, &format!("access_log = {{ path = \"{}\", queue = {queue} }}", log.display()))
            .replace("admin = \"127.0.0.1:0\"", &format!("admin = \"{admin_addr}\""))
    };
    let path = env.write_config("p.toml", &text("127.0.0.1:0", 4096));
    let proxy = ProxyProcess::spawn(&binary(), &path);
    let addr = admin_of(&proxy);
    let generation = |n: u64| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !admin(addr, "GET", "/config").1.starts_with(&format!("{{\"generation\":{n},")) {
            assert!(Instant::now() < deadline, "generation {n} never came: {:#?}", proxy.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    // The same settings: nothing to say.
    proxy.signal(libc::SIGHUP);
    generation(2);
    // Another address and another queue: both said; the endpoint stays where it was, and the
    // rest of the configuration applies.
    std::fs::write(&path, text("127.0.0.2:0", 8192)).unwrap();
    proxy.signal(libc::SIGHUP);
    generation(3);
    let said = |needle: &str| proxy.wait_for_log(needle, Duration::from_secs(10));
    assert!(said("server.admin changed").is_some(), "{:#?}", proxy.log());
    assert!(said("server.access_log.queue changed").is_some(), "{:#?}", proxy.log());
    let warnings = |needle: &str| proxy.log().iter().filter(|l| l.contains(needle)).count();
    assert_eq!(warnings("server.admin changed"), 1, "said once, at the reload that changed it");
    assert_eq!(warnings("server.access_log.queue changed"), 1);
    assert_eq!(admin(addr, "GET", "/healthz").0, 200);
    assert_eq!(env.client(Some(&env.pki.client)).get(proxy.addr, "/x").unwrap().status, 200);
}

#[test]
fn healthz_fails_while_a_worker_stalls_and_ready_while_draining() {
    let env = Env::new();
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, "workers = 1")));
    let addr = admin_of(&proxy);
    // The only worker stops turning for 3 s.
    let proxy_addr = proxy.addr;
    let client = env.client(Some(&env.pki.client));
    let stall = std::thread::spawn(move || {
        let _ =
            client.connect(proxy_addr).unwrap().request("GET", "/x", &[("x-portcullis-fault", "stall")], b"");
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        let answer = admin(addr, "GET", "/healthz");
        if answer.0 == 503 || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("worker 0 has not turned"), "{body}");
    stall.join().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while admin(addr, "GET", "/healthz").0 != 200 {
        assert!(Instant::now() < deadline, "healthy again once the worker turns");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Draining (a slow request keeps the process up): not ready.
    let client = env.client(Some(&env.pki.client));
    let slow = std::thread::spawn(move || {
        client.connect(proxy_addr).unwrap().request("GET", "/slow/2000", &[], b"").map(|r| r.status)
    });
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling the child process this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let ready = loop {
        let answer = admin(addr, "GET", "/ready");
        if answer.0 == 503 || Instant::now() > deadline {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(ready, (503, "draining\n".to_owned()));
    assert_eq!(slow.join().unwrap().unwrap(), 200, "the request in flight finished");
}

/// An identity provider's keys: `/ready` waits for them, and `/metrics` counts them.
#[test]
fn ready_waits_for_the_identity_providers_keys() {
    use portcullis_testkit::{Idp, SigningKey};
    let env = Env::new();
    let key = SigningKey::es256("k1");
    // The provider starts after the proxy: until then the keys are missing.
    let port = portcullis_testkit::idp::free_port();
    let url = format!("https://localhost:{port}/tenant/.well-known/openid-configuration");
    let text = config(&env, "").replace(
        "[[api]]",
        &format!(
            "[[openid]]\nname = \"idp\"\nurl = \"{url}\"\nca = [\"{}\"]\nrefresh = \"1s\"\n\n[[api]]",
            env.paths.root.display()
        ),
    );
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let addr = admin_of(&proxy);
    let (status, body) = admin(addr, "GET", "/ready");
    assert_eq!(status, 503);
    assert!(body.contains("identity provider \"idp\""), "{body}");
    let _idp = Idp::start_on(port, &env.pki.server, &[&key]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while admin(addr, "GET", "/ready").0 != 200 {
        assert!(Instant::now() < deadline, "the keys were never loaded");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = admin(addr, "GET", "/metrics");
    assert_eq!(value(&metrics, "portcullis_jwks_keys{provider=\"idp\"}"), 1);
    assert!(value(&metrics, "portcullis_jwks_fetches_total{provider=\"idp\"}") >= 1);
}

#[test]
fn requests_are_counted_by_operation() {
    let env = Env::new();
    let api = "[[api]]\nname = \"todo\"\npath = \"/\"\nbackend = \"app\"\n  [[api.operation]]\n  match = \"GET /items/{id}\"\n  [[api.operation]]\n  match = \"POST /items\"\n";
    let text = env.config("request", &format!("[server]\nadmin = \"127.0.0.1:0\"\n{api}"));
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let addr = admin_of(&proxy);
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    for i in 0..3 {
        assert_eq!(c.request("GET", &format!("/items/{i}"), &[], b"").unwrap().status, 200);
    }
    assert_eq!(c.request("POST", "/items", &[], b"{}").unwrap().status, 200);
    assert_eq!(c.request("DELETE", "/items", &[], b"").unwrap().status, 404, "no such operation");
    let metrics = metrics_once(addr, "portcullis_request_duration_seconds_count", 5);
    let op = |o: &str, class: &str| {
        value(
            &metrics,
            &format!(
                "portcullis_operation_requests_total{{api=\"todo\",operation=\"{o}\",class=\"{class}\"}}"
            ),
        )
    };
    assert_eq!(op("GET /items/{id}", "2xx"), 3);
    assert_eq!(op("POST /items", "2xx"), 1);
    assert_eq!(op("GET /items/{id}", "4xx"), 0);
    assert_eq!(value(&metrics, "portcullis_api_requests_total{api=\"todo\",class=\"2xx\"}"), 4);
}

#[test]
fn connections_a_backend_refuses_are_counted_as_failed() {
    let env = Env::new();
    // A port nobody listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let text = config(&env, "").replace(&env.backend.addr().to_string(), &closed.to_string());
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let addr = admin_of(&proxy);
    for _ in 0..2 {
        assert_eq!(env.client(Some(&env.pki.client)).get(proxy.addr, "/x").unwrap().status, 502);
    }
    let metrics = metrics_once(addr, "portcullis_request_duration_seconds_count", 2);
    let server = format!("backend=\"app\",server=\"{closed}\"");
    assert_eq!(
        value(&metrics, &format!("portcullis_backend_connections_total{{{server},event=\"failed\"}}")),
        2
    );
    assert_eq!(
        value(&metrics, &format!("portcullis_backend_connections_total{{{server},event=\"opened\"}}")),
        0
    );
    assert_eq!(value(&metrics, "portcullis_upstream_errors_total{status=\"502\"}"), 2);
}
