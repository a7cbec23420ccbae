//! The shipped example configuration, and `portcullis check`.

use std::path::Path;
use std::process::Command;

use crate::common::{Env, binary, says};

fn example() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/portcullis.toml")
}

#[test]
fn the_example_configuration_parses() {
    let config =
        portcullis_config::load(&example()).unwrap_or_else(|e| panic!("config/portcullis.toml:\n{e}"));
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.apis[0].name.value, "todo");
    // The product limits its subscriptions' calls: a rate limit and a quota.
    let steps = format!("{:?}", config.products[0].inbound);
    assert!(steps.contains("RateLimit") && steps.contains("Quota"), "{steps}");
}

#[test]
fn the_example_configuration_compiles_with_its_files() {
    // The documented first step: `portcullis demo --write DIR` next to a copy of the example,
    // then the real `check`.
    let env = Env::new();
    let dir = env.dir().join("example");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::copy(example(), dir.join("portcullis.toml")).unwrap();
    for data in ["devices.sha1", "starter.keys"] {
        std::fs::copy(example().with_file_name("data").join(data), dir.join("data").join(data)).unwrap();
    }
    let out = Command::new(binary()).args(["check", "-c"]).arg(dir.join("portcullis.toml")).output().unwrap();
    assert!(!out.status.success(), "the example checks without its PKI");
    let out = Command::new(binary()).args(["demo", "--write"]).arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in [
        "root.pem",
        "intermediate.pem",
        "intermediate.crl",
        "server.pem",
        "server.key",
        "devices.pem",
        "devices.key",
        "client.pem",
        "client.key",
        "token-signing.pub",
        "example.token",
    ] {
        assert!(dir.join("pki").join(name).is_file(), "{name}");
    }
    let out = Command::new(binary()).args(["check", "-c"]).arg(dir.join("portcullis.toml")).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
}

#[test]
fn check_reports_all_three_mistakes_with_lines() {
    let env = Env::new();
    let good = env.config("require", "");
    let bad = good
        .replacen("client_certificate = \"require\"", "client_certificate = \"requires\"", 1)
        .replacen("name = \"app\"\nurl", "name = \"app\"\nconect_timeout = \"1s\"\nurl", 1)
        .replacen("backend = \"app\"", "backend = \"nope\"", 1);
    let path = env.write_config("bad.toml", &bad);
    let out = Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 3, "{stderr}");
    let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let file = path.display().to_string();
    assert!(errors[0].contains(&format!("{file}:{}:", line_of("\"requires\""))), "{stderr}");
    assert!(errors[0].contains("listener[0].client_certificate"), "{stderr}");
    assert!(errors[1].contains(&format!("{file}:{}:", line_of("conect_timeout"))), "{stderr}");
    assert!(errors[1].contains("did you mean `connect_timeout`"), "{stderr}");
    assert!(errors[2].contains(&format!("{file}:{}:", line_of("\"nope\""))), "{stderr}");
    assert!(errors[2].contains("no backend named \"nope\""), "{stderr}");
}

#[test]
fn check_reports_files_that_do_not_load() {
    let env = Env::new();
    std::fs::write(&env.paths.crl, "not a crl").unwrap();
    std::fs::write(&env.paths.server_key, env.pki.client.key_pem.as_bytes()).unwrap();
    let path = env.write_config("files.toml", &env.config("require", ""));
    let out = Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listener[0].crl[0]"), "{stderr}");
    assert!(stderr.contains("does not match the certificate"), "{stderr}");
}

#[test]
fn a_crl_from_an_unknown_issuer_is_an_error() {
    let env = Env::new();
    let other = portcullis_testkit::pki::Ca::root("Somebody Else");
    std::fs::write(&env.paths.crl, other.crl(&[])).unwrap();
    let errors = match portcullis_testkit::TestProxy::try_start(env.dir(), &env.config("require", "")) {
        Err(portcullis_server::StartError::Config(e)) => e.to_string(),
        other => panic!("expected a configuration error, got {other:?}"),
    };
    assert!(errors.contains("is not one of the client_ca certificates"), "{errors}");
}

