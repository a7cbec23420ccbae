//! TLS to backends (`https://` URLs, `tls = { … }`): a backend that requires the gateway's own
//! certificate, served by rustls (not the proxy's BoringSSL), with its trust and name checked,
//! connections pooled and sessions resumed, and certificates rotated by a reload.

use std::time::Duration;

use portcullis_testkit::{Backend, Identity, ProxyProcess, TestProxy};

use crate::common::{Env, binary};

/// The proxy's configuration: the `gw` certificate is `gateway`'s files, and the `secure`
/// backend (`tls` fields as given) is reached under `/secure`.
fn config(env: &Env, backend: &Backend, tls: &str) -> String {
    let d = env.dir().display();
    env.config(
        "off",
        &format!(
            "[certificates]\ngw = {{ cert = \"{d}/gateway.pem\", key = \"{d}/gateway.key\" }}\n\
             [[backend]]\nname = \"secure\"\nurl = \"https://localhost:{port}/base\"\n{tls}\n\
             [[api]]\nname = \"secure\"\npath = \"/secure\"\nbackend = \"secure\"\n\
             [[api]]\nname = \"app\"\npath = \"/\"\nbackend = \"app\"\n",
            port = backend.addr().port(),
        ),
    )
}

/// Writes `id` as the gateway's certificate files.
fn gateway_is(env: &Env, id: &Identity) {
    std::fs::write(env.dir().join("gateway.pem"), &id.chain_pem).unwrap();
    std::fs::write(env.dir().join("gateway.key"), &id.key_pem).unwrap();
}

fn ca_of(env: &Env) -> String {
    format!("\"{}\", \"{}\"", env.paths.root.display(), env.paths.intermediate.display())
}

/// A backend that trusts the test PKI's clients.
fn mtls_backend(env: &Env) -> Backend {
    Backend::start_tls(
        &env.pki.server,
        Some(&format!("{}{}", env.pki.root.cert_pem, env.pki.intermediate.cert_pem)),
    )
}

#[test]
fn a_backend_that_requires_the_gateways_certificate_gets_it() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client);
    let backend = mtls_backend(&env);
    let tls = format!("tls = {{ ca = [{}], certificate = \"gw\" }}", ca_of(&env));
    let proxy = TestProxy::start(env.dir(), &config(&env, &backend, &tls));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    for i in 0..5 {
        let r = c.request("GET", &format!("/secure/item/{i}"), &[], b"").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().starts_with("tls-client: client1\n"), "{}", r.text());
        assert!(r.text().contains(&format!("GET /base/item/{i} HTTP/1.1")), "{}", r.text());
    }
    // Another client connection: the worker's pooled TLS connection serves it too.
    let r = env.client(None).connect(proxy.addr).unwrap().request("GET", "/secure/again", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert!(backend.connections() <= 2, "pooled: {} connections for 6 requests", backend.connections());
    assert_eq!(backend.refused_handshakes(), 0);
}

#[test]
fn sessions_to_the_backend_are_resumed() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client);
    let backend = mtls_backend(&env);
    // No idle connection is kept: every request opens one.
    let tls = format!("max_idle = 0\ntls = {{ ca = [{}], certificate = \"gw\" }}", ca_of(&env));
    let text = config(&env, &backend, &tls).replace("[[listener]]", "[server]\nworkers = 1\n\n[[listener]]");
    let proxy = TestProxy::start(env.dir(), &text);
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    for _ in 0..4 {
        let r = c.request("GET", "/secure/x", &[], b"").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().starts_with("tls-client: client1\n"), "{}", r.text());
    }
    assert_eq!(backend.connections(), 4);
    assert!(backend.resumed() >= 3, "{} of 4 handshakes resumed", backend.resumed());
}

#[test]
fn a_wrong_certificate_wrong_name_or_untrusted_backend_is_a_502() {
    let env = Env::new();
    let backend = mtls_backend(&env);
    let ca = ca_of(&env);
    for (gateway, tls, why) in [
        (
            &env.pki.wrong_ca,
            format!("tls = {{ ca = [{ca}], certificate = \"gw\" }}"),
            "certificate the backend refuses",
        ),
        (
            &env.pki.client,
            "tls = { certificate = \"gw\" }".to_owned(),
            "system trust: the test CA is not in it",
        ),
        (
            &env.pki.client,
            format!("tls = {{ ca = [{ca}], certificate = \"gw\", server_name = \"other.example\" }}"),
            "a name the backend's certificate does not hold",
        ),
        (&env.pki.client, format!("tls = {{ ca = [{ca}] }}"), "no certificate at all"),
    ] {
        gateway_is(&env, gateway);
        let proxy =
            ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, &backend, &tls)));
        let r = env.client(None).connect(proxy.addr).unwrap().request("GET", "/secure/x", &[], b"").unwrap();
        assert_eq!(r.status, 502, "{why}: {}", r.text());
        assert!(!r.text().contains("certificate"), "details stay in the log: {}", r.text());
        let line =
            proxy.wait_for_log("backend failed", Duration::from_secs(5)).unwrap_or_else(|| panic!("{why}"));
        assert!(line.contains("TLS handshake"), "{why}: {line}");
        // The plain backend next to it is served all the same.
        let r = env.client(None).connect(proxy.addr).unwrap().request("GET", "/plain", &[], b"").unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(backend.refused_handshakes() >= 2, "{}", backend.refused_handshakes());
}

