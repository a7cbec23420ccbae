//! `[[logger]]`: a Kafka producer per logger (on a thread of its own), shared by the snapshots
//! that configure it alike, so that a reload which leaves a logger as it was keeps its
//! connection and buffer; one that changes it starts a new producer, and the old one sends what
//! it holds (for at most its `drain`) and ends. Counts are kept by logger name across both.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use portcullis_config::{ConfigError, LogCompression, Logger};
use portcullis_kafka::{Compression, Connector, Error, Producer, Settings, Stats, Stream};
use portcullis_tls::ClientTls;

/// Brokers over TLS: the proxy's BoringSSL, the brokers' chain and name verified.
struct TlsConnector {
    tls: ClientTls,
}

impl Connector for TlsConnector {
    fn connect(&self, host: &str, port: u16, timeout: Duration) -> Result<Box<dyn Stream>, Error> {
        let tcp = portcullis_kafka::wire::tcp(host, port, timeout)?;
        let tls = self.tls.connect(host, tcp).map_err(Error::Io)?;
        Ok(Box::new(tls))
    }
}

/// What makes two loggers the same producer.
#[derive(PartialEq)]
struct Key {
    settings: Settings,
    /// The CA files and their contents (a rotated CA file takes effect on reload).
    tls: Option<Vec<(std::path::PathBuf, Vec<u8>)>>,
}

struct Live {
    key: Key,
    producer: Weak<Producer>,
}

static LIVE: Mutex<Vec<Live>> = Mutex::new(Vec::new());
static STATS: Mutex<Vec<(String, Arc<Stats>)>> = Mutex::new(Vec::new());

/// The counts of logger `name` (the same across reloads).
pub(crate) fn stats_of(name: &str) -> Arc<Stats> {
    let mut all = STATS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, s)) = all.iter().find(|(n, _)| n == name) {
        return Arc::clone(s);
    }
    let s = Arc::new(Stats::default());
    all.push((name.to_owned(), Arc::clone(&s)));
    s
}

fn settings(l: &Logger) -> Result<Settings, ConfigError> {
    let mut s = Settings::new(&l.name.value, l.bootstrap.clone(), &l.topic);
    if let Some(sasl) = &l.sasl {
        let password = std::fs::read_to_string(&sasl.password_file.value)
            .map_err(|e| sasl.password_file.loc.error(format!("cannot read the password file: {e}")))?;
        let password = password.trim_end_matches(['\r', '\n']).to_owned();
        if password.is_empty() {
            return Err(sasl.password_file.loc.error("the password file is empty"));
        }
        s.sasl = Some((sasl.username.clone(), password));
    }
    s.linger = l.linger;
    s.max_batch = l.max_batch;
    s.compression = match l.compression {
        LogCompression::None => Compression::None,
        LogCompression::Gzip => Compression::Gzip,
        LogCompression::Snappy => Compression::Snappy,
        LogCompression::Lz4 => Compression::Lz4,
        LogCompression::Zstd => Compression::Zstd,
    };
    s.retries = l.retries;
    s.backoff = l.retry_backoff;
    s.max_backoff = l.retry_backoff_max;
    s.buffer = l.buffer;
    s.queue = l.queue;
    s.timeout = l.timeout;
    s.acks = l.acks;
    s.drain = l.drain;
    Ok(s)
}

/// The connector a logger's producer uses: TLS with its CAs, or plain TCP.
fn connector_of(l: &Logger) -> Result<Arc<dyn Connector>, ConfigError> {
    Ok(match &l.tls {
        None => Arc::new(portcullis_kafka::TcpConnector),
        Some(ca) => {
            let at = ca.first().map_or(&l.loc, |c| &c.loc);
            let tls = ClientTls::new(ca).map_err(|e| at.error(format!("logger TLS: {e}")))?;
            Arc::new(TlsConnector { tls })
        }
    })
}

