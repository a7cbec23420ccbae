//! An OpenID Connect identity provider on 127.0.0.1, over HTTPS (rustls, not the proxy's
//! BoringSSL): a discovery document and a JWK Set the test changes at will (key rotation), with
//! counters of what was fetched; and signing keys that make tokens (signed with ring).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde_json::{Value, json};

use crate::pki::Identity;

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the Unix epoch.
pub fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

enum Kind {
    Es256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rsa { pair: RsaKeyPair, n: Vec<u8>, e: Vec<u8>, pss: bool },
    Hmac(Vec<u8>),
}

/// A key that signs tokens, with its `kid`.
pub struct SigningKey {
    pub kid: String,
    kind: Kind,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).field("alg", &self.alg()).finish()
    }
}

impl SigningKey {
    /// An ECDSA P-256 key (ES256).
    pub fn es256(kid: &str) -> SigningKey {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .unwrap();
        SigningKey { kid: kid.to_owned(), kind: Kind::Es256(pair) }
    }

    /// An Ed25519 key (EdDSA).
    pub fn ed25519(kid: &str) -> SigningKey {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        SigningKey {
            kid: kid.to_owned(),
            kind: Kind::Ed25519(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()),
        }
    }

    /// An RSA key of `bits` (RS256, or PS256 with `pss`), made with BoringSSL (ring makes no RSA
    /// keys) and used by ring.
    pub fn rsa(kid: &str, bits: u32, pss: bool) -> SigningKey {
        let rsa = boring::rsa::Rsa::generate(bits).unwrap();
        let (n, e) = (rsa.n().to_vec(), rsa.e().to_vec());
        let der = boring::pkey::PKey::from_rsa(rsa).unwrap().private_key_to_der_pkcs8().unwrap();
        let pair = RsaKeyPair::from_pkcs8(&der).unwrap();
        SigningKey { kid: kid.to_owned(), kind: Kind::Rsa { pair, n, e, pss } }
    }

    /// An HMAC secret (HS256).
    pub fn hs256(kid: &str, secret: &[u8]) -> SigningKey {
        SigningKey { kid: kid.to_owned(), kind: Kind::Hmac(secret.to_vec()) }
    }

    pub fn alg(&self) -> &'static str {
        match &self.kind {
            Kind::Es256(_) => "ES256",
            Kind::Ed25519(_) => "EdDSA",
            Kind::Rsa { pss: false, .. } => "RS256",
            Kind::Rsa { pss: true, .. } => "PS256",
            Kind::Hmac(_) => "HS256",
        }
    }

    /// The public key as a JWK (the secret, for an HMAC key).
    pub fn jwk(&self) -> Value {
        match &self.kind {
            Kind::Es256(pair) => {
                let point = pair.public_key().as_ref();
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig",
                       "x": b64(&point[1..33]), "y": b64(&point[33..65])})
            }
            Kind::Ed25519(pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid, "x": b64(pair.public_key().as_ref())})
            }
            Kind::Rsa { n, e, .. } => {
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "n": b64(n), "e": b64(e)})
            }
            Kind::Hmac(k) => json!({"kty": "oct", "kid": self.kid, "k": b64(k)}),
        }
    }

    /// The public key in PEM (`PUBLIC KEY`), for `issuer_signing_keys = [{ pem = … }]`.
    pub fn public_pem(&self) -> String {
        let der = match &self.kind {
            Kind::Es256(pair) => {
                let mut der = vec![
                    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
                    0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
                ];
                der.extend_from_slice(pair.public_key().as_ref());
                der
            }
            Kind::Ed25519(pair) => {
                let mut der = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
                der.extend_from_slice(pair.public_key().as_ref());
                der
            }
            Kind::Rsa { n, e, .. } => {
                let rsa = boring::rsa::Rsa::from_public_components(
                    boring::bn::BigNum::from_slice(n).unwrap(),
                    boring::bn::BigNum::from_slice(e).unwrap(),
                )
                .unwrap();
                boring::pkey::PKey::from_rsa(rsa).unwrap().public_key_to_der().unwrap()
            }
            Kind::Hmac(_) => panic!("an HMAC secret has no public key"),
        };
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n", lines.join("\n"))
    }

    /// The signature of `input`.
    pub fn sign_bytes(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.kind {
            Kind::Es256(pair) => pair.sign(&rng, input).unwrap().as_ref().to_vec(),
            Kind::Ed25519(pair) => pair.sign(input).as_ref().to_vec(),
            Kind::Rsa { pair, pss, .. } => {
                let mut sig = vec![0; pair.public().modulus_len()];
                let padding: &dyn signature::RsaEncoding =
                    if *pss { &signature::RSA_PSS_SHA256 } else { &signature::RSA_PKCS1_SHA256 };
                pair.sign(padding, &rng, input, &mut sig).unwrap();
                sig
            }
            Kind::Hmac(k) => {
                ring::hmac::sign(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k), input).as_ref().to_vec()
            }
        }
    }

    /// A compact token with `header` (its `alg` and `kid` filled in when absent) and `claims`.
    pub fn token_with(&self, header: Value, claims: &Value) -> String {
        let mut header = header;
        if let Some(h) = header.as_object_mut() {
            h.entry("alg").or_insert(json!(self.alg()));
            h.entry("kid").or_insert(json!(self.kid));
            h.entry("typ").or_insert(json!("JWT"));
            // A null leaves the member out (a token without `kid`, say).
            h.retain(|_, v| !v.is_null());
        }
        let input = format!("{}.{}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()));
        let sig = self.sign_bytes(input.as_bytes());
        format!("{input}.{}", b64(&sig))
    }

    /// A compact token with the usual header and `claims`.
    pub fn token(&self, claims: &Value) -> String {
        self.token_with(json!({}), claims)
    }
}

