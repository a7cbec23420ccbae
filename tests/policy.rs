//! Client-certificate policy with real handshakes: identities, toggles, operations, responses.

use portcullis_testkit::pki::{Identity, LeafOptions, hex_upper};

use crate::common::Env;

/// A proxy in `request` mode whose only API validates client certificates with `step` (the
/// inline table of `validate_client_certificate`), plus `extra` top-level configuration.
fn validating(env: &Env, step: &str, extra: &str) -> portcullis_testkit::TestProxy {
    let api = format!(
        r#"
{extra}

[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_client_certificate = {step}
  [[api.inbound]]
  set_header = {{ name = "X-Client-Cert-Subject", value = "{{client_cert.subject}}" }}
"#
    );
    env.proxy("request", &api)
}

/// An API named "app" on `path`, to the backend "app", with `policy` (its steps or operations).
fn app_api(path: &str, policy: &str) -> String {
    format!("\n[[api]]\nname = \"app\"\npath = \"{path}\"\nbackend = \"app\"\n{policy}\n")
}

/// The status each identity gets (`None` for no certificate).
fn statuses(env: &Env, proxy: &portcullis_testkit::TestProxy, ids: &[Option<&Identity>]) -> Vec<u16> {
    ids.iter().map(|id| env.client(*id).get(proxy.addr, "/").unwrap().status).collect()
}

fn identity_case(step: &str, extra: &str, allowed: &Identity, denied: &Identity, env: &Env) {
    let proxy = validating(env, step, extra);
    assert_eq!(statuses(env, &proxy, &[Some(allowed), Some(denied)]), vec![200, 403], "{step}");
}

#[test]
fn refusal_is_the_apim_json() {
    let env = Env::new();
    let proxy = validating(&env, "{}", "");
    let r = env.client(None).get(proxy.addr, "/").unwrap();
    assert_eq!(r.status, 403);
    assert_eq!(r.header("Content-Type"), Some("application/json"));
    assert_eq!(r.text(), r#"{"statusCode":403,"message":"Invalid client certificate"}"#);
    assert_eq!(env.backend.requests(), 0);
    assert_eq!(env.client(Some(&env.pki.client)).get(proxy.addr, "/").unwrap().status, 200);
}

#[test]
fn step_status_and_message_are_configurable() {
    let env = Env::new();
    let proxy = validating(&env, r#"{ status = 401, message = "Device \"unknown\"" }"#, "");
    let r = env.client(None).get(proxy.addr, "/").unwrap();
    assert_eq!(r.status, 401);
    assert_eq!(r.text(), r#"{"statusCode":401,"message":"Device \"unknown\""}"#);
}

#[test]
fn identity_thumbprint() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    // Lower case with colons is the same thumbprint.
    let t = a.thumbprint().to_lowercase();
    let colons: Vec<String> =
        t.as_bytes().chunks(2).map(|c| String::from_utf8_lossy(c).into_owned()).collect();
    identity_case(
        &format!(r#"{{ identities = [ {{ thumbprint = "{}" }} ] }}"#, colons.join(":")),
        "",
        a,
        b,
        &env,
    );
}

#[test]
fn identity_thumbprint_sha256() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    identity_case(
        &format!(r#"{{ identities = [ {{ thumbprint_sha256 = "{}" }} ] }}"#, a.thumbprint_sha256()),
        "",
        a,
        b,
        &env,
    );
}

#[test]
fn identity_thumbprint_in_list() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    let list = env.dir().join("devices.sha1");
    std::fs::write(
        &list,
        format!(
            "# allowed devices\n{}  # client1\n\nDEADBEEF00000000000000000000000000000000\n",
            a.thumbprint()
        ),
    )
    .unwrap();
    let extra = format!("[thumbprints]\ndevices = \"{}\"\n", list.display());
    identity_case(r#"{ identities = [ { thumbprint_in = "devices" } ] }"#, &extra, a, b, &env);
}

#[test]
fn identity_thumbprint_in_list_of_sha256() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    let list = env.dir().join("devices.sha256");
    std::fs::write(&list, format!("{}\n", a.thumbprint_sha256().to_lowercase())).unwrap();
    let extra = format!("[thumbprints]\ndevices = \"{}\"\n", list.display());
    identity_case(r#"{ identities = [ { thumbprint_in = "devices" } ] }"#, &extra, a, b, &env);
}

#[test]
fn identity_certificate() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    let (cert, _) = a.write(env.dir()).unwrap();
    let extra = format!("[certificates]\ndevice = \"{}\"\n", cert.display());
    identity_case(r#"{ identities = [ { certificate = "device" } ] }"#, &extra, a, b, &env);
}

#[test]
fn identity_serial_number() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    identity_case(
        &format!(r#"{{ identities = [ {{ serial_number = "{}" }} ] }}"#, hex_upper(&a.serial).to_lowercase()),
        "",
        a,
        b,
        &env,
    );
}

#[test]
fn identity_common_name() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    identity_case(r#"{ identities = [ { common_name = "client1" } ] }"#, "", a, b, &env);
}

/// Case is folded the same way on both sides, beyond ASCII too: a word-final capital sigma is
/// where lower-casing a whole string and lower-casing character by character differ.
#[test]
fn identity_common_name_ignores_case_beyond_ascii() {
    let env = Env::new();
    let greek = env.pki.intermediate.issue("greek", &LeafOptions::client("ΟΔΟΣ"));
    identity_case(r#"{ identities = [ { common_name = "ΟΔΟΣ" } ] }"#, "", &greek, &env.pki.client2, &env);
    identity_case(r#"{ identities = [ { common_name = "οδοσ" } ] }"#, "", &greek, &env.pki.client, &env);
}

#[test]
fn identity_subject_in_normalised_form() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    identity_case(
        r#"{ identities = [ { subject = "cn=client1,ou=clients,  O=Portcullis Test,C=xx" } ] }"#,
        "",
        a,
        b,
        &env,
    );
}

#[test]
fn identity_dns_name() {
    let env = Env::new();
    let device = env.pki.intermediate.issue(
        "device",
        &LeafOptions { dns: vec!["device-7.example.com".to_owned()], ..LeafOptions::client("device-7") },
    );
    identity_case(
        r#"{ identities = [ { dns_name = "DEVICE-7.example.com" } ] }"#,
        "",
        &device,
        &env.pki.client,
        &env,
    );
}

#[test]
fn identity_issuer_subject_thumbprint_and_certificate() {
    let env = Env::new();
    // The certificate from another CA is judged on its issuer alone: trust is off here.
    let a = &env.pki.client;
    let b = &env.pki.wrong_ca;
    let issuer = "CN=Portcullis Test Intermediate, OU=CAs, O=Portcullis Test, C=XX";
    identity_case(
        &format!(r#"{{ validate_trust = false, identities = [ {{ issuer_subject = "{issuer}" }} ] }}"#),
        "",
        a,
        b,
        &env,
    );
    let env = Env::new();
    let int_sha1 = {
        let der = pem_to_der(&env.pki.intermediate.cert_pem);
        hex_upper(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &der).as_ref())
    };
    identity_case(
        &format!(r#"{{ validate_trust = false, identities = [ {{ issuer_thumbprint = "{int_sha1}" }} ] }}"#),
        "",
        &env.pki.client,
        &env.pki.wrong_ca,
        &env,
    );
    let env = Env::new();
    let extra = format!("[certificates]\nissuing-ca = \"{}\"\n", env.paths.intermediate.display());
    identity_case(
        r#"{ validate_trust = false, identities = [ { issuer_certificate = "issuing-ca" } ] }"#,
        &extra,
        &env.pki.client,
        &env.pki.wrong_ca,
        &env,
    );
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD.decode(body).unwrap()
}

#[test]
fn attributes_of_one_identity_are_anded() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    // Right name, someone else's thumbprint: nobody matches.
    let step =
        format!(r#"{{ identities = [ {{ common_name = "client1", thumbprint = "{}" }} ] }}"#, b.thumbprint());
    let proxy = validating(&env, &step, "");
    assert_eq!(statuses(&env, &proxy, &[Some(a), Some(b)]), vec![403, 403]);
    drop(proxy);
    let step =
        format!(r#"{{ identities = [ {{ common_name = "client1", thumbprint = "{}" }} ] }}"#, a.thumbprint());
    let proxy = validating(&env, &step, "");
    assert_eq!(statuses(&env, &proxy, &[Some(a), Some(b)]), vec![200, 403]);
}

#[test]
fn identities_are_ored() {
    let env = Env::new();
    let (a, b) = (&env.pki.client, &env.pki.client2);
    let c = env.pki.intermediate.issue("client3", &LeafOptions::client("client3"));
    let step = format!(
        r#"{{ identities = [ {{ thumbprint = "{}" }}, {{ common_name = "client2" }} ] }}"#,
        a.thumbprint()
    );
    let proxy = validating(&env, &step, "");
    assert_eq!(statuses(&env, &proxy, &[Some(a), Some(b), Some(&c), None]), vec![200, 200, 403, 403]);
}

#[test]
fn validate_not_after_toggle() {
    let env = Env::new();
    let expired = Some(&env.pki.expired);
    assert_eq!(statuses(&env, &validating(&env, "{}", ""), &[expired]), vec![403]);
    assert_eq!(
        statuses(&env, &validating(&env, "{ validate_not_after = false }", ""), &[expired]),
        vec![200]
    );
}

#[test]
fn validate_not_before_toggle() {
    let env = Env::new();
    let future = Some(&env.pki.not_yet_valid);
    assert_eq!(statuses(&env, &validating(&env, "{}", ""), &[future]), vec![403]);
    assert_eq!(
        statuses(&env, &validating(&env, "{ validate_not_before = false }", ""), &[future]),
        vec![200]
    );
    // The other date check stays on.
    assert_eq!(
        statuses(&env, &validating(&env, "{ validate_not_before = false }", ""), &[Some(&env.pki.expired)]),
        vec![403]
    );
}

#[test]
fn validate_revocation_toggle() {
    let env = Env::new();
    let revoked = Some(&env.pki.revoked);
    assert_eq!(statuses(&env, &validating(&env, "{}", ""), &[revoked]), vec![403]);
    assert_eq!(
        statuses(&env, &validating(&env, "{ validate_revocation = false }", ""), &[revoked]),
        vec![200]
    );
}

#[test]
fn validate_trust_toggle() {
    let env = Env::new();
    let stranger = Some(&env.pki.wrong_ca);
    assert_eq!(statuses(&env, &validating(&env, "{}", ""), &[stranger]), vec![403]);
    assert_eq!(statuses(&env, &validating(&env, "{ validate_trust = false }", ""), &[stranger]), vec![200]);
}

#[test]
fn a_missing_certificate_fails_even_with_every_check_off() {
    let env = Env::new();
    let step = "{ validate_trust = false, validate_revocation = false, validate_not_before = false, validate_not_after = false }";
    assert_eq!(statuses(&env, &validating(&env, step, ""), &[None, Some(&env.pki.client)]), vec![403, 200]);
}

#[test]
fn ignore_error_lets_the_request_through() {
    let env = Env::new();
    let proxy = validating(&env, "{ ignore_error = true }", "");
    let r = env.client(None).get(proxy.addr, "/").unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn return_response_answers_without_the_backend() {
    let env = Env::new();
    let api = app_api(
        "/",
        r#"  [[api.inbound]]
  return_response = { status = 418, reason = "I'm a teapot", headers = { "X-Who" = "{client_cert.common_name}", "Retry-After" = "5" }, body = "short and stout" }"#,
    );
    let proxy = env.proxy("request", &api);
    let r = env.client(Some(&env.pki.client)).get(proxy.addr, "/").unwrap();
    assert_eq!(r.status, 418);
    assert_eq!(r.header("X-Who"), Some("client1"));
    assert_eq!(r.header("Retry-After"), Some("5"));
    assert_eq!(r.text(), "short and stout");
    assert_eq!(env.backend.connections(), 0);
}

/// A 204 from a policy has no length and no body, so the connection stays in step.
#[test]
fn return_response_204_ends_at_its_head() {
    let env = Env::new();
    let api = app_api(
        "/",
        r#"  [[api.operation]]
  match = "DELETE /items/{id}"
    [[api.operation.inbound]]
    return_response = { status = 204 }"#,
    );
    let proxy = env.proxy("request", &api);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    let r = c.request("DELETE", "/items/7", &[], b"").unwrap();
    assert_eq!((r.status, r.header("Content-Length")), (204, None));
    // The next answer is read whole and as itself (no operation matches it).
    let r = c.request("GET", "/", &[], b"").unwrap();
    assert_eq!(r.text(), r#"{"statusCode":404,"message":"Resource not found"}"#);
}

/// An HTTP/1.0 client that asked to keep the connection is told so, by the proxy's own
/// answers too: otherwise it would wait for a close that only the idle timeout brings.
#[test]
fn http10_keep_alive_clients_hear_keep_alive_from_every_answer() {
    let env = Env::new();
    let api = app_api(
        "/app",
        r#"  [[api.inbound]]
  return_response = { status = 200, body = "from policy" }"#,
    );
    let proxy = env.proxy("request", &api);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    for path in ["/app", "/nowhere"] {
        c.write_raw(format!("GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes()).unwrap();
        let r = c.read_response(false).unwrap();
        assert_eq!(r.header("Connection"), Some("keep-alive"), "{path}: {}", r.status);
    }
}

#[test]
fn operations_route_and_scope_policies() {
    let env = Env::new();
    let api = format!(
        r#"
[[inbound]]
set_header = {{ name = "X-Global", value = "yes" }}

[[api]]
name = "todo"
path = "/todo"
backend = "app"
operations = ["GET /items", "* /health"]
  [[api.inbound]]
  set_header = {{ name = "X-Api", value = "yes" }}
  [[api.operation]]
  match = "GET /devices/{{deviceId}}/telemetry"
    [[api.operation.inbound]]
    validate_client_certificate = {{ identities = [ {{ thumbprint = "{}" }} ] }}
  [[api.operation]]
  match = "POST /devices/{{deviceId}}/reset"
  inherit = false
"#,
        env.pki.client.thumbprint()
    );
    let proxy = env.proxy("request", &api);
    let client = env.client(Some(&env.pki.client));
    let other = env.client(Some(&env.pki.client2));
    let mut c = client.connect(proxy.addr).unwrap();
    let r = c.request("GET", "/todo/items", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed_header("X-Global").as_deref(), Some("yes"));
    assert_eq!(r.echoed_header("X-Api").as_deref(), Some("yes"));
    assert_eq!(c.request("POST", "/todo/items", &[], b"").unwrap().status, 404, "method not declared");
    assert_eq!(c.request("GET", "/todo/unknown", &[], b"").unwrap().status, 404, "path not declared");
    assert_eq!(c.request("DELETE", "/todo/health", &[], b"").unwrap().status, 200, "* matches any method");
    assert_eq!(c.request("GET", "/todo/devices/42/telemetry", &[], b"").unwrap().status, 200);
    assert_eq!(
        other.get(proxy.addr, "/todo/devices/42/telemetry").unwrap().status,
        403,
        "operation-level policy"
    );
    assert_eq!(other.get(proxy.addr, "/todo/items").unwrap().status, 200, "not on other operations");
    let reset = c.request("POST", "/todo/devices/42/reset", &[], b"x").unwrap();
    assert_eq!(reset.status, 200);
    assert_eq!(reset.echoed_header("X-Global"), None, "inherit = false leaves out the parents' steps");
    assert_eq!(reset.echoed_header("X-Api"), None);
}

#[test]
fn outbound_set_header_actions() {
    let env = Env::new();
    let api = r#"
[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.outbound]]
  set_header = { name = "X-Powered-By", value = "portcullis" }
  [[api.outbound]]
  set_header = { name = "X-Backend-Conn", value = "hidden", action = "skip" }
  [[api.outbound]]
  set_header = { name = "X-Trace", value = "{request.id}", action = "append" }
  [[api.outbound]]
  set_header = { name = "Content-Type", action = "delete" }
"#;
    let proxy = env.proxy("request", api);
    let r = env.client(None).get(proxy.addr, "/").unwrap();
    assert_eq!(r.header("X-Powered-By"), Some("portcullis"));
    assert_eq!(r.header_count("X-Powered-By"), 1, "override replaces the backend's value");
    assert_eq!(r.header("X-Backend-Conn"), Some("1"), "skip leaves an existing header alone");
    assert_eq!(r.header("X-Trace").map(str::len), Some(16));
    assert_eq!(r.header("Content-Type"), None);
}

/// `{route.NAME}`: the path segment an operation's `{NAME}` matched, percent-decoded, in any
/// template (here headers and a rate limit's key).
#[test]
fn route_parameters_reach_templates() {
    let env = Env::new();
    let api = app_api(
        "/devices",
        r#"
  [[api.operation]]
  match = "GET /{deviceId}/telemetry"
    [[api.operation.inbound]]
    set_header = { name = "X-Device", value = "{route.deviceId}" }
    [[api.operation.inbound]]
    rate_limit_by_key = { calls = 2, renewal_period = "60s", counter_key = "{route.deviceId}" }
  [[api.operation]]
  match = "GET /{deviceId}/firmware/{version}"
    [[api.operation.inbound]]
    set_header = { name = "X-Firmware", value = "{route.version} for {route.deviceId}" }
  [[api.operation]]
  match = "GET /list"
"#,
    );
    let proxy = env.proxy("request", &api);
    let get =
        |path: &str| env.client(None).connect(proxy.addr).unwrap().request("GET", path, &[], b"").unwrap();
    let r = get("/devices/dev%201/telemetry");
    assert_eq!((r.status, r.echoed_header("X-Device").as_deref()), (200, Some("dev 1")));
    let r = get("/devices/d7/firmware/2.1/");
    assert_eq!(r.echoed_header("X-Firmware").as_deref(), Some("2.1 for d7"));
    let r = get("/devices/list");
    assert_eq!((r.status, r.echoed_header("X-Device")), (200, None));
    // A control character decoded from the path cannot split the header.
    let r = get("/devices/a%0D%0AX-Evil:%201/telemetry");
    assert_eq!(r.status, 200);
    assert_eq!(r.echoed_header("X-Evil"), None, "{}", r.text());
    // One counter per device.
    assert_eq!(get("/devices/dev%201/telemetry").status, 200);
    assert_eq!(get("/devices/dev%201/telemetry").status, 429);
    assert_eq!(get("/devices/other/telemetry").status, 200);
}

/// A `{route.NAME}` that an operation does not declare is refused at load, located: in the
/// operation's own steps, and in the API's steps, which run in every operation.
#[test]
fn route_parameters_an_operation_lacks_are_refused() {
    let env = Env::new();
    for (policy, operation) in [
        (
            "  [[api.operation]]\n  match = \"GET /{id}\"\n    [[api.operation.inbound]]\n    set_header = { name = \"X-A\", value = \"{route.ident}\" }\n",
            "operation \"GET /{id}\" has no parameter {ident}",
        ),
        (
            "  [[api.inbound]]\n  set_header = { name = \"X-A\", value = \"{route.id}\" }\n  [[api.operation]]\n  match = \"GET /{id}\"\n  [[api.operation]]\n  match = \"GET /all\"\n",
            "operation \"GET /all\" has no parameter {id}",
        ),
        (
            "  [[api.inbound]]\n  set_header = { name = \"X-A\", value = \"{route.id}\" }\n",
            "API \"app\" (it declares no operations) has no parameter {id}",
        ),
    ] {
        let text = env.config("request", &app_api("/", policy));
        let errors = portcullis_testkit::TestProxy::try_start(env.dir(), &text).expect_err(policy);
        let all: Vec<String> = errors.to_string().lines().map(str::to_owned).collect();
        let line = all.iter().find(|e| e.contains(operation)).unwrap_or_else(|| panic!("{all:#?}"));
        assert!(line.contains(".set_header.value: {route."), "located at the template: {line}");
        assert_eq!(all.iter().filter(|e| e.contains("route.")).count(), 1, "one error: {all:#?}");
    }
}
