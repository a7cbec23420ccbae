//! `portcullis-load`: see the library documentation.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis_loadtest::options::{Group, Mode, Options, TlsVersions, parse_duration, parse_url};

#[derive(Parser, Debug)]
#[command(name = "portcullis-load", version, about = "mTLS HTTP/1.1 load generator (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant, reason = "parsed once at start-up")]
enum Command {
    /// Load a TLS server and report req/s, errors and latency percentiles.
    Run {
        /// https://HOST:PORT/PATH on a loopback address; HOST is also the SNI name and Host.
        url: String,
        /// keepalive | handshake (full handshake per request) | resume (resumed per request) | idle
        #[arg(short, long, default_value = "keepalive")]
        mode: String,
        #[arg(short, long, default_value_t = 64)]
        connections: usize,
        /// How long to run (at most 600s), e.g. 10s.
        #[arg(short, long, default_value = "10s")]
        duration: String,
        /// Leading part of the run that is not measured.
        #[arg(short, long, default_value = "1s")]
        warmup: String,
        /// Open loop: total requests per second (at least 0.01), sent on schedule; latency counts
        /// from the scheduled time. Default: closed loop.
        #[arg(short, long)]
        rate: Option<f64>,
        /// Stop after this many measured requests.
        #[arg(short = 'n', long)]
        requests: Option<u64>,
        /// 1.2 | 1.3 | both
        #[arg(long, default_value = "1.3")]
        tls: String,
        /// ECDHE group: x25519 | p256 | p384
        #[arg(long, default_value = "p256")]
        group: String,
        /// CA certificate(s) to trust for the server (PEM).
        #[arg(long)]
        ca: PathBuf,
        /// Client certificate chain (PEM).
        #[arg(long)]
        cert: Option<PathBuf>,
        /// Client private key (PEM).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Extra request header, `Name: value` (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Per-request timeout (at most 60s). A request still going when the run ends is cut there
        /// and not counted.
        #[arg(long, default_value = "10s")]
        timeout: String,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Measure the CPU time (and in idle mode the memory) of this process (repeatable).
        #[arg(long = "watch-pid")]
        watch_pids: Vec<u32>,
        /// Print the report as one JSON line (with any --tag fields) instead of text.
        #[arg(long)]
        json: bool,
        /// key=value added to the JSON line (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// A benchmark backend answering every request with SIZE bytes.
    Backend {
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: std::net::SocketAddr,
        #[arg(long, default_value_t = 1024)]
        size: usize,
        /// Serve over TLS with this certificate chain (PEM), requiring a client certificate.
        #[arg(long, requires_all = ["tls_key", "client_ca"])]
        tls_cert: Option<PathBuf>,
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// The CA (PEM) client certificates must chain to.
        #[arg(long)]
        client_ca: Option<PathBuf>,
    },
    /// Write the benchmark PKI into DIR.
    Pki { dir: PathBuf },
    /// Print the Markdown summary of a file of JSON lines.
    Summarize { file: PathBuf },
}

fn raise_fd_limit() {
    // Thousands of connections need thousands of descriptors: use the hard limit.
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Writes to standard output; a reader that went away (`| head`) is not an error worth a panic.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("portcullis-load: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            url,
            mode,
            connections,
            duration,
            warmup,
            rate,
            requests,
            tls,
            group,
            ca,
            cert,
            key,
            headers,
            timeout,
            threads,
            watch_pids,
            json,
            tags,
        } => {
            raise_fd_limit();
            let (target, server_name, path) = parse_url(&url)?;
            let headers = headers
                .iter()
                .map(|h| {
                    h.split_once(':')
                        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
                        .ok_or_else(|| anyhow::anyhow!("--header {h:?}: expected `Name: value`"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let tags = tags
                .iter()
                .map(|t| t.split_once('=').ok_or_else(|| anyhow::anyhow!("--tag {t:?}: expected key=value")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let opts = Options {
                target,
                server_name,
                path,
                mode: Mode::parse(&mode)?,
                connections,
                duration: parse_duration(&duration)?,
                warmup: parse_duration(&warmup)?,
                rate,
                max_requests: requests,
                tls: TlsVersions::parse(&tls)?,
                group: Group::parse(&group)?,
                ca,
                cert,
                key,
                headers,
                timeout: parse_duration(&timeout)?,
                threads,
                watch_pids,
            };
            let report = portcullis_loadtest::run(opts)?;
            if json {
                let mut v = report.to_json();
                for (k, val) in tags {
                    v[k] = serde_json::Value::String(val.to_owned());
                }
                emit(&format!("{v}\n"))?;
            } else {
                emit(&report.to_string())?;
            }
            Ok(if report.ok == 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
        }
        Command::Backend { listen, size, tls_cert, tls_key, client_ca } => {
            raise_fd_limit();
            let tls = match (tls_cert, tls_key, client_ca) {
                (Some(cert), Some(key), Some(client_ca)) => {
                    Some(portcullis_loadtest::backend::BackendTls { cert, key, client_ca })
                }
                _ => None,
            };
            portcullis_loadtest::backend::serve(listen, size, tls)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Pki { dir } => {
            portcullis_loadtest::pki::write(&dir)?;
            emit(&format!("benchmark PKI written to {}\n", dir.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Summarize { file } => {
            let text = std::fs::read_to_string(&file)?;
            emit(&portcullis_loadtest::summarize::summarize(&text)?)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
