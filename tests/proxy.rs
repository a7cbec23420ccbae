//! Proxying: routing, keep-alive, bodies both ways, backend failures, header hygiene.

use std::collections::HashSet;

use portcullis_testkit::backend::expected_pattern;
use portcullis_testkit::{ProxyProcess, TestProxy};

use crate::common::{Env, binary, raw_exchange_bytes, status_of};

#[test]
fn keep_alive_reuses_one_upstream_connection() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let mut served_by = HashSet::new();
    for i in 0..50 {
        let r = c.request("GET", &format!("/item/{i}"), &[], b"").unwrap();
        assert_eq!(r.status, 200);
        served_by.insert(r.header("X-Backend-Conn").unwrap().to_owned());
    }
    assert_eq!(served_by.len(), 1, "all requests over one backend connection");
    assert_eq!(env.backend.connections(), 1);
}

#[test]
fn pooled_connections_serve_later_client_connections() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let client = env.client(Some(&env.pki.client));
    for _ in 0..5 {
        assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
    }
    assert_eq!(env.backend.connections(), 1, "the pool keeps the backend connection between clients");
}

#[test]
fn a_backend_that_closes_after_responding_is_not_reused() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    for _ in 0..3 {
        assert_eq!(c.request("GET", "/close", &[], b"").unwrap().status, 200);
    }
    assert_eq!(env.backend.connections(), 3);
}

#[test]
fn ten_mib_chunked_request_body_streams_through() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    c.write_raw(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
    let body = expected_pattern(10 * 1024 * 1024);
    for piece in body.chunks(100_003) {
        c.write_raw(format!("{:x}\r\n", piece.len()).as_bytes()).unwrap();
        c.write_raw(piece).unwrap();
        c.write_raw(b"\r\n").unwrap();
    }
    c.send(b"0\r\n\r\n").unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    let digest = ring::digest::digest(&ring::digest::SHA256, &body);
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(r.text(), format!("bytes={} sha256={hex}", body.len()));
}

#[test]
fn ten_mib_chunked_response_streams_through() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let len = 10 * 1024 * 1024;
    let r = c.request("GET", &format!("/chunked/{len}"), &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    assert_eq!(r.body.len(), len);
    assert!(r.body == expected_pattern(len), "body differs from what the backend sent");
    // The connection is still good for another request.
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
}

/// A size line of the process's status in /proc (`VmHWM`, `VmRSS`), in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Peak resident memory of a process.
fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

/// The most the process held while `work` ran: its resident size sampled every few
/// milliseconds, and its high-water mark at the end. The mark alone does not do: the kernel
/// reports it as the larger of a stored peak and the resident size it reads now, and memory
/// given back with `madvise` (as mimalloc does) lowers the second without raising the first, so
/// that a mark read later can be lower than one read before.
fn most_rss_kib_during(pid: u32, work: impl FnOnce()) -> u64 {
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                most = most.max(status_kib(pid, "VmRSS"));
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            most
        });
        work();
        done.store(true, std::sync::atomic::Ordering::Release);
        sampler.join().unwrap().max(peak_rss_kib(pid))
    })
}

