//! Every byte from a backend is hostile: odd, broken and malicious responses, each with its
//! defined outcome (forwarded in canonical form, or `502` and the backend connection dropped),
//! and after each one the proxy — a single worker — serves the next request.

use portcullis_testkit::proxy::{DEFAULT_API, config};
use portcullis_testkit::{Reply, ScriptedBackend, TestProxy, Then};

use crate::common::{Env, raw_exchange, status_of};

/// One worker: a panic or a stuck loop anywhere shows as the next request failing.
fn proxy_for(env: &Env, backend: &ScriptedBackend) -> TestProxy {
    let text =
        config(&env.paths, backend.addr(), "require", &format!("[server]\nworkers = 1\n{DEFAULT_API}"));
    TestProxy::start(env.dir(), &text)
}

fn script(entries: &[(&str, &[u8], Then)]) -> Vec<(String, Reply)> {
    entries.iter().map(|(p, b, t)| ((*p).to_owned(), Reply::new(*b, *t))).collect()
}

/// The whole exchange for `path` on its own connection, closed by the client's request.
fn fetch(env: &Env, proxy: &TestProxy, path: &str) -> String {
    let client = env.client(Some(&env.pki.client));
    let raw = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    raw_exchange(&client, proxy.addr, raw.as_bytes()).unwrap_or_else(|e| format!("error: {e}"))
}

fn assert_serving(env: &Env, proxy: &TestProxy, after: &str) {
    let text = fetch(env, proxy, "/fine");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "after {after}: {text:?}");
    assert!(text.ends_with("\r\n\r\nok"), "after {after}: {text:?}");
}

