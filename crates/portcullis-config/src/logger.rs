//! `[[logger]]` (where request logs go: Kafka, or Azure Event Hubs' Kafka endpoint) and the
//! `log_to_eventhub` step that writes to one.

use std::time::Duration;

use toml::de::DeTable;

use crate::load::required;
use crate::model::{LogCompression, LogToEventhub, Logger, Sasl, StepKind};
use crate::reader::{Reader, Value, get, join};
use crate::{Config, Located};

const LOGGER_KEYS: [&str; 19] = [
    "name",
    "id",
    "kind",
    "bootstrap",
    "topic",
    "tls",
    "sasl",
    "partition_key",
    "linger",
    "max_batch",
    "compression",
    "retries",
    "retry_backoff",
    "retry_backoff_max",
    "buffer",
    "queue",
    "timeout",
    "acks",
    "drain",
];

/// A `host:port` of a broker.
fn broker(text: &str) -> Result<(String, u16), String> {
    let bad = || format!("\"{text}\" is not host:port");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u16 = port.parse().ok().filter(|&p| p > 0).ok_or_else(bad)?;
    if host.is_empty() || host.bytes().any(|b| b <= b' ' || b >= 0x7f || b == b'/' || b == b'@') {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn bounded_duration(
    r: &mut Reader,
    t: &DeTable<'_>,
    field: &str,
    key: &str,
    default: Duration,
    (min, max): (Duration, Duration),
) -> Duration {
    let Some(v) = get(t, key) else { return default };
    let f = join(field, key);
    match r.duration(v, &f) {
        Some(d) if d >= min && d <= max => d,
        Some(_) => {
            r.error(&v.span(), &f, format!("must be between {min:?} and {max:?}"));
            default
        }
        None => default,
    }
}

fn bounded_integer(r: &mut Reader, t: &DeTable<'_>, field: &str, key: &str, default: i64, max: i64) -> i64 {
    match get(t, key) {
        Some(v) => r.integer(v, &join(field, key), 1..max + 1).unwrap_or(default),
        None => default,
    }
}

pub(crate) fn logger(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Logger> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &LOGGER_KEYS);
    // `id` is API Management's word (`logger-id`); `name` is this file's.
    let name = match (get(t, "name"), get(t, "id")) {
        (Some(_), Some(id)) => {
            r.error(&id.span(), &join(field, "id"), "give the logger a name or an id, not both");
            None
        }
        (Some(n), None) => r.non_empty_string(n, &join(field, "name")),
        (None, Some(n)) => r.non_empty_string(n, &join(field, "id")),
        (None, None) => {
            required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")))
        }
    };
    let kind =
        required(r, t, v, field, "kind").and_then(|k| r.choice(k, &join(field, "kind"), &[("kafka", ())]));
    let mut bootstrap = Vec::new();
    if let Some(b) = required(r, t, v, field, "bootstrap") {
        let f = join(field, "bootstrap");
        let list = match b.get_ref() {
            toml::de::DeValue::String(_) => r.string(b, &f).into_iter().collect(),
            _ => r.strings(b, &f),
        };
        for entry in list {
            match broker(&entry.value) {
                Ok(hp) => bootstrap.push(hp),
                Err(e) => r.errors.push(entry.loc.error(e)),
            }
        }
        if bootstrap.is_empty() && r.errors.is_empty() {
            r.error(&b.span(), &f, "name at least one broker");
        }
    }
    let topic = required(r, t, v, field, "topic").and_then(|x| r.non_empty_string(x, &join(field, "topic")));
    if let Some(topic) = &topic
        && (topic.value.len() > 249
            || !topic.value.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)))
    {
        r.errors.push(topic.loc.error("a topic name is 1 to 249 of a-z, A-Z, 0-9, '.', '_' and '-'"));
    }
    let tls = get(t, "tls").and_then(|x| tls(r, x, &join(field, "tls")));
    let sasl = get(t, "sasl").and_then(|x| sasl(r, x, &join(field, "sasl")));
    let partition_key = get(t, "partition_key").and_then(|x| r.string(x, &join(field, "partition_key")));
    let linger = bounded_duration(
        r,
        t,
        field,
        "linger",
        Duration::from_millis(20),
        (Duration::ZERO, Duration::from_secs(10)),
    );
    let max_batch = bounded_integer(r, t, field, "max_batch", 512 * 1024, 64 << 20) as usize;
    let compression = match get(t, "compression") {
        Some(c) => r
            .choice(
                c,
                &join(field, "compression"),
                &[
                    ("none", LogCompression::None),
                    ("gzip", LogCompression::Gzip),
                    ("snappy", LogCompression::Snappy),
                    ("lz4", LogCompression::Lz4),
                    ("zstd", LogCompression::Zstd),
                ],
            )
            .unwrap_or(LogCompression::None),
        None => LogCompression::None,
    };
    let retries = match get(t, "retries") {
        Some(x) => r.integer(x, &join(field, "retries"), 0..1001).unwrap_or(5) as u32,
        None => 5,
    };
    let retry_backoff = bounded_duration(
        r,
        t,
        field,
        "retry_backoff",
        Duration::from_millis(100),
        (Duration::from_millis(1), Duration::from_secs(60)),
    );
    let retry_backoff_max = bounded_duration(
        r,
        t,
        field,
        "retry_backoff_max",
        Duration::from_secs(2),
        (Duration::from_millis(1), Duration::from_secs(300)),
    )
    .max(retry_backoff);
    let buffer = bounded_integer(r, t, field, "buffer", 32 << 20, 1 << 34) as usize;
    // The queue's slots are allocated at start (about 80 bytes each).
    let queue = bounded_integer(r, t, field, "queue", 65_536, 1 << 20) as usize;
    let timeout = bounded_duration(
        r,
        t,
        field,
        "timeout",
        Duration::from_secs(10),
        (Duration::from_millis(100), Duration::from_secs(300)),
    );
    let drain = bounded_duration(
        r,
        t,
        field,
        "drain",
        Duration::from_secs(2),
        (Duration::ZERO, Duration::from_secs(300)),
    );
    let acks = match get(t, "acks") {
        Some(a) => {
            r.choice(a, &join(field, "acks"), &[("all", -1i16), ("leader", 1), ("none", 0)]).unwrap_or(-1)
        }
        None => -1,
    };
    kind?;
    Some(Logger {
        name: name?,
        bootstrap,
        topic: topic?.value,
        tls,
        sasl,
        partition_key,
        linger,
        max_batch,
        compression,
        retries,
        retry_backoff,
        retry_backoff_max,
        buffer,
        queue,
        timeout,
        acks,
        drain,
        loc: r.loc(&v.span(), field),
    })
}