/// How long `portcullis check` waits for one broker's step (connecting, TLS, each answer) at most,
/// whatever the logger's `timeout`.
const CHECK_STEP: Duration = Duration::from_secs(5);
/// How long it waits for all the loggers' brokers together.
const CHECK_ALL: Duration = Duration::from_secs(20);

/// What `portcullis check` says of each `[[logger]]`'s brokers: a warning when none of them
/// answers for the topic as the producer would ask (connected, TLS and SASL included), with what
/// each said, or when some of the topic's partitions have no leader. The proxy would start all
/// the same, and hold messages in the buffer until a broker answers. The loggers are asked at
/// once, each on a thread of its own; one still asking after [`CHECK_ALL`] is said to be.
pub(crate) fn check(loggers: &[Logger]) -> Vec<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    // Which loggers are asked: those whose settings load (the others are errors already).
    let mut asked = vec![false; loggers.len()];
    for (i, l) in loggers.iter().enumerate() {
        // A logger whose settings or TLS do not load is already an error of the configuration.
        let (Ok(mut settings), Ok(connector)) = (settings(l), connector_of(l)) else { continue };
        settings.timeout = settings.timeout.min(CHECK_STEP);
        let tx = tx.clone();
        let spawned = std::thread::Builder::new().name("portcullis-check".into()).spawn(move || {
            let _ = tx.send((i, portcullis_kafka::probe(&settings, &*connector)));
        });
        asked[i] = spawned.is_ok();
    }
    drop(tx);
    let deadline = Instant::now() + CHECK_ALL;
    let mut said: Vec<Option<Result<(usize, usize), String>>> = vec![None; loggers.len()];
    for _ in asked.iter().filter(|&&a| a) {
        let Ok((i, answer)) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) else {
            break;
        };
        said[i] = Some(answer);
    }
    let mut warnings = Vec::new();
    for ((l, answer), asked) in loggers.iter().zip(said).zip(asked) {
        let (name, topic) = (&l.name.value, &l.topic);
        match answer {
            Some(Ok((_, 0))) => {}
            Some(Ok((partitions, leaderless))) => warnings.push(format!(
                "{}: warning: logger \"{name}\": {leaderless} of the {partitions} partitions of topic \"{topic}\" have no leader now; their messages would wait",
                l.loc
            )),
            Some(Err(e)) => warnings.push(format!(
                "{}: warning: logger \"{name}\": {e}; the proxy would start, and hold messages in its buffer until a broker answers for the topic",
                l.loc
            )),
            None if asked => warnings.push(format!(
                "{}: warning: logger \"{name}\": its brokers did not answer for topic \"{topic}\" within {} s",
                l.loc,
                CHECK_ALL.as_secs()
            )),
            None => {}
        }
    }
    warnings
}

/// The producer of each `[[logger]]`, in order: the one already running for the same settings,
/// or a new one.
pub(crate) fn compile(loggers: &[Logger]) -> Result<Vec<Arc<Producer>>, ConfigError> {
    let mut out = Vec::with_capacity(loggers.len());
    for l in loggers {
        let settings = settings(l)?;
        let tls = match &l.tls {
            None => None,
            Some(ca) => {
                let mut files = Vec::with_capacity(ca.len());
                for c in ca {
                    let bytes =
                        std::fs::read(&c.value).map_err(|e| c.loc.error(format!("cannot read: {e}")))?;
                    files.push((c.value.clone(), bytes));
                }
                Some(files)
            }
        };
        let key = Key { settings, tls };
        let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|l| l.producer.strong_count() > 0);
        if let Some(p) = live.iter().find(|x| x.key == key).and_then(|x| x.producer.upgrade()) {
            out.push(p);
            continue;
        }
        let connector = connector_of(l)?;
        let producer = Producer::start_with(key.settings.clone(), connector, stats_of(&l.name.value))
            .map_err(|e| l.loc.error(format!("cannot start the logger's thread: {e}")))?;
        let producer = Arc::new(producer);
        live.push(Live { key, producer: Arc::downgrade(&producer) });
        out.push(producer);
    }
    Ok(out)
}
