//! TLS: client certificate modes, what the proxy learns from a certificate, SNI, resumption.

use portcullis_testkit::pki::LeafOptions;
use portcullis_testkit::{TlsClient, Versions};

use crate::common::Env;

/// Headers that expose what the proxy knows about the client certificate to the backend.
const FACTS: &str = r#"
[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  set_header = { name = "X-Cert-Subject", value = "{client_cert.subject}" }
  [[api.inbound]]
  set_header = { name = "X-Cert-Issuer", value = "{client_cert.issuer}" }
  [[api.inbound]]
  set_header = { name = "X-Cert-Thumbprint", value = "{client_cert.thumbprint}" }
  [[api.inbound]]
  set_header = { name = "X-Cert-Sha256", value = "{client_cert.thumbprint_sha256}" }
  [[api.inbound]]
  set_header = { name = "X-Cert-Serial", value = "{client_cert.serial}" }
  [[api.inbound]]
  set_header = { name = "X-Cert-Errors", value = "[{client_cert.verify_errors}]" }
"#;

fn refused(result: std::io::Result<portcullis_testkit::Response>) -> String {
    match result {
        Ok(r) => panic!("expected the handshake to be refused, got HTTP {}", r.status),
        Err(e) => e.to_string(),
    }
}

#[test]
fn allowed_client_reaches_the_backend() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let r = env.client(Some(&env.pki.client)).get(proxy.addr, "/hello").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().starts_with("GET /hello HTTP/1.1\n"), "{}", r.text());
    assert_eq!(env.backend.connections(), 1);
}

/// A client that ends the session with close_notify gets one back before the FIN, for TLS 1.3
/// and 1.2 (RFC 8446 §6.1): a clean end, not a truncation.
#[test]
fn a_closing_client_gets_close_notify_back() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    for versions in [Versions::Tls13, Versions::Tls12] {
        let mut c = TlsClient::with(&env.pki, Some(&env.pki.client), versions).connect(proxy.addr).unwrap();
        assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
        assert!(c.exchange_close_notify().unwrap(), "{versions:?}: no close_notify from the proxy");
    }
}

/// A chain with a certificate that does not parse — bytes that are none after a good leaf, or
/// a good intermediate with a byte after it — is no certificate: `require` refuses the handshake (and
/// says why in the log); `request` completes it, and the connection has no certificate facts.
#[test]
fn a_chain_that_does_not_parse_is_no_certificate() {
    use base64::Engine as _;
    let env = Env::new();
    let pem = |der: &[u8]| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE-----\n{b64}\n-----END CERTIFICATE-----\n")
    };
    let mut padded = pem_to_der(&env.pki.intermediate.cert_pem);
    padded.push(0);
    let leaf = pem(&env.pki.client.cert_der);
    let chains = [format!("{leaf}{}", pem(b"not a certificate at all")), format!("{leaf}{}", pem(&padded))];
    let strict_config = env.write_config("strict.toml", &env.config("require", ""));
    let strict = portcullis_testkit::ProxyProcess::spawn(&crate::common::binary(), &strict_config);
    let lenient = env.proxy("request", FACTS);
    for (i, chain) in chains.iter().enumerate() {
        let client = TlsClient::from_pem(
            &env.pki.root.cert_pem,
            Some((chain, &env.pki.client.key_pem)),
            Versions::Both,
            "localhost",
        );
        refused(client.connect(strict.addr).and_then(|mut c| c.request("GET", "/", &[], b"")));
        let r = client.connect(lenient.addr).unwrap().request("GET", "/", &[], b"").unwrap();
        assert_eq!(r.status, 200, "chain {i}");
        assert_eq!(r.echoed_header("X-Cert-Subject"), None, "chain {i}");
    }
    let logged =
        strict.wait_for_log("client certificate chain does not parse", std::time::Duration::from_secs(10));
    assert!(logged.is_some(), "{:?}", strict.log());
    assert_eq!(env.backend.requests(), 2);
}

#[test]
fn require_refuses_a_missing_certificate() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let e = refused(env.client(None).get(proxy.addr, "/"));
    assert!(e.contains("CertificateRequired") || e.contains("HandshakeFailure"), "{e}");
    assert_eq!(env.backend.connections(), 0);
}

