//! The llhttp request corpus (tests/data/http-llhttp, MIT): every strict-mode case through the
//! proxy's own parsing path, compared with llhttp's verdict; then the whole corpus through the
//! running proxy, which must answer or close every connection and keep serving.
//!
//! llhttp strict is a reference, RFC 9112 is the law: where the two disagree the case is listed
//! in `DIFFERENCES` with the rule that decides.

use base64::Engine as _;
use bytes::BytesMut;
use portcullis_http::{ChunkedDecoder, ChunkedOutput, Decoded, Framing, HeadScanner, Limits, RequestHead};

use crate::common::Env;

struct Case {
    id: String,
    name: String,
    mode: String,
    raw: Vec<u8>,
    llhttp_ok: bool,
    completed: usize,
}

fn corpus() -> Vec<Case> {
    let text = include_str!("data/http-llhttp/requests.jsonl");
    text.lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            Case {
                id: v["id"].as_str().unwrap().to_owned(),
                name: v["name"].as_str().unwrap().to_owned(),
                mode: v["mode"].as_str().unwrap().to_owned(),
                raw: base64::engine::general_purpose::STANDARD
                    .decode(v["raw_b64"].as_str().unwrap())
                    .unwrap(),
                llhttp_ok: v["llhttp_verdict"] == "ok",
                completed: v["messages_completed"].as_u64().unwrap_or(0) as usize,
            }
        })
        .collect()
}

/// Why Portcullis's verdict differs from llhttp strict on a case, by case id.
const DIFFERENCES: &[(&str, &str)] = &[
    (
        "34c1c91b8da9",
        "RFC 9110 §9.1: a method is any token; unknown methods are forwarded for the backend to judge",
    ),
    ("f7489ed7f4ac", "RFC 9112 §3.2.4: the asterisk-form is only for a server-wide OPTIONS request"),
    ("8cbb42bf82f5", "RFC 9112 §2.3: HTTP-name is \"HTTP\"; ICE/1.0 is not HTTP"),
    ("78612c295674", "RFC 9112 §2.3: HTTP-name is \"HTTP\"; RTSP/1.0 is not HTTP"),
    ("3fb521549a40", "RFC 9112 §2.3: HTTP-name is \"HTTP\"; RTSP/1.0 is not HTTP"),
    (
        "b9a78cf94064",
        "RFC 9112 §3: the request-line has an HTTP-version; HTTP/0.9 simple requests are not served",
    ),
    ("0e4d077bdc78", "RFC 9110 §4.2.4: userinfo in an http URI is to be treated as an error"),
];

/// Reasons that cover every case they apply to.
fn general_difference(error: &str) -> Option<&'static str> {
    if error.contains("missing or repeated Host") {
        return Some("RFC 9112 §3.2: a server MUST respond 400 to an HTTP/1.1 request without a Host field");
    }
    None
}

/// How the input ended for the parser.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// After a complete message.
    Clean,
    /// Inside a head or body: the proxy waits for more, then times out (408) — nothing more is
    /// forwarded, as with an error.
    Incomplete,
    Error(String),
}

