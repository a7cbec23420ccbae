//! The proxy engine: workers, listeners, the connection pipeline, the backend pool, snapshots.
//!
//! [`Server::start`] compiles a [`portcullis_config::Config`] into a [`Snapshot`] (TLS contexts,
//! routes, policies, resolved backends), binds one SO_REUSEPORT socket per listener per worker,
//! and starts one thread per worker, each with its own monoio runtime (io_uring, or epoll when
//! io_uring is unavailable). Workers share nothing but the snapshot, read through a per-worker
//! `arc_swap::Cache`: no locks on the data path, no file reads.
//!
//! [`Server::reload`] swaps in a new snapshot (on error the old one stays); requests already
//! being served finish on the snapshot they started with. [`Server::shutdown`] stops accepting,
//! closes idle connections, lets in-flight requests finish within the drain timeout, and returns.
#![forbid(unsafe_code)]

mod accesslog;
mod admin;
mod balance;
mod conn;
mod cpus;
mod event;
mod fleet;
mod health;
mod keys;
mod loggers;
mod pool;
mod relay;
pub mod resp;
mod server;
mod snapshot;
mod stats;
mod timer;
mod upstream;
mod worker;

pub use server::{LogReopener, Server, StartError};
pub use snapshot::Snapshot;

/// What `portcullis check` runs: compiles `config` and everything it names (errors), then
/// fetches each identity provider's keys once (warnings: the proxy would start, and refuse that
/// provider's tokens until its keys arrive), tries `background_cpus` as a start would (an
/// error when none of them can be run on, a warning for each that cannot), and warns when the
/// access log's file cannot be opened for appending (the records would be dropped) and when no
/// broker of a `[[logger]]` answers for its topic (its messages would wait in its buffer).
pub fn check(config: &portcullis_config::Config) -> Result<Vec<String>, portcullis_config::ConfigErrors> {
    let providers = keys::KeyFetchers::default().prepare(config);
    let counters = std::sync::Arc::new(portcullis_policy::Counters::with_capacity(64));
    let compiled = Snapshot::compile(config, &portcullis_tls::TicketKeys::generate(), 0, providers, counters);
    let mut errors = compiled.err().unwrap_or_default();
    let cpu_warnings = cpus::check(&config.server.background_cpus).unwrap_or_else(|e| {
        errors.push(e);
        Vec::new()
    });
    errors.into_result(())?;
    let mut warnings = keys::check_providers(config);
    warnings.extend(cpu_warnings);
    warnings.extend(accesslog::check_path(config));
    warnings.extend(loggers::check(&config.loggers));
    Ok(warnings)
}
