//! Everything compiled from one configuration, swapped as a whole on reload.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use boring::hash::MessageDigest;
use bytes::Bytes;
use portcullis_config::{Config, ConfigErrors};
use portcullis_http::Limits;
use portcullis_jose::RemoteKeys;
use portcullis_policy::{Counters, Inputs, IpSet, PolicySet};
use portcullis_tls::{BoringCrypto, RevocationSet, TicketKeys, TlsAcceptor};

use crate::upstream::{PoolKey, Target, UpstreamTls};

/// A listener's PROXY protocol settings.
#[derive(Debug)]
pub(crate) struct ProxyProtocol {
    /// Who may send the header (`None`: anyone).
    pub(crate) from: Option<IpSet>,
}

/// A backend, resolved.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) name: String,
    /// Prepended to forwarded paths ("" for none).
    pub(crate) base_path: Bytes,
    /// Its servers are reached over TLS.
    pub(crate) https: bool,
    pub(crate) response_timeout: Duration,
    /// Where its connections go (one per server), and how the worker's pool keeps them.
    pub(crate) servers: Vec<Server>,
    pub(crate) balance: portcullis_config::Balance,
    pub(crate) eject_after: u32,
    pub(crate) eject_for: Duration,
    pub(crate) health_check: Option<portcullis_config::HealthCheck>,
}

/// One server of a backend.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) target: Target,
    pub(crate) health: Arc<crate::balance::Health>,
    /// `host:port` as configured, for logs.
    pub(crate) name: String,
}

#[derive(Debug)]
pub(crate) struct Route {
    /// Index into `Config::apis` and `PolicySet::apis`.
    pub(crate) api: usize,
    pub(crate) name: String,
    pub(crate) backend: usize,
    pub(crate) prefix: Bytes,
    /// Lower-case host without port.
    pub(crate) host: Option<Bytes>,
    /// Its requests by status class, per worker.
    pub(crate) counters: Arc<crate::stats::ApiCounters>,
}

impl Route {
    /// The part of `path` after this route's prefix (what operations are matched against).
    pub(crate) fn rest_of<'p>(&self, path: &'p [u8]) -> &'p [u8] {
        if self.prefix.as_ref() == b"/" { path } else { &path[self.prefix.len().min(path.len())..] }
    }
}

/// Host + path → API, most specific first.
#[derive(Debug, Default)]
pub(crate) struct Router {
    routes: Vec<Route>,
}

impl Router {
    pub(crate) fn routes(&self) -> &[Route] {
        &self.routes
    }

    fn new(mut routes: Vec<Route>) -> Router {
        // Longest prefix first; at equal length, a host-specific route before a host-less one.
        routes.sort_by(|a, b| {
            b.prefix.len().cmp(&a.prefix.len()).then(b.host.is_some().cmp(&a.host.is_some()))
        });
        Router { routes }
    }

    /// The route for a request. `host` is the `Host` (or absolute-form authority) as received.
    pub(crate) fn find(&self, host: Option<&[u8]>, path: &[u8]) -> Option<&Route> {
        let host = host.map(strip_port);
        self.routes.iter().find(|r| {
            if let Some(h) = &r.host
                && !host.is_some_and(|req| req.eq_ignore_ascii_case(h))
            {
                return false;
            }
            prefix_matches(&r.prefix, path)
        })
    }
}

/// `/todo` matches `/todo`, `/todo/…` and `/todo?…`, never `/todos`.
fn prefix_matches(prefix: &[u8], path: &[u8]) -> bool {
    if prefix == b"/" {
        return path.starts_with(b"/");
    }
    path.starts_with(prefix) && matches!(path.get(prefix.len()), None | Some(b'/') | Some(b'?'))
}

/// The host of a `Host` value (or absolute-form authority): `name`, `name:port`, `[v6]:port`.
pub(crate) fn strip_port(host: &[u8]) -> &[u8] {
    if host.starts_with(b"[") {
        // [v6]:port
        return match host.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|&b| b == b':') {
        Some(i) => &host[..i],
        None => host,
    }
}

