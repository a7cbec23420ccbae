//! Hiding the backend: `find_and_replace` in response bodies (streamed, in bounded memory,
//! wherever the backend's writes split a match), compressed bodies left alone,
//! `redirect_content_urls` for `Location` and `Content-Location`, and API Management's recipe
//! of deleting the headers that name the backend's software.

use std::time::Duration;

use portcullis_testkit::scripted::{Reply, ScriptedBackend, Then};
use portcullis_testkit::{Backend, ProxyProcess, TestProxy};

use crate::common::{Env, binary};

const BACKEND_URL: &str = "http://backend.internal:8080";
const PUBLIC_URL: &str = "https://api.example.com";

/// A configuration whose `/api` goes to `backend` (URL as given) with `outbound` steps.
fn config(env: &Env, backend_url: &str, outbound: &str) -> String {
    env.config(
        "request",
        &format!(
            "[[backend]]\nname = \"hidden\"\nurl = \"{backend_url}\"\n\
             [[api]]\nname = \"api\"\npath = \"/api\"\nbackend = \"hidden\"\n{outbound}\n"
        ),
    )
}

fn replace_step() -> String {
    format!(
        "  [[api.outbound]]\n  find_and_replace = {{ from = \"{BACKEND_URL}\", to = \"{PUBLIC_URL}\" }}\n"
    )
}

fn body_with_urls() -> String {
    format!(
        "{{\"self\":\"{BACKEND_URL}/items/7\",\"next\":\"{BACKEND_URL}/items/8\",\"almost\":\"{}\"}}",
        &BACKEND_URL[..20]
    )
}