/// `tls = { ca = … }` (the system's CAs when `ca` is left out), or `tls = true`.
fn tls(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Vec<Located<std::path::PathBuf>>> {
    if let toml::de::DeValue::Boolean(b) = v.get_ref() {
        return b.then(Vec::new);
    }
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["ca"]);
    Some(get(t, "ca").map(|c| r.paths(c, &join(field, "ca"))).unwrap_or_default())
}

/// `sasl = { mechanism = "PLAIN", username, password_file }`.
fn sasl(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Sasl> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["mechanism", "username", "password_file"]);
    let mechanism = match get(t, "mechanism") {
        Some(m) => r.choice(m, &join(field, "mechanism"), &[("PLAIN", ())]),
        None => Some(()),
    };
    let username =
        required(r, t, v, field, "username").and_then(|u| r.non_empty_string(u, &join(field, "username")));
    let password_file =
        required(r, t, v, field, "password_file").and_then(|p| r.path(p, &join(field, "password_file")));
    mechanism?;
    Some(Sasl { username: username?.value, password_file: password_file? })
}

const STEP_KEYS: [&str; 4] = ["logger_id", "message", "partition_id", "partition_key"];

/// `log_to_eventhub = { logger_id, message, partition_id, partition_key }`.
pub(crate) fn log_to_eventhub(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<LogToEventhub> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &STEP_KEYS);
    let logger_id =
        required(r, t, v, field, "logger_id").and_then(|l| r.non_empty_string(l, &join(field, "logger_id")));
    let message =
        required(r, t, v, field, "message").and_then(|m| r.non_empty_string(m, &join(field, "message")));
    let partition_id = match get(t, "partition_id") {
        Some(p) => Some(r.integer(p, &join(field, "partition_id"), 0..100_000)? as u32),
        None => None,
    };
    let partition_key = get(t, "partition_key").and_then(|k| r.string(k, &join(field, "partition_key")));
    if partition_id.is_some()
        && let (Some(k), Some(_)) = (get(t, "partition_key"), &partition_key)
    {
        r.error(&k.span(), &join(field, "partition_key"), "give a partition_id or a partition_key, not both");
        return None;
    }
    Some(LogToEventhub { logger_id: logger_id?, message: message?, partition_id, partition_key })
}

/// Logger names are unique, and every `log_to_eventhub` and the access log name one.
pub(crate) fn cross_check(r: &mut Reader, c: &Config) {
    let mut seen: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    for l in &c.loggers {
        if let Some(first) = seen.insert(&l.name.value, l.name.loc.line) {
            r.errors.push(
                l.name
                    .loc
                    .error(format!("logger \"{}\" is defined twice (first at line {first})", l.name.value)),
            );
        }
    }
    let known = || {
        if c.loggers.is_empty() {
            "no [[logger]] is defined".to_owned()
        } else {
            let names: Vec<String> = c.loggers.iter().map(|l| format!("\"{}\"", l.name.value)).collect();
            format!("known: {}", names.join(", "))
        }
    };
    for step in c.all_steps() {
        if let StepKind::LogToEventhub(s) = &step.kind
            && !c.loggers.iter().any(|l| l.name.value == s.logger_id.value)
        {
            r.errors.push(s.logger_id.loc.error(format!(
                "no logger named \"{}\" ({})",
                s.logger_id.value,
                known()
            )));
        }
    }
    if let Some(a) = &c.server.access_log
        && let Some(name) = &a.logger
        && !c.loggers.iter().any(|l| l.name.value == name.value)
    {
        r.errors.push(name.loc.error(format!("no logger named \"{}\" ({})", name.value, known())));
    }
}

#[cfg(test)]
mod tests {
    use super::broker;

    #[test]
    fn brokers_are_host_and_port() {
        assert_eq!(
            broker("a.servicebus.windows.net:9093"),
            Ok(("a.servicebus.windows.net".to_owned(), 9093))
        );
        assert_eq!(broker("[::1]:9092"), Ok(("::1".to_owned(), 9092)));
        for bad in ["host", "host:0", "host:x", ":9092", "a b:1", "user@h:1", "h:99999"] {
            assert!(broker(bad).is_err(), "{bad}");
        }
    }
}
