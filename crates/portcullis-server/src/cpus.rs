//! Where the threads that are not workers run (`[server] background_cpus`).
//!
//! A worker shares its core with whatever else the process runs there: the log thread
//! formatting a round of records, a logger's thread encoding a batch, the health checks. Each
//! time one of them runs, it takes the worker's caches too. Moved to a core of their own (a
//! housekeeping core), they leave the workers' cores to requests.
//!
//! On Linux a thread starts on the CPUs of the thread that started it. The thread that starts
//! the server is narrowed to the background CPUs first; every thread it starts from then on
//! (the log thread, loggers, the admin endpoint, health checks, key fetchers, and what a
//! reload starts) inherits them, and each worker takes back the CPUs the process had.
//!
//! "The CPUs the process had" are those of the thread that starts the server, as it calls
//! [`narrow`]. A program that starts a server in-process keeps that thread on the background
//! CPUs once the server runs (also after the server stops): a second server started from it
//! would give its workers the background CPUs alone. The binary starts one.

use portcullis_config::{ConfigError, Located};
use rustix::thread::{CpuSet, sched_getaffinity, sched_setaffinity};

/// The CPUs the process could run on before the background threads were narrowed: what a
/// worker takes back as it starts.
#[derive(Debug, Clone)]
pub(crate) struct WorkerCpus(CpuSet);

/// Narrows the calling thread to `cpus` (nothing when there are none). Returns the CPUs it
/// had, for the workers; an error, naming the field, when none of `cpus` can be run on.
pub(crate) fn narrow(cpus: &[Located<usize>]) -> Result<Option<WorkerCpus>, String> {
    let Some(first) = cpus.first() else { return Ok(None) };
    let before = sched_getaffinity(None)
        .map_err(|e| format!("{}: cannot read the CPUs this thread may use: {e}", first.loc))?;
    let left_out = move_to(cpus).map_err(|e| format!("{}: {e}", first.loc))?;
    for c in left_out {
        tracing::warn!(cpu = c.value, at = %c.loc, "server.background_cpus: this CPU cannot be used; the background threads run on the others named");
    }
    tracing::info!(cpus = %named(cpus), "threads other than workers run on the background CPUs");
    Ok(Some(WorkerCpus(before)))
}

/// `0, 2`: the CPUs of the setting, as written.
fn named(cpus: &[Located<usize>]) -> String {
    cpus.iter().map(|c| c.value.to_string()).collect::<Vec<_>>().join(", ")
}

/// Moves the calling thread onto `cpus` (not empty). The system takes any CPU that is online
/// and in the process's cgroup, whatever CPUs the thread had (`taskset` or systemd's
/// `CPUAffinity=` do not limit it); returns those it left out. An error (without the field)
/// when it takes none.
fn move_to(cpus: &[Located<usize>]) -> Result<Vec<&Located<usize>>, String> {
    let mut set = CpuSet::new();
    for c in cpus {
        set.set(c.value);
    }
    sched_setaffinity(None, &set).map_err(|e| format!("cannot run on CPUs [{}]: {e}", named(cpus)))?;
    let now = sched_getaffinity(None).unwrap_or(set);
    Ok(cpus.iter().filter(|c| !now.is_set(c.value)).collect())
}

/// The calling thread back on the CPUs the process had: a worker as it starts, or the thread
/// whose start of the server failed.
pub(crate) fn widen(cpus: &WorkerCpus) {
    if let Err(e) = sched_setaffinity(None, &cpus.0) {
        tracing::warn!(error = %e, "a thread could not leave the background CPUs");
    }
}

/// What `portcullis check` can tell of `cpus`: what a start would do, done by a thread started
/// for it (and ended), in the checking process's cgroup. An error when no CPU named can be run
/// on (a start would fail); else a warning for each one left out (a start would skip it).
pub(crate) fn check(cpus: &[Located<usize>]) -> Result<Vec<String>, ConfigError> {
    let Some(first) = cpus.first() else { return Ok(Vec::new()) };
    let tried = std::thread::scope(|s| {
        let tried = std::thread::Builder::new().spawn_scoped(s, || move_to(cpus));
        tried.ok().and_then(|t| t.join().ok())
    });
    let Some(tried) = tried else {
        return Ok(vec![format!("{}: warning: cannot try these CPUs: no thread to try them on", first.loc)]);
    };
    let left_out = tried.map_err(|e| first.loc.error(e))?;
    let warning = |c: &Located<usize>| {
        format!(
            "{}: warning: CPU {} cannot be used here (offline, or outside this process's cgroup); the background threads would run on the others named",
            c.loc, c.value
        )
    };
    Ok(left_out.into_iter().map(warning).collect())
}
