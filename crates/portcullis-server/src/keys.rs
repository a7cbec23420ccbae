//! Identity providers' keys, fetched off the data path: per `[[openid]]` provider one thread
//! fetches the discovery document, then its `jwks_uri`, over HTTPS with the provider's CAs; it
//! publishes the keys through [`RemoteKeys`] (arc-swap), refreshes them every `refresh`, retries
//! a failed fetch with a growing pause, and fetches at once when a worker is granted a refetch (a
//! token named an unknown `kid`). A failed fetch keeps the last good keys. Providers live across
//! reloads while their settings stay the same.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis_config::{Config, OpenId};
use portcullis_http::forward::BodyMode;
use portcullis_http::{ChunkedDecoder, ChunkedOutput, Decoded, HeadScanner, Limits, ResponseHead};
use portcullis_jose::{Json, KeySet, Origin, RemoteKeys};
use portcullis_tls::{BoringCrypto, ClientTls};

/// Largest discovery document or key set read.
const MAX_DOCUMENT: usize = 1 << 20;
/// Longest pause between retries of a failing provider.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// A provider's keys and the thread that fetches them.
struct Fetcher {
    settings: OpenId,
    keys: Arc<RemoteKeys>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Fetcher {
    /// Tells the thread to stop and lets it go: it may be in the middle of a fetch (up to its
    /// timeouts), and a reload or a shutdown does not wait for that.
    fn end(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
        }
    }
}

/// Whether two `[[openid]]` entries describe the same provider, fetched the same way.
fn same_provider(a: &OpenId, b: &OpenId) -> bool {
    a.name.value == b.name.value
        && a.url.value == b.url.value
        && a.ca.iter().map(|c| &c.value).eq(b.ca.iter().map(|c| &c.value))
        && (a.refresh, a.min_refetch, a.refetch_wait, a.timeout)
            == (b.refresh, b.min_refetch, b.refetch_wait, b.timeout)
}

/// Every provider of the running configuration.
#[derive(Default)]
pub(crate) struct KeyFetchers {
    fetchers: Vec<Fetcher>,
}

impl std::fmt::Debug for KeyFetchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.fetchers.iter().map(|x| x.keys.name())).finish()
    }
}

impl KeyFetchers {
    /// The providers `config` names, by name: the running ones where their settings are
    /// unchanged, new (not yet fetching) ones otherwise.
    pub(crate) fn prepare(&self, config: &Config) -> Vec<(String, Arc<RemoteKeys>)> {
        config
            .openid
            .iter()
            .map(|o| {
                let keys = match self.fetchers.iter().find(|f| same_provider(&f.settings, o)) {
                    Some(f) => f.keys.clone(),
                    None => {
                        let keys =
                            RemoteKeys::new(&o.name.value, &o.url.value, o.min_refetch, o.refetch_wait);
                        // Same provider, other fetch settings: its keys serve until the new fetch.
                        if let Some(f) = self
                            .fetchers
                            .iter()
                            .find(|f| f.keys.name() == o.name.value && f.keys.url() == o.url.value)
                        {
                            keys.seed_from(&f.keys);
                        }
                        keys
                    }
                };
                (o.name.value.clone(), keys)
            })
            .collect()
    }

