//! Portcullis configuration: TOML text → typed, validated [`Config`].
//!
//! Every error names the file, line, column and field it is about, and a load reports all the
//! errors it finds, not just the first (`portcullis check` prints them all). Relative paths are
//! resolved against the directory of the configuration file.
//!
//! This crate reads the configuration file itself, and the OpenAPI documents APIs are imported
//! from (their operations are part of the configuration: [`openapi`]). Loading what else it
//! names (certificates, keys, CRLs, thumbprint lists) is the job of the crates that understand
//! those files; they report their errors against the [`Loc`] kept beside each value.
#![forbid(unsafe_code)]

mod callers;
mod callout;
mod error;
mod load;
mod logger;
mod model;
pub mod openapi;
mod reader;
mod traffic;

pub use callers::{https_url, subscription_key_problem};
pub use error::{ConfigError, ConfigErrors, Loc};
pub use load::{host_of, load, load_partial, parse, parse_partial, portcullis_max_headers};
pub use model::*;
pub use traffic::{RedisUrl, canonical_ip, parse_redis_url};

#[cfg(test)]
mod tests;
