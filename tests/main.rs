//! Integration tests: the real proxy on 127.0.0.1, real TLS on both sides (BoringSSL in the
//! proxy, rustls in the client), a real backend, a PKI generated in each test.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests: a panic is a failed test")]

mod accesslog;
mod admin;
mod backend_responses;
mod backend_tls;
mod callout;
mod common;
mod config;
mod conformance;
mod containment;
mod fleet;
mod framing;
mod hiding;
mod jose;
mod jwt;
mod kafka;
mod lifecycle;
mod limits;
mod openapi;
mod operator;
mod policy;
mod pools;
mod proxy;
mod reload;
mod subscriptions;
mod tls;
mod traffic;