#[test]
fn a_status_line_without_a_reason_phrase_is_forwarded_with_the_canonical_one() {
    let env = Env::new();
    let backend = ScriptedBackend::start(script(&[
        ("/no-reason", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", Then::KeepOpen),
        ("/no-reason-sp", b"HTTP/1.1 404 \r\nContent-Length: 2\r\n\r\nno", Then::KeepOpen),
        ("/unregistered", b"HTTP/1.1 299\r\nContent-Length: 2\r\n\r\nok", Then::KeepOpen),
        ("/obs-text", b"HTTP/1.1 200 \xe9t\xe9\r\nContent-Length: 2\r\n\r\nok", Then::KeepOpen),
        ("/custom", b"HTTP/1.1 200 Fine Thanks\r\nContent-Length: 2\r\n\r\nok", Then::KeepOpen),
        (
            "/interim-no-reason",
            b"HTTP/1.1 103\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
            Then::KeepOpen,
        ),
    ]));
    let proxy = proxy_for(&env, &backend);
    for (path, status_line) in [
        ("/no-reason", "HTTP/1.1 200 OK\r\n"),
        ("/no-reason-sp", "HTTP/1.1 404 Not Found\r\n"),
        ("/unregistered", "HTTP/1.1 299 Success\r\n"),
        ("/obs-text", "HTTP/1.1 200 OK\r\n"),
        ("/custom", "HTTP/1.1 200 Fine Thanks\r\n"),
        ("/interim-no-reason", "HTTP/1.1 103 Early Hints\r\n"),
    ] {
        let text = fetch(&env, &proxy, path);
        assert!(text.starts_with(status_line), "{path}: {text:?}");
        assert!(text.ends_with("\r\n\r\nok") || text.ends_with("\r\n\r\nno"), "{path}: {text:?}");
        assert_serving(&env, &proxy, path);
    }
    let text = fetch(&env, &proxy, "/interim-no-reason");
    assert!(text.contains("\r\n\r\nHTTP/1.1 200 OK\r\n"), "{text:?}");
}

/// Responses that cannot be relayed as they are: each is a 502, and the connection that
/// carried it is not used again.
#[test]
fn responses_that_cannot_be_relayed_get_502_and_the_proxy_serves_on() {
    let env = Env::new();
    let big_header = {
        let mut v = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        v.extend(std::iter::repeat_n(b'a', 70 * 1024));
        v.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
        v
    };
    let many_headers = {
        let mut v = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..300 {
            v.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        v.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
        v
    };
    let cases: Vec<(&str, Vec<u8>, Then)> = vec![
        ("/status-099", b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok".to_vec(), Then::KeepOpen),
        ("/status-600", b"HTTP/1.1 600 High\r\nContent-Length: 2\r\n\r\nok".to_vec(), Then::KeepOpen),
        ("/status-999", b"HTTP/1.1 999 High\r\nContent-Length: 2\r\n\r\nok".to_vec(), Then::KeepOpen),
        ("/status-4-digits", b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), Then::KeepOpen),
        ("/status-2-digits", b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), Then::KeepOpen),
        (
            "/cl-and-te",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                .to_vec(),
            Then::KeepOpen,
        ),
        (
            "/te-and-cl",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                .to_vec(),
            Then::KeepOpen,
        ),
        (
            "/differing-cl",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!".to_vec(),
            Then::KeepOpen,
        ),
        ("/cl-list", b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok!".to_vec(), Then::KeepOpen),
        ("/cl-negative", b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok".to_vec(), Then::KeepOpen),
        ("/cl-plus", b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok".to_vec(), Then::KeepOpen),
        ("/bare-lf", b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok".to_vec(), Then::KeepOpen),
        (
            "/bare-lf-in-fields",
            b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok".to_vec(),
            Then::KeepOpen,
        ),
        (
            "/bare-cr",
            b"HTTP/1.1 200 OK\r\nX-A: 1\rX-B: 2\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            Then::KeepOpen,
        ),
        (
            "/obs-fold",
            b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            Then::KeepOpen,
        ),
        (
            "/nul-in-value",
            b"HTTP/1.1 200 OK\r\nX-A: a\0b\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            Then::KeepOpen,
        ),
        (
            "/space-before-colon",
            b"HTTP/1.1 200 OK\r\nX-A : 1\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            Then::KeepOpen,
        ),
        ("/oversized-head", big_header, Then::KeepOpen),
        ("/too-many-headers", many_headers, Then::KeepOpen),
        ("/endless-1xx", b"HTTP/1.1 102 Processing\r\n\r\n".to_vec(), Then::Repeat),
        ("/endless-103", b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n".to_vec(), Then::Repeat),
        ("/http-0.9", b"ok, no head at all\n".to_vec(), Then::Close),
        ("/garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), Then::Close),
        ("/http-2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(), Then::KeepOpen),
        ("/close-mid-head", b"HTTP/1.1 200 OK\r\nContent-Le".to_vec(), Then::Close),
        ("/close-mid-status-line", b"HTTP/1.1 2".to_vec(), Then::Close),
        (
            "/switching",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n".to_vec(),
            Then::KeepOpen,
        ),
        ("/te-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok".to_vec(), Then::Close),
        (
            "/chunked-twice",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
            Then::KeepOpen,
        ),
    ];
    let backend = ScriptedBackend::start(
        cases.iter().map(|(p, b, t)| ((*p).to_owned(), Reply::new(b.clone(), *t))).collect(),
    );
    let proxy = proxy_for(&env, &backend);
    for (path, _, _) in &cases {
        let text = fetch(&env, &proxy, path);
        // Interim responses are forwarded (RFC 9110 §15.2), a bounded number of them; the final
        // answer is the proxy's 502.
        let interim = text.matches("HTTP/1.1 1").count();
        assert!(interim <= 16, "{path}: {interim} interim responses forwarded");
        let last = &text[text.rfind("HTTP/1.1 ").unwrap_or(0)..];
        assert_eq!(status_of(last), Some(502), "{path}: {text:?}");
        assert!(text.ends_with(r#"{"statusCode":502,"message":"Bad gateway"}"#), "{path}: {text:?}");
        assert_serving(&env, &proxy, path);
    }
}

#[test]
fn identical_duplicate_content_lengths_are_one_length() {
    let env = Env::new();
    let backend = ScriptedBackend::start(script(&[(
        "/dup-cl",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        Then::KeepOpen,
    )]));
    let proxy = proxy_for(&env, &backend);
    let text = fetch(&env, &proxy, "/dup-cl");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text:?}");
    assert_eq!(
        text.matches("content-length: 2\r\n").count() + text.matches("Content-Length: 2\r\n").count(),
        1,
        "{text:?}"
    );
    assert!(text.ends_with("\r\n\r\nok"), "{text:?}");
}

/// Bytes after the body its length announced are no response to anything: they are not relayed,
/// and the connection they came on is not reused (the next request would read them as its
/// answer).
#[test]
fn a_body_longer_than_its_content_length_is_cut_and_its_connection_dropped() {
    let env = Env::new();
    let backend = ScriptedBackend::start(script(&[(
        "/longer",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged",
        Then::KeepOpen,
    )]));
    let proxy = proxy_for(&env, &backend);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/longer", &[], b"").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"));
    let before = backend.connections();
    let r = c.request("GET", "/fine", &[], b"").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok"), "the stray bytes were read as an answer");
    assert_eq!(backend.connections(), before + 1, "the connection with stray bytes was reused");
}

/// A body shorter than its length, then a close: the head has gone out already, so the client
/// connection is closed where the body stops — never left waiting, never reused.
#[test]
fn a_body_shorter_than_its_content_length_ends_the_client_connection() {
    let env = Env::new();
    let backend = ScriptedBackend::start(script(&[(
        "/shorter",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        Then::Close,
    )]));
    let proxy = proxy_for(&env, &backend);
    let client = env.client(Some(&env.pki.client));
    let raw = b"GET /shorter HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let mut c = client.connect(proxy.addr).unwrap();
    c.write_raw(raw).unwrap();
    let got = String::from_utf8_lossy(&c.read_to_close().unwrap_or_default()).into_owned();
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got:?}");
    assert!(got.contains("Content-Length: 10\r\n") || got.contains("content-length: 10\r\n"), "{got:?}");
    assert!(got.ends_with("\r\n\r\nabc"), "{got:?}");
    assert_serving(&env, &proxy, "/shorter");
}

/// A chunked body that breaks off or lies about its sizes is cut the same way.
#[test]
fn a_broken_chunked_body_ends_the_client_connection() {
    let env = Env::new();
    let backend = ScriptedBackend::start(script(&[
        (
            "/bad-size",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n",
            Then::KeepOpen,
        ),
        ("/cut", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nok", Then::Close),
    ]));
    let proxy = proxy_for(&env, &backend);
    for path in ["/bad-size", "/cut"] {
        let text = fetch(&env, &proxy, path);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {text:?}");
        assert!(!text.ends_with("0\r\n\r\n"), "{path}: a cut body was completed: {text:?}");
        assert_serving(&env, &proxy, path);
    }
}

/// Unknown fields, odd-but-valid values and the like pass through.
#[test]
fn odd_but_valid_responses_pass_through() {
    let env = Env::new();
    let backend = ScriptedBackend::start(script(&[
        ("/tab-in-value", b"HTTP/1.1 200 OK\r\nX-A: a\tb\r\nContent-Length: 2\r\n\r\nok", Then::KeepOpen),
        ("/empty-value", b"HTTP/1.1 200 OK\r\nX-Empty:\r\nContent-Length: 2\r\n\r\nok", Then::KeepOpen),
        ("/http-1.0-close", b"HTTP/1.0 200 OK\r\n\r\nok", Then::Close),
        ("/no-length-close", b"HTTP/1.1 200 OK\r\n\r\nok", Then::Close),
    ]));
    let proxy = proxy_for(&env, &backend);
    for path in ["/tab-in-value", "/empty-value", "/http-1.0-close", "/no-length-close"] {
        let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
        let r = c.request("GET", path, &[], b"").unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "ok"), "{path}");
        assert_serving(&env, &proxy, path);
    }
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/tab-in-value", &[], b"").unwrap();
    assert_eq!(r.header("x-a"), Some("a\tb"));
}