/// The path sent to the backend: the backend URL's path, then what follows the API prefix.
pub(crate) fn forwarded_path(route: &Route, backend: &Backend, path: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let rest = if route.prefix.as_ref() == b"/" { path } else { &path[route.prefix.len().min(path.len())..] };
    out.extend_from_slice(&backend.base_path);
    if !rest.starts_with(b"/")
        && (backend.base_path.is_empty() || !rest.is_empty() && !rest.starts_with(b"?"))
    {
        out.push(b'/');
    }
    out.extend_from_slice(rest);
}

/// One compiled configuration.
pub struct Snapshot {
    pub(crate) generation: u64,
    pub(crate) listeners: Vec<TlsAcceptor>,
    /// Per listener (indexed like `listeners`): the PROXY protocol header that comes first, if one
    /// does.
    pub(crate) proxy_protocol: Vec<Option<ProxyProtocol>>,
    pub(crate) router: Router,
    pub(crate) backends: Vec<Backend>,
    pub(crate) policies: PolicySet,
    pub(crate) limits: Limits,
    pub(crate) server: portcullis_config::Server,
    /// Open client connections per worker before accepting waits (`server.max_connections`, or
    /// sized from the open-file limit).
    pub(crate) max_connections: usize,
    /// Every CRL of this configuration, merged (with each issuer's CRL number).
    pub(crate) revoked: Arc<RevocationSet>,
    /// Where rate-limit and quota counts are shared with other hosts (`[server.redis]`).
    pub(crate) fleet: Option<Arc<crate::fleet::FleetLink>>,
    /// Where callouts go, indexed like the policy set's callout targets.
    pub(crate) callouts: Vec<Callout>,
    /// The identity providers' keys, by name (`/ready` waits for them).
    pub(crate) providers: Vec<(String, Arc<RemoteKeys>)>,
    /// When the configuration's certificates expire (for `/metrics`): (kind, listener address,
    /// file, Unix seconds).
    pub(crate) expiry: Vec<(&'static str, String, String, i64)>,
    /// The producer of each `[[logger]]`, indexed as the configuration lists them.
    pub(crate) loggers: Vec<Arc<portcullis_kafka::Producer>>,
    /// Some step writes to a logger (outbound steps then get the request's method and path).
    pub(crate) log_steps: bool,
}

/// The first address `host:port` resolves to, at load. Under the fuzzer, names are not looked
/// up (each lookup costs a round of the system's resolver, and the fuzzer makes millions):
/// address literals and `localhost` only.
pub(crate) fn resolve(authority: &str) -> std::io::Result<Option<std::net::SocketAddr>> {
    #[cfg(fuzzing)]
    {
        let local = authority.strip_prefix("localhost:").map(|port| format!("127.0.0.1:{port}"));
        return Ok(local.as_deref().unwrap_or(authority).parse().ok());
    }
    #[cfg(not(fuzzing))]
    std::net::ToSocketAddrs::to_socket_addrs(authority).map(|mut a| a.next())
}

/// When the server certificates (the leaf of each chain) and the client CAs of the listeners
/// expire.
fn expiry_of(config: &Config) -> Vec<(&'static str, String, String, i64)> {
    let mut out = Vec::new();
    for l in &config.listeners {
        let bind = l.bind.value.to_string();
        let servers = std::iter::once(&l.certificate.cert).chain(l.sni.iter().map(|s| &s.certificate.cert));
        for file in servers {
            if let Some(leaf) =
                portcullis_tls::load_certificates(file).ok().and_then(|c| c.into_iter().next())
            {
                out.push((
                    "server",
                    bind.clone(),
                    file.value.display().to_string(),
                    portcullis_tls::not_after_unix(&leaf),
                ));
            }
        }
        let cas = l.client.client_ca.iter().chain(l.sni.iter().flat_map(|s| s.client.client_ca.iter()));
        for file in cas {
            for (i, ca) in portcullis_tls::load_certificates(file).unwrap_or_default().iter().enumerate() {
                let name = format!("{}#{i}", file.value.display());
                out.push(("ca", bind.clone(), name, portcullis_tls::not_after_unix(ca)));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// A callout's destination, resolved.
#[derive(Debug)]
pub(crate) struct Callout {
    pub(crate) target: Target,
    /// For the whole callout.
    pub(crate) timeout: Duration,
    /// `host:port`, for logs.
    pub(crate) name: String,
}

/// How long a pooled connection to a callout's service is kept idle, and how many per worker.
const CALLOUT_IDLE: Duration = Duration::from_secs(30);
const CALLOUT_MAX_IDLE: usize = 16;

/// The TLS context of a backend: its trust, the proxy's certificate (named, or found in
/// `[certificates]` by thumbprint), the server name. A context made from the same files and
/// settings as one still in use is that one, so that a reload which changes nothing of it keeps
/// its pooled connections and sessions.
fn upstream_tls(
    t: &portcullis_config::BackendTls,
    (what, loc): (&str, &portcullis_config::Loc),
    config: &Config,
    thumbprints: &HashMap<String, [u8; 20]>,
) -> Result<Arc<UpstreamTls>, portcullis_config::ConfigError> {
    static CONTEXTS: std::sync::Mutex<Vec<(u64, std::sync::Weak<UpstreamTls>)>> =
        std::sync::Mutex::new(Vec::new());
    let named = match (&t.certificate, &t.certificate_thumbprint) {
        (Some(name), _) => {
            let found = config.certificates.iter().find(|c| c.name.value == name.value);
            if found.is_none() {
                return Err(name
                    .loc
                    .error(format!("no certificate named \"{}\" in [certificates]", name.value)));
            }
            found
        }
        (None, Some(thumb)) => {
            let found = thumbprints
                .iter()
                .find(|(_, sha1)| portcullis_tls::hex_upper(&sha1[..]) == thumb.value)
                .and_then(|(name, _)| config.certificates.iter().find(|c| &c.name.value == name));
            if found.is_none() {
                return Err(thumb
                    .loc
                    .error(format!("no certificate in [certificates] has the thumbprint {}", thumb.value)));
            }
            found
        }
        (None, None) => None,
    };
    let identity =
        named.and_then(|c| c.key.as_ref().map(|key| portcullis_tls::ClientIdentity { cert: &c.cert, key }));
    if named.is_some() && identity.is_none() {
        return Err(loc.error("the client certificate has no key in [certificates]"));
    }
    // What the context is made of, for its id.
    let mut digest = boring::sha::Sha256::new();
    let mut add_file = |p: &std::path::Path| {
        digest.update(&std::fs::read(p).unwrap_or_default());
        digest.update(&[0]);
    };
    t.ca.iter().for_each(|c| add_file(&c.value));
    if let Some(id) = &identity {
        add_file(&id.cert.value);
        add_file(&id.key.value);
    }
    digest.update(t.server_name.as_bytes());
    digest.update(&[u8::from(t.verify), u8::from(t.ca.is_empty())]);
    let id = u64::from_le_bytes(digest.finish()[..8].try_into().unwrap_or_default()).max(1);
    if !t.verify {
        tracing::warn!(
            to = what,
            "TLS is not verified (verify = false): anyone on the path can pose as the server"
        );
    }
    let mut contexts = CONTEXTS.lock().unwrap_or_else(|e| e.into_inner());
    contexts.retain(|(_, w)| w.strong_count() > 0);
    if let Some(same) = contexts.iter().find(|(i, _)| *i == id).and_then(|(_, w)| w.upgrade()) {
        return Ok(same);
    }
    let loc = t.ca.first().map_or(loc, |c| &c.loc);
    let client = portcullis_tls::ClientTls::with(&t.ca, identity, t.verify).map_err(|e| loc.error(e))?;
    let tls = Arc::new(UpstreamTls { client, server_name: t.server_name.clone(), id });
    contexts.push((id, Arc::downgrade(&tls)));
    Ok(tls)
}

/// Connections per worker when `server.max_connections` is not set: the open-file limit, less a
/// reserve for listeners, files and logs, split between the workers, two descriptors a
/// connection (the client's and a backend's).
pub(crate) fn default_max_connections(workers: usize) -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(1 << 20);
    let usable = usize::try_from(soft).unwrap_or(usize::MAX).saturating_sub(256);
    (usable / 2 / workers.max(1)).max(16)
}

/// Worker threads for a configuration (`0`: one per available core).
pub(crate) fn worker_count(server: &portcullis_config::Server) -> usize {
    match server.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Loads every file the configuration names and compiles it; reports every error.
    /// `providers` are the `[[openid]]` providers' shared keys, by name (see `KeyFetchers`);
    /// `counters` the host's rate-limit and quota counts (both outlive a reload).
    pub fn compile(
        config: &Config,
        keys: &TicketKeys,
        generation: u64,
        providers: Vec<(String, Arc<RemoteKeys>)>,
        counters: Arc<Counters>,
    ) -> Result<Snapshot, ConfigErrors> {
        let kept = crate::stats::Kept::default();
        Snapshot::compile_keeping(config, keys, generation, providers, counters, &kept)
    }

    /// [`Snapshot::compile`], finding the metrics a server keeps across reloads in `kept`.
    pub(crate) fn compile_keeping(
        config: &Config,
        keys: &TicketKeys,
        generation: u64,
        providers: Vec<(String, Arc<RemoteKeys>)>,
        counters: Arc<Counters>,
        kept: &crate::stats::Kept,
    ) -> Result<Snapshot, ConfigErrors> {
        let mut errors = ConfigErrors::default();
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            match TlsAcceptor::build(l, keys) {
                Ok(a) => listeners.push(a),
                Err(e) => errors.extend(e),
            }
        }
        let proxy_protocol = config
            .listeners
            .iter()
            .map(|l| {
                let from = (!l.proxy_protocol_from.is_empty())
                    .then(|| IpSet::new(l.proxy_protocol_from.iter().map(|r| r.value)));
                l.proxy_protocol.then_some(ProxyProtocol { from })
            })
            .collect();
        // Revocation is checked again on every request, against every CRL of this configuration.
        let mut revoked = RevocationSet::default();
        for acceptor in &listeners {
            for set in acceptor.revocation_sets() {
                revoked.merge(set);
            }
        }
        let mut certificates = HashMap::new();
        let mut certificate_keys = HashMap::new();
        for named in &config.certificates {
            match portcullis_tls::load_certificates(&named.cert) {
                Ok(certs) => {
                    match certs[0].digest(MessageDigest::sha1()) {
                        Ok(d) => {
                            let mut sha1 = [0u8; 20];
                            sha1.copy_from_slice(&d);
                            certificates.insert(named.name.value.clone(), sha1);
                        }
                        Err(e) => errors.push(named.cert.loc.error(e.to_string())),
                    }
                    match portcullis_tls::public_key_der_of(&certs[0]) {
                        Ok(der) => {
                            certificate_keys.insert(named.name.value.clone(), der);
                        }
                        Err(e) => errors.push(named.cert.loc.error(e)),
                    }
                }
                Err(e) => errors.push(e),
            }
            if let Some(key) = &named.key
                && let Err(e) = portcullis_tls::load_private_key(key)
            {
                errors.push(e);
            }
        }
        let mut backends = Vec::with_capacity(config.backends.len());
        for b in &config.backends {
            let what = format!("backend {}", b.name.value);
            let mut servers = Vec::with_capacity(b.servers.len());
            for s in &b.servers {
                // Each server is checked against its own host, unless a name was given.
                let tls = match &b.tls {
                    None => None,
                    Some(t) => {
                        let mut t = t.clone();
                        if !t.server_name_given {
                            t.server_name = portcullis_config::host_of(&s.value).to_owned();
                        }
                        match upstream_tls(&t, (&what, &s.loc), config, &certificates) {
                            Ok(tls) => Some(tls),
                            Err(e) => {
                                errors.push(e);
                                break;
                            }
                        }
                    }
                };
                let addr = match resolve(&s.value) {
                    Ok(Some(addr)) => addr,
                    Ok(None) | Err(_) => {
                        errors.push(s.loc.error(format!("cannot resolve \"{}\"", s.value)));
                        continue;
                    }
                };
                let key = PoolKey {
                    addr,
                    authority: Bytes::from(s.value.clone().into_bytes()),
                    tls: tls.as_ref().map_or(0, |t| t.id),
                };
                // A host name (not an address) is resolved again by the control side.
                let named = portcullis_config::host_of(&s.value).parse::<std::net::IpAddr>().is_err();
                let health = crate::balance::Health::of(kept, &b.name.value, &key);
                // Without checks (any more), no earlier check keeps the server out.
                if b.health_check.is_none() {
                    health.checked_down.store(false, std::sync::atomic::Ordering::Relaxed);
                }
                servers.push(Server {
                    health,
                    target: Target {
                        key,
                        resolved: named.then(|| Arc::new(arc_swap::ArcSwap::from_pointee(addr))),
                        counters: Some(crate::stats::PoolCounters::of(
                            kept,
                            &b.name.value,
                            &s.value,
                            worker_count(&config.server),
                        )),
                        tls: tls.clone(),
                        connect_timeout: b.connect_timeout,
                        idle_timeout: b.idle_timeout,
                        max_idle: b.max_idle,
                    },
                    name: s.value.clone(),
                });
            }
            if servers.len() != b.servers.len() {
                continue;
            }
            backends.push(Backend {
                name: b.name.value.clone(),
                base_path: Bytes::from(b.base_path.clone().into_bytes()),
                https: b.tls.is_some(),
                response_timeout: b.response_timeout,
                servers,
                balance: b.balance,
                eject_after: b.eject_after,
                eject_for: b.eject_for,
                health_check: b.health_check.clone(),
            });
        }
        let fleet = match config.server.redis.as_ref().map(crate::fleet::FleetLink::compile) {
            Some(Ok(link)) => Some(Arc::new(link)),
            Some(Err(e)) => {
                errors.extend(e);
                None
            }
            None => None,
        };
        let revoked = Arc::new(revoked);
        // Named certificates by thumbprint, for the callouts' TLS (compiled with the policies).
        let thumbprints = certificates.clone();
        let providers_kept = providers.clone();
        let inputs = Inputs {
            certificates,
            certificate_keys,
            revoked: revoked.clone(),
            crypto: Some(Arc::new(BoringCrypto)),
            providers,
            counters: Some(counters),
        };
        let policies = match portcullis_policy::compile(config, &inputs) {
            Ok(p) => p,
            Err(e) => {
                errors.extend(e);
                PolicySet::default()
            }
        };
        let mut callouts = Vec::with_capacity(policies.callout_targets().len());
        for c in policies.callout_targets() {
            let addr = match resolve(&c.authority) {
                Ok(Some(addr)) => addr,
                Ok(None) | Err(_) => {
                    errors.push(c.loc.error(format!("cannot resolve \"{}\"", c.authority)));
                    continue;
                }
            };
            let what = format!("callout {}", c.authority);
            let tls = match c.tls.as_ref().map(|t| upstream_tls(t, (&what, &c.loc), config, &thumbprints)) {
                None => None,
                Some(Ok(tls)) => Some(tls),
                Some(Err(e)) => {
                    errors.push(e);
                    continue;
                }
            };
            let default_port = if c.https { ":443" } else { ":80" };
            let host = c.authority.strip_suffix(default_port).unwrap_or(&c.authority);
            callouts.push(Callout {
                target: Target {
                    key: PoolKey {
                        addr,
                        authority: Bytes::from(host.to_owned().into_bytes()),
                        tls: tls.as_ref().map_or(0, |t| t.id),
                    },
                    resolved: None,
                    counters: Some(crate::stats::PoolCounters::of(
                        kept,
                        "callout",
                        &c.authority,
                        worker_count(&config.server),
                    )),
                    tls,
                    connect_timeout: c.timeout,
                    idle_timeout: CALLOUT_IDLE,
                    max_idle: CALLOUT_MAX_IDLE,
                },
                timeout: c.timeout,
                name: c.authority.clone(),
            });
        }
        let mut routes = Vec::with_capacity(config.apis.len());
        for (i, api) in config.apis.iter().enumerate() {
            let Some(backend) = backends.iter().position(|b| b.name == api.backend.value) else { continue };
            routes.push(Route {
                api: i,
                name: api.name.value.clone(),
                backend,
                prefix: Bytes::from(api.path.value.clone().into_bytes()),
                host: api.host.as_ref().map(|h| Bytes::from(h.value.to_ascii_lowercase().into_bytes())),
                counters: crate::stats::ApiCounters::of(
                    kept,
                    &api.name.value,
                    api.operations
                        .iter()
                        .map(|o| o.id.clone().unwrap_or_else(|| o.pattern.value.clone()))
                        .collect(),
                    worker_count(&config.server),
                ),
            });
        }
        // Producers start only for a configuration that will run (a reload that fails keeps the
        // running ones as they are).
        let loggers = if errors.is_empty() {
            crate::loggers::compile(&config.loggers).unwrap_or_else(|e| {
                errors.push(e);
                Vec::new()
            })
        } else {
            Vec::new()
        };
        let snapshot = Snapshot {
            generation,
            listeners,
            proxy_protocol,
            router: Router::new(routes),
            backends,
            policies,
            limits: Limits {
                max_head_size: config.server.max_head_size,
                max_headers: config.server.max_headers,
            },
            server: config.server.clone(),
            max_connections: config
                .server
                .max_connections
                .unwrap_or_else(|| default_max_connections(worker_count(&config.server))),
            revoked,
            fleet,
            callouts,
            providers: providers_kept,
            expiry: expiry_of(config),
            loggers,
            log_steps: config
                .all_steps()
                .any(|s| matches!(s.kind, portcullis_config::StepKind::LogToEventhub(_))),
        };
        errors.into_result(snapshot)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str, host: Option<&str>, api: usize) -> Route {
        Route {
            api,
            name: String::new(),
            backend: 0,
            prefix: Bytes::from(prefix.to_owned()),
            host: host.map(|h| Bytes::from(h.to_owned())),
            counters: crate::stats::ApiCounters::of(&crate::stats::Kept::default(), "test", Vec::new(), 1),
        }
    }

    #[test]
    fn routing_by_prefix_and_host() {
        let r = Router::new(vec![
            route("/", None, 0),
            route("/todo", None, 1),
            route("/todo", Some("api.example.com"), 2),
        ]);
        let find = |host: &str, path: &str| r.find(Some(host.as_bytes()), path.as_bytes()).map(|r| r.api);
        assert_eq!(find("x", "/todo/items"), Some(1));
        assert_eq!(find("API.example.com:8443", "/todo"), Some(2));
        assert_eq!(find("x", "/todos"), Some(0));
        assert_eq!(find("x", "/todo?a=1"), Some(1));
        let only = Router::new(vec![route("/todo", None, 1)]);
        assert!(only.find(None, b"/other").is_none());
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port(b"a.example:8443"), b"a.example");
        assert_eq!(strip_port(b"[::1]:8443"), b"[::1]");
        assert_eq!(strip_port(b"a.example"), b"a.example");
        // Hostile shapes: never a panic, never a slice past either end.
        assert_eq!(strip_port(b":]"), b"");
        assert_eq!(strip_port(b"]:"), b"]");
        assert_eq!(strip_port(b":"), b"");
        assert_eq!(strip_port(b"[::1"), b"[::1");
        assert_eq!(strip_port(b"["), b"[");
        assert_eq!(strip_port(b""), b"");
    }

    #[test]
    fn forwarded_paths() {
        let backend = |base: &str| Backend {
            name: String::new(),
            base_path: Bytes::from(base.to_owned()),
            https: false,
            response_timeout: Duration::ZERO,
            servers: Vec::new(),
            balance: portcullis_config::Balance::RoundRobin,
            eject_after: 0,
            eject_for: Duration::ZERO,
            health_check: None,
        };
        let fwd = |prefix: &str, base: &str, path: &str| {
            let mut out = Vec::new();
            forwarded_path(&route(prefix, None, 0), &backend(base), path.as_bytes(), &mut out);
            String::from_utf8(out).expect("ascii")
        };
        assert_eq!(fwd("/", "", "/echo?x=1"), "/echo?x=1");
        assert_eq!(fwd("/todo", "", "/todo/items"), "/items");
        assert_eq!(fwd("/todo", "", "/todo"), "/");
        assert_eq!(fwd("/todo", "", "/todo?x"), "/?x");
        assert_eq!(fwd("/todo", "/api", "/todo/items?x"), "/api/items?x");
        assert_eq!(fwd("/todo", "/api", "/todo"), "/api");
        assert_eq!(fwd("/todo", "/api", "/todo?x"), "/api?x");
        assert_eq!(fwd("/", "/api", "/x"), "/api/x");
    }
}
