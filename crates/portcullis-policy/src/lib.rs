//! Policy: configuration compiled into flat lists of steps, evaluated per request, sans-IO.
//!
//! [`compile`] turns the `[[api.inbound]]` / `[[api.outbound]]` steps of a [`Config`] (with the
//! global scope's steps in front unless an API sets `inherit = false`) into an [`ApiPolicy`] per
//! API. Templates are parsed at compile time; evaluating a policy is a `match` over its steps
//! that reads the request's [`Facts`] and writes [`HeaderEdits`] — no I/O, no parsing.
//!
//! Headers the proxy derives from a client certificate are collected into
//! [`PolicySet::identity_headers`]: the server strips them from every request it receives, so a
//! client can never supply its own.
//!
//! [`Config`]: portcullis_config::Config
#![forbid(unsafe_code)]

mod facts;
mod policy;
mod template;

pub use facts::{Facts, HeaderEdits, HeaderList};
pub use policy::{ApiPolicy, PolicySet, Verdict, compile};
pub use template::Template;
