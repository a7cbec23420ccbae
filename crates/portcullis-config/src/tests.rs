use std::path::Path;

use crate::*;

const GOOD: &str = r#"
[server]
workers = 2
head_timeout = "5s"

[[listener]]
bind = "127.0.0.1:8443"
certificate = { cert = "pki/server.pem", key = "pki/server.key" }
client_certificate = "request"
client_ca = ["pki/root.pem", "pki/intermediate.pem"]
crl = ["pki/intermediate.crl"]
  [[listener.sni]]
  hostnames = ["devices.example.com"]
  certificate = { cert = "pki/devices.pem", key = "pki/devices.key" }
  client_certificate = "require"

[[backend]]
name = "todo"
url = "http://127.0.0.1:5000/base/"

[[api]]
name = "todo"
path = "/todo/"
backend = "todo"
  [[api.inbound]]
  set_header = { name = "X-Client-Cert-Subject", value = "{client_cert.subject}" }
  [[api.outbound]]
  set_header = { name = "X-Powered-By", action = "delete" }
"#;

#[test]
fn a_good_config_loads() {
    let c = parse(Path::new("/etc/portcullis/p.toml"), GOOD).expect("valid");
    assert_eq!(c.server.workers, 2);
    assert_eq!(c.server.head_timeout.as_secs(), 5);
    let l = &c.listeners[0];
    assert_eq!(l.client.mode.value, ClientCertMode::Request);
    assert_eq!(l.client.client_ca[1].value, Path::new("/etc/portcullis/pki/intermediate.pem"));
    assert_eq!(l.sni[0].client.mode.value, ClientCertMode::Require);
    assert_eq!(l.sni[0].client.crl.len(), 1, "an SNI entry inherits the listener's CRLs");
    assert_eq!(c.backends[0].authority, "127.0.0.1:5000");
    assert_eq!(c.backends[0].base_path, "/base");
    assert_eq!(c.apis[0].path.value, "/todo");
    assert_eq!(c.apis[0].inbound.len(), 1);
    assert_eq!(c.apis[0].path.loc.line, 23);
    assert_eq!(c.apis[0].path.loc.field, "api[0].path");
}

#[test]
fn three_mistakes_three_errors_with_lines() {
    let text = GOOD
        .replace("client_certificate = \"request\"", "client_certificate = \"requets\"")
        .replace("backend = \"todo\"", "backend = \"tdoo\"")
        .replace("workers = 2", "workerz = 2");
    let errors = parse(Path::new("p.toml"), &text).expect_err("invalid");
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 3, "{lines:#?}");
    assert!(
        lines[0].starts_with("p.toml:3:1: server.workerz: unknown field `workerz` (did you mean `workers`?)"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with("p.toml:9:22: listener[0].client_certificate: unknown value \"requets\""),
        "{}",
        lines[1]
    );
    assert!(lines[2].starts_with("p.toml:24:11: api[0].backend: no backend named \"tdoo\""), "{}", lines[2]);
}

#[test]
fn syntax_errors_have_lines() {
    let errors = parse(Path::new("p.toml"), "[server]\nworkers = \n").expect_err("invalid");
    let first = errors.iter().next().expect("one").to_string();
    assert!(first.starts_with("p.toml:2:"), "{first}");
}

#[test]
fn missing_and_mistyped_fields() {
    let text = r#"
[[listener]]
bind = "nowhere"
client_certificate = "require"

[[backend]]
name = "b"
url = "gopher://x"
connect_timeout = "soon"
"#;
    let errors = parse(Path::new("p.toml"), text).expect_err("invalid");
    let all = errors.to_string();
    assert!(all.contains("listener[0].bind: \"nowhere\" is not an address"), "{all}");
    assert!(all.contains("listener[0].certificate: missing field `certificate`"), "{all}");
    assert!(all.contains("needs `client_ca`"), "{all}");
    assert!(all.contains("not an http:// or https:// URL"), "{all}");
    assert!(all.contains("backend[0].connect_timeout: invalid duration \"soon\""), "{all}");
}

