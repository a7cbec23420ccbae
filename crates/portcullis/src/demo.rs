//! `portcullis demo`: everything needed to see the proxy work, made on the spot.

use std::process::ExitCode;

use anyhow::Context as _;
use portcullis_testkit::idp::now;
use portcullis_testkit::{Backend, DeviceAuth, Idp, Pki, SigningKey};
use serde_json::json;

/// Writes a fresh demo PKI into `dir/pki` under the names `config/portcullis.toml` uses, and
/// client identities to try it with.
pub(crate) fn write(dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let pki_dir = dir.join("pki");
    let pki = Pki::generate();
    let paths = pki.write(&pki_dir).with_context(|| format!("writing {}", pki_dir.display()))?;
    let rename = |from: &std::path::Path, to: &str| {
        let target = pki_dir.join(to);
        std::fs::rename(from, &target).with_context(|| format!("writing {}", target.display()))
    };
    rename(&paths.server_chain, "server.pem")?;
    rename(&paths.server_key, "server.key")?;
    rename(&paths.sni_chain, "devices.pem")?;
    rename(&paths.sni_key, "devices.key")?;
    let (client_cert, client_key) = pki.client.write(&pki_dir)?;
    let (revoked_cert, revoked_key) = pki.revoked.write(&pki_dir)?;
    // A token signing key: its public half for the example's validate_jwt, and a token to try.
    let signing = SigningKey::es256("example-key");
    let public = pki_dir.join("token-signing.pub");
    std::fs::write(&public, signing.public_pem()).with_context(|| format!("writing {}", public.display()))?;
    let token = signing.token(&json!({
        "iss": "https://idp.example.com", "aud": "api://orders", "sub": "example-client",
        "appidacr": "2", "scope": "orders.read", "nbf": now() - 60, "exp": now() + 7 * 24 * 3600,
    }));
    let token_file = pki_dir.join("example.token");
    std::fs::write(&token_file, format!("{token}\n"))
        .with_context(|| format!("writing {}", token_file.display()))?;
    // A line for a thumbprint list, so that the example's allow-list can be made to admit it.
    let listed = pki_dir.join("client.sha1");
    std::fs::write(
        &listed,
        format!("{}   # demo client (portcullis demo --write)\n", pki.client.thumbprint()),
    )
    .with_context(|| format!("writing {}", listed.display()))?;
    println!(
        "wrote a demo PKI to {d}:\n  root.pem intermediate.pem intermediate.crl (CAs and the CRL revoking {rc})\n  server.pem server.key (localhost) devices.pem devices.key (devices.localhost)\n  {cc} {ck} (a client, thumbprint {tp}, also in client.sha1)\n  {rc} {rk} (a revoked client)\n  token-signing.pub (a token signing key) example.token (a token it signed, valid 7 days)",
        d = pki_dir.display(),
        cc = client_cert.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
        ck = client_key.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
        rc = revoked_cert.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
        rk = revoked_key.file_name().map(|f| f.to_string_lossy()).unwrap_or_default(),
        tp = pki.client.thumbprint(),
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn run(port: u16) -> anyhow::Result<ExitCode> {
    let mut signals = crate::signals()?;
    let dir = tempfile::Builder::new()
        .prefix("portcullis-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let pki = Pki::generate();
    let paths = pki.write(dir.path()).context("writing the demo PKI")?;
    let (client_cert, client_key) = pki.client.write(dir.path())?;
    let (revoked_cert, revoked_key) = pki.revoked.write(dir.path())?;
    let backend = Backend::start();
    // The device scenario: a backend over TLS that requires the gateway's own certificate (the
    // demo PKI's client2), and a device-authorisation service (mutual TLS as well) that knows the
    // demo client's certificate as device dev-1.
    let (gateway_cert, gateway_key) = pki.client2.write(dir.path())?;
    let cas = format!("{}{}", pki.root.cert_pem, pki.intermediate.cert_pem);
    let secure_backend = Backend::start_tls(&pki.server, Some(&cas));
    let devices = DeviceAuth::start(&pki.server, Some(&cas), &[(&pki.client.thumbprint(), "dev-1")]);
    // An identity provider over HTTPS (the demo PKI's server certificate), with one signing key,
    // and a subscription's keys.
    let token_key = SigningKey::es256("demo-key-1");
    let idp = Idp::start(&pki.server, &[&token_key]);
    let token = |appidacr: &str| {
        token_key.token(&json!({
            "iss": idp.issuer(), "aud": "api://orders", "sub": "demo-client", "appid": "demo-app",
            "appidacr": appidacr, "iat": now(), "nbf": now() - 60, "exp": now() + 24 * 3600,
        }))
    };
    let (primary, secondary) = ("demo0primary0key0000000000000000", "demo0secondary0key00000000000000");
    // Request logs to Kafka: a broker (Tansu) of the demo's own, when one is installed.
    let tansu = std::process::Command::new(std::env::var_os("TANSU").unwrap_or_else(|| "tansu".into()))
        .arg("--help")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let broker = tansu.then(portcullis_testkit::KafkaBroker::start);
    if let Some(b) = &broker {
        b.create_topic("requests", 1);
    }
    let p = |p: &std::path::Path| p.display().to_string();
    let config_text = format!(
        r#"# Generated by `portcullis demo`.
[server]
workers = 1
# Metrics and health checks (Prometheus text at /metrics).
admin = "127.0.0.1:0"

[[listener]]
bind = "127.0.0.1:{port}"
certificate = {{ cert = "{server}", key = "{server_key}" }}
client_certificate = "request"
client_ca = ["{root}", "{intermediate}"]
crl = ["{crl}"]

[[backend]]
name = "echo"
url = "http://{backend}"

# The gateway's own certificate, presented to backends and services that ask for one.
[certificates]
gateway = {{ cert = "{gateway_cert}", key = "{gateway_key}" }}

# An echo backend over TLS that admits only the gateway's certificate.
[[backend]]
name = "secure-echo"
url = "https://localhost:{secure_port}"
tls = {{ ca = ["{root}"], certificate = "gateway" }}

# Subscription keys: the todo API needs one; the starter product grants it.
[[product]]
name = "starter"
apis = ["todo"]

[[subscription]]
id = "demo-subscription"
product = "starter"
primary_key = "{primary}"
secondary_key = "{secondary}"

[[api]]
name = "todo"
path = "/todo"
backend = "echo"
subscription_required = true
  [[api.inbound]]
  set_header = {{ name = "X-Subscription-Id", value = "{{subscription.id}}" }}

# OAuth 2.0 tokens from an OpenID Connect provider (started by the demo), and only those that
# were obtained with a certificate credential (appidacr = 2).
[[openid]]
name = "demo-idp"
url = "{idp_url}"
ca = ["{root}"]

[[api]]
name = "orders"
path = "/orders"
backend = "echo"
  [[api.inbound]]
  validate_jwt = {{ openid = ["demo-idp"], require_scheme = "Bearer", audiences = ["api://orders"],
                   required_claims = [ {{ name = "appidacr", values = ["2"] }} ] }}
  [[api.inbound]]
  set_header = {{ name = "X-Token-Sub", value = "{{jwt.claim.sub}}" }}

# Traffic policy: loopback callers only, five calls per 30 s each (sliding), and a daily quota.
[[api]]
name = "limited"
path = "/limited"
backend = "echo"
  [[api.inbound]]
  ip_filter = {{ action = "allow", cidrs = ["127.0.0.0/8", "::1/128"] }}
  [[api.inbound]]
  rate_limit_by_key = {{ calls = 5, renewal_period = "30s", counter_key = "{{request.ip}}",
                        remaining_calls_header_name = "X-RateLimit-Remaining" }}
  [[api.inbound]]
  quota_by_key = {{ calls = 1000, renewal_period = "1d", counter_key = "{{request.ip}}" }}

# Devices: the device-authorisation service must know the client's certificate as the device
# in the URL; what it answers reaches the backend (over mutual TLS) in x-request-context-data.
[[api]]
name = "devices"
path = "/devices"
backend = "secure-echo"
  [[api.operation]]
  match = "GET /{{deviceId}}/telemetry"
    [[api.operation.inbound]]
    send_request = {{ name = "device", url = "{devices_url}/check?certificateThumbprint={{client_cert.thumbprint}}&deviceId={{route.deviceId}}",
                     headers = {{ "X-Request-Id" = "{{request.id}}" }}, timeout = "5s",
                     backend_tls = {{ ca = ["{root}"], certificate = "gateway" }}, expect_status = [200],
                     status = 403, message = "Forbidden. Certificate was not recognized.",
                     set_headers = {{ "x-request-context-data" = "deviceId={{callout.device.json.deviceId}};certificateThumbprint={{callout.device.json.certificateThumbprint}}" }} }}
    [[api.operation.outbound]]
    set_header = {{ name = "X-Powered-By", action = "delete" }}

# Client certificates: the rest.
[[api]]
name = "echo"
path = "/"
backend = "echo"
  [[api.inbound]]
  validate_client_certificate = {{ identities = [ {{ issuer_subject = "CN=Portcullis Test Intermediate, OU=CAs, O=Portcullis Test, C=XX" }} ] }}
  [[api.inbound]]
  set_header = {{ name = "X-Client-Cert-Subject", value = "{{client_cert.subject}}" }}
  [[api.inbound]]
  set_header = {{ name = "X-Client-Cert-Thumbprint", value = "{{client_cert.thumbprint}}" }}
  [[api.outbound]]
  set_header = {{ name = "X-Powered-By", action = "delete" }}
"#,
        server = p(&paths.server_chain),
        server_key = p(&paths.server_key),
        root = p(&paths.root),
        intermediate = p(&paths.intermediate),
        crl = p(&paths.crl),
        backend = backend.addr(),
        idp_url = idp.url(),
        gateway_cert = p(&gateway_cert),
        gateway_key = p(&gateway_key),
        secure_port = secure_backend.addr().port(),
        devices_url = devices.url(),
    );
    // Every call to the echo API (/hello) logged as JSON to the broker's topic.
    let config_text = match &broker {
        None => config_text,
        Some(b) => format!(
            r#"{config_text}  [[api.inbound]]
  log_to_eventhub = {{ logger_id = "audit", message = '{{"id":"{{request.id}}","ip":"{{request.ip}}","method":"{{request.method}}","path":"{{request.path}}","cert":"{{client_cert.thumbprint}}"}}' }}

# Request logs (API Management's log-to-eventhub): a Kafka topic, here on a broker the demo
# started; Azure Event Hubs' Kafka endpoint takes the same, with tls and sasl.
[[logger]]
name = "audit"
kind = "kafka"
bootstrap = ["{bootstrap}"]
topic = "requests"
linger = "50ms"
"#,
            bootstrap = b.bootstrap()
        ),
    };
    let config_path = dir.path().join("portcullis.toml");
    std::fs::write(&config_path, &config_text)?;
    let config = portcullis_config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let server = crate::start(&config)?;
    let admin = server.admin_addr().map_or_else(|| "-".to_owned(), |a| a.to_string());
    let d = dir.path().display();
    let url = format!("https://127.0.0.1:{port}/hello");
    let base = format!("https://127.0.0.1:{port}");
    println!(
        r#"
Portcullis demo: proxy on {base}, echo backend on {backend}, identity provider on
{idp_url}, files in {d}

Client certificates (/hello): the listener asks for one; the policy admits certificates issued
by the demo intermediate CA, valid and not revoked (validate_client_certificate).

# allowed: 200, the echo shows the identity headers the proxy added
curl --cacert {d}/root.pem --cert {cc} --key {ck} {url}

# no client certificate: 403 {{"statusCode":403,"message":"Invalid client certificate"}}
curl --cacert {d}/root.pem {url}

# a revoked certificate (listed in {d}/intermediate.crl): 403 as well
curl --cacert {d}/root.pem --cert {rc} --key {rk} {url}

Subscription keys (/todo): either key of an active subscription to a product that grants the API.

# allowed: 200 (the key is not forwarded; the backend sees X-Subscription-Id instead)
curl --cacert {d}/root.pem -H "Ocp-Apim-Subscription-Key: {primary}" {base}/todo/items

# no key: 401 "Access denied due to missing subscription key. …"
curl --cacert {d}/root.pem {base}/todo/items

# a wrong key: 401 "Access denied due to invalid subscription key. …"
curl --cacert {d}/root.pem -H "Ocp-Apim-Subscription-Key: not-a-key" {base}/todo/items

OAuth 2.0 tokens (/orders): signed by the provider's key (fetched by OpenID Connect discovery),
for api://orders, obtained with a certificate credential (appidacr = 2).

# appidacr = 2: 200
curl --cacert {d}/root.pem -H "Authorization: Bearer {good}" {base}/orders/1

# appidacr = 1 (a client secret): 401 "JWT claim appidacr is missing or not allowed."
curl --cacert {d}/root.pem -H "Authorization: Bearer {bad}" {base}/orders/1

Traffic policy (/limited): callers from loopback addresses only (ip_filter), five calls per
30 seconds each (rate_limit_by_key, counted for the whole host), 1,000 a day (quota_by_key).

# six calls: 200 200 200 200 200 429 (the 429 says, and Retry-After, when to come back)
for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w "%{{http_code}} " --cacert {d}/root.pem {base}/limited/; done; echo

Devices (/devices): a device-authorisation service (on {devices_url}) must know the client's
certificate as the device in the URL (send_request); the backend is reached over mutual TLS
with the gateway's certificate, and sees what the service answered in x-request-context-data.

# the certificate of device dev-1: 200, the echo shows x-request-context-data
curl --cacert {d}/root.pem --cert {cc} --key {ck} {base}/devices/dev-1/telemetry

# the same certificate for another device: 403 "Forbidden. Certificate was not recognized."
curl --cacert {d}/root.pem --cert {cc} --key {ck} {base}/devices/dev-2/telemetry

{logs}
Metrics (counters of everything above; /healthz, /ready and /config beside them):

curl -s http://{admin}/metrics

Configuration: {config}   (edit it and `kill -HUP {pid}` to reload; Ctrl-C to stop)
"#,
        idp_url = idp.url(),
        devices_url = devices.url(),
        good = token("2"),
        bad = token("1"),
        backend = backend.addr(),
        cc = client_cert.display(),
        ck = client_key.display(),
        rc = revoked_cert.display(),
        rk = revoked_key.display(),
        config = config_path.display(),
        pid = std::process::id(),
        logs = match &broker {
            Some(b) => format!(
                "Request logs: every call to /hello, as JSON, to Kafka topic \"requests\" on {0}\n(log_to_eventhub); read them back:\n\ntansu cat consume --broker tcp://{0} requests\n",
                b.bootstrap()
            ),
            None =>
                "Request logs to Kafka: install Tansu (see the README) and start the demo again.\n".to_owned(),
        },
    );
    let mut server = server;
    let server_reopen = server.log_reopener();
    crate::wait_for_signals(
        &mut signals,
        || match portcullis_config::load(&config_path).and_then(|c| server.reload(&c)) {
            Ok(g) => tracing::info!(generation = g, "configuration reloaded"),
            Err(e) => tracing::error!("reload failed:\n{e}"),
        },
        || server_reopen.reopen(),
    )?;
    server.shutdown().context("shutting down")?;
    drop(backend);
    drop(secure_backend);
    drop(devices);
    drop(idp);
    drop(broker);
    Ok(ExitCode::SUCCESS)
}