#[test]
fn require_refuses_a_certificate_from_another_ca() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let e = refused(env.client(Some(&env.pki.wrong_ca)).get(proxy.addr, "/"));
    assert!(e.contains("UnknownCA"), "{e}");
    assert_eq!(env.backend.connections(), 0);
}

#[test]
fn require_refuses_a_revoked_certificate() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let e = refused(env.client(Some(&env.pki.revoked)).get(proxy.addr, "/"));
    assert!(e.contains("CertificateRevoked"), "{e}");
    assert_eq!(env.backend.connections(), 0);
}

#[test]
fn require_refuses_an_expired_certificate() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let e = refused(env.client(Some(&env.pki.expired)).get(proxy.addr, "/"));
    assert!(e.contains("CertificateExpired"), "{e}");
    let e = refused(env.client(Some(&env.pki.not_yet_valid)).get(proxy.addr, "/"));
    assert!(e.contains("CertificateExpired"), "{e}");
    assert_eq!(env.backend.connections(), 0);
}

#[test]
fn request_mode_completes_and_exposes_the_facts() {
    let env = Env::new();
    let proxy = env.proxy("request", FACTS);
    let pki = &env.pki;

    let good = env.client(Some(&pki.client)).get(proxy.addr, "/").unwrap();
    assert_eq!(good.status, 200);
    assert_eq!(
        good.echoed_header("X-Cert-Subject").unwrap(),
        "CN=client1, OU=Clients, O=Portcullis Test, C=XX"
    );
    assert_eq!(
        good.echoed_header("X-Cert-Issuer").unwrap(),
        "CN=Portcullis Test Intermediate, OU=CAs, O=Portcullis Test, C=XX"
    );
    assert_eq!(good.echoed_header("X-Cert-Thumbprint").unwrap(), pki.client.thumbprint());
    assert_eq!(good.echoed_header("X-Cert-Sha256").unwrap(), pki.client.thumbprint_sha256());
    let serial = portcullis_testkit::pki::hex_upper(&pki.client.serial);
    assert_eq!(good.echoed_header("X-Cert-Serial").unwrap(), serial.trim_start_matches('0'));
    assert_eq!(good.echoed_header("X-Cert-Errors").unwrap(), "[]");

    let none = env.client(None).get(proxy.addr, "/").unwrap();
    assert_eq!(none.status, 200);
    assert_eq!(none.echoed_header("X-Cert-Subject"), None, "no certificate, no identity header");

    let cases = [
        (&pki.expired, "certificate has expired (depth 0)"),
        (&pki.not_yet_valid, "certificate is not yet valid (depth 0)"),
        (&pki.revoked, "certificate revoked (depth 0)"),
        (&pki.wrong_ca, "unable to get local issuer certificate"),
    ];
    for (id, error) in cases {
        let r = env.client(Some(id)).get(proxy.addr, "/").unwrap();
        assert_eq!(r.status, 200, "{}", id.name);
        assert_eq!(r.echoed_header("X-Cert-Thumbprint").unwrap(), id.thumbprint());
        let errors = r.echoed_header("X-Cert-Errors").unwrap();
        assert!(errors.contains(error), "{}: {errors}", id.name);
    }
}

#[test]
fn every_verification_error_is_recorded() {
    let env = Env::new();
    let pki = &env.pki;
    // Expired AND revoked: both must be known, not only the first one found.
    let now = time::OffsetDateTime::now_utc();
    let both = pki.intermediate.issue(
        "both",
        &LeafOptions {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(2),
            ..LeafOptions::client("expired-and-revoked")
        },
    );
    std::fs::write(&env.paths.crl, pki.intermediate.crl(&[&pki.revoked, &both])).unwrap();
    // Expired AND meant for servers only: two problems BoringSSL's verifier itself finds, so
    // both are there only if verification goes on after the first.
    let server_only = pki.intermediate.issue(
        "server-only",
        &LeafOptions {
            server: true,
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(2),
            ..LeafOptions::client("expired-server-purpose")
        },
    );
    let proxy = env.proxy("request", FACTS);
    let r = env.client(Some(&both)).get(proxy.addr, "/").unwrap();
    let errors = r.echoed_header("X-Cert-Errors").unwrap();
    assert!(errors.contains("certificate has expired (depth 0)"), "{errors}");
    assert!(errors.contains("certificate revoked (depth 0)"), "{errors}");
    let r = env.client(Some(&server_only)).get(proxy.addr, "/").unwrap();
    let errors = r.echoed_header("X-Cert-Errors").unwrap();
    assert!(errors.contains("certificate has expired (depth 0)"), "{errors}");
    assert!(errors.contains("unsupported certificate purpose (depth 0)"), "{errors}");
}