#[test]
fn large_bodies_do_not_grow_the_proxy_memory() {
    let env = Env::new();
    let config = env.write_config("mem.toml", &env.config("require", "[server]\nworkers = 1\n"));
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let client = env.client(Some(&env.pki.client));
    // Warm up: one small exchange of each kind, then measure the peak.
    let mut c = client.connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/chunked/100000", &[], b"").unwrap().status, 200);
    assert_eq!(c.request("POST", "/upload", &[], &[7u8; 100_000]).unwrap().status, 200);
    let before = peak_rss_kib(proxy.pid());

    let len = 32 * 1024 * 1024;
    let most = most_rss_kib_during(proxy.pid(), || {
        c.write_raw(format!("GET /chunked/{len} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
        let r = c.read_response(false).unwrap();
        assert_eq!(r.body.len(), len);
        let mut up = client.connect(proxy.addr).unwrap();
        up.write_raw(
            format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let piece = vec![1u8; 1 << 20];
        for _ in 0..32 {
            up.write_raw(&piece).unwrap();
        }
        let r = up.read_response(false).unwrap();
        assert!(r.text().starts_with(&format!("bytes={len} ")), "{}", r.text());
        // And a chunked request body of the same size, in 1 MiB chunks.
        let mut up = client.connect(proxy.addr).unwrap();
        up.write_raw(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap();
        for _ in 0..32 {
            up.write_raw(format!("{:x}\r\n", piece.len()).as_bytes()).unwrap();
            up.write_raw(&piece).unwrap();
            up.write_raw(b"\r\n").unwrap();
        }
        up.write_raw(b"0\r\n\r\n").unwrap();
        let r = up.read_response(false).unwrap();
        assert!(r.text().starts_with(&format!("bytes={len} ")), "{}", r.text());
    });
    let grew = most.saturating_sub(before);
    assert!(grew < 8 * 1024, "peak RSS grew by {grew} KiB while 96 MiB went through");
}

#[test]
fn backend_refusing_connections_gives_502() {
    let env = Env::new();
    // A port nothing listens on: bind, note, release.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let config = env.config("require", "").replace(&env.backend.addr().to_string(), &dead.to_string());
    let proxy = TestProxy::start(env.dir(), &config);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/", &[], b"").unwrap();
    assert_eq!(r.status, 502);
    assert_eq!(r.text(), r#"{"statusCode":502,"message":"Bad gateway"}"#);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    // Nothing about the backend leaks, and the client connection is still usable.
    assert!(!r.text().contains("refused"));
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 502);
}

#[test]
fn silent_backend_gives_504() {
    let env = Env::new();
    let config =
        env.config("require", "").replace("url = \"http://", "response_timeout = \"300ms\"\nurl = \"http://");
    let proxy = TestProxy::start(env.dir(), &config);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/silent", &[], b"").unwrap();
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), r#"{"statusCode":504,"message":"Gateway timeout"}"#);
}

#[test]
fn unknown_path_gives_404_json() {
    let env = Env::new();
    let api = "[[api]]\nname = \"todo\"\npath = \"/todo\"\nbackend = \"app\"\n";
    let proxy = env.proxy("require", api);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/todos", &[], b"").unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), r#"{"statusCode":404,"message":"Resource not found"}"#);
    let r = c.request("GET", "/todo/items?x=1", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.text().starts_with("GET /items?x=1 HTTP/1.1"),
        "the API prefix is replaced by the backend path: {}",
        r.text()
    );
    assert_eq!(env.backend.connections(), 1);
}

#[test]
fn hop_by_hop_headers_are_dropped_and_forwarding_headers_set() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c
        .request(
            "GET",
            "/",
            &[
                ("Connection", "keep-alive, X-Secret"),
                ("X-Secret", "1"),
                ("Keep-Alive", "timeout=5"),
                ("TE", "trailers"),
                ("Upgrade", "h2c"),
                ("Proxy-Connection", "keep-alive"),
                ("X-Forwarded-For", "6.6.6.6"),
                ("X-Forwarded-Proto", "http"),
                ("X-Kept", "yes"),
            ],
            b"",
        )
        .unwrap();
    assert_eq!(r.status, 200);
    for gone in ["Connection", "X-Secret", "Keep-Alive", "TE", "Upgrade", "Proxy-Connection"] {
        assert_eq!(r.echoed_header(gone), None, "{gone} reached the backend");
    }
    assert_eq!(r.echoed_header("X-Kept").as_deref(), Some("yes"));
    assert_eq!(r.echoed_header("X-Forwarded-For").as_deref(), Some("127.0.0.1"));
    assert_eq!(r.echoed_header_count("X-Forwarded-For"), 1);
    assert_eq!(r.echoed_header("X-Forwarded-Proto").as_deref(), Some("https"));
}

#[test]
fn identity_headers_from_the_client_never_reach_the_backend() {
    let env = Env::new();
    let steps = r#"
[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  set_header = { name = "X-Client-Cert-Subject", value = "{client_cert.subject}", action = "skip" }
"#;
    let proxy = env.proxy("request", steps);
    // With a certificate: the proxy's value, once.
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c
        .request(
            "GET",
            "/",
            &[("X-Client-Cert-Subject", "CN=admin"), ("x-client-cert-subject", "CN=root")],
            b"",
        )
        .unwrap();
    assert_eq!(
        r.echoed_header("X-Client-Cert-Subject").as_deref(),
        Some("CN=client1, OU=Clients, O=Portcullis Test, C=XX")
    );
    assert_eq!(r.echoed_header_count("X-Client-Cert-Subject"), 1);
    // Without one: nothing, not the forged value.
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/", &[("X-Client-Cert-Subject", "CN=admin")], b"").unwrap();
    assert_eq!(r.echoed_header("X-Client-Cert-Subject"), None, "{}", r.text());
}

/// A header is an identity header wherever the step that sets it stands: in one operation of
/// one API, or after a `return_response` that ends its API before it runs. Requests elsewhere
/// still never carry the client's own value.
#[test]
fn identity_headers_are_stripped_everywhere_whatever_step_sets_them() {
    let env = Env::new();
    let steps = r#"
[[api]]
name = "devices"
path = "/devices"
backend = "app"
  [[api.operation]]
  match = "GET /thumb"
    [[api.operation.inbound]]
    set_header = { name = "X-Device-Thumbprint", value = "{client_cert.thumbprint}" }
  [[api.operation]]
  match = "GET /plain"

[[api]]
name = "closed"
path = "/closed"
backend = "app"
  [[api.inbound]]
  return_response = { status = 410 }
  [[api.inbound]]
  set_header = { name = "X-Late-Subject", value = "{client_cert.subject}" }

[[api]]
name = "app"
path = "/"
backend = "app"
"#;
    let proxy = env.proxy("request", steps);
    let forged = [("X-Device-Thumbprint", "00"), ("X-Late-Subject", "CN=admin")];
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/devices/thumb", &forged, b"").unwrap();
    assert_eq!(r.echoed_header("X-Device-Thumbprint"), Some(env.pki.client.thumbprint()));
    assert_eq!(r.echoed_header_count("X-Device-Thumbprint"), 1);
    for path in ["/devices/plain", "/elsewhere"] {
        let r = c.request("GET", path, &forged, b"").unwrap();
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.echoed_header("X-Device-Thumbprint"), None, "{path}");
        assert_eq!(r.echoed_header("X-Late-Subject"), None, "{path}");
    }
    assert_eq!(c.request("GET", "/closed", &forged, b"").unwrap().status, 410);
}

#[test]
fn outbound_delete_removes_a_backend_header() {
    let env = Env::new();
    let steps = r#"
[[outbound]]
set_header = { name = "X-Powered-By", action = "delete" }
"#;
    let proxy = env.proxy("require", steps);
    let r = env.client(Some(&env.pki.client)).get(proxy.addr, "/").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Powered-By"), None);
    assert!(r.header("X-Backend-Conn").is_some());
}

#[test]
fn http10_request_is_served_and_closed() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let bytes = raw_exchange_bytes(
        &env.client(Some(&env.pki.client)),
        proxy.addr,
        b"GET /chunked/5000 HTTP/1.0\r\n\r\n",
    )
    .unwrap();
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&bytes[..end]);
    assert_eq!(status_of(&head), Some(200), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "no chunked coding for HTTP/1.0: {head}"
    );
    assert!(head.contains("Connection: close"));
    assert!(bytes[end..] == expected_pattern(5000)[..], "the body, unchunked, ends at the close");
}