/// A JWK Set of `keys`' public keys.
pub fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// A running identity provider; stopped when dropped.
pub struct Idp {
    addr: SocketAddr,
    jwks: Arc<Mutex<String>>,
    discovery_fetches: Arc<AtomicUsize>,
    jwks_fetches: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Idp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idp").field("addr", &self.addr).finish_non_exhaustive()
    }
}

/// A free port on 127.0.0.1 (for a provider that starts later than the proxy).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Idp {
    /// Starts on a free port, serving `server`'s certificate, with the keys of `keys`.
    pub fn start(server: &Identity, keys: &[&SigningKey]) -> Idp {
        Idp::start_on(0, server, keys)
    }

    /// Starts on `port` (0: any).
    pub fn start_on(port: u16, server: &Identity, keys: &[&SigningKey]) -> Idp {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap_or_else(|e| panic!("idp bind: {e}"));
        let addr = listener.local_addr().unwrap();
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(server.chain_pem.as_bytes()).collect::<Result<_, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(server.key_pem.as_bytes()).unwrap();
        let config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let config = Arc::new(config);
        let jwks = Arc::new(Mutex::new(self::jwks(keys)));
        let discovery_fetches = Arc::new(AtomicUsize::new(0));
        let jwks_fetches = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let issuer = format!("https://localhost:{}/tenant", addr.port());
        let thread = std::thread::spawn({
            let (jwks, d, j, stop) =
                (jwks.clone(), discovery_fetches.clone(), jwks_fetches.clone(), stop.clone());
            move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (config, jwks, d, j, issuer) =
                        (config.clone(), jwks.clone(), d.clone(), j.clone(), issuer.clone());
                    std::thread::spawn(move || serve(stream, config, &jwks, &d, &j, &issuer));
                }
            }
        });
        Idp { addr, jwks, discovery_fetches, jwks_fetches, stop, thread: Some(thread) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The discovery document's URL.
    pub fn url(&self) -> String {
        format!("https://localhost:{}/tenant/.well-known/openid-configuration", self.addr.port())
    }

    /// The issuer the discovery document names.
    pub fn issuer(&self) -> String {
        format!("https://localhost:{}/tenant", self.addr.port())
    }

    /// Publishes another key set (a rotation).
    pub fn set_keys(&self, keys: &[&SigningKey]) {
        *self.jwks.lock().unwrap() = jwks(keys);
    }

    /// Publishes `text` as the key set, whatever it is.
    pub fn set_jwks_text(&self, text: &str) {
        *self.jwks.lock().unwrap() = text.to_owned();
    }

    pub fn discovery_fetches(&self) -> usize {
        self.discovery_fetches.load(Ordering::Acquire)
    }

    pub fn jwks_fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::Acquire)
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    jwks: &Mutex<String>,
    d: &AtomicUsize,
    j: &AtomicUsize,
    issuer: &str,
) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
    let Ok(conn) = ServerConnection::new(config) else { return };
    let mut tls = StreamOwned::new(conn, tcp);
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 64 * 1024 {
            return;
        }
    }
    let line = String::from_utf8_lossy(&head).lines().next().unwrap_or("").to_owned();
    let path = line.split(' ').nth(1).unwrap_or("");
    let (status, body) = match path {
        "/tenant/.well-known/openid-configuration" => {
            d.fetch_add(1, Ordering::AcqRel);
            let doc = json!({"issuer": issuer, "jwks_uri": format!("{issuer}/discovery/keys"),
                             "id_token_signing_alg_values_supported": ["ES256", "RS256", "EdDSA"]});
            ("200 OK", doc.to_string())
        }
        "/tenant/discovery/keys" => {
            j.fetch_add(1, Ordering::AcqRel);
            ("200 OK", jwks.lock().unwrap().clone())
        }
        _ => ("404 Not Found", "{}".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(response.as_bytes());
    let _ = tls.flush();
    tls.conn.send_close_notify();
    let _ = tls.flush();
}