#[test]
fn sni_selects_certificate_and_client_mode() {
    let env = Env::new();
    let p = |p: &std::path::Path| p.display().to_string();
    let sni = format!(
        r#"
  [[listener.sni]]
  hostnames = ["devices.localhost"]
  certificate = {{ cert = "{}", key = "{}" }}
  client_certificate = "require"
"#,
        p(&env.paths.sni_chain),
        p(&env.paths.sni_key)
    );
    // The SNI table belongs to the listener: put it right after the listener's fields.
    let config = env.config("request", "").replacen("\n[[backend]]", &format!("{sni}\n[[backend]]"), 1);
    let proxy = portcullis_testkit::TestProxy::start(env.dir(), &config);

    // The default name gets the default certificate (rustls checks the name), no cert needed.
    let r = env.client(None).get(proxy.addr, "/").unwrap();
    assert_eq!(r.status, 200);
    // devices.localhost gets its own certificate, and requires a client certificate.
    let devices = env.client(Some(&env.pki.client)).sni("devices.localhost");
    assert_eq!(devices.get(proxy.addr, "/").unwrap().status, 200);
    let anonymous = env.client(None).sni("devices.localhost");
    assert!(anonymous.get(proxy.addr, "/").is_err(), "devices.localhost requires a client certificate");
    // A name the default certificate does not cover fails the client's own check.
    let wrong = TlsClient::new(&env.pki, None).sni("other.localhost");
    assert!(wrong.connect(proxy.addr).is_err());
}

fn resumption(versions: Versions) {
    let env = Env::new();
    let proxy = env.proxy("require", FACTS);
    let client = TlsClient::with(&env.pki, Some(&env.pki.client), versions);
    let mut first = client.connect(proxy.addr).unwrap();
    assert!(!first.resumed());
    let r = first.request("GET", "/", &[], b"").unwrap();
    assert_eq!(r.echoed_header("X-Cert-Thumbprint").unwrap(), env.pki.client.thumbprint());
    first.close();

    let mut second = client.connect(proxy.addr).unwrap();
    let r = second.request("GET", "/", &[], b"").unwrap();
    assert!(second.resumed(), "the second connection should resume the first session");
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed_header("X-Cert-Thumbprint").unwrap(), env.pki.client.thumbprint());
    assert_eq!(r.echoed_header("X-Cert-Subject").unwrap(), "CN=client1, OU=Clients, O=Portcullis Test, C=XX");
    assert_eq!(r.echoed_header("X-Cert-Errors").unwrap(), "[]");
}

#[test]
fn resumed_tls13_session_keeps_the_certificate_facts() {
    resumption(Versions::Tls13);
}

#[test]
fn resumed_tls12_session_keeps_the_certificate_facts() {
    resumption(Versions::Tls12);
}

#[test]
fn tls12_and_tls13_are_both_served() {
    let env = Env::new();
    let proxy = env.proxy("require", "");
    for (v, expected) in [
        (Versions::Tls12, rustls::ProtocolVersion::TLSv1_2),
        (Versions::Tls13, rustls::ProtocolVersion::TLSv1_3),
    ] {
        let client = TlsClient::with(&env.pki, Some(&env.pki.client), v);
        let mut c = client.connect(proxy.addr).unwrap();
        assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
        assert_eq!(c.protocol_version(), Some(expected));
    }
}

#[test]
fn tls_min_version_13_refuses_tls12() {
    let env = Env::new();
    let config = env.config("require", "").replacen("crl = [", "tls_min_version = \"1.3\"\ncrl = [", 1);
    let proxy = portcullis_testkit::TestProxy::start(env.dir(), &config);
    let tls12 = TlsClient::with(&env.pki, Some(&env.pki.client), Versions::Tls12);
    assert!(tls12.get(proxy.addr, "/").is_err());
    let tls13 = TlsClient::with(&env.pki, Some(&env.pki.client), Versions::Tls13);
    assert_eq!(tls13.get(proxy.addr, "/").unwrap().status, 200);
}