    /// Makes `config`'s providers (as [`prepare`](Self::prepare) gave them) the running ones:
    /// starts fetching for the new, stops the ones no longer named.
    pub(crate) fn commit(&mut self, config: &Config, providers: &[(String, Arc<RemoteKeys>)]) {
        let mut kept = Vec::with_capacity(providers.len());
        for (o, (_, keys)) in config.openid.iter().zip(providers) {
            if let Some(i) = self.fetchers.iter().position(|f| Arc::ptr_eq(&f.keys, keys)) {
                kept.push(self.fetchers.swap_remove(i));
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let thread = spawn(o.clone(), keys.clone(), stop.clone());
            kept.push(Fetcher { settings: o.clone(), keys: keys.clone(), stop, thread });
        }
        for mut gone in self.fetchers.drain(..) {
            tracing::info!(
                provider = gone.keys.name(),
                "identity provider no longer configured; its keys are dropped"
            );
            gone.end();
        }
        self.fetchers = kept;
    }

    pub(crate) fn stop(&mut self) {
        for f in &mut self.fetchers {
            f.end();
        }
    }
}

fn spawn(settings: OpenId, keys: Arc<RemoteKeys>, stop: Arc<AtomicBool>) -> Option<JoinHandle<()>> {
    // The first fetch counts as under way from now: requests that come before it ends wait for
    // it rather than ask for another.
    keys.fetch_started();
    let name = format!("portcullis-keys-{}", settings.name.value);
    let handle = std::thread::Builder::new().name(name.chars().take(15).collect()).spawn({
        let keys = keys.clone();
        move || run(&settings, &keys, &stop)
    });
    match handle {
        Ok(h) => {
            keys.set_fetcher(h.thread().clone());
            Some(h)
        }
        Err(e) => {
            tracing::error!(provider = keys.name(), error = %e, "cannot start the key fetcher thread");
            // No fetch is under way: requests must not wait for one.
            keys.attempt_done();
            None
        }
    }
}

fn run(settings: &OpenId, keys: &RemoteKeys, stop: &AtomicBool) {
    let mut failures = 0u32;
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        keys.fetch_started();
        let wait = match fetch_once(settings) {
            Ok((set, issuer, skipped)) => {
                for why in &skipped {
                    tracing::info!(provider = %settings.name.value, "{why}");
                }
                if failures > 0 || !keys.is_loaded() {
                    tracing::info!(provider = %settings.name.value, keys = set.len(), "identity provider keys loaded");
                } else {
                    tracing::debug!(provider = %settings.name.value, keys = set.len(), "identity provider keys refreshed");
                }
                failures = 0;
                keys.publish(set, issuer);
                settings.refresh
            }
            Err(e) => {
                failures += 1;
                let wait = Duration::from_secs(1 << failures.min(6)).min(MAX_RETRY).min(settings.refresh);
                if keys.is_loaded() {
                    tracing::warn!(provider = %settings.name.value, error = %e, retry_in_s = wait.as_secs(), "identity provider fetch failed; the last keys stay");
                } else {
                    tracing::warn!(provider = %settings.name.value, error = %e, retry_in_s = wait.as_secs(), "identity provider fetch failed; its tokens are refused until keys arrive");
                }
                keys.attempt_done();
                wait
            }
        };
        // Until the next fetch is due, or a worker is granted a refetch, or the end.
        let due = Instant::now() + wait;
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            if keys.is_wanted() {
                break;
            }
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::park_timeout(due - now);
        }
    }
}

/// Fetches every provider of `config` once (for `portcullis check`): one line per provider that
/// cannot be reached or whose keys do not load. The proxy starts anyway with such a provider; its
/// tokens are refused until its keys arrive.
pub(crate) fn check_providers(config: &Config) -> Vec<String> {
    config
        .openid
        .iter()
        .filter_map(|o| {
            fetch_once(o)
                .err()
                .map(|e| format!("{}: warning: openid provider \"{}\": {e}", o.url.loc, o.name.value))
        })
        .collect()
}

/// One fetch: the discovery document, then its key set.
pub(crate) fn fetch_once(settings: &OpenId) -> Result<(KeySet, Option<String>, Vec<String>), String> {
    let tls = ClientTls::new(&settings.ca)?;
    let deadline = Instant::now() + settings.timeout;
    let discovery = https_get(&tls, &settings.url.value, deadline)?;
    let doc = Json::parse(&discovery).map_err(|e| format!("discovery document: {e}"))?;
    let jwks_uri =
        doc.get("jwks_uri").and_then(Json::as_str).ok_or("discovery document: no \"jwks_uri\"")?.to_owned();
    portcullis_config::https_url(&jwks_uri).map_err(|e| format!("discovery document: jwks_uri {e}"))?;
    let issuer = match doc.get("issuer") {
        None => None,
        Some(Json::String(s)) => Some(s.to_string()),
        Some(_) => return Err("discovery document: \"issuer\" is not a string".into()),
    };
    let jwks = https_get(&tls, &jwks_uri, Instant::now() + settings.timeout)?;
    let (set, skipped) =
        KeySet::from_jwks(&BoringCrypto, &jwks, Origin::Published).map_err(|e| format!("{jwks_uri}: {e}"))?;
    Ok((set, issuer, skipped))
}

/// Splits an `https://host[:port]/path?query` URL.
fn split_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url.strip_prefix("https://").ok_or_else(|| format!("{url}: not https"))?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().map_err(|_| format!("{url}: bad port"))?),
        _ => (authority, 443),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    Ok((host.to_owned(), port, path))
}

