//! Strict HTTP/1.1 framing (RFC 9112): each rule has a test that fails if the check goes.
//! Every refused request gets its status, a JSON body, `Connection: close`, and the close; the
//! backend never sees it.

use crate::common::{Env, raw_exchange, status_of};

/// Sends `raw` on a fresh connection and checks the proxy answers `status` and closes, without
/// the request reaching the backend.
fn refused_with(status: u16, raw: &[u8], extra_config: &str) {
    let env = refused(status, raw, extra_config);
    assert_eq!(env.backend.connections(), 0, "the backend must not see a refused request");
}

/// As `refused_with`, for errors in a body: the head may have been forwarded by then (bodies are
/// streamed), but the backend never gets the request whole.
fn refused_in_body(status: u16, raw: &[u8]) {
    let env = refused(status, raw, "");
    assert_eq!(env.backend.requests(), 0, "the backend must not get a refused request whole");
}

fn refused(status: u16, raw: &[u8], extra_config: &str) -> Env {
    let env = Env::new();
    let proxy = env.proxy("require", extra_config);
    let text = raw_exchange(&env.client(Some(&env.pki.client)), proxy.addr, raw).unwrap();
    assert_eq!(status_of(&text), Some(status), "for {:?}:\n{text}", String::from_utf8_lossy(raw));
    assert!(text.contains("Connection: close\r\n"), "{text}");
    assert!(text.contains(&format!("{{\"statusCode\":{status},")), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "exactly one response, then the close: {text}");
    drop(proxy);
    env
}

#[test]
fn content_length_with_transfer_encoding() {
    refused_with(400, b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "");
}

#[test]
fn differing_duplicate_content_length() {
    refused_with(
        400,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "",
    );
    refused_with(400, b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 6\r\n\r\nhello!", "");
}

#[test]
fn malformed_content_length() {
    refused_with(400, b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: +5\r\n\r\nhello", "");
    refused_with(
        400,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        "",
    );
}

#[test]
fn transfer_encoding_not_ending_in_chunked() {
    refused_with(400, b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "");
    refused_with(400, b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: identity\r\n\r\n", "");
    refused_with(400, b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "");
}

#[test]
fn transfer_codings_before_chunked_are_not_implemented() {
    refused_with(
        501,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "",
    );
}

#[test]
fn transfer_encoding_in_http10() {
    refused_with(400, b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "");
}

#[test]
fn invalid_chunk_size() {
    refused_in_body(400, b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
}

#[test]
fn chunk_data_not_followed_by_crlf() {
    refused_in_body(400, b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n")
}

#[test]
fn obs_fold() {
    refused_with(400, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Folded: a\r\n b\r\n\r\n", "");
}

#[test]
fn bare_cr() {
    refused_with(400, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: a\rX-B: b\r\n\r\n", "");
}

#[test]
fn bare_lf() {
    refused_with(400, b"GET / HTTP/1.1\r\nHost: localhost\nX-A: a\r\n\r\n", "");
}

#[test]
fn nul_in_header_value() {
    refused_with(400, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: a\0b\r\n\r\n", "");
}

#[test]
fn control_byte_in_header_value() {
    refused_with(400, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: a\x01b\r\n\r\n", "");
    refused_with(400, b"GET / HTTP/1.1\r\nHost: localhost\r\nX-A: a\x7fb\r\n\r\n", "");
}

#[test]
fn whitespace_before_colon() {
    refused_with(400, b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length : 5\r\n\r\nhello", "");
}

#[test]
fn missing_or_repeated_host() {
    refused_with(400, b"GET / HTTP/1.1\r\n\r\n", "");
    refused_with(400, b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "");
}

#[test]
fn head_over_the_limit() {
    let mut raw = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    raw.extend(std::iter::repeat_n(b'a', 17 * 1024));
    raw.extend_from_slice(b"\r\n\r\n");
    refused_with(431, &raw, "");
    // The limit is configurable.
    let mut small = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: ".to_vec();
    small.extend(std::iter::repeat_n(b'a', 3000));
    small.extend_from_slice(b"\r\n\r\n");
    refused_with(431, &small, "[server]\nmax_head_size = 2048\n");
}

#[test]
fn too_many_headers() {
    let mut raw = String::from("GET / HTTP/1.1\r\nHost: localhost\r\n");
    for i in 0..101 {
        raw.push_str(&format!("X-H{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    refused_with(431, raw.as_bytes(), "");
}

#[test]
fn slow_head_times_out_with_408() {
    refused_with(
        408,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ",
        "[server]\nhead_timeout = \"300ms\"\n",
    );
}

#[test]
fn connect_method_is_refused() {
    refused_with(405, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", "");
}

#[test]
fn invalid_request_line() {
    refused_with(400, b"GET /a b HTTP/1.1\r\nHost: localhost\r\n\r\n", "");
    refused_with(400, b"GET / HTTP/2.0\r\nHost: localhost\r\n\r\n", "");
    refused_with(400, b"GET /\xce\xb4 HTTP/1.1\r\nHost: localhost\r\n\r\n", "");
}

#[test]
fn a_refusal_after_good_requests_closes_only_then() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let text = raw_exchange(
        &env.client(Some(&env.pki.client)),
        proxy.addr,
        b"GET /one HTTP/1.1\r\nHost: localhost\r\n\r\nGET /two HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nGET /three HTTP/1.1\r\nHost: localhost\r\n\r\n",
    )
    .unwrap();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
    assert_eq!(text.matches("HTTP/1.1 400").count(), 1, "{text}");
    assert!(!text.contains("GET /three"), "nothing after the bad request is processed: {text}");
}

#[test]
fn connection_naming_a_framing_field() {
    // Naming Content-Length as hop-by-hop would drop it, and the backend would take the body
    // for a second request: a smuggling vector, refused outright.
    refused_with(
        400,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nConnection: content-length\r\nContent-Length: 40\r\n\r\nGET /admin HTTP/1.1\r\nHost: localhost\r\n\r\n",
        "",
    );
    refused_with(
        400,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nConnection: Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "",
    );
}

#[test]
fn unsupported_expectation() {
    refused_with(
        417,
        b"POST / HTTP/1.1\r\nHost: localhost\r\nExpect: 200-ok\r\nContent-Length: 1\r\n\r\nx",
        "",
    );
}

#[test]
fn too_many_connection_tokens_and_bad_host() {
    refused_with(
        400,
        b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: a, b, c, d, e, f, g, h, i\r\n\r\n",
        "",
    );
    refused_with(400, b"GET / HTTP/1.1\r\nHost: local host\r\n\r\n", "");
}

#[test]
fn a_body_that_stops_coming_gets_408() {
    let env = refused(
        408,
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 10\r\n\r\nabc",
        "[server]\nbody_timeout = \"300ms\"\n",
    );
    assert_eq!(env.backend.requests(), 0);
}

#[test]
fn content_length_is_forwarded_once_normalised() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let text = raw_exchange(
        &env.client(Some(&env.pki.client)),
        proxy.addr,
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5, 5\r\nContent-Length: 005\r\nConnection: close\r\n\r\nhello",
    )
    .unwrap();
    assert_eq!(status_of(&text), Some(200), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let lengths: Vec<&str> =
        body.lines().filter(|l| l.to_ascii_lowercase().starts_with("content-length")).collect();
    assert_eq!(lengths, vec!["Content-Length: 5"], "{body}");
    assert!(body.contains("\nVia: 1.1 portcullis\n"), "{body}");
}
