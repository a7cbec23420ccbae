//! Traffic policy: ip_filter, check_header, and the client's real address behind an L4 balancer
//! (PROXY protocol v1 and v2).

use std::io::Read as _;

use portcullis_testkit::{Response, TestProxy};

use crate::common::Env;

const FORBIDDEN: &str = r#"{"statusCode":403,"message":"Forbidden"}"#;

/// A proxy whose API runs `step`; its listener takes a PROXY protocol header when `proxied`
/// names who may send one (`Some("")`: anyone).
fn proxy(env: &Env, step: &str, proxied: Option<&str>, extra: &str) -> TestProxy {
    let text = env.config(
        "request",
        &format!(
            "{extra}\n[[api]]\nname = \"app\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  {step}\n  [[api.inbound]]\n  set_header = {{ name = \"X-Seen-Ip\", value = \"{{request.ip}}\" }}\n"
        ),
    );
    let text = match proxied {
        None => text,
        Some(from) => {
            let from =
                if from.is_empty() { String::new() } else { format!("proxy_protocol_from = [{from}]\n") };
            text.replacen("crl = [", &format!("proxy_protocol = true\n{from}crl = ["), 1)
        }
    };
    TestProxy::start(env.dir(), &text)
}

fn get(env: &Env, proxy: &TestProxy, headers: &[(&str, &str)]) -> Response {
    env.client(None).connect(proxy.addr).unwrap().request("GET", "/", headers, b"").unwrap()
}

/// A request behind a PROXY protocol header.
fn via(env: &Env, proxy: &TestProxy, preamble: &[u8]) -> std::io::Result<Response> {
    env.client(None).connect_after(proxy.addr, preamble)?.request("GET", "/", &[], b"")
}

fn v1(src: &str) -> Vec<u8> {
    format!("PROXY TCP4 {src} 127.0.0.1 40000 443\r\n").into_bytes()
}

fn v2_ipv6(src: std::net::Ipv6Addr) -> Vec<u8> {
    let mut h =
        vec![0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x21, 0, 36];
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
    h.extend_from_slice(&[0x9c, 0x40, 0x01, 0xbb]);
    h
}

