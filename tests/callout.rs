//! `send_request`: the device scenario. A device-authorisation service from the test kit, over
//! HTTPS (rustls) with and without mutual TLS, is asked whether the client's certificate
//! belongs to the device in the URL; its answer goes to the backend in a header, or the request
//! is refused.

use std::time::Duration;

use portcullis_testkit::{DeviceAuth, Identity, ProxyProcess, TestProxy};

use crate::common::{Env, binary};

/// The device API, whose telemetry operation asks `service`; `fields` are added to the step.
fn config(env: &Env, service: &DeviceAuth, fields: &str) -> String {
    let d = env.dir().display();
    let ca = format!("\"{}\", \"{}\"", env.paths.root.display(), env.paths.intermediate.display());
    env.config(
        "request",
        &format!(
            r#"[certificates]
gw = {{ cert = "{d}/gateway.pem", key = "{d}/gateway.key" }}

[[api]]
name = "devices"
path = "/devices"
backend = "app"
  [[api.operation]]
  match = "GET /{{deviceId}}/telemetry"
    [[api.operation.inbound]]
    send_request = {{ name = "device", method = "GET", url = "{url}/check?certificateThumbprint={{client_cert.thumbprint}}&deviceId={{route.deviceId}}", headers = {{ "X-Request-Id" = "{{request.id}}" }}, timeout = "1s", backend_tls = {{ ca = [{ca}], certificate = "gw" }}, expect_status = [200], status = 403, message = "Forbidden. Certificate was not recognized.", set_headers = {{ "x-request-context-data" = "deviceId={{callout.device.json.deviceId}};certificateThumbprint={{callout.device.json.certificateThumbprint}}" }}{fields} }}
"#,
            url = service.url(),
        ),
    )
}

fn gateway_is(env: &Env, id: &Identity) {
    std::fs::write(env.dir().join("gateway.pem"), &id.chain_pem).unwrap();
    std::fs::write(env.dir().join("gateway.key"), &id.key_pem).unwrap();
}

/// The test PKI's CAs, in PEM, for a service that requires the gateway's certificate.
fn client_ca(env: &Env) -> String {
    format!("{}{}", env.pki.root.cert_pem, env.pki.intermediate.cert_pem)
}

fn get(
    env: &Env,
    addr: std::net::SocketAddr,
    id: Option<&Identity>,
    path: &str,
) -> portcullis_testkit::Response {
    env.client(id)
        .connect(addr)
        .unwrap()
        .request("GET", path, &[("x-request-context-data", "forged")], b"")
        .unwrap()
}

#[test]
fn a_known_device_passes_with_the_services_answer_and_an_unknown_one_is_refused() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client2);
    let client = &env.pki.client;
    let service =
        DeviceAuth::start(&env.pki.server, Some(&client_ca(&env)), &[(&client.thumbprint(), "dev-1")]);
    let proxy = TestProxy::start(env.dir(), &config(&env, &service, ""));
    let r = get(&env, proxy.addr, Some(client), "/devices/dev-1/telemetry");
    assert_eq!(r.status, 200, "{}", r.text());
    let expected = format!("deviceId=dev-1;certificateThumbprint={}", client.thumbprint());
    assert_eq!(r.echoed_header("x-request-context-data").as_deref(), Some(expected.as_str()), "{}", r.text());
    assert_eq!(r.echoed_header_count("x-request-context-data"), 1, "the client's own is dropped");
    // The service saw the gateway's certificate, the request id, and nothing of the client's.
    assert_eq!(service.last_client().as_deref(), Some("client2"));
    let seen = service.last_request();
    assert!(
        seen.starts_with(&format!(
            "GET /check?certificateThumbprint={}&deviceId=dev-1 HTTP/1.1",
            client.thumbprint()
        )),
        "{seen}"
    );
    assert!(seen.to_ascii_lowercase().contains("x-request-id: "), "{seen}");
    assert!(!seen.contains("forged"), "{seen}");
    // Another device, or another certificate: the configured refusal.
    for (id, path) in
        [(Some(client), "/devices/dev-2/telemetry"), (Some(&env.pki.client2), "/devices/dev-1/telemetry")]
    {
        let r = get(&env, proxy.addr, id, path);
        assert_eq!(r.status, 403, "{path}");
        assert_eq!(r.text(), r#"{"statusCode":403,"message":"Forbidden. Certificate was not recognized."}"#);
    }
    // No certificate at all: the URL has no value, so no callout is made.
    let calls = service.calls();
    assert_eq!(get(&env, proxy.addr, None, "/devices/dev-1/telemetry").status, 403);
    assert_eq!(service.calls(), calls);
    // A route parameter is percent-encoded into the callout's URL.
    get(&env, proxy.addr, Some(client), "/devices/a%26deviceId%3Ddev-1/telemetry");
    assert!(service.last_request().contains("deviceId=a%26deviceId%3Ddev-1 "), "{}", service.last_request());
    // Pooled: one connection to the service per worker at most.
    assert!(service.connections() <= 2, "{} connections", service.connections());
}