#[test]
fn expect_100_continue_is_answered_by_the_proxy() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    c.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    // The interim response comes before the body is sent.
    assert_eq!(c.read_line().unwrap(), "HTTP/1.1 100 Continue");
    assert_eq!(c.read_line().unwrap(), "");
    c.send(b"hello").unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("bytes=5 "), "{}", r.text());
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    c.send(b"GET /a HTTP/1.1\r\nHost: localhost\r\n\r\nPOST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabcGET /c HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let a = c.read_response(false).unwrap();
    let b = c.read_response(false).unwrap();
    let d = c.read_response(false).unwrap();
    assert!(a.text().starts_with("GET /a "));
    assert!(b.text().starts_with("bytes=3 "));
    assert!(d.text().starts_with("GET /c "));
}

#[test]
fn head_requests_get_headers_only() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("HEAD", "/bytes/1000", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("Content-Length"), Some("1000"));
    assert!(r.body.is_empty());
    // The next response on the connection is intact.
    let r = c.request("GET", "/bytes/10", &[], b"").unwrap();
    assert_eq!(r.body, expected_pattern(10));
}

#[test]
fn backend_status_and_reason_are_relayed() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/status/418", &[], b"").unwrap();
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "status 418");
    let r = c.request("GET", "/status/204", &[], b"").unwrap();
    assert_eq!(r.status, 204);
}