#[test]
fn policy_steps_are_checked() {
    let text = r#"
[[listener]]
bind = "127.0.0.1:8443"
certificate = { cert = "s.pem", key = "s.key" }

[thumbprints]
devices = "d.sha1"

[[backend]]
name = "b"
url = "http://127.0.0.1:5000"

[[api]]
name = "a"
path = "/"
backend = "b"
operations = ["GET /items/{id}", "FETCH", "GET /x/{a}/{a}", "GET /y{z}"]
  [[api.inbound]]
  validate_client_certificate = { identities = [ { thumbprint = "abc" }, { thumbprint_in = "nope" }, { certificate = "none" }, {} ], validate_trust = "yes" }
  [[api.inbound]]
  return_response = { body = "x" }
  [[api.inbound]]
  set_header = { name = "X", value = "1" }
  return_response = { status = 200 }
  [[api.outbound]]
  set_header = { name = "Content-Length", action = "delete" }
  [[api.inbound]]
  return_response = { status = 200, headers = { "Transfer-Encoding" = "chunked" } }
  [[api.inbound]]
  return_response = { status = 204, body = "gone" }
"#;
    let errors = parse(Path::new("p.toml"), text).expect_err("invalid").to_string();
    for expected in [
        "\"FETCH\" is not an operation",
        "parameter {a} appears twice",
        "\"y{z}\": a parameter is a whole segment",
        "identities[0].thumbprint: \"abc\" is not 40 hex digits",
        "no thumbprint list named \"nope\"",
        "no certificate named \"none\"",
        "an identity needs at least one of",
        "validate_trust: expected true or false",
        "return_response.status: missing field `status`",
        "a step has exactly one of",
        "\"Content-Length\" cannot be set by a policy",
        "headers.Transfer-Encoding: \"Transfer-Encoding\" cannot be set by a policy",
        "return_response.body: a 204 response has no body",
    ] {
        assert!(errors.contains(expected), "missing {expected:?} in:\n{errors}");
    }
}

/// Integers in other bases, and the fuzzer's `workers = 0x` (a radix prefix without digits,
/// which the TOML parser hands over as an integer): a value or an error, never a panic.
#[test]
fn integers_in_other_bases_and_without_digits() {
    let with =
        |v: &str| parse(Path::new("t.toml"), &GOOD.replacen("workers = 2", &format!("workers = {v}"), 1));
    assert_eq!(with("0x10").map(|c| c.server.workers).ok(), Some(16));
    assert_eq!(with("0o10").map(|c| c.server.workers).ok(), Some(8));
    assert_eq!(with("0b11").map(|c| c.server.workers).ok(), Some(3));
    let _ = with("0x");
    let _ = with("0x               ");
}

/// Every input the fuzzer found crashing, kept as it was found.
#[test]
fn fuzz_regressions_parse_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("regression directory") {
        let path = entry.expect("entry").path();
        let bytes = std::fs::read(&path).expect("read");
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = parse(Path::new("fuzz.toml"), text);
        }
        n += 1;
    }
    assert!(n > 0, "no regression inputs in {}", dir.display());
}

#[test]
fn redis_urls() {
    let u = parse_redis_url("redis://127.0.0.1:6380/2").expect("plain");
    assert_eq!((u.tls, u.host.as_str(), u.port, u.db, u.password), (false, "127.0.0.1", 6380, 2, None));
    let u = parse_redis_url("rediss://edge:p%40ss%3Aword@redis.internal").expect("tls");
    assert_eq!((u.tls, u.port, u.db), (true, 6379, 0));
    assert_eq!((u.username.as_deref(), u.password.as_deref()), (Some("edge"), Some("p@ss:word")));
    let u = parse_redis_url("redis://u:p/w@d@127.0.0.1/3").expect("a password with / and @ unencoded");
    assert_eq!((u.password.as_deref(), u.host.as_str(), u.db), (Some("p/w@d"), "127.0.0.1", 3));
    let u = parse_redis_url("redis://:secret@[::1]:7000").expect("v6, password only");
    assert_eq!(
        (u.host.as_str(), u.port, u.username, u.password.as_deref()),
        ("::1", 7000, None, Some("secret"))
    );
    for bad in [
        "http://127.0.0.1",
        "redis://",
        "redis://host:0",
        "redis://host:65536",
        "redis://host/db",
        "redis://host/1?timeout=3",
        "redis://[::1",
        "redis://[nope]:1",
        "redis://ho st",
        "redis://u:%zz@host",
    ] {
        assert!(parse_redis_url(bad).is_err(), "{bad}");
    }
}

