//! What a run measured, for people and for scripts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;

use crate::options::{Mode, Options};

/// The outcome of a run.
#[derive(Debug, Clone)]
pub struct Report {
    pub mode: Mode,
    pub connections: usize,
    pub rate: Option<f64>,
    pub tls: String,
    pub group: &'static str,
    /// Measured time (after warm-up).
    pub seconds: f64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub handshakes: u64,
    pub resumed: u64,
    /// Latency percentiles in microseconds: p50, p90, p99, p99.9, max.
    pub latency_us: [u64; 5],
    /// CPU time the watched processes used during the measured window.
    pub watched_cpu_seconds: Option<f64>,
    /// Resident memory of the watched processes near the end of the run.
    pub watched_rss_kib: Option<u64>,
}

impl Report {
    pub(crate) fn new(
        opts: &Options,
        elapsed: Duration,
        ok: u64,
        errors: BTreeMap<String, u64>,
        latency: &Histogram<u64>,
        handshakes: u64,
        resumed: u64,
    ) -> Report {
        let q = |p: f64| if latency.is_empty() { 0 } else { latency.value_at_quantile(p) };
        Report {
            mode: opts.mode,
            connections: opts.connections,
            rate: opts.rate,
            tls: format!("{:?}", opts.tls).to_lowercase(),
            group: opts.group.name(),
            seconds: elapsed.as_secs_f64(),
            ok,
            errors,
            handshakes,
            resumed,
            latency_us: [q(0.5), q(0.9), q(0.99), q(0.999), latency.max()],
            watched_cpu_seconds: None,
            watched_rss_kib: None,
        }
    }

    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        if self.seconds > 0.0 { self.ok as f64 / self.seconds } else { 0.0 }
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "mode": self.mode.name(),
            "connections": self.connections,
            "rate": self.rate,
            "tls": self.tls,
            "group": self.group,
            "seconds": self.seconds,
            "ok": self.ok,
            "rps": self.rps(),
            "errors": self.errors,
            "error_count": self.error_count(),
            "handshakes": self.handshakes,
            "resumed": self.resumed,
            "proxy_cpu_seconds": self.watched_cpu_seconds,
            "proxy_rss_kib": self.watched_rss_kib,
            "latency_us": {
                "p50": self.latency_us[0],
                "p90": self.latency_us[1],
                "p99": self.latency_us[2],
                "p999": self.latency_us[3],
                "max": self.latency_us[4],
            },
        })
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let l = self.latency_us;
        writeln!(
            f,
            "{} x{} conns{}, TLS {} {}: {:.0} req/s over {:.1}s ({} ok, {} errors)",
            self.mode.name(),
            self.connections,
            self.rate.map(|r| format!(" at {r:.0} req/s")).unwrap_or_default(),
            self.tls,
            self.group,
            self.rps(),
            self.seconds,
            self.ok,
            self.error_count()
        )?;
        writeln!(f, "  latency µs: p50 {} p90 {} p99 {} p99.9 {} max {}", l[0], l[1], l[2], l[3], l[4])?;
        writeln!(f, "  handshakes {} (resumed {})", self.handshakes, self.resumed)?;
        if let Some(cpu) = self.watched_cpu_seconds {
            let per = if self.ok > 0 { cpu * 1e6 / self.ok as f64 } else { 0.0 };
            writeln!(f, "  watched processes: {cpu:.2} s CPU, {per:.1} µs per request")?;
        }
        if let Some(rss) = self.watched_rss_kib {
            let per = if self.connections > 0 { rss as f64 / self.connections as f64 } else { 0.0 };
            writeln!(f, "  watched processes: {rss} KiB resident, {per:.1} KiB per connection")?;
        }
        for (kind, n) in &self.errors {
            writeln!(f, "  error {kind}: {n}")?;
        }
        Ok(())
    }
}
