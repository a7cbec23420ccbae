//! Backends with several servers: traffic spread over them, a server that dies costs no GET and
//! is taken out of rotation, then comes back; a POST is never sent twice; active health checks;
//! API and operation timeouts over the backend's.

use std::time::{Duration, Instant};

use portcullis_testkit::scripted::{Reply, ScriptedBackend, Then};
use portcullis_testkit::{Backend, ProxyProcess, TestProxy};

use crate::common::{Env, binary};

/// One worker (round robin is per worker), the `pool` backend with `servers` and `fields`, and
/// an API on `/` that uses it.
fn config(env: &Env, servers: &[String], fields: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    env.config(
        "request",
        &format!(
            "[[backend]]\nname = \"pool\"\nservers = [{}]\n{fields}\n\
             [[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"pool\"\n",
            list.join(", ")
        ),
    )
    .replace("[[listener]]", "[server]\nworkers = 1\n\n[[listener]]")
}

fn url(b: &Backend) -> String {
    format!("http://{}", b.addr())
}

#[test]
fn traffic_is_spread_over_the_servers() {
    let env = Env::new();
    let servers = [Backend::start(), Backend::start(), Backend::start()];
    let urls: Vec<String> = servers.iter().map(url).collect();
    for (balance, expect_even) in [("round_robin", true), ("least_requests", false)] {
        let before: Vec<usize> = servers.iter().map(Backend::requests).collect();
        let proxy = TestProxy::start(env.dir(), &config(&env, &urls, &format!("balance = \"{balance}\"")));
        let mut c = env.client(None).connect(proxy.addr).unwrap();
        for _ in 0..30 {
            assert_eq!(c.request("GET", "/x", &[], b"").unwrap().status, 200);
        }
        let got: Vec<usize> = servers.iter().zip(&before).map(|(s, b)| s.requests() - b).collect();
        assert_eq!(got.iter().sum::<usize>(), 30, "{balance}: {got:?}");
        if expect_even {
            assert_eq!(got, [10, 10, 10], "{balance}");
        } else {
            assert!(got.iter().all(|&n| n > 0), "{balance}: {got:?}");
        }
    }
}

#[test]
fn a_dead_server_costs_no_get_is_ejected_and_comes_back() {
    let env = Env::new();
    let a = Backend::start();
    let b = Backend::start();
    let dead = Backend::start();
    let port = dead.addr().port();
    let urls = vec![url(&a), url(&b), url(&dead)];
    drop(dead);
    // No pooled connections: each request opens one, so a dead server shows at once.
    let text = config(&env, &urls, "max_idle = 0\neject_after = 2\neject_for = \"1s\"");
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    for i in 0..30 {
        let r = c.request("GET", "/x", &[], b"").unwrap();
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    assert_eq!(a.requests() + b.requests(), 30);
    let line = proxy.wait_for_log("server out of rotation", Duration::from_secs(5)).unwrap();
    assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
    let tried = proxy.count_log("trying another server");
    assert_eq!(tried, 2, "two failures, then the server is skipped: {:?}", proxy.log());
    // It comes back where it was; once its time out is over, it takes requests again.
    let back = Backend::start_on(port);
    let deadline = Instant::now() + Duration::from_secs(10);
    while back.requests() == 0 {
        assert!(Instant::now() < deadline, "the server was never taken back");
        assert_eq!(c.request("GET", "/x", &[], b"").unwrap().status, 200);
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_post_is_never_sent_twice() {
    let env = Env::new();
    let a = Backend::start();
    let b = Backend::start();
    let proxy = TestProxy::start(env.dir(), &config(&env, &[url(&a), url(&b)], "max_idle = 0"));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    // `/reset`: the server closes as soon as it has read the head.
    let r = c.request("POST", "/reset", &[], b"do this once").unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(a.connections() + b.connections(), 1, "the POST went to one server only");
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/reset", &[], b"").unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(a.connections() + b.connections(), 3, "the GET went to the other server once more");
}

#[test]
fn a_server_that_fails_its_health_check_is_passed_over() {
    let env = Env::new();
    let healthy = Backend::start();
    let sick = ScriptedBackend::start(vec![(
        "/hc".into(),
        Reply::new("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", Then::Close),
    )]);
    let urls = vec![url(&healthy), format!("http://{}", sick.addr())];
    let text =
        config(&env, &urls, "health_check = { path = \"/hc\", interval = \"100ms\", timeout = \"1s\" }");
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    proxy.wait_for_log("health check failed", Duration::from_secs(10)).unwrap();
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    for _ in 0..10 {
        let r = c.request("GET", "/traffic", &[], b"").unwrap();
        assert!(r.text().starts_with("GET /traffic HTTP/1.1"), "the healthy server answered: {}", r.text());
    }
}

#[test]
fn api_and_operation_timeouts_override_the_backends() {
    let env = Env::new();
    let text = env.config(
        "request",
        "[[api]]\nname = \"hasty\"\npath = \"/h\"\nbackend = \"app\"\ntimeout = \"300ms\"\n\
         [[api]]\nname = \"patient\"\npath = \"/p\"\nbackend = \"app\"\ntimeout = \"300ms\"\n  [[api.operation]]\n  match = \"GET /slow/{ms}\"\n  timeout = \"5s\"\n",
    );
    let proxy = TestProxy::start(env.dir(), &text);
    let get =
        |p: &str| env.client(None).connect(proxy.addr).unwrap().request("GET", p, &[], b"").unwrap().status;
    assert_eq!(get("/h/slow/1000"), 504, "the API's 300 ms, not the backend's 60 s");
    assert_eq!(get("/h/slow/10"), 200);
    assert_eq!(get("/p/slow/1000"), 200, "the operation's 5 s over its API's 300 ms");
}
