//! Policy: configuration compiled into flat lists of steps, evaluated per request, sans-IO.
//!
//! [`compile`] turns the steps of a [`Config`] — global scope, then the request's product, then
//! API, then operation, each scope able to leave out its parents' with `inherit = false` — into
//! one [`ApiPolicy`] per route. Templates, DNs, thumbprints and thumbprint lists (hash sets of fixed-size arrays) are
//! prepared at compile time; evaluating a policy is a `match` over its steps that reads the
//! request's [`Facts`] and writes [`HeaderEdits`]: no I/O, no parsing, and no allocation once a
//! connection's buffers have grown.
//!
//! Before any step, API Management's subscription check: a key (header, else query) of an active
//! subscription that grants the API, or an open product, or an API that needs no key.
//!
//! Steps: `set_header`, `validate_client_certificate` (APIM semantics: trust, revocation,
//! not-before, not-after, identities as an OR of ANDs; revocation is checked against the current
//! CRLs on every request), `validate_jwt` (keys from the configuration or from OpenID providers,
//! a per-worker cache of verified tokens; a token with an unknown `kid` makes the step wait for
//! the provider's keys to be fetched again), `return_response`.
//!
//! Headers the proxy derives from who the caller is (certificate, subscription, product, token
//! claims) are collected into [`PolicySet::identity_headers`]: the server strips them from every
//! request it receives, so a client can never supply its own.
//!
//! [`Config`]: portcullis_config::Config
#![forbid(unsafe_code)]

mod callout;
mod counters;
mod facts;
mod fleet;
mod ipset;
mod jwt;
mod limits;
mod list_file;
mod operations;
mod policy;
mod subscriptions;
mod template;
mod thumbprints;

pub use callout::CalloutTarget;
pub use counters::Counters;
pub use facts::{Answer, Facts, HeaderEdits, HeaderList, LogMessage, RequestState, RouteMatch, WorkerLocal};
pub use fleet::{Batch, Deltas, SCRIPT as FLEET_SCRIPT};
pub use ipset::IpSet;
pub use jwt::TokenCache;
pub use policy::{
    ApiPolicy, ApiRoutes, Inputs, Need, PolicySet, Response, Verdict, compile, load_thumbprints,
};
pub use subscriptions::Subscriptions;
pub use template::{Context, Template};
pub use thumbprints::ThumbprintSet;