#[test]
fn the_certificate_may_be_named_by_thumbprint_and_rotates_on_reload() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client);
    let backend = mtls_backend(&env);
    let tls = format!(
        "tls = {{ ca = [{}], certificate_thumbprint = \"{}\" }}",
        ca_of(&env),
        env.pki.client.thumbprint().to_lowercase()
    );
    let mut proxy = TestProxy::start(env.dir(), &config(&env, &backend, &tls));
    let get = |proxy: &TestProxy| {
        env.client(None).connect(proxy.addr).unwrap().request("GET", "/secure/who", &[], b"").unwrap()
    };
    assert!(get(&proxy).text().starts_with("tls-client: client1\n"));
    // The certificate files are replaced (client2 now), and the configuration names it by its
    // new thumbprint: after the reload, new connections present it.
    gateway_is(&env, &env.pki.client2);
    let rotated = config(
        &env,
        &backend,
        &tls.replace(&env.pki.client.thumbprint().to_lowercase(), &env.pki.client2.thumbprint()),
    );
    proxy.reload(&rotated).expect("reload");
    let r = get(&proxy);
    assert!(r.text().starts_with("tls-client: client2\n"), "{}", r.text());
    // A thumbprint no certificate has is refused, and the running configuration stays.
    let errors = proxy.reload(&config(&env, &backend, &tls)).expect_err("unknown thumbprint");
    assert!(errors.to_string().contains("no certificate in [certificates] has the thumbprint"), "{errors}");
    assert!(get(&proxy).text().starts_with("tls-client: client2\n"));
}

#[test]
fn verify_false_reaches_an_untrusted_backend_with_a_warning() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client);
    let backend = Backend::start_tls(&env.pki.wrong_ca, None);
    let text = config(&env, &backend, "tls = { verify = false }");
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let r = env.client(None).connect(proxy.addr).unwrap().request("GET", "/secure/x", &[], b"").unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(proxy.wait_for_log("is not verified", Duration::from_secs(5)).is_some());
}

/// A pooled TLS connection that the backend closed while it sat idle (close_notify, then FIN)
/// is found out before use: the next request goes out on a new one and succeeds.
#[test]
fn an_idle_tls_connection_the_backend_closed_is_not_used() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client);
    let backend = mtls_backend(&env);
    let tls = format!("tls = {{ ca = [{}], certificate = \"gw\" }}", ca_of(&env));
    // No base path: the backend sees `/then-close` as sent.
    let text = config(&env, &backend, &tls)
        .replace("/base\"", "\"")
        .replace("[[listener]]", "[server]\nworkers = 1\n\n[[listener]]");
    let proxy = TestProxy::start(env.dir(), &text);
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let r = c.request("GET", "/secure/then-close", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let r = c.request("POST", "/secure/upload", &[], b"not to be sent twice").unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().starts_with("bytes=20 "), "{}", r.text());
    }
    assert_eq!(backend.connections(), 2, "one closed by the backend, one new");
}

/// A TLS backend that refuses a body before taking it (a 413 as soon as it has read the head):
/// its answer reaches the client, as over plain TCP.
#[test]
fn an_early_refusal_over_tls_reaches_the_client() {
    let env = Env::new();
    gateway_is(&env, &env.pki.client);
    let backend = mtls_backend(&env);
    let tls = format!("tls = {{ ca = [{}], certificate = \"gw\" }}", ca_of(&env));
    let text = config(&env, &backend, &tls).replace("/base\"", "\"");
    let proxy = TestProxy::start(env.dir(), &text);
    let body = vec![b'x'; 4 << 20];
    let r = env
        .client(None)
        .connect(proxy.addr)
        .unwrap()
        .request("POST", "/secure/early-413", &[], &body)
        .unwrap();
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(r.text(), "too large");
}
