//! `portcullis`: the command line. `run` serves, `check` validates a configuration like
//! `nginx -t`, `demo` starts a self-contained showcase on 127.0.0.1:8443.
//!
//! This thread is the control thread: it loads configuration, starts the workers, and then waits
//! for signals — SIGHUP reloads, SIGTERM and SIGINT drain and exit.

#[cfg(feature = "demo")]
mod demo;
mod notify;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use portcullis_config::ConfigErrors;
use portcullis_server::{Server, StartError};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "portcullis", version, about = "mTLS edge proxy enforcing API-security policy")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve. SIGHUP reloads the configuration and every file it names; SIGTERM/SIGINT drain and exit.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = "config/portcullis.toml")]
        config: PathBuf,
        /// Write the process id here (removed on exit).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Load and compile a configuration and everything it names; print `ok` or every error.
    Check {
        #[arg(short, long, default_value = "config/portcullis.toml")]
        config: PathBuf,
    },
    /// A throwaway PKI, an echo backend and the proxy on 127.0.0.1:8443, with curl commands to try.
    Demo {
        #[arg(long, default_value_t = 8443)]
        port: u16,
        /// Write a demo PKI into DIR/pki (the file names config/portcullis.toml uses), then exit.
        #[arg(long, value_name = "DIR")]
        write: Option<PathBuf>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn print_errors(errors: &ConfigErrors) {
    for e in errors.iter() {
        eprintln!("error: {e}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run { config, pid_file } => run(&config, pid_file.as_deref()),
        Command::Check { config } => Ok(check(&config)),
        #[cfg(feature = "demo")]
        Command::Demo { port, write: None } => demo::run(port),
        #[cfg(feature = "demo")]
        Command::Demo { write: Some(dir), .. } => demo::write(&dir),
        #[cfg(not(feature = "demo"))]
        Command::Demo { .. } => Err(anyhow::anyhow!("this binary was built without the `demo` feature")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every problem in one pass: the configuration's own, and those of the files it names (read
/// from what was sound of it), each once, in file order.
fn check(path: &Path) -> ExitCode {
    let (config, mut errors) = portcullis_config::load_partial(path);
    let mut warnings = Vec::new();
    if let Some(config) = config {
        match portcullis_server::check(&config) {
            Ok(w) => warnings = w,
            Err(e) => errors.extend(e),
        }
    }
    errors.sort();
    errors.dedup();
    if errors.is_empty() {
        for w in &warnings {
            eprintln!("{w}");
        }
        println!("ok");
        return ExitCode::SUCCESS;
    }
    print_errors(&errors);
    eprintln!("{} error(s) in {}", errors.iter().count(), path.display());
    ExitCode::FAILURE
}

/// Starts a server on `config` and reports where it listens.
pub(crate) fn start(config: &portcullis_config::Config) -> anyhow::Result<Server> {
    match Server::start(config) {
        Ok(server) => {
            for addr in server.local_addrs() {
                tracing::info!("listening on {addr}");
            }
            Ok(server)
        }
        Err(StartError::Config(errors)) => {
            print_errors(&errors);
            anyhow::bail!("{} configuration error(s)", errors.iter().count())
        }
        Err(StartError::Io(e)) => anyhow::bail!("{e}"),
    }
}

/// Installs the handlers for SIGHUP, SIGUSR1, SIGTERM and SIGINT. Done before anything starts,
/// so that a signal during start-up is not fatal.
pub(crate) fn signals() -> anyhow::Result<Signals> {
    Signals::new([SIGHUP, SIGUSR1, SIGTERM, SIGINT]).context("installing signal handlers")
}

/// Blocks until SIGTERM/SIGINT; calls `on_hup` for each SIGHUP and `on_usr1` for each SIGUSR1.
pub(crate) fn wait_for_signals(
    signals: &mut Signals,
    mut on_hup: impl FnMut(),
    mut on_usr1: impl FnMut(),
) -> anyhow::Result<i32> {
    for signal in signals.forever() {
        match signal {
            SIGHUP => on_hup(),
            SIGUSR1 => on_usr1(),
            other => return Ok(other),
        }
    }
    Ok(SIGTERM)
}

/// Raises the soft limit on open files to the hard limit: every connection costs one or two.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write a local struct; no other memory is touched.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                tracing::warn!("could not raise the open-file limit");
            }
        }
    }
}

fn run(path: &Path, pid_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let mut signals = signals()?;
    raise_fd_limit();
    let config = match portcullis_config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            print_errors(&errors);
            anyhow::bail!("{} configuration error(s) in {}", errors.iter().count(), path.display());
        }
    };
    let mut server = start(&config)?;
    if let Some(p) = pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("writing {}", p.display()))?;
    }
    // A lost worker ends the signal loop: the process then exits non-zero instead of serving on
    // with fewer workers (and, with one, with none).
    let handle = signals.handle();
    server.on_lost_worker(move || handle.close());
    notify::state("READY=1\nSTATUS=serving");
    let mut reloads: u64 = 0;
    let reopener = server.log_reopener();
    let signal = wait_for_signals(
        &mut signals,
        || {
            reloads += 1;
            let started = std::time::Instant::now();
            notify::reloading();
            let loaded = portcullis_config::load(path);
            if let Err(errors) = &loaded {
                server.note_failed_reload(errors);
            }
            let result = loaded.and_then(|c| server.reload(&c));
            notify::state(&format!("READY=1\nSTATUS=serving generation {}", server.generation()));
            match result {
                Ok(generation) => tracing::info!(
                    reload = reloads,
                    generation,
                    millis = started.elapsed().as_millis() as u64,
                    "configuration reloaded"
                ),
                Err(errors) => {
                    for e in errors.iter() {
                        tracing::error!(reload = reloads, "{e}");
                    }
                    tracing::error!(
                        reload = reloads,
                        generation = server.generation(),
                        "reload failed; still serving the previous configuration"
                    );
                }
            }
        },
        || {
            tracing::info!("SIGUSR1: opening the access log again");
            reopener.reopen();
        },
    )?;
    let lost = server.lost_workers();
    if lost > 0 {
        tracing::error!(
            lost,
            "a worker thread is gone; stopping so that the service manager restarts the proxy"
        );
    } else {
        tracing::info!(signal, "shutting down: draining in-flight requests");
    }
    notify::state("STOPPING=1");
    let result = server.shutdown();
    if let Some(p) = pid_file {
        let _ = std::fs::remove_file(p);
    }
    if lost > 0 {
        return Ok(ExitCode::from(70)); // EX_SOFTWARE
    }
    result.context("shutting down")?;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}
