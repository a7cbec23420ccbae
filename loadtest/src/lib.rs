//! `portcullis-load`: an HTTP/1.1 load generator that presents client certificates.
//!
//! - `run`: keep-alive (N connections, request loops), full handshake (a new connection and a
//!   full mTLS handshake per request, resumption off), or resumed handshake (a new connection per
//!   request, TLS session resumption); closed loop, or open loop at a constant rate (latency then
//!   counts from the scheduled send time). Reports req/s, errors by kind, HDR latency percentiles,
//!   as text and as a JSON line. Every run is bounded in time (and optionally in count) and only
//!   ever targets loopback addresses.
//! - `backend`: a fixed-size-response HTTP/1.1 backend for benchmarks.
//! - `pki`: the benchmark's certificates (root, intermediate, server, clients good and bad, CRLs,
//!   a SHA-1 allow-list).
//! - `summarize`: medians, ranges and ratios from the benchmark's JSON lines.
//!
//! TLS is rustls, not the proxy's BoringSSL, so that the proxy is never only measured against itself.

pub mod backend;
pub mod options;
pub mod pki;
pub mod report;
pub mod run;
pub mod summarize;

pub use options::{Group, Mode, Options, TlsVersions};
pub use report::Report;
pub use run::run;
