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
    let mut set = CpuSet::new();
    for c in cpus {
        set.set(c.value);
    }
    let named = || cpus.iter().map(|c| c.value.to_string()).collect::<Vec<_>>().join(", ");
    sched_setaffinity(None, &set)
        .map_err(|e| format!("{}: cannot run on CPUs [{}]: {e}", first.loc, named()))?;
    // Those the system left out (offline, or outside the process's cgroup): said, not fatal.
    let now = sched_getaffinity(None).unwrap_or(set);
    for c in cpus.iter().filter(|c| !now.is_set(c.value)) {
        tracing::warn!(cpu = c.value, at = %c.loc, "server.background_cpus: this CPU cannot be used; the background threads run on the others named");
    }
    tracing::info!(cpus = %named(), "threads other than workers run on the background CPUs");
    Ok(Some(WorkerCpus(before)))
}

/// The calling thread back on the CPUs the process had: a worker as it starts, or the thread
/// whose start of the server failed.
pub(crate) fn widen(cpus: &WorkerCpus) {
    if let Err(e) = sched_setaffinity(None, &cpus.0) {
        tracing::warn!(error = %e, "a thread could not leave the background CPUs");
    }
}

/// What `portcullis check` can tell of `cpus` without moving a thread, from the CPUs the
/// checking process may use (a service started with other CPUs, by systemd's `CPUAffinity=`
/// say, is not seen): an error when it may use none of them (a start would fail), and a warning
/// for each one it may not use (a start would skip it).
pub(crate) fn check(cpus: &[Located<usize>]) -> (Option<ConfigError>, Vec<String>) {
    let Some(first) = cpus.first() else { return (None, Vec::new()) };
    let Ok(own) = sched_getaffinity(None) else { return (None, Vec::new()) };
    let usable = |c: usize| c < CpuSet::MAX_CPU && own.is_set(c);
    let list = ranges((0..CpuSet::MAX_CPU).filter(|&c| own.is_set(c)));
    if !cpus.iter().any(|c| usable(c.value)) {
        let named = cpus.iter().map(|c| c.value.to_string()).collect::<Vec<_>>().join(", ");
        let message = format!("cannot run on CPUs [{named}]: this process may use CPUs {list} only");
        return (Some(first.loc.error(message)), Vec::new());
    }
    let warnings = cpus
        .iter()
        .filter(|c| !usable(c.value))
        .map(|c| {
            format!(
                "{}: warning: CPU {} cannot be used here (CPUs {list} can); the background threads would run on the others named",
                c.loc, c.value
            )
        })
        .collect();
    (None, warnings)
}

/// `0-3,6`: CPUs in increasing order as ranges (as in `/proc`'s `Cpus_allowed_list`).
fn ranges(cpus: impl Iterator<Item = usize>) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for c in cpus {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == c => *end = c,
            _ => runs.push((c, c)),
        }
    }
    let run = |&(a, b): &(usize, usize)| if a == b { a.to_string() } else { format!("{a}-{b}") };
    runs.iter().map(run).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpus_are_listed_as_ranges() {
        assert_eq!(super::ranges([0, 1, 2, 3, 6, 8, 9].into_iter()), "0-3,6,8-9");
        assert_eq!(super::ranges([5].into_iter()), "5");
        assert_eq!(super::ranges(std::iter::empty()), "");
    }
}
