//! What an operator trying the proxy found, one test each.

use crate::common::{Env, raw_exchange, status_of};

const SUBJECT_API: &str = r#"
[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  set_header = { name = "X-Client-Cert-Subject", value = "{client_cert.subject}" }
"#;

/// `X_Client_Cert_Subject` reaches a CGI/WSGI backend as the proxy's own identity header: it
/// never passes, and by default no name with `_` does.
#[test]
fn underscore_variants_of_identity_headers_never_reach_the_backend() {
    let env = Env::new();
    let headers =
        [("X_Client_Cert_Subject", "CN=admin"), ("x_client_cert_SUBJECT", "CN=root"), ("X_Trace", "1")];
    let proxy = env.proxy("require", SUBJECT_API);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/", &headers, b"").unwrap();
    assert_eq!(r.status, 200);
    let echoed = r.text();
    assert!(!echoed.contains("CN=admin") && !echoed.contains("CN=root"), "{echoed}");
    assert_eq!(r.echoed_header("X_Trace"), None, "underscore names are dropped by default: {echoed}");
    assert_eq!(r.echoed_header_count("X-Client-Cert-Subject"), 1, "{echoed}");
    drop(proxy);

    let proxy =
        env.proxy("require", &format!("[server]\nallow_underscores_in_headers = true\n{SUBJECT_API}"));
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/", &headers, b"").unwrap();
    let echoed = r.text();
    assert_eq!(r.echoed_header("X_Trace").as_deref(), Some("1"), "{echoed}");
    assert!(!echoed.contains("CN=admin") && !echoed.contains("CN=root"), "{echoed}");
}

#[test]
fn bodies_over_max_body_size_get_413() {
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nworkers = 1\nmax_body_size = 10\n");
    let client = env.client(Some(&env.pki.client));
    let mut c = client.connect(proxy.addr).unwrap();
    assert_eq!(c.request("POST", "/upload", &[], b"0123456789").unwrap().status, 200, "at the limit");
    let before = env.backend.requests();
    let text = raw_exchange(
        &client,
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 11\r\n\r\n01234567890",
    )
    .unwrap();
    assert_eq!(status_of(&text), Some(413), "{text}");
    assert!(text.contains("Connection: close"), "{text}");
    assert!(text.ends_with(r#"{"statusCode":413,"message":"Request body too large"}"#), "{text}");
    assert_eq!(env.backend.requests(), before, "a refused body reached the backend");
    let text = raw_exchange(
        &client,
        proxy.addr,
        b"POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n012345\r\n6\r\n678901\r\n0\r\n\r\n",
    )
    .unwrap();
    assert_eq!(status_of(&text), Some(413), "{text}");
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
}

/// Every refused request reaches the access log with its reason: bad heads, oversized heads,
/// bodies over the limit, unknown paths, and handshakes refused for want of a certificate.
#[test]
fn refused_requests_reach_the_access_log_with_their_reason() {
    use portcullis_testkit::ProxyProcess;
    let env = Env::new();
    let extra = format!(
        "[server]\nworkers = 1\n{}\nmax_body_size = 4\n[[api]]\nname = \"app\"\npath = \"/app\"\nbackend = \"app\"\n",
        crate::common::access_log_to(env.dir())
    );
    let config = env.write_config("p.toml", &env.config("require", &extra));
    let proxy = ProxyProcess::spawn(&crate::common::binary(), &config);
    let client = env.client(Some(&env.pki.client));
    let bad =
        raw_exchange(&client, proxy.addr, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n").unwrap();
    assert_eq!(status_of(&bad), Some(400));
    let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(status_of(&raw_exchange(&client, proxy.addr, big.as_bytes()).unwrap()), Some(431));
    let body =
        raw_exchange(&client, proxy.addr, b"POST /app HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n12345")
            .unwrap();
    assert_eq!(status_of(&body), Some(413));
    assert_eq!(client.get(proxy.addr, "/elsewhere").unwrap().status, 404);
    assert_eq!(client.get(proxy.addr, "/app/x").unwrap().status, 200);
    assert_eq!(client.get(proxy.addr, "/app/reset").unwrap().status, 502);
    assert!(env.client(None).get(proxy.addr, "/app").is_err());
    for (status, why) in [
        ("\"status\":400", "\"refused\":\"malformed head"),
        ("\"status\":431", "\"refused\":\"head exceeds the size limit"),
        ("\"status\":413", "\"refused\":\"body larger than max_body_size\""),
        ("\"status\":404", "\"refused\":\"no API or operation\""),
        ("\"status\":200", "\"refused\":\"-\""),
        ("\"status\":502", "\"refused\":\"backend closed before responding\""),
        ("\"status\":null", "\"refused\":\"client certificate rejected"),
    ] {
        let line = crate::common::access_line(env.dir(), &[status])
            .unwrap_or_else(|| panic!("no access line with {status}: {:#?}", proxy.log()));
        assert!(line.contains(why), "{line}");
    }
}

/// A client that connects and never finishes its handshake is logged when the handshake
/// timeout closes it.
#[test]
fn a_handshake_timeout_is_logged() {
    use portcullis_testkit::ProxyProcess;
    use std::time::Duration;
    let env = Env::new();
    let config =
        env.write_config("p.toml", &env.config("require", "[server]\nhandshake_timeout = \"200ms\"\n"));
    let proxy = ProxyProcess::spawn(&crate::common::binary(), &config);
    let mut silent = std::net::TcpStream::connect(proxy.addr).unwrap();
    let line = proxy.wait_for_log("TLS handshake timed out", Duration::from_secs(20));
    assert!(line.is_some_and(|l| l.contains("timeout_ms=200")), "{:#?}", proxy.log());
    // And the connection is gone.
    silent.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(std::io::Read::read(&mut silent, &mut buf), Ok(0) | Err(_)));
}