#[test]
fn garbage_instead_of_a_client_hello_is_closed() {
    use std::io::{Read, Write};
    let env = Env::new();
    let proxy = env.proxy("require", "");
    let mut tcp = std::net::TcpStream::connect(proxy.addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = Vec::new();
    let _ = tcp.read_to_end(&mut buf);
    // Either nothing or a TLS alert record (content type 21) comes back, then the close.
    assert!(buf.is_empty() || buf[0] == 21, "{buf:?}");
    assert_eq!(env.backend.connections(), 0);
}

#[test]
fn a_silent_client_is_dropped_at_the_handshake_timeout() {
    use std::io::Read;
    let env = Env::new();
    let proxy = env.proxy("require", "[server]\nhandshake_timeout = \"300ms\"\n");
    let mut tcp = std::net::TcpStream::connect(proxy.addr).unwrap();
    // Longer than the handshake timeout, shorter than forever: the proxy must close first.
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 16];
    let n = tcp.read(&mut buf).expect("the proxy closes the connection instead of waiting");
    assert_eq!(n, 0);
}

#[test]
fn a_revoked_certificate_cannot_resume_its_session() {
    let env = Env::new();
    let mut proxy = env.proxy("require", FACTS);
    let client = TlsClient::with(&env.pki, Some(&env.pki.client), Versions::Tls13);
    let mut first = client.connect(proxy.addr).unwrap();
    assert_eq!(first.request("GET", "/", &[], b"").unwrap().status, 200);
    first.close();
    // Revoke the client and reload: the session ticket it holds must not let it back in.
    std::fs::write(&env.paths.crl, env.pki.intermediate.crl(&[&env.pki.revoked, &env.pki.client])).unwrap();
    let config = std::fs::read_to_string(&proxy.config_path).unwrap();
    proxy.reload(&config).unwrap();
    // TLS 1.3: the client finishes its side of the resumed handshake, then learns the verdict.
    let mut c = client.connect(proxy.addr).expect("the client side of the handshake completes");
    assert!(c.resumed(), "the client offered its ticket and the server took it");
    let result = c.request("GET", "/", &[], b"");
    assert!(result.is_err(), "a revoked certificate resumed: {result:?}");
}