/// Runs bytes through the same parsing the server does: head scanner, head parser, body framing.
/// Returns the number of complete messages and how the input ended.
fn parse_stream(raw: &[u8]) -> (usize, End) {
    let limits = Limits::default();
    let mut buf = BytesMut::from(raw);
    let mut scanner = HeadScanner::default();
    let mut head = RequestHead::default();
    let mut completed = 0;
    loop {
        if buf.is_empty() {
            return (completed, End::Clean);
        }
        let len = match scanner.scan(&mut buf, limits.max_head_size) {
            Ok(Some(len)) => len,
            Ok(None) => return (completed, if buf.is_empty() { End::Clean } else { End::Incomplete }),
            Err(e) => return (completed, End::Error(e.to_string())),
        };
        if let Err(e) = head.parse(&mut buf, len, &limits) {
            return (completed, End::Error(e.to_string()));
        }
        match head.framing() {
            Framing::None | Framing::UntilClose => {}
            Framing::Length(n) => {
                if (buf.len() as u64) < n {
                    return (completed, End::Incomplete);
                }
                let _ = buf.split_to(n as usize);
            }
            Framing::Chunked => {
                let mut decoder = ChunkedDecoder::new(ChunkedOutput::DataOnly);
                let mut out = BytesMut::new();
                match decoder.decode(&mut buf, &mut out) {
                    Ok(Decoded::Done) => {}
                    Ok(Decoded::NeedMore) => return (completed, End::Incomplete),
                    Err(e) => return (completed, End::Error(e.to_string())),
                }
            }
        }
        completed += 1;
        if !head.keep_alive() && !buf.is_empty() {
            // RFC 9112 §9.6: after a message that closes the connection nothing more is read.
            return (completed, End::Error("data after a message that closes the connection".to_owned()));
        }
    }
}

/// Whether our outcome is llhttp's: the same messages completed, and an error where llhttp has
/// one. Input that stops inside a message completes nothing more under either parser.
fn agrees(case: &Case, completed: usize, end: &End) -> bool {
    match end {
        End::Clean => case.llhttp_ok && completed == case.completed,
        End::Incomplete => completed == case.completed,
        End::Error(_) => !case.llhttp_ok,
    }
}

#[test]
fn strict_cases_match_llhttp_or_the_rfc() {
    let mut unexplained = Vec::new();
    let mut checked = 0;
    for case in corpus().into_iter().filter(|c| c.mode == "strict") {
        checked += 1;
        let (completed, end) = parse_stream(&case.raw);
        if agrees(&case, completed, &end) {
            continue;
        }
        if let End::Error(e) = &end
            && general_difference(e).is_some()
        {
            continue;
        }
        if DIFFERENCES.iter().any(|(id, _)| *id == case.id) {
            continue;
        }
        let llhttp = if case.llhttp_ok { "ok" } else { "error" };
        let ours = if matches!(end, End::Error(_)) { "error" } else { "ok" };
        unexplained.push(format!(
            "{} {:?}: llhttp {llhttp} ({} messages), portcullis {ours} ({completed} messages): {end:?}\n    {:?}",
            case.id,
            case.name,
            case.completed,
            String::from_utf8_lossy(&case.raw),
        ));
    }
    assert!(checked > 100, "the corpus should have its strict cases");
    assert!(
        unexplained.is_empty(),
        "{} unexplained differences:\n{}",
        unexplained.len(),
        unexplained.join("\n")
    );
}

#[test]
fn every_listed_difference_is_still_a_difference() {
    // A stale entry would hide a change of behaviour.
    let corpus = corpus();
    for (id, reason) in DIFFERENCES {
        let case = corpus.iter().find(|c| c.id == *id).unwrap_or_else(|| panic!("{id} not in the corpus"));
        let (completed, end) = parse_stream(&case.raw);
        assert!(
            !agrees(case, completed, &end),
            "{id} ({reason}) now agrees with llhttp; remove it from DIFFERENCES"
        );
    }
}

#[test]
fn the_whole_corpus_through_the_running_proxy() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nhead_timeout = \"2s\"\n");
    let client = env.client(Some(&env.pki.client));
    for case in corpus() {
        let mut c = client.connect(proxy.addr).unwrap();
        c.write_raw(&case.raw).unwrap();
        // End our side, so that a proxy waiting for more bytes sees the end of the stream.
        let text = match c.finish() {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => panic!("{} {:?}: {e}", case.id, case.name),
        };
        for response in text.split("HTTP/1.1 ").skip(1) {
            let status: u16 = response.get(..3).and_then(|s| s.parse().ok()).unwrap_or(0);
            assert!((200..600).contains(&status), "{}: odd response {response:?}", case.id);
        }
    }
    // Still serving.
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
}
