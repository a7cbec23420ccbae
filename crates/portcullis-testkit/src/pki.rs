//! A throwaway PKI: root → intermediate → server and client certificates, a CRL, and the odd
//! ones out (expired, not yet valid, revoked, issued by another root). ECDSA P-256 throughout.

use std::io;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A certificate with its key, in PEM.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    /// The certificate alone.
    pub cert_pem: String,
    /// The certificate followed by its issuing intermediate (what a client presents).
    pub chain_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub serial: Vec<u8>,
}

impl Identity {
    /// SHA-1 of the DER, upper-case hex: the APIM thumbprint.
    pub fn thumbprint(&self) -> String {
        hex_upper(ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &self.cert_der).as_ref())
    }

    pub fn thumbprint_sha256(&self) -> String {
        hex_upper(ring::digest::digest(&ring::digest::SHA256, &self.cert_der).as_ref())
    }

    /// Writes `<dir>/<name>.pem` (chain) and `<dir>/<name>.key`; returns their paths.
    pub fn write(&self, dir: &Path) -> io::Result<(PathBuf, PathBuf)> {
        let cert = dir.join(format!("{}.pem", self.name));
        let key = dir.join(format!("{}.key", self.name));
        std::fs::write(&cert, &self.chain_pem)?;
        std::fs::write(&key, &self.key_pem)?;
        Ok((cert, key))
    }
}

pub fn hex_upper(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// A CA that can issue certificates and CRLs.
pub struct Ca {
    pub name: String,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    params: CertificateParams,
    key: KeyPair,
    /// The CA's own certificate chain above it (empty for a root).
    chain_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("name", &self.name).finish_non_exhaustive()
    }
}

fn dn(cn: &str, ou: &str) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CountryName, "XX");
    d.push(DnType::OrganizationName, "Portcullis Test");
    d.push(DnType::OrganizationalUnitName, ou);
    d.push(DnType::CommonName, cn);
    d
}

fn random_serial() -> Vec<u8> {
    let mut s = [0u8; 16];
    use ring::rand::SecureRandom;
    let _ = ring::rand::SystemRandom::new().fill(&mut s);
    s[0] &= 0x7f;
    s[0] |= 0x10;
    s.to_vec()
}

/// Options for an issued leaf certificate.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    pub cn: String,
    pub ou: String,
    pub dns: Vec<String>,
    pub ips: Vec<String>,
    pub server: bool,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl LeafOptions {
    pub fn client(cn: &str) -> LeafOptions {
        let now = OffsetDateTime::now_utc();
        LeafOptions {
            cn: cn.to_owned(),
            ou: "Clients".to_owned(),
            dns: Vec::new(),
            ips: Vec::new(),
            server: false,
            not_before: now - Duration::days(1),
            not_after: now + Duration::days(365),
        }
    }

    pub fn server(cn: &str, dns: &[&str]) -> LeafOptions {
        LeafOptions {
            ou: "Servers".to_owned(),
            dns: dns.iter().map(|s| s.to_string()).collect(),
            ips: vec!["127.0.0.1".to_owned()],
            server: true,
            ..LeafOptions::client(cn)
        }
    }
}

impl Ca {
    pub fn root(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("key generation: {e}"));
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name, "CAs");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from(random_serial()));
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(30);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key).unwrap_or_else(|e| panic!("self-signing {name}: {e}"));
        Ca {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            params,
            key,
            chain_pem: String::new(),
        }
    }

    fn issuer(&self) -> Issuer<'_, &KeyPair> {
        Issuer::from_params(&self.params, &self.key)
    }

    pub fn intermediate(&self, name: &str) -> Ca {
        self.intermediate_with(name, BasicConstraints::Constrained(0))
    }

    /// An intermediate that may itself issue intermediates (for chains of any depth).
    pub fn intermediate_ca(&self, name: &str) -> Ca {
        self.intermediate_with(name, BasicConstraints::Unconstrained)
    }

    /// The chain a client of this CA presents: `id`'s certificate, this CA and every CA above.
    pub fn full_chain_pem(&self, id: &Identity) -> String {
        format!("{}{}", id.chain_pem, self.chain_pem)
    }

    fn intermediate_with(&self, name: &str, constraints: BasicConstraints) -> Ca {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("key generation: {e}"));
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name, "CAs");
        params.is_ca = IsCa::Ca(constraints);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from(random_serial()));
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(30);
        params.not_after = now + Duration::days(1825);
        let cert = params.signed_by(&key, &self.issuer()).unwrap_or_else(|e| panic!("signing {name}: {e}"));
        Ca {
            name: name.to_owned(),
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            params,
            key,
            chain_pem: format!("{}{}", self.cert_pem, self.chain_pem),
        }
    }

    pub fn issue(&self, name: &str, opts: &LeafOptions) -> Identity {
        let key = KeyPair::generate().unwrap_or_else(|e| panic!("key generation: {e}"));
        let mut params =
            CertificateParams::new(opts.dns.iter().chain(&opts.ips).cloned().collect::<Vec<_>>())
                .unwrap_or_else(|e| panic!("certificate parameters: {e}"));
        params.distinguished_name = dn(&opts.cn, &opts.ou);
        params.not_before = opts.not_before;
        params.not_after = opts.not_after;
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from(serial.clone()));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if opts.server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let cert = params.signed_by(&key, &self.issuer()).unwrap_or_else(|e| panic!("signing {name}: {e}"));
        let cert_pem = cert.pem();
        Identity {
            name: name.to_owned(),
            chain_pem: format!("{cert_pem}{}", self.cert_pem),
            cert_pem,
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            serial,
        }
    }

    /// The CA certificate's serial number.
    pub fn serial(&self) -> Vec<u8> {
        self.params.serial_number.as_ref().map(SerialNumber::to_bytes).unwrap_or_default()
    }

    /// A CRL revoking `revoked`, valid from an hour ago for a day.
    pub fn crl(&self, revoked: &[&Identity]) -> String {
        self.crl_of(&revoked.iter().map(|id| id.serial.clone()).collect::<Vec<_>>())
    }

    /// A CRL revoking the certificates with these serials (a CA's, say).
    pub fn crl_of(&self, serials: &[Vec<u8>]) -> String {
        self.crl_numbered(serials, OffsetDateTime::now_utc().unix_timestamp() as u64)
    }

    /// A CRL revoking `serials` with CRL number `number` (RFC 5280 §5.2.3).
    pub fn crl_numbered(&self, serials: &[Vec<u8>], number: u64) -> String {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(serial.clone()),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer())
            .and_then(|crl| crl.pem())
            .unwrap_or_else(|e| panic!("signing a CRL: {e}"))
    }
}

