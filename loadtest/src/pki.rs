//! The benchmark's certificates, ECDSA P-256: root → intermediate → server and clients.

use std::path::Path;

use anyhow::Context as _;
use portcullis_testkit::SigningKey;
use portcullis_testkit::pki::{Ca, Identity, LeafOptions};

/// Writes the benchmark PKI into `dir`:
/// `root.pem`, `intermediate.pem`, `ca-chain.pem` (both), `crl.pem` (the intermediate's CRL,
/// revoking `client-revoked`, and the root's, empty), `server-chain.pem` + `server.key`
/// (`server-bundle.pem`: both in one file), clients `client1`..`client3` (allow-listed),
/// `client-denied` (valid, not listed), `client-revoked`, `client-expired` (both listed, so that
/// only revocation or expiry can refuse them) as `NAME-chain.pem` + `NAME.key`, and the SHA-1
/// allow-list as `allow-sha1.lst` (upper-case hex) and `allow-sha1.map` (nginx map).
///
/// For the token and subscription modes: `token-signer.pub` (an ES256 public key, PEM: what
/// HAProxy 2.6's `jwt_verify` takes), `token.jwt` (a token it signed, for
/// `api://bench`, valid a week), `token-expired.jwt`, `subscriptions.keys` (100,000
/// subscriptions, `bench-key-000…` among them) and `subscriptions.map` (the same keys for
/// HAProxy).
pub fn write(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = Ca::root("Bench Root");
    let intermediate = root.intermediate("Bench Intermediate");
    let server = intermediate.issue("server", &LeafOptions::server("localhost", &["localhost"]));
    let now = time::OffsetDateTime::now_utc();
    let client = |name: &str| intermediate.issue(name, &LeafOptions::client(name));
    let clients: Vec<Identity> = ["client1", "client2", "client3", "client-denied", "client-revoked"]
        .into_iter()
        .map(client)
        .collect();
    let expired = intermediate.issue(
        "client-expired",
        &LeafOptions {
            not_before: now - time::Duration::days(30),
            not_after: now - time::Duration::days(1),
            ..LeafOptions::client("client-expired")
        },
    );
    let write = |name: &str, text: &str| {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
    };
    write("root.pem", &root.cert_pem)?;
    write("intermediate.pem", &intermediate.cert_pem)?;
    write("ca-chain.pem", &format!("{}{}", intermediate.cert_pem, root.cert_pem))?;
    let revoked = &clients[4];
    write("crl.pem", &format!("{}{}", intermediate.crl(&[revoked]), root.crl(&[])))?;
    write("server-chain.pem", &server.chain_pem)?;
    write("server.key", &server.key_pem)?;
    write("server-bundle.pem", &format!("{}{}", server.chain_pem, server.key_pem))?;
    let mut allow = String::new();
    let mut map = String::new();
    for id in clients.iter().chain(std::iter::once(&expired)) {
        write(&format!("{}-chain.pem", id.name), &id.chain_pem)?;
        write(&format!("{}.key", id.name), &id.key_pem)?;
        if id.name != "client-denied" {
            allow.push_str(&format!("{}\n", id.thumbprint()));
            map.push_str(&format!("{} 1;\n", id.thumbprint().to_lowercase()));
        }
    }
    write("allow-sha1.lst", &allow)?;
    write("allow-sha1.map", &map)?;
    // The gateway's own certificate, for backends that require one (the tls-backend mode):
    // separate files for Portcullis, one bundle for HAProxy's `crt`.
    let gateway = intermediate.issue("gateway", &LeafOptions::client("gateway"));
    write("gateway-chain.pem", &gateway.chain_pem)?;
    write("gateway.key", &gateway.key_pem)?;
    write("gateway-bundle.pem", &format!("{}{}", gateway.chain_pem, gateway.key_pem))?;
    let signer = SigningKey::es256("bench");
    write("token-signer.pub", &signer.public_pem())?;
    let now = portcullis_testkit::idp::now();
    let claims = |exp: i64| {
        serde_json::json!({"iss": "https://idp.bench", "aud": "api://bench", "sub": "bench-client",
                           "appidacr": "2", "nbf": now - 60, "exp": exp})
    };
    write("token.jwt", &signer.token(&claims(now + 7 * 24 * 3600)))?;
    write("token-expired.jwt", &signer.token(&claims(now - 60)))?;
    let mut keys = String::with_capacity(100 * 100_000);
    let mut hmap = String::with_capacity(60 * 100_000);
    for i in 0..100_000 {
        keys.push_str(&format!(
            "sub-{i:06}, bench-key-{i:06}-primary-0123456789, bench-key-{i:06}-secondary-012345678, active\n"
        ));
        hmap.push_str(&format!("bench-key-{i:06}-primary-0123456789 sub-{i:06}\nbench-key-{i:06}-secondary-012345678 sub-{i:06}\n"));
    }
    write("subscriptions.keys", &keys)?;
    write("subscriptions.map", &hmap)?;
    Ok(())
}