/// A GET over HTTPS, by `deadline`: a 200 with a body of at most [`MAX_DOCUMENT`] bytes, or an
/// error that says what went wrong. Redirects are refused.
pub(crate) fn https_get(tls: &ClientTls, url: &str, deadline: Instant) -> Result<Vec<u8>, String> {
    let (host, port, path) = split_url(url)?;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or(format!("{url}: timed out"))
    };
    let addrs: Vec<_> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("{url}: cannot resolve {host}: {e}"))?
        .collect();
    // Each address in turn (`localhost` may be ::1 and 127.0.0.1, with only one listening).
    let mut last = format!("{url}: {host} has no address");
    let mut connected = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(tcp) => {
                connected = Some(tcp);
                break;
            }
            Err(e) => last = format!("{url}: cannot connect to {addr}: {e}"),
        }
    }
    let tcp = connected.ok_or(last)?;
    tcp.set_read_timeout(Some(left()?)).map_err(|e| e.to_string())?;
    tcp.set_write_timeout(Some(left()?)).map_err(|e| e.to_string())?;
    let mut stream = tls.connect(&host, tcp)?;
    let host_field = if port == 443 { host.clone() } else { format!("{host}:{port}") };
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host_field}\r\nAccept: application/json\r\nUser-Agent: portcullis/{}\r\nConnection: close\r\n\r\n",
        env!("CARGO_PKG_VERSION")
    );
    stream.write_all(request.as_bytes()).map_err(|e| format!("{url}: {e}"))?;
    let mut buf = BytesMut::with_capacity(8192);
    let mut chunk = [0u8; 8192];
    let mut read = |buf: &mut BytesMut| -> Result<usize, String> {
        left()?;
        match stream.read(&mut chunk) {
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                Ok(n)
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                Err(format!("{url}: timed out"))
            }
            // A peer that closes without close_notify: the framing below decides whether the body is whole.
            Err(e)
                if e.kind() == std::io::ErrorKind::UnexpectedEof
                    || e.kind() == std::io::ErrorKind::ConnectionAborted =>
            {
                Ok(0)
            }
            Err(e) => Err(format!("{url}: {e}")),
        }
    };
    let limits = Limits { max_head_size: 64 * 1024, max_headers: 256 };
    let mut scanner = HeadScanner::default();
    let mut head = ResponseHead::default();
    loop {
        match scanner.scan(&mut buf, limits.max_head_size).map_err(|e| format!("{url}: {e}"))? {
            Some(len) => {
                head.parse(&mut buf, len, &limits).map_err(|e| format!("{url}: {e}"))?;
                if head.is_informational() {
                    head.clear();
                    continue;
                }
                break;
            }
            None => {
                if read(&mut buf)? == 0 {
                    return Err(format!("{url}: closed before the response head"));
                }
            }
        }
    }
    if head.status() != 200 {
        let what = if (300..400).contains(&head.status()) { " (redirects are not followed)" } else { "" };
        return Err(format!("{url}: status {}{what}", head.status()));
    }
    let (mode, _) = portcullis_http::forward::response_body(&head, false, true);
    let mut body = BytesMut::new();
    let too_large = || format!("{url}: larger than {MAX_DOCUMENT} bytes");
    match mode {
        BodyMode::None => {}
        BodyMode::Length(n) => {
            if n > MAX_DOCUMENT as u64 {
                return Err(too_large());
            }
            while (buf.len() as u64) < n {
                if read(&mut buf)? == 0 {
                    return Err(format!("{url}: closed in the middle of the body"));
                }
            }
            body.extend_from_slice(&buf[..n as usize]);
        }
        BodyMode::Chunked(_) => {
            let mut decoder = ChunkedDecoder::new(ChunkedOutput::DataOnly);
            loop {
                let done = decoder.decode(&mut buf, &mut body).map_err(|e| format!("{url}: {e}"))?;
                if body.len() > MAX_DOCUMENT {
                    return Err(too_large());
                }
                if done == Decoded::Done {
                    break;
                }
                if read(&mut buf)? == 0 {
                    return Err(format!("{url}: closed in the middle of the body"));
                }
            }
        }
        BodyMode::UntilClose { .. } => loop {
            if buf.len() > MAX_DOCUMENT {
                return Err(too_large());
            }
            if read(&mut buf)? == 0 {
                body = buf;
                break;
            }
        },
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(split_url("https://idp/x"), Ok(("idp".into(), 443, "/x".into())));
        assert_eq!(split_url("https://idp:8443"), Ok(("idp".into(), 8443, "/".into())));
        assert_eq!(split_url("https://[::1]:9/a?b"), Ok(("::1".into(), 9, "/a?b".into())));
        assert_eq!(split_url("https://idp?q"), Ok(("idp".into(), 443, "/?q".into())));
        assert!(split_url("http://idp/").is_err());
        assert!(split_url("https://:9/").is_err());
        assert!(split_url("https://idp:x/").is_err());
    }
}