#[test]
fn a_service_that_fails_gets_the_refusal_and_details_go_to_the_log() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client2);
    let service = DeviceAuth::start(&env.pki.server, Some(&client_ca(&env)), &[]);
    let text = config(&env, &service, "");
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    for (device, log) in [
        ("slow", "callout timed out"),
        ("error", "callout refused the request"),
        ("html", "callout answer is not JSON"),
        ("huge", "callout answer invalid"),
        ("hangup", "callout service closed the connection"),
    ] {
        let r = get(&env, proxy.addr, Some(&env.pki.client), &format!("/devices/{device}/telemetry"));
        assert_eq!(r.status, 403, "{device}: {}", r.text());
        assert!(r.text().contains("Certificate was not recognized"), "{device}: nothing else is told");
        proxy
            .wait_for_log(log, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{device}: {:?}", proxy.log()));
    }
    // A service that is not there: unreachable, the same refusal. (Not this one stopped: its
    // pooled connections would still answer.)
    let port = portcullis_testkit::idp::free_port();
    let text = text.replace(&service.url(), &format!("https://localhost:{port}"));
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("gone.toml", &text));
    let r = get(&env, proxy.addr, Some(&env.pki.client), "/devices/dev-1/telemetry");
    assert_eq!(r.status, 403);
    assert!(
        proxy.wait_for_log("callout service unreachable", Duration::from_secs(5)).is_some(),
        "{:?}",
        proxy.log()
    );
}

#[test]
fn ignore_error_carries_on_with_the_fields_empty() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client2);
    let service = DeviceAuth::start(&env.pki.server, Some(&client_ca(&env)), &[]);
    let proxy = TestProxy::start(env.dir(), &config(&env, &service, ", ignore_error = true"));
    for device in ["unknown", "error", "html"] {
        let r = get(&env, proxy.addr, Some(&env.pki.client), &format!("/devices/{device}/telemetry"));
        assert_eq!(r.status, 200, "{device}");
        assert_eq!(r.echoed_header("x-request-context-data"), None, "{device}: {}", r.text());
    }
}

#[test]
fn cached_answers_make_no_second_call_and_a_reload_drops_them() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client2);
    let client = &env.pki.client;
    let service =
        DeviceAuth::start(&env.pki.server, Some(&client_ca(&env)), &[(&client.thumbprint(), "dev-1")]);
    let text = config(&env, &service, ", cache_ttl = \"60s\"")
        .replace("[[listener]]", "[server]\nworkers = 1\nadmin = \"127.0.0.1:0\"\n\n[[listener]]");
    let mut proxy = TestProxy::start(env.dir(), &text);
    let mut c = env.client(Some(client)).connect(proxy.addr).unwrap();
    for _ in 0..5 {
        let r = c.request("GET", "/devices/dev-1/telemetry", &[], b"").unwrap();
        assert_eq!(r.status, 200);
        assert!(r.echoed_header("x-request-context-data").is_some_and(|v| v.starts_with("deviceId=dev-1;")));
    }
    // The request id is in the callout: each request renders another callout, so none is cached.
    assert_eq!(service.calls(), 5);
    let text = text.replace(r#"headers = { "X-Request-Id" = "{request.id}" }, "#, "");
    proxy.reload(&text).expect("reload");
    for _ in 0..5 {
        assert_eq!(c.request("GET", "/devices/dev-1/telemetry", &[], b"").unwrap().status, 200);
        assert_eq!(c.request("GET", "/devices/dev-2/telemetry", &[], b"").unwrap().status, 403);
    }
    assert_eq!(service.calls(), 7, "one call per device: the rest were answered from the cache");
    // A reload drops what was cached.
    proxy.reload(&text).expect("reload");
    assert_eq!(c.request("GET", "/devices/dev-1/telemetry", &[], b"").unwrap().status, 200);
    assert_eq!(service.calls(), 8);
    // The metrics count the callouts made, not the answers from the cache.
    let (_, metrics) = crate::common::admin(proxy.admin_addr().unwrap(), "GET", "/metrics");
    assert_eq!(crate::common::metric(&metrics, "portcullis_callout_duration_seconds_count"), 8);
    assert_eq!(crate::common::metric(&metrics, "portcullis_callout_failures_total"), 0);
    assert_eq!(
        crate::common::metric(&metrics, "portcullis_callout_cache_hits_total"),
        8,
        "10 answers, 2 calls"
    );
}

