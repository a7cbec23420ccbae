//! What a load run does, checked before anything starts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};

/// The longest run allowed: every run is bounded.
pub const MAX_DURATION: Duration = Duration::from_secs(600);
/// The longest a request may take (`--timeout`).
pub const MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// The lowest open-loop rate, in requests per second.
pub const MIN_RATE: f64 = 0.01;

/// How connections are used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Each connection sends request after request.
    KeepAlive,
    /// A new connection and a full handshake (no resumption) for every request.
    Handshake,
    /// A new connection for every request, resuming the previous TLS session.
    Resume,
    /// Each connection makes one request, then stays open and idle until the end (to measure
    /// what idle connections cost the server).
    Idle,
}

impl Mode {
    pub fn parse(s: &str) -> anyhow::Result<Mode> {
        Ok(match s {
            "keepalive" | "keep-alive" => Mode::KeepAlive,
            "handshake" | "full" => Mode::Handshake,
            "resume" | "resumed" => Mode::Resume,
            "idle" => Mode::Idle,
            other => bail!("unknown mode {other:?}: use keepalive, handshake, resume or idle"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keepalive",
            Mode::Handshake => "handshake",
            Mode::Resume => "resume",
            Mode::Idle => "idle",
        }
    }
}

/// TLS versions offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersions {
    Tls12,
    Tls13,
    Both,
}

impl TlsVersions {
    pub fn parse(s: &str) -> anyhow::Result<TlsVersions> {
        Ok(match s {
            "1.2" => TlsVersions::Tls12,
            "1.3" => TlsVersions::Tls13,
            "both" | "any" => TlsVersions::Both,
            other => bail!("unknown TLS version {other:?}: use 1.2, 1.3 or both"),
        })
    }
}

/// ECDHE group offered (only this one, so runs are comparable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    X25519,
    P256,
    P384,
}

impl Group {
    pub fn parse(s: &str) -> anyhow::Result<Group> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "x25519" => Group::X25519,
            "p256" | "p-256" | "secp256r1" => Group::P256,
            "p384" | "p-384" | "secp384r1" => Group::P384,
            other => bail!("unknown group {other:?}: use x25519, p256 or p384"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Group::X25519 => "x25519",
            Group::P256 => "p256",
            Group::P384 => "p384",
        }
    }
}

/// A complete, validated run description.
#[derive(Debug, Clone)]
pub struct Options {
    pub target: SocketAddr,
    /// SNI and `Host`.
    pub server_name: String,
    pub path: String,
    pub mode: Mode,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Open loop: this many requests per second in total, sent on schedule; latency counts from
    /// the scheduled time (no coordinated omission). `None`: closed loop, as fast as answers come.
    pub rate: Option<f64>,
    /// Stop after this many requests (after warm-up), if sooner than the duration.
    pub max_requests: Option<u64>,
    pub tls: TlsVersions,
    pub group: Group,
    pub ca: PathBuf,
    /// Client certificate chain and key (PEM); none means no client certificate.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub headers: Vec<(String, String)>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Runtime threads.
    pub threads: usize,
    /// Processes whose CPU time (and, in idle mode, memory) is measured over the run.
    pub watch_pids: Vec<u32>,
}

/// Parses `https://host:port/path` into its address (loopback only), name and path.
pub fn parse_url(url: &str) -> anyhow::Result<(SocketAddr, String, String)> {
    let rest =
        url.strip_prefix("https://").with_context(|| format!("{url:?}: only https:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => {
            (h, p.parse::<u16>().with_context(|| format!("{url:?}: invalid port"))?)
        }
        _ => (authority, 443),
    };
    let host_plain = host.trim_start_matches('[').trim_end_matches(']');
    let addr = (host_plain, port)
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {host_plain}"))?
        .find(|a| a.ip().is_loopback())
        .with_context(|| {
            format!("{url:?}: the load tool only targets loopback addresses (127.0.0.0/8, ::1)")
        })?;
    Ok((addr, host_plain.to_owned(), path.to_owned()))
}

impl Options {
    /// Checks the combination; every problem is an error before any connection is made.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.target.ip().is_loopback() {
            bail!("{}: the load tool only targets loopback addresses", self.target);
        }
        if self.connections == 0 || self.connections > 100_000 {
            bail!("--connections must be between 1 and 100000");
        }
        if self.duration.is_zero() || self.duration > MAX_DURATION {
            bail!("--duration must be between 1ms and {}s", MAX_DURATION.as_secs());
        }
        if self.warmup >= self.duration {
            bail!("--warmup must be shorter than --duration");
        }
        // A run lasts at most its duration plus one request's timeout.
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            bail!("--timeout must be between 1ms and {}s", MAX_TIMEOUT.as_secs());
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r >= MIN_RATE)
        {
            bail!("--rate must be at least {MIN_RATE} requests per second");
        }
        if self.max_requests == Some(0) {
            bail!("--requests must be at least 1");
        }
        if self.cert.is_some() != self.key.is_some() {
            bail!("--cert and --key go together");
        }
        if self.threads == 0 || self.threads > 64 {
            bail!("--threads must be between 1 and 64");
        }
        for p in [Some(&self.ca), self.cert.as_ref(), self.key.as_ref()].into_iter().flatten() {
            if !p.is_file() {
                bail!("{}: no such file", p.display());
            }
        }
        Ok(())
    }
}

/// Parses `10s`, `500ms`, `2m` (or plain seconds).
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let n: f64 = num.parse().with_context(|| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        other => bail!("{s:?}: unknown unit {other:?} (use ms, s or m)"),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| anyhow::anyhow!("{s:?} is not a usable duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let (addr, name, path) = parse_url("https://127.0.0.1:8443/x?y").unwrap();
        assert_eq!(addr.to_string(), "127.0.0.1:8443");
        assert_eq!(name, "127.0.0.1");
        assert_eq!(path, "/x?y");
        let (addr, name, _) = parse_url("https://localhost:9/").unwrap();
        assert!(addr.ip().is_loopback());
        assert_eq!(name, "localhost");
        assert!(parse_url("http://127.0.0.1:1/").is_err());
        assert!(parse_url("https://192.0.2.1:443/").is_err());
        assert!(parse_url("https://[::1]:8443/").is_ok());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("99999999999999999999999").is_err(), "too large, not a panic");
    }
}