#[test]
fn server_redis_fields_and_their_errors() {
    let text = GOOD.replace(
        "head_timeout = \"5s\"",
        "head_timeout = \"5s\"\n[server.redis]\nurl = \"redis://fleet:hunter2@127.0.0.1:6379/3\"\nsync_interval = \"50ms\"\ntimeout = \"2s\"\nredis_failure = \"deny\"",
    );
    let c = parse(Path::new("/etc/portcullis/p.toml"), &text).expect("valid");
    let r = c.server.redis.as_ref().expect("redis");
    assert_eq!((r.host.as_str(), r.port, r.db, r.tls), ("127.0.0.1", 6379, 3, false));
    assert_eq!((r.username.as_deref(), r.password.as_deref()), (Some("fleet"), Some("hunter2")));
    assert_eq!((r.sync_interval.as_millis(), r.timeout.as_secs(), r.failure), (50, 2, RedisFailure::Deny));
    assert!(!r.url.value.contains("hunter2"), "the password is not kept in the URL: {}", r.url.value);
    // Defaults.
    let text = GOOD
        .replace("head_timeout = \"5s\"", "head_timeout = \"5s\"\nredis = { url = \"redis://127.0.0.1\" }");
    let c = parse(Path::new("p.toml"), &text).expect("valid");
    let r = c.server.redis.as_ref().expect("redis");
    assert_eq!((r.sync_interval.as_millis(), r.timeout.as_secs(), r.failure), (100, 1, RedisFailure::Local));
    // Mistakes, each named.
    for (fields, expect) in [
        ("url = \"http://x\"", "server.redis.url"),
        ("url = \"redis://:pw@x\"\npassword_file = \"pw.txt\"", "keep one of them"),
        ("url = \"redis://x\"\nca = [\"ca.pem\"]", "`ca` is for rediss://"),
        ("url = \"redis://x\"\nsync_interval = \"1ms\"", "server.redis.sync_interval"),
        ("url = \"redis://x\"\nsync_interval = \"2s\"", "from 10ms to 1s"),
        ("url = \"redis://u:hunter2/x@host:0\"", "redis://u:***@host:0"),
        ("url = \"redis://x\"\nredis_failure = \"open\"", "server.redis.redis_failure"),
        ("url = \"redis://x\"\nurl_typo = 1", "url_typo"),
        ("sync_interval = \"50ms\"", "missing field `url`"),
    ] {
        let text = GOOD
            .replace("head_timeout = \"5s\"", &format!("head_timeout = \"5s\"\n[server.redis]\n{fields}"));
        let errors = parse(Path::new("p.toml"), &text).expect_err(fields);
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(all.iter().any(|e| e.contains(expect)), "{fields}: {all:?}");
        assert!(all.iter().all(|e| !e.contains("hunter2") && !e.contains(":pw@")), "{all:?}");
    }
}