fn check(path: &Path) -> (Option<i32>, Vec<String>) {
    let out = Command::new(binary()).args(["check", "-c"]).arg(path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let errors = stderr.lines().filter(|l| l.starts_with("error: ")).map(str::to_owned).collect();
    (out.status.code(), errors)
}

/// Model errors and file errors in one pass, each once, with a true count; a missing SNI
/// certificate shows beside a missing listener CA.
#[test]
fn check_reports_every_error_in_one_pass_each_once() {
    let env = Env::new();
    let p = |p: &Path| p.display().to_string();
    let sni = format!(
        "\n  [[listener.sni]]\n  hostnames = [\"devices.localhost\"]\n  certificate = {{ cert = \"{}\", key = \"{}\" }}\n",
        p(&env.dir().join("missing-sni.pem")),
        p(&env.paths.sni_key)
    );
    let text = env
        .config("require", "")
        .replacen(&p(&env.paths.root), &p(&env.dir().join("missing-root.pem")), 1)
        .replacen("\n[[backend]]", &format!("{sni}\n[[backend]]"), 1)
        .replacen("backend = \"app\"", "backend = \"nope\"", 1);
    let path = env.write_config("all.toml", &text);
    let (code, errors) = check(&path);
    assert_eq!(code, Some(1));
    let has = |needle: &str| errors.iter().filter(|e| e.contains(needle)).count();
    assert_eq!(has("missing-root.pem"), 1, "{errors:#?}");
    assert_eq!(has("missing-sni.pem"), 1, "{errors:#?}");
    assert_eq!(has("no backend named \"nope\""), 1, "{errors:#?}");
    let out = Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{} error(s)", errors.len())), "{stderr}");
}

#[test]
fn a_syntax_error_is_one_error() {
    let env = Env::new();
    let text = format!("[server\nworkers = 1\n{}", env.config("require", ""));
    let (code, errors) = check(&env.write_config("syntax.toml", &text));
    assert_eq!(code, Some(1));
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert!(errors[0].contains(":1:") && errors[0].contains("TOML syntax"), "{errors:#?}");
}

/// A step of the global or API scope is compiled into every operation's policy; its error is
/// still reported once.
#[test]
fn a_policy_error_shared_by_operations_is_reported_once() {
    let env = Env::new();
    let apis = r#"
[[inbound]]
set_header = { name = "X-Who", value = "{client_cert.nickname}" }

[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_client_certificate = { identities = [ { thumbprint_in = "nowhere" } ] }
  [[api.operation]]
  match = "GET /a"
  [[api.operation]]
  match = "GET /b"
  [[api.operation]]
  match = "GET /c"
    [[api.operation.inbound]]
    set_header = { name = "X-Op", value = "c" }
"#;
    let text = env.config("require", apis);
    let (code, errors) = check(&env.write_config("shared.toml", &text));
    assert_eq!(code, Some(1));
    let has = |needle: &str| errors.iter().filter(|e| e.contains(needle)).count();
    assert_eq!(has("client_cert.nickname"), 1, "{errors:#?}");
    assert_eq!(has("no thumbprint list named \"nowhere\""), 1, "{errors:#?}");
    assert_eq!(errors.len(), 2, "{errors:#?}");
}

/// What was accepted silently before: each is refused with its place.
#[test]
fn check_refuses_what_is_almost_certainly_a_mistake() {
    let env = Env::new();
    let apis = r#"
[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.operation]]
  match = "GET /a"
  [[api.operation]]
  match = "GET /a/"
  [[api.operation]]
  match = "post /b"
  [[api.inbound]]
  validate_client_certificate = { identities = [ { subject = "admin" } ] }

[[api]]
name = "app"
path = "/other"
backend = "app"
"#;
    let text = env.config("require", apis);
    let path = env.write_config("mistakes.toml", &text);
    let (code, errors) = check(&path);
    assert_eq!(code, Some(1));
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let at = |line: usize, needle: &str| {
        errors.iter().any(|e| e.contains(&format!(":{line}:")) && e.contains(needle))
    };
    assert!(at(line_of("\"GET /a/\""), "repeats the one at line"), "{errors:#?}");
    assert!(at(line_of("\"post /b\""), "did you mean \"POST\""), "{errors:#?}");
    assert!(at(line_of("subject = \"admin\""), "is not a distinguished name"), "{errors:#?}");
    assert!(at(line_of("path = \"/other\"") - 1, "API \"app\" is defined twice"), "{errors:#?}");
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn a_leaf_certificate_given_as_client_ca_is_refused() {
    let env = Env::new();
    std::fs::write(&env.paths.intermediate, env.pki.client.cert_pem.as_bytes()).unwrap();
    let (code, errors) = check(&env.write_config("leaf.toml", &env.config("require", "")));
    assert_eq!(code, Some(1));
    assert!(
        errors.iter().any(|e| e.contains("client_ca[1]") && e.contains("is not a CA certificate")),
        "{errors:#?}"
    );
}

/// BoringSSL cannot load RSA-PSS keys (PKCS#8 with the RSASSA-PSS algorithm): the error says so
/// instead of "not a private key".
#[test]
fn an_rsa_pss_key_gets_an_error_that_names_it() {
    use base64::Engine as _;
    let env = Env::new();
    // A PKCS#8 PrivateKeyInfo whose algorithm is id-RSASSA-PSS (1.2.840.113549.1.1.10); the key
    // itself does not matter, the algorithm is what BoringSSL refuses.
    let mut der = vec![0x30, 0x14, 0x02, 0x01, 0x00, 0x30, 0x0b, 0x06, 0x09];
    der.extend_from_slice(&[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a, 0x05, 0x00]);
    der.extend_from_slice(&[0x04, 0x02, 0x30, 0x00]);
    der[1] = (der.len() - 2) as u8;
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(&der)
    );
    std::fs::write(&env.paths.server_key, pem).unwrap();
    let (code, errors) = check(&env.write_config("pss.toml", &env.config("require", "")));
    assert_eq!(code, Some(1));
    assert!(
        errors.iter().any(|e| e.contains("listener[0].certificate") && e.contains("RSA-PSS")),
        "{errors:#?}"
    );
}

/// Every mistake in products, subscriptions, providers and validate_jwt is reported, located,
/// in one pass.
#[test]
fn check_reports_caller_mistakes_with_their_places() {
    let env = Env::new();
    let keys = env.dir().join("starter.keys");
    std::fs::write(&keys, "ok-1, goodkey1\nbad-1, has space\n").unwrap();
    let pem = env.dir().join("short.pub");
    std::fs::write(&pem, "not a key").unwrap();
    let text = env.config(
        "request",
        &format!(
            r#"
[subscriptions]
starter = "{keys}"
nosuch = "{keys}"

[[product]]
name = "starter"
apis = ["app", "ghost"]

[[product]]
name = "free"
apis = ["app"]
subscription_required = false

[[product]]
name = "free2"
apis = ["app"]
subscription_required = false

[[subscription]]
id = "s1"
product = "starter"
primary_key = "dupkey"

[[subscription]]
id = "s1"
product = "starter"
primary_key = "dupkey"

[[subscription]]
id = "s2"
scope = {{ api = "nope" }}
primary_key = "otherkey"

[[subscription]]
id = "s3"
product = "starter"
primary_key = "a/b"
state = "paused"

[[openid]]
name = "idp"
url = "http://idp.example.com/.well-known/openid-configuration"

[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_jwt = {{ audiences = ["x"] }}
  [[api.inbound]]
  validate_jwt = {{ openid = ["missing"], decryption_keys = [], require_signed_tokens = false }}
  [[api.inbound]]
  validate_jwt = {{ issuer_signing_keys = [ {{ secret_base64 = "c2hvcnQ=" }}, {{ pem = "{pem}" }}, {{ certificate = "nocert" }} ] }}
  [[api.outbound]]
  validate_jwt = {{ issuer_signing_keys = [ {{ n = "AQAB", e = "AQAB" }} ] }}
"#,
            keys = keys.display(),
            pem = pem.display()
        ),
    );
    let path = env.write_config("callers.toml", &text);
    let (code, errors) = check(&path);
    assert_eq!(code, Some(1));
    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let expect = |needle: &str, line: usize| {
        let file = path.display().to_string();
        assert!(
            errors.iter().any(|e| e.contains(needle) && e.contains(&format!("{file}:{line}:"))),
            "no error {needle:?} at line {line}:\n{errors:#?}"
        );
    };
    expect("no product named \"nosuch\"", line_of("nosuch ="));
    expect("no API named \"ghost\"", line_of("\"ghost\""));
    expect("already in the open product \"free\"", line_of("name = \"free2\"") + 1);
    let second_s1 = text.lines().enumerate().filter(|(_, l)| l.contains("id = \"s1\"")).nth(1).unwrap().0 + 1;
    expect("subscription id \"s1\" is used twice", second_s1);
    expect("a key of subscription \"s1\" is already a key of \"s1\"", second_s1);
    expect("no API named \"nope\"", line_of("scope = { api"));
    expect("only letters, digits and -._~", line_of("\"a/b\""));
    expect("unknown value \"paused\"", line_of("\"paused\""));
    expect("is not an https:// URL", line_of("http://idp"));
    expect("validate_jwt needs keys", line_of("audiences = [\"x\"]"));
    expect("no [[openid]] provider named \"missing\"", line_of("decryption_keys"));
    expect("encrypted tokens (JWE) are not supported", line_of("decryption_keys"));
    expect("unsigned tokens are never accepted", line_of("decryption_keys"));
    expect("an HMAC secret of 5 bytes is too short", line_of("secret_base64"));
    expect("short.pub: neither a PUBLIC KEY nor a CERTIFICATE", line_of("secret_base64"));
    expect("no certificate named \"nocert\"", line_of("secret_base64"));
    expect("validate_jwt is an inbound step", line_of("[[api.outbound]]") + 1);
    let file_error = format!("{}:2:1: subscriptions.starter: a subscription key has only", keys.display());
    assert!(errors.iter().any(|e| e.contains(&file_error)), "{errors:#?}");
    assert_eq!(errors.len(), 18, "each once: {errors:#?}");
}

/// An identity provider that cannot be reached is a warning, not an error: the proxy would start
/// and refuse its tokens until its keys arrive.
#[test]
fn check_warns_about_an_unreachable_identity_provider() {
    let env = Env::new();
    let port = portcullis_testkit::idp::free_port();
    let text = env.config(
        "request",
        &format!(
            r#"
[[openid]]
name = "down"
url = "https://localhost:{port}/tenant/.well-known/openid-configuration"
ca = ["{}"]
timeout = "2s"

[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_jwt = {{ openid = ["down"] }}
"#,
            env.paths.root.display()
        ),
    );
    let path = env.write_config("down.toml", &text);
    let out = Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let line = text.lines().position(|l| l.contains("tenant/.well-known")).unwrap() + 1;
    assert!(stderr.contains(&format!("down.toml:{line}:")), "{stderr}");
    assert!(says(&stderr, &["warning: openid provider \"down\"", "cannot connect"]), "{stderr}");
}