#[test]
fn a_plain_http_service_and_bad_callout_settings() {
    let env = Env::new();
    // A plain-HTTP service: the echo backend answers whatever it is asked (200, not JSON, which
    // no template reads here).
    let text = env.config(
        "request",
        &format!(
            "[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  send_request = {{ name = \"echo\", method = \"POST\", url = \"http://{}/authz?ip={{request.ip}}\", body = \"{{{{\\\"ip\\\":\\\"{{request.ip}}\\\"}}}}\", set_headers = {{ \"X-Authz\" = \"{{callout.echo.status}}\" }} }}\n",
            env.backend.addr()
        ),
    );
    let proxy = TestProxy::start(env.dir(), &text);
    let r = get(&env, proxy.addr, None, "/x");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.echoed_header("X-Authz").as_deref(), Some("200"));
    // Settings that cannot work are refused at load, located.
    for (step, expect) in [
        (r#"send_request = { name = "d", url = "https://{route.host}/x" }"#, "no usable host"),
        (
            r#"send_request = { name = "d", url = "http://x/", backend_tls = { verify = false } }"#,
            "needs an https:// URL",
        ),
        (
            r#"send_request = { name = "d", url = "http://127.0.0.1:1/", expect_status = ["2xx"] }"#,
            "not a range",
        ),
        (
            r#"set_header = { name = "X", value = "{callout.nothing.status}" }"#,
            "no send_request is named \"nothing\"",
        ),
        (
            r#"send_request = { name = "d", url = "http://127.0.0.1:1/", headers = { "Content-Length" = "1" } }"#,
            "cannot be set by a policy",
        ),
        (
            r#"send_request = { name = "d", url = "https://localhost:1/", backend_tls = { certificate = "nope" } }"#,
            "no certificate named \"nope\"",
        ),
    ] {
        let text = env.config(
            "request",
            &format!("[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  {step}\n"),
        );
        let path = env.write_config("bad.toml", &text);
        let out = std::process::Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(expect), "{step}: {stderr}");
        assert!(stderr.contains("bad.toml:"), "located: {stderr}");
    }
}

/// A service that asks for no client certificate, reached with `backend_tls` naming only its CA.
#[test]
fn a_service_without_mutual_tls() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client2);
    let client = &env.pki.client;
    let service = DeviceAuth::start(&env.pki.server, None, &[(&client.thumbprint(), "dev-1")]);
    let text = config(&env, &service, "").replace(", certificate = \"gw\" }", " }");
    assert!(!text.contains("certificate = \"gw\" }, expect"), "no client certificate in the callout");
    let proxy = TestProxy::start(env.dir(), &text);
    let r = get(&env, proxy.addr, Some(client), "/devices/dev-1/telemetry");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(service.last_client(), None, "no certificate was presented");
    assert_eq!(get(&env, proxy.addr, Some(client), "/devices/dev-9/telemetry").status, 403);
}

/// What a client sends cannot change the structure of a callout's JSON body: a route parameter
/// with quotes in it stays inside its string.
#[test]
fn client_values_are_escaped_in_a_json_body() {
    let env = Env::new();
    let text = env.config(
        "request",
        &format!(
            "[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n  [[api.operation]]\n  match = \"GET /d/{{id}}\"\n    [[api.operation.inbound]]\n    send_request = {{ name = \"up\", method = \"POST\", url = \"http://{}/upload\", body = '{{{{\"device\":\"{{route.id}}\"}}}}', set_headers = {{ \"X-Seen\" = \"{{callout.up.body}}\" }} }}\n",
            env.backend.addr()
        ),
    );
    let proxy = TestProxy::start(env.dir(), &text);
    let r = get(&env, proxy.addr, None, "/d/x%22,%22admin%22:true,%22a%22:%22y");
    assert_eq!(r.status, 200, "{}", r.text());
    let sent = r#"{"device":"x\",\"admin\":true,\"a\":\"y"}"#;
    let sha: String = ring::digest::digest(&ring::digest::SHA256, sent.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(r.echoed_header("X-Seen"), Some(format!("bytes={} sha256={sha}", sent.len())));
}