#[test]
fn epoll_driver_serves_too() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\ndriver = \"epoll\"\nworkers = 2\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    for _ in 0..3 {
        assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
    }
    let r = c.request("GET", &format!("/chunked/{}", 1 << 20), &[], b"").unwrap();
    assert_eq!(r.body.len(), 1 << 20);
}

#[test]
fn many_workers_share_the_port() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 4\n");
    let client = env.client(Some(&env.pki.client));
    for _ in 0..20 {
        assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
    }
}

#[test]
fn pooled_connections_expire_after_their_idle_timeout() {
    let env = Env::new();
    let config = env
        .config("require", "[server]\nworkers = 1\n")
        .replace("url = \"http://", "idle_timeout = \"200ms\"\nurl = \"http://");
    let proxy = TestProxy::start(env.dir(), &config);
    let client = env.client(Some(&env.pki.client));
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
    assert_eq!(env.backend.connections(), 1);
    // Sequencing, not timing: well past the idle timeout the pooled connection is gone.
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
    assert_eq!(env.backend.connections(), 2);
}

#[test]
fn a_stale_pooled_connection_is_retried_transparently() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
    // The backend closes the pooled connection after answering, without saying so …
    assert_eq!(c.request("GET", "/then-close", &[], b"").unwrap().status, 200);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // … so the next request finds it dead, and is sent again on a new one.
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
    assert_eq!(env.backend.connections(), 2);
}

#[test]
fn a_connection_idle_long_enough_to_give_back_its_buffers_still_works() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/bytes/20000", &[], b"").unwrap().body.len(), 20_000);
    // Past the point where an idle connection drops its buffers and waits for readability.
    std::thread::sleep(std::time::Duration::from_millis(2600));
    let r = c.request("POST", "/upload", &[], &[5u8; 30_000]).unwrap();
    assert!(r.text().starts_with("bytes=30000 "), "{}", r.text());
    assert_eq!(c.request("GET", "/bytes/10", &[], b"").unwrap().body, expected_pattern(10));
}

#[test]
fn backend_responses_that_cannot_be_relayed_give_502() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let client = env.client(Some(&env.pki.client));
    for path in ["/garbage", "/switch", "/gzip", "/conn-cl", "/reset"] {
        let r = client.get(proxy.addr, path).unwrap();
        assert_eq!(r.status, 502, "{path}");
        assert_eq!(r.text(), r#"{"statusCode":502,"message":"Bad gateway"}"#, "{path}");
    }
}

#[test]
fn head_request_to_an_unknown_path_gets_a_bodiless_404() {
    let env = Env::new();
    let proxy = env.proxy("require", "[[api]]\nname = \"todo\"\npath = \"/todo\"\nbackend = \"app\"\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("HEAD", "/nothing", &[], b"").unwrap();
    assert_eq!(r.status, 404);
    assert!(r.body.is_empty());
    // Had a body been sent, this would read it as the next response.
    assert_eq!(c.request("GET", "/todo/x", &[], b"").unwrap().status, 200);
}

#[test]
fn a_request_body_the_backend_stopped_reading_closes_the_client_connection() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nbody_timeout = \"1s\"\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    c.write_raw(b"POST /early-close HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000\r\n\r\n").unwrap();
    c.write_raw(&[7u8; 200_000]).unwrap();
    let r = c.read_response(false).unwrap();
    // Whether the backend's close or the missing rest of the body is noticed first, the rest of
    // the body must never be read as another request: the proxy answers, then closes.
    assert!(matches!(r.status, 502 | 408), "{}", r.status);
    assert_eq!(r.header("Connection"), Some("close"));
}

/// Some servers answer an idle keep-alive connection's timeout with an unsolicited 408 before
/// closing it. That 408 is nobody's answer: a GET sent on the connection is repeated on a new
/// one, and a POST finds the connection checked and replaced before it is sent.
#[test]
fn an_unsolicited_408_on_a_pooled_connection_is_not_taken_for_the_answer() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/then-408", &[], b"").unwrap().status, 200);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = c.request("GET", "/", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Backend-Conn"), Some("2"));
    assert_eq!(c.request("GET", "/then-408", &[], b"").unwrap().status, 200);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let r = c.request("POST", "/", &[], b"x").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Backend-Conn"), Some("3"));
    assert_eq!(env.backend.connections(), 3);
}