#[test]
fn https_backends_and_their_tls_fields() {
    let backend = |fields: &str| {
        GOOD.replace(
            "url = \"http://127.0.0.1:5000/base/\"",
            &format!("{fields}\n[certificates]\ngw = {{ cert = \"gw.pem\", key = \"gw.key\" }}"),
        )
    };
    let text = backend(
        "url = \"https://backend.internal/base\"\ntls = { ca = [\"ca.pem\"], certificate = \"gw\", server_name = \"api.internal\" }",
    );
    let c = parse(Path::new("p.toml"), &text).expect("valid");
    let b = &c.backends[0];
    assert_eq!(b.authority, "backend.internal:443");
    let tls = b.tls.as_ref().expect("tls");
    assert_eq!((tls.server_name.as_str(), tls.verify, tls.ca.len()), ("api.internal", true, 1));
    assert_eq!(tls.certificate.as_ref().map(|c| c.value.as_str()), Some("gw"));
    // Defaults: the URL's host, the system's trust; the older `client_certificate` still names
    // the certificate; a thumbprint is normalised.
    let c = parse(Path::new("p.toml"), &backend("url = \"https://[::1]:8443\"\nclient_certificate = \"gw\""))
        .expect("valid");
    let tls = c.backends[0].tls.as_ref().expect("tls");
    assert_eq!((tls.server_name.as_str(), tls.ca.is_empty()), ("::1", true));
    assert_eq!(tls.certificate.as_ref().map(|c| c.value.as_str()), Some("gw"));
    let thumb = "eb:92:".to_owned() + &"ab".repeat(18);
    let text = backend(&format!("url = \"https://b\"\ntls = {{ certificate_thumbprint = \"{thumb}\" }}"));
    let c = parse(Path::new("p.toml"), &text).expect("valid");
    let tls = c.backends[0].tls.as_ref().expect("tls");
    assert_eq!(
        tls.certificate_thumbprint.as_ref().map(|t| t.value.clone()),
        Some("EB92".to_owned() + &"AB".repeat(18))
    );
    assert!(
        c.backends[0].tls.is_some()
            && parse(Path::new("p.toml"), GOOD).expect("valid").backends[0].tls.is_none()
    );
    for (fields, expect) in [
        ("url = \"http://b\"\ntls = { verify = false }", "TLS to the backend needs an https:// URL"),
        ("url = \"ftp://b\"", "not an http:// or https:// URL"),
        ("url = \"https://b\"\ntls = { certificate = \"nope\" }", "no certificate named \"nope\""),
        ("url = \"https://b\"\ntls = { certificate_thumbprint = \"EB92\" }", "40 hexadecimal digits"),
        (
            "url = \"https://b\"\nclient_certificate = \"gw\"\ntls = { certificate = \"gw\" }",
            "give the backend's certificate once",
        ),
        ("url = \"https://b\"\ntls = { verify = \"no\" }", "backend[0].tls.verify"),
        ("url = \"https://b\"\ntls = { sni = \"x\" }", "sni"),
    ] {
        let errors = parse(Path::new("p.toml"), &backend(fields)).expect_err(fields);
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(all.iter().any(|e| e.contains(expect)), "{fields}: {all:?}");
    }
}

#[test]
fn backends_with_several_servers() {
    let with = |fields: &str| GOOD.replace("url = \"http://127.0.0.1:5000/base/\"", fields);
    let text = with(
        "servers = [\"http://10.0.0.1:5000/base\", \"http://10.0.0.2:5000/base/\"]\nbalance = \"least_requests\"\neject_after = 3\neject_for = \"10s\"\nhealth_check = { path = \"/healthz\", interval = \"2s\", expect_status = [200, \"204-204\"] }",
    );
    let c = parse(Path::new("p.toml"), &text).expect("valid");
    let b = &c.backends[0];
    let servers: Vec<&str> = b.servers.iter().map(|s| s.value.as_str()).collect();
    assert_eq!(servers, ["10.0.0.1:5000", "10.0.0.2:5000"]);
    assert_eq!(
        (b.balance, b.eject_after, b.eject_for.as_secs(), b.base_path.as_str()),
        (Balance::LeastRequests, 3, 10, "/base")
    );
    let hc = b.health_check.as_ref().expect("health check");
    assert_eq!((hc.path.as_str(), hc.interval.as_secs(), hc.timeout.as_secs()), ("/healthz", 2, 2));
    assert!(hc.expect_status.contains(204) && !hc.expect_status.contains(500));
    // One server by `url`: the defaults.
    let c = parse(Path::new("p.toml"), GOOD).expect("valid");
    assert_eq!(
        (c.backends[0].servers.len(), c.backends[0].balance, c.backends[0].eject_after),
        (1, Balance::RoundRobin, 5)
    );
    for (fields, expect) in [
        ("servers = [\"http://a:1/x\", \"http://b:1/y\"]", "same scheme and base path"),
        ("servers = [\"http://a:1\", \"https://b:1\"]", "same scheme and base path"),
        ("url = \"http://a:1\"\nservers = [\"http://b:1\"]", "not both"),
        ("servers = []", "at least one server"),
        ("servers = [\"http://a:1\"]\nbalance = \"random\"", "backend[0].balance"),
        ("servers = [\"http://a:1\"]\nhealth_check = { path = \"healthz\" }", "is not a path"),
        ("servers = [\"http://a:1\"]\nhealth_check = { interval = \"1ms\" }", "between 100ms and 1h"),
        ("name2 = 1", "missing field `url` (or `servers`)"),
    ] {
        let errors = parse(Path::new("p.toml"), &with(fields)).expect_err(fields);
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert!(all.iter().any(|e| e.contains(expect)), "{fields}: {all:?}");
    }
}