#[test]
fn bodies_are_rewritten_wherever_the_backends_writes_split_them() {
    let env = Env::new();
    let body = body_with_urls();
    let want = body.replace(BACKEND_URL, PUBLIC_URL);
    let chunked = {
        let mut b = String::from(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        for piece in body.as_bytes().chunks(7) {
            b.push_str(&format!("{:x}\r\n{}\r\n", piece.len(), String::from_utf8_lossy(piece)));
        }
        b + "0\r\n\r\n"
    };
    let sized = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let until_close = format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{body}");
    let backend = ScriptedBackend::start(vec![
        ("/chunked".into(), Reply::dribbled(chunked, Then::KeepOpen)),
        ("/sized".into(), Reply::dribbled(sized, Then::KeepOpen)),
        ("/until-close".into(), Reply::dribbled(until_close, Then::Close)),
    ]);
    let proxy =
        TestProxy::start(env.dir(), &config(&env, &format!("http://{}", backend.addr()), &replace_step()));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    // Chunked from the backend: streamed, chunked to the client.
    let r = c.request("GET", "/api/chunked", &[], b"").unwrap();
    assert_eq!((r.status, r.text()), (200, want.clone()));
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    // A small body with a length: rewritten whole, sent with its new length.
    let r = c.request("GET", "/api/sized", &[], b"").unwrap();
    assert_eq!((r.status, r.text()), (200, want.clone()));
    assert_eq!(r.header("Content-Length"), Some(want.len().to_string().as_str()));
    // Until the backend closes: chunked to the client, whose connection stays open.
    let r = c.request("GET", "/api/until-close", &[], b"").unwrap();
    assert_eq!((r.status, r.text()), (200, want.clone()));
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    assert_eq!(c.request("GET", "/api/sized", &[], b"").unwrap().text(), want);
}

#[test]
fn a_hundred_mebibytes_stream_through_in_bounded_memory() {
    let env = Env::new();
    let backend = Backend::start();
    // The test backend's bytes run 0, 1, … 250, 0, 1, …: "ABC" comes once every 251 bytes.
    let step = "  [[api.outbound]]\n  find_and_replace = { from = \"ABC\", to = \"[abc]\" }\n";
    let text = config(&env, &format!("http://{}", backend.addr()), step);
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let size = 100 << 20;
    for path in [format!("/api/bytes/{size}"), format!("/api/chunked/{size}")] {
        let r = env.client(None).connect(proxy.addr).unwrap().request("GET", &path, &[], b"").unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Transfer-Encoding"), Some("chunked"), "{path}: too large to hold");
        let sent = portcullis_testkit::backend::expected_pattern(size);
        let pairs = [(bytes::Bytes::from_static(b"ABC"), bytes::Bytes::from_static(b"[abc]"))];
        assert!(r.body == portcullis_http::replace_all(&sent, &pairs), "{path}: the body as replaced whole");
        assert_eq!(r.body.len(), size + 2 * sent.windows(3).filter(|w| w == b"ABC").count());
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    eprintln!("peak resident memory of the proxy: {peak_kib} KiB");
    assert!(
        peak_kib < 96 * 1024,
        "the proxy's peak resident memory was {peak_kib} KiB for 2 × 100 MiB bodies"
    );
}

#[test]
fn compressed_bodies_are_left_alone_and_identity_is_asked_for() {
    let env = Env::new();
    let gz = format!(
        "HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: {}\r\n\r\n{BACKEND_URL}",
        BACKEND_URL.len()
    );
    let scripted = ScriptedBackend::start(vec![("/gz".into(), Reply::new(gz, Then::KeepOpen))]);
    let proxy = ProxyProcess::spawn(
        &binary(),
        &env.write_config("p.toml", &config(&env, &format!("http://{}", scripted.addr()), &replace_step())),
    );
    let r = env
        .client(None)
        .connect(proxy.addr)
        .unwrap()
        .request("GET", "/api/gz", &[("Accept-Encoding", "gzip, br")], b"")
        .unwrap();
    assert_eq!(r.text(), BACKEND_URL, "not rewritten: it is compressed");
    assert!(proxy.wait_for_log("came compressed", Duration::from_secs(5)).is_some());
    // The echo backend shows what the proxy asked for.
    let text = config(&env, &format!("http://{}", env.backend.addr()), &replace_step());
    let proxy = TestProxy::start(env.dir(), &text);
    let r = env
        .client(None)
        .connect(proxy.addr)
        .unwrap()
        .request("GET", "/api/x", &[("Accept-Encoding", "gzip, br")], b"")
        .unwrap();
    assert_eq!(r.echoed_header("Accept-Encoding").as_deref(), Some("identity"), "{}", r.text());
    assert_eq!(r.echoed_header_count("Accept-Encoding"), 1);
}

#[test]
fn redirects_point_to_the_public_url_and_the_backends_headers_go() {
    let env = Env::new();
    let scripted = ScriptedBackend::start_with(|addr| {
        let port = addr.port();
        vec![
            (
                "/base/old".into(),
                Reply::new(
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: http://LOCALHOST:{port}/base/items/7?x=1\r\nContent-Length: 0\r\n\r\n"
                    ),
                    Then::KeepOpen,
                ),
            ),
            (
                "/base/made".into(),
                Reply::new(
                    format!(
                        "HTTP/1.1 201 Created\r\nContent-Location: http://localhost:{port}/base\r\nLocation: https://elsewhere.example/base/x\r\nServer: Kestrel\r\nX-Powered-By: ASP.NET\r\nX-AspNet-Version: 4.0.30319\r\nContent-Length: 0\r\n\r\n"
                    ),
                    Then::KeepOpen,
                ),
            ),
            (
                "/base/other".into(),
                Reply::new(
                    format!(
                        "HTTP/1.1 302 Found\r\nLocation: http://localhost:{port}/basement\r\nContent-Length: 0\r\n\r\n"
                    ),
                    Then::KeepOpen,
                ),
            ),
        ]
    });
    // API Management's recipe: the URLs rewritten, the headers that name the software deleted.
    let outbound = "  [[api.outbound]]\n  redirect_content_urls = true\n  [[api.outbound]]\n  set_header = { name = \"X-Powered-By\", action = \"delete\" }\n  [[api.outbound]]\n  set_header = { name = \"X-AspNet-Version\", action = \"delete\" }\n  [[api.outbound]]\n  set_header = { name = \"Server\", action = \"delete\" }\n";
    let text = config(&env, &format!("http://localhost:{}/base", scripted.addr().port()), outbound);
    let proxy = TestProxy::start(env.dir(), &text);
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let host = {
        let r = c.request("GET", "/api/old", &[], b"").unwrap();
        assert_eq!(r.status, 302);
        let location = r.header("Location").unwrap().to_owned();
        let host = location.strip_prefix("https://").and_then(|l| l.strip_suffix("/api/items/7?x=1"));
        assert!(host.is_some(), "{location}");
        host.unwrap().to_owned()
    };
    let r = c.request("GET", "/api/made", &[], b"").unwrap();
    assert_eq!(r.status, 201);
    assert_eq!(r.header("Content-Location"), Some(format!("https://{host}/api").as_str()));
    assert_eq!(r.header("Location"), Some("https://elsewhere.example/base/x"), "another host: left alone");
    for gone in ["Server", "X-Powered-By", "X-AspNet-Version"] {
        assert_eq!(r.header(gone), None, "{gone}");
    }
    // A path that only starts like the backend's base is not under it.
    let r = c.request("GET", "/api/other", &[], b"").unwrap();
    assert!(
        r.header("Location").is_some_and(|l| l.ends_with("/basement") && l.starts_with("http://localhost:"))
    );
    // redirect_content_urls is an outbound step.
    let step = "redirect_content_urls = true";
    let text = env.config(
        "request",
        &format!("[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  {step}\n"),
    );
    let path = env.write_config("bad.toml", &text);
    let out = std::process::Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
    assert!(!out.status.success(), "{step}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("outbound"),
        "{step}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Inbound `find_and_replace`: the public URL in a request body becomes the backend's, whether
/// the body comes with a length (rewritten whole, sent with its new length) or chunked
/// (streamed); a compressed body goes as it is.
#[test]
fn request_bodies_are_rewritten_on_their_way_in() {
    let env = Env::new();
    let step = format!(
        "  [[api.inbound]]\n  find_and_replace = {{ from = \"{PUBLIC_URL}\", to = \"{BACKEND_URL}\" }}\n"
    );
    let proxy = TestProxy::start(env.dir(), &config(&env, &format!("http://{}", env.backend.addr()), &step));
    let body = format!("{{\"callback\":\"{PUBLIC_URL}/hooks/1\",\"other\":\"{PUBLIC_URL}\"}}");
    let want = body.replace(PUBLIC_URL, BACKEND_URL);
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let r = c.request("POST", "/api/upload", &[], body.as_bytes()).unwrap();
    assert_eq!(r.text(), format!("bytes={} sha256={}", want.len(), sha256_hex(want.as_bytes())));
    // Chunked, large enough to stream, a match split across chunks.
    let big = format!("{}{}", "x".repeat(300_000), body).repeat(2);
    let want = big.replace(PUBLIC_URL, BACKEND_URL);
    let mut raw = b"POST /api/upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for piece in big.as_bytes().chunks(7_001) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let text = crate::common::raw_exchange(&env.client(None), proxy.addr, &raw).unwrap();
    assert!(
        text.ends_with(&format!("bytes={} sha256={}", want.len(), sha256_hex(want.as_bytes()))),
        "{text}"
    );
    // Compressed: as it is.
    let r = env
        .client(None)
        .connect(proxy.addr)
        .unwrap()
        .request("POST", "/api/upload", &[("Content-Encoding", "gzip")], body.as_bytes())
        .unwrap();
    assert_eq!(r.text(), format!("bytes={} sha256={}", body.len(), sha256_hex(body.as_bytes())));
}

/// A body to rewrite that ends before its length: nothing went to the client yet, so it gets
/// the proxy's 502 (not a connection closed without a word); a range request is sent whole.
#[test]
fn a_short_body_to_rewrite_is_a_502_and_ranges_are_not_asked_for() {
    let env = Env::new();
    let scripted = ScriptedBackend::start(vec![(
        "/short".into(),
        Reply::new("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nonly this", Then::Close),
    )]);
    let proxy =
        TestProxy::start(env.dir(), &config(&env, &format!("http://{}", scripted.addr()), &replace_step()));
    let r = env.client(None).connect(proxy.addr).unwrap().request("GET", "/api/short", &[], b"").unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let proxy = TestProxy::start(
        env.dir(),
        &config(&env, &format!("http://{}", env.backend.addr()), &replace_step()),
    );
    let r = env
        .client(None)
        .connect(proxy.addr)
        .unwrap()
        .request("GET", "/api/x", &[("Range", "bytes=0-10")], b"")
        .unwrap();
    assert_eq!((r.status, r.echoed_header("Range")), (200, None), "{}", r.text());
}