/// An empty body keeps its length on both sides: a response without one would be read until
/// the connection closes (RFC 9112 §6.3), so the client would wait on a keep-alive connection;
/// and a POST that said `Content-Length: 0` says it to the backend too. A 204 carries none.
#[test]
fn empty_bodies_keep_their_length() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    for _ in 0..2 {
        let r = c.request("GET", "/bytes/0", &[], b"").unwrap();
        assert_eq!((r.status, r.header("Content-Length")), (200, Some("0")));
        assert!(r.body.is_empty());
    }
    let r = c.request("GET", "/status/204", &[], b"").unwrap();
    assert_eq!((r.status, r.header("Content-Length")), (204, None));
    c.write_raw(b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n").unwrap();
    let r = c.read_response(false).unwrap();
    assert!(r.text().to_ascii_lowercase().contains("\ncontent-length: 0\n"), "{}", r.text());
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200, "the connection is still in step");
}

/// When the proxy is the one to close (here the client asked for it, and went on sending),
/// what keeps coming is read and dropped for a moment, so the kernel does not answer it with a
/// reset that would destroy the response before the client reads it (RFC 9112 §9.6).
#[test]
fn closing_after_connection_close_does_not_reset_the_response_away() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    // A response big enough to still be on its way when the proxy closes.
    let mut raw = b"GET /bytes/8000000 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".to_vec();
    raw.extend(std::iter::repeat_n(b'x', 200_000));
    c.write_raw(&raw).unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
    assert_eq!(r.body.len(), 8_000_000);
}

/// The 408 comes only once the next request is on its way (no check before sending could see
/// it): a GET is sent again on a new connection; a POST, which cannot be, gets the 408.
#[test]
fn a_408_from_a_pooled_connection_repeats_a_get_but_not_a_post() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/next-gets-408", &[], b"").unwrap().status, 200);
    let r = c.request("GET", "/", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("X-Backend-Conn"), Some("2"));
    assert_eq!(c.request("GET", "/next-gets-408", &[], b"").unwrap().status, 200);
    assert_eq!(c.request("POST", "/", &[], b"x").unwrap().status, 408);
    assert_eq!(env.backend.connections(), 2);
}

/// A backend that refuses an upload before reading it (413, then close) is heard: the client
/// gets the 413, not a 502 for the body the backend stopped taking, and the connection ends.
#[test]
fn an_answer_the_backend_gives_before_taking_the_body_is_relayed() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    // A little of the body, then the client waits: the proxy, waiting for the rest, must notice
    // that the backend has answered.
    c.write_raw(b"POST /early-413 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4000000\r\n\r\n").unwrap();
    c.write_raw(&[7u8; 1000]).unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (413, "too large"));
    assert_eq!(r.header("Connection"), Some("close"));
    // And while the body is still pouring in.
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    c.write_raw(b"POST /early-413 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4000000\r\n\r\n").unwrap();
    let _ = c.write_raw(&[7u8; 1_000_000]);
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.text().as_str()), (413, "too large"));
}

/// A backend's 103 Early Hints reaches an HTTP/1.1 client ahead of the response (RFC 9110
/// §15.2); an HTTP/1.0 client, which cannot take interim responses, gets the final one alone.
#[test]
fn interim_responses_are_forwarded_to_http11_clients() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    c.write_raw(b"GET /early-hints HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let mut interim = Vec::new();
    loop {
        let line = c.read_line().unwrap();
        if line.is_empty() {
            break;
        }
        interim.push(line);
    }
    assert_eq!(interim[0], "HTTP/1.1 103 Early Hints");
    assert!(interim.iter().any(|l| l == "Link: </style.css>; rel=preload"), "{interim:?}");
    assert_eq!(c.read_response(false).unwrap().status, 200);
    c.write_raw(b"GET /early-hints HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    assert_eq!(c.read_line().unwrap(), "HTTP/1.1 200 OK");
}

/// What a backend says early that is no refusal — here a 103 before it reads the body — does
/// not stop the upload: the body goes through whole and the final answer follows.
#[test]
fn an_early_interim_answer_does_not_stop_the_upload() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    c.write_raw(b"POST /early-hints HTTP/1.1\r\nHost: localhost\r\nContent-Length: 300000\r\n\r\n").unwrap();
    c.write_raw(&[7u8; 1000]).unwrap();
    // Sequencing, not timing: the 103 reaches the proxy while most of the body is to come.
    std::thread::sleep(std::time::Duration::from_millis(200));
    c.write_raw(&[7u8; 299_000]).unwrap();
    // It is passed on ahead of the final answer.
    assert_eq!(c.read_line().unwrap(), "HTTP/1.1 103 Early Hints");
    while !c.read_line().unwrap().is_empty() {}
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("POST /early-hints HTTP/1.1\n"), "{}", r.text());
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200, "the connection goes on");
}