/// The standard test PKI.
#[derive(Debug)]
pub struct Pki {
    pub root: Ca,
    pub intermediate: Ca,
    pub server: Identity,
    /// A second server certificate, for SNI (`devices.localhost`).
    pub sni_server: Identity,
    pub client: Identity,
    pub client2: Identity,
    pub revoked: Identity,
    pub expired: Identity,
    pub not_yet_valid: Identity,
    /// Issued by a root the proxy does not trust.
    pub wrong_ca: Identity,
}

/// Where [`Pki::write`] put things.
#[derive(Debug, Clone)]
pub struct PkiPaths {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub intermediate: PathBuf,
    pub server_chain: PathBuf,
    pub server_key: PathBuf,
    pub sni_chain: PathBuf,
    pub sni_key: PathBuf,
    pub crl: PathBuf,
}

impl Pki {
    pub fn generate() -> Pki {
        let root = Ca::root("Portcullis Test Root");
        let intermediate = root.intermediate("Portcullis Test Intermediate");
        let server = intermediate.issue("server", &LeafOptions::server("localhost", &["localhost"]));
        let sni_server = intermediate
            .issue("sni-server", &LeafOptions::server("devices.localhost", &["devices.localhost"]));
        let client = intermediate.issue("client", &LeafOptions::client("client1"));
        let client2 = intermediate.issue("client2", &LeafOptions::client("client2"));
        let revoked = intermediate.issue("revoked", &LeafOptions::client("revoked-client"));
        let now = OffsetDateTime::now_utc();
        let expired = intermediate.issue(
            "expired",
            &LeafOptions {
                not_before: now - Duration::days(30),
                not_after: now - Duration::days(1),
                ..LeafOptions::client("expired-client")
            },
        );
        let not_yet_valid = intermediate.issue(
            "not-yet-valid",
            &LeafOptions {
                not_before: now + Duration::days(1),
                not_after: now + Duration::days(30),
                ..LeafOptions::client("future-client")
            },
        );
        let other_root = Ca::root("Untrusted Root");
        let other_int = other_root.intermediate("Untrusted Intermediate");
        let wrong_ca = other_int.issue("wrong-ca", &LeafOptions::client("client1"));
        Pki {
            root,
            intermediate,
            server,
            sni_server,
            client,
            client2,
            revoked,
            expired,
            not_yet_valid,
            wrong_ca,
        }
    }

    /// Writes the CA certificates, server identities and the CRL into `dir`.
    pub fn write(&self, dir: &Path) -> io::Result<PkiPaths> {
        std::fs::create_dir_all(dir)?;
        let root = dir.join("root.pem");
        let intermediate = dir.join("intermediate.pem");
        let crl = dir.join("intermediate.crl");
        std::fs::write(&root, &self.root.cert_pem)?;
        std::fs::write(&intermediate, &self.intermediate.cert_pem)?;
        std::fs::write(&crl, self.intermediate.crl(&[&self.revoked]))?;
        let (server_chain, server_key) = self.server.write(dir)?;
        let (sni_chain, sni_key) = self.sni_server.write(dir)?;
        Ok(PkiPaths {
            dir: dir.to_path_buf(),
            root,
            intermediate,
            server_chain,
            server_key,
            sni_chain,
            sni_key,
            crl,
        })
    }
}
