//! Policy: configuration compiled into flat lists of steps, evaluated per request, sans-IO.
//!
//! [`compile`] turns the steps of a [`Config`] — global scope, then API, then operation, each
//! scope able to leave out its parents' with `inherit = false` — into one flat [`ApiPolicy`] per
//! route. Templates, DNs, thumbprints and thumbprint lists (hash sets of fixed-size arrays) are
//! prepared at compile time; evaluating a policy is a `match` over its steps that reads the
//! request's [`Facts`] and writes [`HeaderEdits`]: no I/O, no parsing, and no allocation once a
//! connection's buffers have grown.
//!
//! Steps: `set_header`, `validate_client_certificate` (APIM semantics: trust, revocation,
//! not-before, not-after, identities as an OR of ANDs; revocation is checked against the current
//! CRLs on every request), `return_response`.
//!
//! Headers the proxy derives from a client certificate are collected into
//! [`PolicySet::identity_headers`]: the server strips them from every request it receives, so a
//! client can never supply its own.
//!
//! [`Config`]: portcullis_config::Config
#![forbid(unsafe_code)]

mod facts;
mod operations;
mod policy;
mod template;
mod thumbprints;

pub use facts::{Answer, Answers, Facts, HeaderEdits, HeaderList};
pub use policy::{
    ApiPolicy, ApiRoutes, Inputs, Need, PolicySet, Response, Verdict, compile, load_thumbprints,
};
pub use template::Template;
pub use thumbprints::ThumbprintSet;