#[test]
fn non_idempotent_requests_are_not_retried_on_a_stale_connection() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/then-close", &[], b"").unwrap().status, 200);
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The pooled connection is found dead before use and replaced: nothing to retry.
    assert_eq!(c.request("POST", "/", &[], b"").unwrap().status, 200);
    assert_eq!(env.backend.connections(), 2);
}

#[test]
fn sni_and_host_must_agree() {
    let env = Env::new();
    let p = |p: &std::path::Path| p.display().to_string();
    let sni = format!(
        "\n  [[listener.sni]]\n  hostnames = [\"devices.localhost\"]\n  certificate = {{ cert = \"{}\", key = \"{}\" }}\n  client_certificate = \"require\"\n",
        p(&env.paths.sni_chain),
        p(&env.paths.sni_key)
    );
    let config = env.config("request", "").replacen("\n[[backend]]", &format!("{sni}\n[[backend]]"), 1);
    let proxy = TestProxy::start(env.dir(), &config);
    // Connected to the lenient default site without a certificate, asking for the strict one.
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/", &[("X-Ignored", "1")], b"").unwrap();
    assert_eq!(r.status, 200, "its own host is fine");
    c.write_raw(b"GET / HTTP/1.1\r\nHost: devices.localhost:443\r\n\r\n").unwrap();
    assert_eq!(c.read_line().unwrap(), "HTTP/1.1 421 Misdirected Request");
    let mut length = 0;
    loop {
        let line = c.read_line().unwrap();
        if line.is_empty() {
            break;
        }
        if let Some(v) = line.strip_prefix("Content-Length: ") {
            length = v.parse().unwrap();
        }
    }
    c.read_body_streaming(length, |_| {}).unwrap();
    c.write_raw(b"GET / HTTP/1.1\r\nHost: devices.localhost:443\r\n\r\n").unwrap();
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 421);
    assert!(r.header("date").is_some_and(|d| d.ends_with(" GMT") && d.len() == 29), "{:?}", r.headers);
    assert_eq!(r.text(), r#"{"statusCode":421,"message":"Misdirected request"}"#);
    assert_eq!(env.backend.requests(), 1);
}

/// A Host of a shape that only a careless port split could choke on is refused by the parser,
/// and the worker goes on serving: on a listener with SNI entries every Host is matched against
/// the sites, the path where such a value once panicked.
#[test]
fn hostile_host_values_are_refused_and_the_worker_survives() {
    let env = Env::new();
    let p = |p: &std::path::Path| p.display().to_string();
    let sni = format!(
        "\n  [[listener.sni]]\n  hostnames = [\"devices.localhost\"]\n  certificate = {{ cert = \"{}\", key = \"{}\" }}\n",
        p(&env.paths.sni_chain),
        p(&env.paths.sni_key)
    );
    let config = env.config("request", "[server]\nworkers = 1\n").replacen(
        "\n[[backend]]",
        &format!("{sni}\n[[backend]]"),
        1,
    );
    let proxy = TestProxy::start(env.dir(), &config);
    for raw in [&b"GET / HTTP/1.1\r\nHost: :]\r\n\r\n"[..], b"GET http://:]/ HTTP/1.1\r\nHost: a\r\n\r\n"] {
        let mut c = env.client(None).connect(proxy.addr).unwrap();
        c.write_raw(raw).unwrap();
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(raw));
    }
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200, "the only worker still serves");
    assert_eq!(env.backend.requests(), 1);
}