#[test]
fn the_admin_address() {
    let text = GOOD.replace("head_timeout = \"5s\"", "head_timeout = \"5s\"\nadmin = \"127.0.0.1:9901\"");
    let c = parse(Path::new("p.toml"), &text).expect("valid");
    assert_eq!(c.server.admin, "127.0.0.1:9901".parse().ok());
    assert_eq!(parse(Path::new("p.toml"), GOOD).expect("valid").server.admin, None, "off by default");
    let text = GOOD.replace("head_timeout = \"5s\"", "head_timeout = \"5s\"\nadmin = \"localhost\"");
    let errors = parse(Path::new("p.toml"), &text).expect_err("not an address").to_string();
    assert!(errors.contains("server.admin") && errors.contains("not an address"), "{errors}");
}

#[test]
fn background_cpus_are_numbers_each_once() {
    let with = |v: &str| {
        GOOD.replace("head_timeout = \"5s\"", &format!("head_timeout = \"5s\"\nbackground_cpus = {v}"))
    };
    let c = parse(Path::new("p.toml"), &with("[0, 3]")).expect("valid");
    let cpus: Vec<usize> = c.server.background_cpus.iter().map(|c| c.value).collect();
    assert_eq!(cpus, [0, 3]);
    assert!(
        c.server.background_cpus[1].loc.to_string().starts_with("p.toml:"),
        "{}",
        c.server.background_cpus[1].loc
    );
    assert!(
        parse(Path::new("p.toml"), GOOD).expect("valid").server.background_cpus.is_empty(),
        "off by default"
    );
    for (v, says) in [
        ("[1024]", "server.background_cpus[0]: must be an integer from 0 to 1023"),
        ("[-1]", "server.background_cpus[0]: must be an integer from 0 to 1023"),
        ("[2, 2]", "server.background_cpus[1]: CPU 2 is named twice"),
        ("[]", "server.background_cpus: must name at least one CPU"),
        ("\"0-1\"", "server.background_cpus: must be an array of CPU numbers"),
        ("[\"0\"]", "server.background_cpus[0]"),
    ] {
        let errors = parse(Path::new("p.toml"), &with(v)).expect_err(v).to_string();
        assert!(errors.contains(says) && errors.contains("p.toml:"), "{v}: {errors}");
    }
}

#[test]
fn the_access_log_forms() {
    let with =
        |v: &str| GOOD.replace("head_timeout = \"5s\"", &format!("head_timeout = \"5s\"\naccess_log = {v}"));
    let c = parse(Path::new("/etc/p/p.toml"), &with("true")).expect("valid");
    assert_eq!(
        c.server.access_log,
        Some(AccessLog {
            path: None,
            path_loc: None,
            format: AccessFormat::Json,
            queue: 65_536,
            logger: None
        })
    );
    assert_eq!(parse(Path::new("p.toml"), &with("false")).expect("valid").server.access_log, None);
    let c = parse(
        Path::new("/etc/p/p.toml"),
        &with("{ path = \"log/access.log\", format = \"combined\", queue = 16 }"),
    )
    .expect("valid");
    let a = c.server.access_log.expect("on");
    assert_eq!(
        (a.path.as_deref(), a.format, a.queue),
        (Some(Path::new("/etc/p/log/access.log")), AccessFormat::Combined, 16)
    );
    let c = parse(Path::new("p.toml"), &with("{ path = \"stdout\" }")).expect("valid");
    assert_eq!(c.server.access_log.and_then(|a| a.path), None);
    for (v, expect) in [
        ("{ format = \"clf\" }", "server.access_log.format"),
        ("{ queue = 0 }", "server.access_log.queue"),
        ("{ pth = \"x\" }", "pth"),
    ] {
        let errors = parse(Path::new("p.toml"), &with(v)).expect_err(v).to_string();
        assert!(errors.contains(expect), "{v}: {errors}");
    }
}