#[test]
fn ip_filter_allows_and_forbids() {
    let env = Env::new();
    let allow = proxy(
        &env,
        r#"ip_filter = { action = "allow", ranges = [ { from = "127.0.0.1", to = "127.0.0.9" } ] }"#,
        None,
        "",
    );
    assert_eq!(get(&env, &allow, &[]).status, 200);
    let other = proxy(
        &env,
        r#"ip_filter = { action = "allow", addresses = ["203.0.113.7"], cidrs = ["2001:db8::/32"] }"#,
        None,
        "",
    );
    let r = get(&env, &other, &[]);
    assert_eq!((r.status, r.text().as_str()), (403, FORBIDDEN));
    let forbid = proxy(&env, r#"ip_filter = { action = "forbid", cidrs = ["127.0.0.0/8"] }"#, None, "");
    assert_eq!(get(&env, &forbid, &[]).status, 403);
    let custom = proxy(
        &env,
        r#"ip_filter = { action = "forbid", addresses = ["127.0.0.1"], status = 451, message = "Not from there" }"#,
        None,
        "",
    );
    let r = get(&env, &custom, &[]);
    assert_eq!((r.status, r.text().as_str()), (451, r#"{"statusCode":451,"message":"Not from there"}"#));
    assert_eq!(env.backend.requests(), 1);
}

#[test]
fn ip_lists_are_files_and_reload() {
    let env = Env::new();
    let list = env.dir().join("blocked.txt");
    std::fs::write(&list, "# blocked\n203.0.113.0/24\n10.1.1.1 - 10.1.1.9\n").unwrap();
    let step = format!(r#"ip_filter = {{ action = "forbid", ip_list = "{}" }}"#, list.display());
    let mut p = proxy(&env, &step, None, "");
    assert_eq!(get(&env, &p, &[]).status, 200);
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    std::fs::write(&list, "203.0.113.0/24\n::ffff:127.0.0.1\n").unwrap();
    p.reload(&text).unwrap();
    assert_eq!(get(&env, &p, &[]).status, 403, "an IPv4-mapped entry matches the IPv4 client");
    std::fs::write(&list, "127.0.0.1\n300.1.1.1\n").unwrap();
    let e = p.reload(&text).unwrap_err().to_string();
    assert!(e.contains("blocked.txt:2") && e.contains("\"300.1.1.1\" is not an IP address"), "{e}");
}

#[test]
fn check_header_requires_a_header_and_its_values() {
    let env = Env::new();
    let p = proxy(&env, r#"check_header = { name = "X-Tenant", values = ["alpha", "Beta"] }"#, None, "");
    assert_eq!(get(&env, &p, &[("X-Tenant", "beta")]).status, 200, "case ignored by default");
    assert_eq!(
        get(&env, &p, &[("X-Tenant", "gamma"), ("X-Tenant", "alpha")]).status,
        200,
        "any field may hold it"
    );
    let r = get(&env, &p, &[]);
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            400,
            r#"{"statusCode":400,"message":"Header X-Tenant is missing or has a value that is not allowed"}"#
        )
    );
    assert_eq!(get(&env, &p, &[("X-Tenant", "gamma")]).status, 400);
    let strict = proxy(
        &env,
        r#"check_header = { name = "X-Tenant", values = ["alpha"], ignore_case = false, status = 401, message = "Not authorized" }"#,
        None,
        "",
    );
    let r = get(&env, &strict, &[("X-Tenant", "ALPHA")]);
    assert_eq!((r.status, r.text().as_str()), (401, r#"{"statusCode":401,"message":"Not authorized"}"#));
    let present = proxy(&env, r#"check_header = { name = "X-Tenant" }"#, None, "");
    assert_eq!(get(&env, &present, &[("X-Tenant", "anything")]).status, 200);
    assert_eq!(get(&env, &present, &[]).status, 400);
}

#[test]
fn the_proxy_protocol_address_reaches_ip_filter_and_the_backend() {
    let env = Env::new();
    let p = proxy(
        &env,
        r#"ip_filter = { action = "forbid", cidrs = ["198.51.100.0/24"] }"#,
        Some(""),
        "[server]\naccess_log = true\n",
    );
    let r = via(&env, &p, &v1("192.0.2.7")).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed_header("X-Seen-Ip").as_deref(), Some("192.0.2.7"));
    assert_eq!(r.echoed_header("X-Forwarded-For").as_deref(), Some("192.0.2.7"));
    assert_eq!(via(&env, &p, &v1("198.51.100.9")).unwrap().status, 403);
    let v6: std::net::Ipv6Addr = "2001:db8::7".parse().unwrap();
    let r = via(&env, &p, &v2_ipv6(v6)).unwrap();
    assert_eq!(r.echoed_header("X-Seen-Ip").as_deref(), Some("2001:db8::7"));
    // A LOCAL header (a balancer's health check): the connection's own address stands.
    let local =
        [&[0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x20, 0x00, 0, 0][..]]
            .concat();
    assert_eq!(via(&env, &p, &local).unwrap().echoed_header("X-Seen-Ip").as_deref(), Some("127.0.0.1"));
}

/// Whether the proxy closed the connection without a TLS handshake.
fn closed(env: &Env, p: &TestProxy, preamble: &[u8]) -> bool {
    match env.client(None).connect_after(p.addr, preamble) {
        Err(_) => true,
        Ok(mut c) => c.request("GET", "/", &[], b"").is_err(),
    }
}

#[test]
fn a_bad_or_missing_proxy_header_closes_the_connection() {
    let env = Env::new();
    let p = proxy(&env, r#"set_header = { name = "X-A", value = "1" }"#, Some(""), "");
    assert!(!closed(&env, &p, &v1("192.0.2.7")));
    assert!(closed(&env, &p, b""), "a TLS ClientHello where the header should be");
    assert!(closed(&env, &p, b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 443\r\n"));
    assert!(closed(&env, &p, b"PROXY TCP4 192.0.2.7 127.0.0.1 1 443\n"));
    assert!(closed(&env, &p, b"GET / HTTP/1.1\r\n\r\n"));
    // A header cut short, then the client's end closed: the connection ends, nothing is sent.
    let mut raw = std::net::TcpStream::connect(p.addr).unwrap();
    std::io::Write::write_all(&mut raw, b"PROXY TCP4 192.0.2.7").unwrap();
    raw.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    raw.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    assert_eq!(raw.read_to_end(&mut rest).map(|_| rest.len()).unwrap_or(0), 0);
    assert_eq!(env.backend.requests(), 1);
}

#[test]
fn only_listed_balancers_may_send_the_header() {
    let env = Env::new();
    let p = proxy(&env, r#"set_header = { name = "X-A", value = "1" }"#, Some(r#""10.0.0.0/8""#), "");
    assert!(closed(&env, &p, &v1("192.0.2.7")), "127.0.0.1 is not a listed balancer");
    let ok = proxy(
        &env,
        r#"set_header = { name = "X-A", value = "1" }"#,
        Some(r#""127.0.0.1", "10.0.0.0/8""#),
        "",
    );
    assert_eq!(via(&env, &ok, &v1("192.0.2.7")).unwrap().status, 200);
}

/// The access log names the client the PROXY protocol header carries, not the balancer.
#[test]
fn the_access_log_names_the_address_behind_the_balancer() {
    let env = Env::new();
    let text = env
        .config("request", &format!("[server]\n{}\n", crate::common::access_log_to(env.dir())))
        .replacen("crl = [", "proxy_protocol = true\ncrl = [", 1);
    let p =
        portcullis_testkit::ProxyProcess::spawn(&crate::common::binary(), &env.write_config("p.toml", &text));
    let r =
        env.client(None).connect_after(p.addr, &v1("192.0.2.77")).unwrap().request("GET", "/seen", &[], b"");
    assert_eq!(r.unwrap().status, 200);
    let line = crate::common::access_line(env.dir(), &["\"path\":\"/seen\""])
        .unwrap_or_else(|| panic!("no access line: {:?}", p.log()));
    assert!(line.contains("192.0.2.77"), "{line}");
    assert!(line.contains("\"peer\":\"192.0.2.77:"), "the balancer's address is not the peer: {line}");
}