#[test]
fn a_ticket_from_another_process_means_a_full_handshake() {
    // Two proxies, two ticket keys. rustls keeps tickets by server name, so it offers the first
    // proxy's ticket to the second, which cannot open it and does a full handshake instead of
    // failing.
    let env = Env::new();
    let client = TlsClient::with(&env.pki, Some(&env.pki.client), Versions::Tls13);
    let first = env.proxy("require", FACTS);
    let mut c = client.connect(first.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
    c.close();
    let other = tempfile::tempdir().unwrap();
    let second = portcullis_testkit::TestProxy::start(other.path(), &env.config("require", FACTS));
    let mut c = client.connect(second.addr).unwrap();
    let r = c.request("GET", "/", &[], b"").unwrap();
    assert!(!c.resumed());
    assert_eq!(r.echoed_header("X-Cert-Thumbprint").unwrap(), env.pki.client.thumbprint());
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(b64).unwrap()
}

/// A chain deeper than the verifier's limit (8 CAs) is refused for what it is, not as an
/// unknown issuer.
#[test]
fn a_chain_past_the_depth_limit_is_refused_as_too_long() {
    let env = Env::new();
    let root = portcullis_testkit::pki::Ca::root("Deep Root");
    let mut ca = root.intermediate_ca("Deep CA 1");
    let mut within = None;
    for i in 2..=10 {
        ca = ca.intermediate_ca(&format!("Deep CA {i}"));
        if i == 6 {
            let leaf = ca.issue("within", &portcullis_testkit::pki::LeafOptions::client("within-client"));
            within = Some((ca.full_chain_pem(&leaf), leaf.key_pem));
        }
    }
    let leaf = ca.issue("deep", &portcullis_testkit::pki::LeafOptions::client("deep-client"));
    let root_path = env.dir().join("deep-root.pem");
    std::fs::write(&root_path, &root.cert_pem).unwrap();
    let crl_path = env.dir().join("deep-root.crl");
    std::fs::write(&crl_path, root.crl(&[])).unwrap();
    let text = env
        .config("request", FACTS)
        .replacen(&format!("\"{}\"", env.paths.root.display()), &format!("\"{}\"", root_path.display()), 1)
        .replacen(&format!("\"{}\"", env.paths.crl.display()), &format!("\"{}\"", crl_path.display()), 1)
        .replacen(&format!(", \"{}\"", env.paths.intermediate.display()), "", 1);
    let proxy = portcullis_testkit::TestProxy::start(env.dir(), &text);
    let chain = ca.full_chain_pem(&leaf);
    let client = TlsClient::from_pem(
        &env.pki.root.cert_pem,
        Some((&chain, &leaf.key_pem)),
        Versions::Both,
        "localhost",
    );
    let r = client.get(proxy.addr, "/").unwrap();
    let errors = r.echoed_header("X-Cert-Errors").unwrap_or_default();
    assert!(errors.contains("certificate chain too long"), "{errors}");
    assert!(!errors.contains("unable to get local issuer"), "{errors}");
    // Six CAs deep is within the limit: verified, no error.
    let (chain, key) = within.unwrap();
    let client =
        TlsClient::from_pem(&env.pki.root.cert_pem, Some((&chain, &key)), Versions::Both, "localhost");
    let r = client.get(proxy.addr, "/").unwrap();
    assert_eq!(r.echoed_header("X-Cert-Errors").as_deref(), Some("[]"), "{}", r.text());
}

/// A ClientHello record written byte by byte (RFC 8446 §4.1.2), to offer what no TLS library
/// would: `legacy_version`, cipher suites, and, when `versions` is not empty, the
/// `supported_versions`, `supported_groups` and an empty `key_share`.
fn client_hello(legacy: u16, suites: &[u16], versions: &[u16], groups: &[u16]) -> Vec<u8> {
    fn put16(v: &mut Vec<u8>, n: usize) {
        v.extend_from_slice(&(n as u16).to_be_bytes());
    }
    fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        put16(out, body.len());
        out.extend_from_slice(body);
    }
    let list16 = |items: &[u16]| {
        let mut v = Vec::new();
        put16(&mut v, items.len() * 2);
        items.iter().for_each(|i| v.extend_from_slice(&i.to_be_bytes()));
        v
    };
    let mut ext = Vec::new();
    extension(&mut ext, 0x000d, &list16(&[0x0403, 0x0804, 0x0401])); // signature_algorithms
    extension(&mut ext, 0x000a, &list16(groups)); // supported_groups
    extension(&mut ext, 0x000b, &[1, 0]); // ec_point_formats: uncompressed
    if !versions.is_empty() {
        let mut v = vec![(versions.len() * 2) as u8];
        versions.iter().for_each(|x| v.extend_from_slice(&x.to_be_bytes()));
        extension(&mut ext, 0x002b, &v); // supported_versions
        extension(&mut ext, 0x0033, &[0, 0]); // key_share: no shares
    }
    let mut hello = Vec::new();
    hello.extend_from_slice(&legacy.to_be_bytes());
    hello.extend_from_slice(&[7u8; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&list16(suites));
    hello.extend_from_slice(&[1, 0]); // compression: null
    put16(&mut hello, ext.len());
    hello.extend_from_slice(&ext);
    let mut handshake = vec![1u8]; // client_hello
    handshake.extend_from_slice(&(hello.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&hello);
    let mut record = vec![0x16, 0x03, 0x01];
    put16(&mut record, handshake.len());
    record.extend_from_slice(&handshake);
    record
}

/// Handshakes refused for want of common ground are told apart by BoringSSL's reason codes,
/// and the access log says which it was.
#[test]
fn refused_handshakes_are_classified() {
    use std::io::{Read, Write};
    use std::time::Duration;

    use portcullis_testkit::ProxyProcess;

    let env = Env::new();
    let config = env.write_config(
        "p.toml",
        &env.config("off", &format!("[server]\n{}\n", crate::common::access_log_to(env.dir()))),
    );
    let proxy = ProxyProcess::spawn(&crate::common::binary(), &config);
    let cases: [(Vec<u8>, &str); 4] = [
        // TLS 1.2 with RC4-SHA and AES128-SHA only: BoringSSL knows the second, the proxy does
        // not offer it.
        (client_hello(0x0303, &[0x0005, 0x002f], &[], &[0x001d, 0x0017]), "no shared cipher suite"),
        // TLS 1.3 with finite-field groups only.
        (client_hello(0x0303, &[0x1301], &[0x0304], &[0x0100, 0x0101]), "no shared key-exchange group"),
        // TLS 1.0 at most.
        (client_hello(0x0301, &[0xc02f, 0xc013], &[], &[0x001d]), "unsupported TLS version"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(), "not TLS"),
    ];
    for (bytes, fault) in &cases {
        let mut c = std::net::TcpStream::connect(proxy.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(bytes).unwrap();
        let mut answer = Vec::new();
        let _ = c.read_to_end(&mut answer);
        // An alert record, or nothing (for bytes that are not TLS); never a ServerHello.
        assert!(answer.first().is_none_or(|&t| t == 0x15), "{fault}: answered {answer:?}");
        let needle = format!("handshake failed: {fault} (");
        let line = crate::common::access_line(env.dir(), &[&needle]);
        assert!(line.as_deref().is_some_and(|l| l.contains("\"status\":null")), "{fault}: {line:?}");
    }
    // None of them was a fault the proxy could not name.
    let log = std::fs::read_to_string(env.dir().join("access.log")).unwrap();
    assert!(!log.contains("handshake failed: refused"), "{log}");
    assert_eq!(env.client(None).get(proxy.addr, "/").unwrap().status, 200);
}

/// The client certificate forwarded for backends that authorise by it: as nginx's escaped PEM,
/// as the base64 DER of `X-ARR-ClientCert`, and as Envoy's `X-Forwarded-Client-Cert`; forged
/// copies from the client are stripped, and a resumed session forwards the same.
#[test]
fn the_certificate_itself_reaches_the_backend() {
    use base64::Engine as _;
    let env = Env::new();
    let steps = r#"
[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  set_header = { name = "X-SSL-Client-Cert", value = "{client_cert.pem_urlencoded}" }
  [[api.inbound]]
  set_header = { name = "X-ARR-ClientCert", value = "{client_cert.der_base64}" }
  [[api.inbound]]
  set_header = { name = "X-Forwarded-Client-Cert", value = "{client_cert.xfcc}" }
"#;
    let proxy = env.proxy("require", steps);
    let client = TlsClient::with(&env.pki, Some(&env.pki.client), Versions::Tls13);
    let forged = [
        ("X-SSL-Client-Cert", "forged"),
        ("X-ARR-ClientCert", "Zm9yZ2Vk"),
        ("X-Forwarded-Client-Cert", "Hash=00;Subject=\"CN=admin\""),
    ];
    let der = &env.pki.client.cert_der;
    let b64 = base64::engine::general_purpose::STANDARD;
    for resumed in [false, true] {
        let mut c = client.connect(proxy.addr).unwrap();
        let r = c.request("GET", "/", &forged, b"").unwrap();
        assert_eq!(c.resumed(), resumed);
        assert_eq!(r.status, 200);
        let seen = |name: &str| {
            assert_eq!(r.echoed_header_count(name), 1, "{name} exactly once: {}", r.text());
            r.echoed_header(name).unwrap()
        };
        assert_eq!(b64.decode(seen("X-ARR-ClientCert")).unwrap(), *der);
        // The escaped PEM: percent-decoded, the certificate's PEM.
        let escaped = seen("X-SSL-Client-Cert");
        let mut pem = Vec::new();
        let mut bytes = escaped.bytes();
        while let Some(b) = bytes.next() {
            if b == b'%' {
                let hex = [bytes.next().unwrap(), bytes.next().unwrap()];
                pem.push(u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap());
            } else {
                pem.push(b);
            }
        }
        let pem = String::from_utf8(pem).unwrap();
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        assert!(
            pem.starts_with("-----BEGIN CERTIFICATE-----\n") && pem.ends_with("-----END CERTIFICATE-----\n")
        );
        assert_eq!(b64.decode(body).unwrap(), *der);
        assert_eq!(
            seen("X-Forwarded-Client-Cert"),
            format!(
                "Hash={};Subject=\"CN=client1,OU=Clients,O=Portcullis Test,C=XX\"",
                env.pki.client.thumbprint_sha256().to_ascii_lowercase()
            )
        );
        c.close();
    }
}
