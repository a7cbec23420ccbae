//! Test harness for Portcullis: everything a test needs to run the proxy for real.
//!
//! - [`pki`]: a throwaway PKI made in the test (root, intermediate, server, clients good and bad,
//!   a CRL) with rcgen;
//! - [`backend`]: an HTTP/1.1 backend on 127.0.0.1 with behaviours chosen by path;
//! - [`client`]: a rustls client that presents certificates, resumes sessions and sends raw bytes;
//! - [`scripted`]: a backend that answers with exact bytes, for responses no server should send;
//! - [`devauth`]: a device-authorisation service over HTTPS, for callouts;
//! - [`idp`]: an OpenID Connect provider over HTTPS whose keys the test rotates, and keys that
//!   sign tokens;
//! - [`proxy`]: the proxy started in-process, or the real binary as a child process;
//! - [`redis`]: a real `redis-server` on a free loopback port, stopped and restarted at will;
//! - [`kafka`]: a real Kafka-protocol broker (Tansu) on a free loopback port, likewise.
//!
//! No mocks: real sockets on 127.0.0.1, real TLS on both sides. The demo (`portcullis demo`) is
//! built from the same pieces.
#![allow(clippy::unwrap_used, reason = "a harness: a failure here is a failed test")]

pub mod backend;
pub mod client;
pub mod devauth;
pub mod idp;
pub mod kafka;
pub mod pki;
pub mod proxy;
pub mod redis;
pub mod scripted;

pub use backend::Backend;
pub use client::{Conn, Response, TlsClient, Versions};
pub use devauth::DeviceAuth;
pub use idp::{Idp, SigningKey};
pub use kafka::KafkaBroker;
pub use pki::{Identity, Pki, PkiPaths};
pub use proxy::{ProxyProcess, TestProxy};
pub use redis::{RedisServer, RedisTls};
pub use scripted::{Reply, ScriptedBackend, Then};
