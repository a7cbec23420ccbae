//! TOML text → [`Config`], section by section.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use toml::de::DeTable;

use crate::callers::{openid, product, subscription};
use crate::error::{ConfigError, ConfigErrors, Loc};
use crate::model::*;
use crate::reader::{Reader, Value, get, join};

/// Reads and parses a configuration file. Files it names are not opened here.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        loc: Loc { file: path.into(), line: 0, column: 0, field: String::new() },
        message: format!("cannot read configuration: {e}"),
    })?;
    parse(path, &text)
}

/// Parses configuration text as if read from `path` (relative paths resolve against its
/// directory).
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    match parse_partial(path, text) {
        (Some(config), errors) => errors.into_result(config),
        (None, errors) => Err(errors),
    }
}

/// Reads and parses a configuration file like [`load`], but keeps going past errors: when the
/// TOML itself is sound, the configuration is returned without the parts that were wrong,
/// with every error found, so that `check` can look at the files it names too and report all
/// problems in one pass.
pub fn load_partial(path: &Path) -> (Option<Config>, ConfigErrors) {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_partial(path, &text),
        Err(e) => (
            None,
            ConfigError {
                loc: Loc { file: path.into(), line: 0, column: 0, field: String::new() },
                message: format!("cannot read configuration: {e}"),
            }
            .into(),
        ),
    }
}

/// [`parse`], keeping the partial configuration (see [`load_partial`]). A TOML syntax error is
/// reported alone, the first one only: what a parser recovers after it is mostly echoes.
pub fn parse_partial(path: &Path, text: &str) -> (Option<Config>, ConfigErrors) {
    let mut r = Reader::new(path, text);
    let (doc, syntax) = DeTable::parse_recoverable(text);
    if let Some(e) = syntax.first() {
        let span = e.span().unwrap_or(0..0);
        let more = if syntax.len() > 1 { " (later syntax errors may follow from this one)" } else { "" };
        r.error(&span, "", format!("TOML syntax: {}{more}", e.message().trim()));
        return (None, std::mem::take(&mut r.errors));
    }
    let root = doc.get_ref();
    r.check_keys(
        root,
        "",
        &[
            "server",
            "listener",
            "certificates",
            "thumbprints",
            "backend",
            "api",
            "product",
            "subscriptions",
            "subscription",
            "openid",
            "inbound",
            "outbound",
            "logger",
        ],
    );
    let server = match get(root, "server") {
        Some(v) => server(&mut r, v),
        None => Server::default(),
    };
    let listeners: Vec<Listener> = match get(root, "listener") {
        Some(v) => r.tables(v, "listener").into_iter().filter_map(|(v, f)| listener(&mut r, v, &f)).collect(),
        None => Vec::new(),
    };
    if listeners.is_empty() && get(root, "listener").is_none() {
        r.error(&(0..0), "listener", "at least one [[listener]] is required");
    }
    let certificates = get(root, "certificates").map(|v| certificates(&mut r, v)).unwrap_or_default();
    let thumbprints =
        get(root, "thumbprints").map(|v| named_files(&mut r, v, "thumbprints")).unwrap_or_default();
    let backends: Vec<Backend> = match get(root, "backend") {
        Some(v) => r.tables(v, "backend").into_iter().filter_map(|(v, f)| backend(&mut r, v, &f)).collect(),
        None => Vec::new(),
    };
    let apis: Vec<Api> = match get(root, "api") {
        Some(v) => r.tables(v, "api").into_iter().filter_map(|(v, f)| api(&mut r, v, &f)).collect(),
        None => Vec::new(),
    };
    let products: Vec<Product> = match get(root, "product") {
        Some(v) => r.tables(v, "product").into_iter().filter_map(|(v, f)| product(&mut r, v, &f)).collect(),
        None => Vec::new(),
    };
    let subscription_files =
        get(root, "subscriptions").map(|v| named_files(&mut r, v, "subscriptions")).unwrap_or_default();
    let subscriptions: Vec<Subscription> = match get(root, "subscription") {
        Some(v) => {
            r.tables(v, "subscription").into_iter().filter_map(|(v, f)| subscription(&mut r, v, &f)).collect()
        }
        None => Vec::new(),
    };
    let openid: Vec<OpenId> = match get(root, "openid") {
        Some(v) => r.tables(v, "openid").into_iter().filter_map(|(v, f)| openid(&mut r, v, &f)).collect(),
        None => Vec::new(),
    };
    let loggers: Vec<Logger> = match get(root, "logger") {
        Some(v) => r
            .tables(v, "logger")
            .into_iter()
            .filter_map(|(v, f)| crate::logger::logger(&mut r, v, &f))
            .collect(),
        None => Vec::new(),
    };
    let inbound = get(root, "inbound").map(|v| steps(&mut r, v, "inbound")).unwrap_or_default();
    let outbound = get(root, "outbound").map(|v| steps(&mut r, v, "outbound")).unwrap_or_default();

    let config = Config {
        path: path.to_path_buf(),
        server,
        listeners,
        certificates,
        thumbprints,
        backends,
        apis,
        products,
        subscription_files,
        subscriptions,
        openid,
        inbound,
        outbound,
        loggers,
    };
    cross_check(&mut r, &config);
    crate::logger::cross_check(&mut r, &config);
    crate::callers::cross_check(&mut r.errors, &config);
    let mut errors = r.errors;
    errors.sort();
    errors.dedup();
    (Some(config), errors)
}

/// Rules that span sections: unique names, references that resolve, no two listeners on one
/// address.
fn cross_check(r: &mut Reader, c: &Config) {
    let mut seen: HashMap<&str, &Loc> = HashMap::new();
    for b in &c.backends {
        if let Some(first) = seen.insert(&b.name.value, &b.name.loc) {
            let msg = format!("backend \"{}\" is defined twice (first at line {})", b.name.value, first.line);
            r.errors.push(b.name.loc.error(msg));
        }
    }
    let mut apis: HashMap<(Option<String>, &str), &Loc> = HashMap::new();
    for a in &c.apis {
        if !c.backends.iter().any(|b| b.name.value == a.backend.value) {
            let names: Vec<String> = c.backends.iter().map(|b| format!("\"{}\"", b.name.value)).collect();
            let known = if names.is_empty() {
                "no [[backend]] is defined".to_owned()
            } else {
                format!("known: {}", names.join(", "))
            };
            r.errors.push(a.backend.loc.error(format!("no backend named \"{}\" ({known})", a.backend.value)));
        }
        let key = (a.host.as_ref().map(|h| h.value.to_ascii_lowercase()), a.path.value.as_str());
        if let Some(first) = apis.insert(key, &a.path.loc) {
            r.errors.push(a.path.loc.error(format!(
                "another API already has path \"{}\" for the same host (line {})",
                a.path.value, first.line
            )));
        }
    }
    let steps = c.inbound.iter().chain(&c.outbound).chain(c.apis.iter().flat_map(|a| {
        a.inbound
            .iter()
            .chain(&a.outbound)
            .chain(a.operations.iter().flat_map(|o| o.inbound.iter().chain(&o.outbound)))
    }));
    for step in steps {
        let StepKind::ValidateClientCertificate(v) = &step.kind else { continue };
        for attribute in v.identities.iter().flat_map(|i| &i.attributes) {
            match &attribute.value {
                IdentityAttribute::ThumbprintIn(name)
                    if !c.thumbprints.iter().any(|t| &t.name.value == name) =>
                {
                    r.errors.push(
                        attribute.loc.error(format!("no thumbprint list named \"{name}\" in [thumbprints]")),
                    );
                }
                IdentityAttribute::Certificate(name) | IdentityAttribute::IssuerCertificate(name)
                    if !c.certificates.iter().any(|t| &t.name.value == name) =>
                {
                    r.errors.push(
                        attribute.loc.error(format!("no certificate named \"{name}\" in [certificates]")),
                    );
                }
                IdentityAttribute::Subject(dn) | IdentityAttribute::IssuerSubject(dn)
                    if !looks_like_dn(dn) =>
                {
                    r.errors.push(attribute.loc.error(format!(
                        "\"{dn}\" is not a distinguished name (expected attribute=value pairs, e.g. \"CN=device-1, O=Contoso\")"
                    )));
                }
                _ => {}
            }
        }
    }
    let mut names: HashMap<&str, &Loc> = HashMap::new();
    for a in &c.apis {
        if let Some(first) = names.insert(&a.name.value, &a.name.loc) {
            r.errors.push(
                a.name.loc.error(format!(
                    "API \"{}\" is defined twice (first at line {})",
                    a.name.value, first.line
                )),
            );
        }
        let mut operations: HashMap<(String, String), &Loc> = HashMap::new();
        let patterns = a.operations.iter().map(|o| &o.pattern);
        for pattern in patterns {
            let Some((method, path)) = pattern.value.trim().split_once(' ') else { continue };
            let known = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];
            if method != method.to_ascii_uppercase() && known.iter().any(|k| k.eq_ignore_ascii_case(method)) {
                r.errors.push(pattern.loc.error(format!(
                    "method \"{method}\": methods are case-sensitive (RFC 9110 §9.1); did you mean \"{}\"?",
                    method.to_ascii_uppercase()
                )));
            }
            // A trailing slash does not matter to matching, so "GET /a" and "GET /a/" are one.
            let path = path.trim();
            let key = (
                method.to_owned(),
                path.strip_suffix('/').filter(|p| !p.is_empty()).unwrap_or(path).to_owned(),
            );
            // Exact repeats are reported where operations are compiled.
            if let Some(first) = operations.insert(key, &pattern.loc)
                && !first_text_equal(a, first, &pattern.value)
            {
                r.errors.push(pattern.loc.error(format!(
                    "operation \"{}\" repeats the one at line {} (a trailing slash does not matter)",
                    pattern.value, first.line
                )));
            }
        }
    }
    let mut binds: HashMap<SocketAddr, &Loc> = HashMap::new();

    for l in &c.listeners {
        if let Some(first) = binds.insert(l.bind.value, &l.bind.loc) {
            r.errors.push(
                l.bind.loc.error(format!(
                    "{} is already bound by the listener at line {}",
                    l.bind.value, first.line
                )),
            );
        }
    }
    for b in &c.backends {
        if let Some(name) = b.tls.as_ref().and_then(|t| t.certificate.as_ref()) {
            match c.certificates.iter().find(|cert| cert.name.value == name.value) {
                None => r.errors.push(
                    name.loc.error(format!("no certificate named \"{}\" in [certificates]", name.value)),
                ),
                Some(cert) if cert.key.is_none() => r.errors.push(name.loc.error(format!(
                    "certificate \"{}\" has no key; a client certificate needs one",
                    name.value
                ))),
                Some(_) => {}
            }
        }
    }
}

pub(crate) fn required<'v, 'a>(
    r: &mut Reader,
    t: &'v DeTable<'a>,
    span: &Value<'_>,
    field: &str,
    key: &str,
) -> Option<&'v Value<'a>> {
    let v = get(t, key);
    if v.is_none() {
        r.error(&span.span(), &join(field, key), format!("missing field `{key}`"));
    }
    v
}

fn server(r: &mut Reader, v: &Value<'_>) -> Server {
    let mut s = Server::default();
    let Some(t) = r.table(v, "server") else { return s };
    r.check_keys(
        t,
        "server",
        &[
            "workers",
            "driver",
            "max_head_size",
            "max_headers",
            "head_timeout",
            "idle_timeout",
            "handshake_timeout",
            "drain_timeout",
            "body_timeout",
            "access_log",
            "max_connections",
            "allow_underscores_in_headers",
            "max_body_size",
            "rate_limit_keys",
            "redis",
            "admin",
            "background_cpus",
        ],
    );
    if let Some(v) = get(t, "workers") {
        s.workers = r.integer(v, "server.workers", 0..1025).map_or(s.workers, |n| n as usize);
    }
    if let Some(v) = get(t, "driver") {
        let options = [("auto", Driver::Auto), ("io_uring", Driver::IoUring), ("epoll", Driver::Epoll)];
        s.driver = r.choice(v, "server.driver", &options).unwrap_or(s.driver);
    }
    if let Some(v) = get(t, "max_head_size") {
        s.max_head_size =
            r.integer(v, "server.max_head_size", 1024..(1 << 20) + 1).map_or(s.max_head_size, |n| n as usize);
    }
    if let Some(v) = get(t, "max_headers") {
        let cap = portcullis_max_headers() as i64;
        s.max_headers = r.integer(v, "server.max_headers", 1..cap + 1).map_or(s.max_headers, |n| n as usize);
    }
    for (key, slot) in [
        ("head_timeout", &mut s.head_timeout),
        ("idle_timeout", &mut s.idle_timeout),
        ("handshake_timeout", &mut s.handshake_timeout),
        ("drain_timeout", &mut s.drain_timeout),
        ("body_timeout", &mut s.body_timeout),
    ] {
        if let Some(v) = get(t, key) {
            let field = format!("server.{key}");
            match r.duration(v, &field) {
                Some(d) if d.is_zero() => r.error(&v.span(), &field, "must be greater than zero"),
                Some(d) => *slot = d,
                None => {}
            }
        }
    }
    if let Some(v) = get(t, "access_log") {
        s.access_log = access_log(r, v);
    }
    if let Some(v) = get(t, "max_connections") {
        s.max_connections =
            r.integer(v, "server.max_connections", 1..10_000_001).map(|n| n as usize).or(s.max_connections);
    }
    if let Some(v) = get(t, "allow_underscores_in_headers") {
        s.allow_underscores_in_headers =
            r.boolean(v, "server.allow_underscores_in_headers").unwrap_or(s.allow_underscores_in_headers);
    }
    if let Some(v) = get(t, "rate_limit_keys") {
        s.rate_limit_keys = r
            .integer(v, "server.rate_limit_keys", 64..(1 << 26) + 1)
            .map_or(s.rate_limit_keys, |n| n as usize);
    }
    if let Some(v) = get(t, "redis") {
        s.redis = crate::traffic::redis(r, v);
    }
    if let Some(v) = get(t, "admin")
        && let Some(a) = r.string(v, "server.admin")
    {
        match a.value.parse::<std::net::SocketAddr>() {
            Ok(addr) => s.admin = Some(addr),
            Err(_) => r
                .errors
                .push(a.loc.error(format!("\"{}\" is not an address like \"127.0.0.1:9901\"", a.value))),
        }
    }
    if let Some(v) = get(t, "max_body_size") {
        s.max_body_size =
            r.integer(v, "server.max_body_size", 0..i64::MAX).map(|n| n as u64).or(s.max_body_size);
    }
    if let Some(v) = get(t, "background_cpus") {
        s.background_cpus = background_cpus(r, v);
    }
    s
}

/// `background_cpus = [0, 1]`: CPU numbers, each once (a CPU set holds 1024).
fn background_cpus(r: &mut Reader, v: &Value<'_>) -> Vec<Located<usize>> {
    let field = "server.background_cpus";
    let toml::de::DeValue::Array(items) = v.get_ref() else {
        r.error(&v.span(), field, "must be an array of CPU numbers, like [0] or [0, 1]");
        return Vec::new();
    };
    if items.is_empty() {
        r.error(&v.span(), field, "must name at least one CPU (leave it out to run those threads anywhere)");
    }
    let mut cpus: Vec<Located<usize>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let Some(n) = r.integer(item, &at, 0..1024) else { continue };
        if cpus.iter().any(|c| c.value == n as usize) {
            r.error(&item.span(), &at, format!("CPU {n} is named twice"));
            continue;
        }
        cpus.push(Located { value: n as usize, loc: r.loc(&item.span(), &at) });
    }
    cpus
}

/// `access_log = true | false | { path, format, queue }`.
fn access_log(r: &mut Reader, v: &Value<'_>) -> Option<AccessLog> {
    let field = "server.access_log";
    let default =
        AccessLog { path: None, path_loc: None, format: AccessFormat::Json, queue: 65_536, logger: None };
    if let toml::de::DeValue::Boolean(b) = v.get_ref() {
        return b.then_some(default);
    }
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["path", "format", "queue", "logger"]);
    let path = match get(t, "path").and_then(|p| r.non_empty_string(p, &join(field, "path"))) {
        Some(p) if p.value == "stdout" => None,
        Some(_) => get(t, "path").and_then(|v| r.path(v, &join(field, "path"))),
        None => None,
    };
    let (path, path_loc) = path.map_or((None, None), |p| (Some(p.value), Some(p.loc)));
    let format = match get(t, "format") {
        Some(f) => r
            .choice(
                f,
                &join(field, "format"),
                &[("json", AccessFormat::Json), ("combined", AccessFormat::Combined)],
            )
            .unwrap_or(AccessFormat::Json),
        None => AccessFormat::Json,
    };
    let queue = match get(t, "queue") {
        Some(q) => {
            r.integer(q, &join(field, "queue"), 1..(1 << 24) + 1).map_or(default.queue, |n| n as usize)
        }
        None => default.queue,
    };
    let logger = get(t, "logger").and_then(|l| r.non_empty_string(l, &join(field, "logger")));
    if let (Some(l), Some(_)) = (&logger, get(t, "path")) {
        r.errors.push(l.loc.error("give the access log a path or a logger, not both"));
    }
    if let (Some(l), AccessFormat::Combined) = (&logger, format) {
        r.errors.push(l.loc.error("a logger takes the access log as JSON: leave format out, or \"json\""));
    }
    Some(AccessLog { path, path_loc, format, queue, logger })
}

/// The parser's hard cap on header fields (`portcullis_http::MAX_HEADERS_CAP`); the config crate
/// knows no HTTP, so the number is repeated here and checked by a test in the server crate.
pub const fn portcullis_max_headers() -> usize {
    256
}

fn cert_key(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<CertKey> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["cert", "key"]);
    let cert = required(r, t, v, field, "cert").and_then(|c| r.path(c, &join(field, "cert")));
    let key = required(r, t, v, field, "key").and_then(|k| r.path(k, &join(field, "key")));
    Some(CertKey { cert: cert?, key: key?, loc: r.loc(&v.span(), field) })
}

const CLIENT_MODES: [(&str, ClientCertMode); 3] = [
    ("off", ClientCertMode::Off),
    ("request", ClientCertMode::Request),
    ("require", ClientCertMode::Require),
];

/// The client-certificate fields of a listener (`inherit` = None) or of an SNI entry.
fn client_auth(
    r: &mut Reader,
    t: &DeTable<'_>,
    v: &Value<'_>,
    field: &str,
    inherit: Option<&ClientAuth>,
) -> ClientAuth {
    let mode_field = join(field, "client_certificate");
    let mode = match get(t, "client_certificate") {
        Some(m) => r
            .choice(m, &mode_field, &CLIENT_MODES)
            .map(|mode| Located::new(mode, r.loc(&m.span(), &mode_field))),
        None => None,
    };
    let mode = mode.unwrap_or_else(|| match inherit {
        Some(parent) => parent.mode.clone(),
        None => Located::new(ClientCertMode::Off, r.loc(&v.span(), &mode_field)),
    });
    let client_ca = match get(t, "client_ca") {
        Some(c) => r.paths(c, &join(field, "client_ca")),
        None => inherit.map(|p| p.client_ca.clone()).unwrap_or_default(),
    };
    let crl = match get(t, "crl") {
        Some(c) => r.paths(c, &join(field, "crl")),
        None => inherit.map(|p| p.crl.clone()).unwrap_or_default(),
    };
    if mode.value != ClientCertMode::Off && client_ca.is_empty() {
        r.errors.push(mode.loc.error(
            "asking for client certificates needs `client_ca` (the CA certificates they must chain to)",
        ));
    }
    if !crl.is_empty() && client_ca.is_empty() {
        r.error(&v.span(), &join(field, "crl"), "`crl` needs `client_ca`");
    }
    ClientAuth { mode, client_ca, crl }
}

fn listener(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Listener> {
    let t = r.table(v, field)?;
    r.check_keys(
        t,
        field,
        &[
            "bind",
            "certificate",
            "client_certificate",
            "client_ca",
            "crl",
            "tls_min_version",
            "session_tickets",
            "sni",
            "proxy_protocol",
            "proxy_protocol_from",
        ],
    );
    let bind = required(r, t, v, field, "bind").and_then(|b| {
        let s = r.string(b, &join(field, "bind"))?;
        match s.value.parse::<SocketAddr>() {
            Ok(addr) => Some(Located::new(addr, s.loc)),
            Err(_) => {
                r.error(
                    &b.span(),
                    &join(field, "bind"),
                    format!("\"{}\" is not an address like \"0.0.0.0:8443\"", s.value),
                );
                None
            }
        }
    });
    let certificate =
        required(r, t, v, field, "certificate").and_then(|c| cert_key(r, c, &join(field, "certificate")));
    let client = client_auth(r, t, v, field, None);
    let tls_min_version = match get(t, "tls_min_version") {
        Some(m) => r
            .choice(
                m,
                &join(field, "tls_min_version"),
                &[("1.2", TlsVersion::Tls12), ("1.3", TlsVersion::Tls13)],
            )
            .unwrap_or(TlsVersion::Tls12),
        None => TlsVersion::Tls12,
    };
    let session_tickets = match get(t, "session_tickets") {
        Some(b) => r.boolean(b, &join(field, "session_tickets")).unwrap_or(true),
        None => true,
    };
    let proxy_protocol = flag(r, t, field, "proxy_protocol", false);
    let proxy_protocol_from = get(t, "proxy_protocol_from")
        .map(|v| crate::traffic::ranges(r, v, &join(field, "proxy_protocol_from")))
        .unwrap_or_default();
    if !proxy_protocol && get(t, "proxy_protocol_from").is_some() {
        r.error(
            &v.span(),
            &join(field, "proxy_protocol_from"),
            "`proxy_protocol_from` goes with `proxy_protocol = true`",
        );
    }
    let sni = match get(t, "sni") {
        Some(s) => {
            r.tables(s, &join(field, "sni")).into_iter().filter_map(|(v, f)| sni(r, v, &f, &client)).collect()
        }
        None => Vec::new(),
    };
    Some(Listener {
        bind: bind?,
        certificate: certificate?,
        client,
        tls_min_version,
        session_tickets,
        proxy_protocol,
        proxy_protocol_from,
        sni,
        loc: r.loc(&v.span(), field),
    })
}

fn sni(r: &mut Reader, v: &Value<'_>, field: &str, parent: &ClientAuth) -> Option<Sni> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["hostnames", "certificate", "client_certificate", "client_ca", "crl"]);
    let hostnames = required(r, t, v, field, "hostnames").map(|h| r.strings(h, &join(field, "hostnames")));
    if let Some(names) = &hostnames {
        for h in names {
            let ok = h.value.split('.').enumerate().all(|(i, label)| {
                (i == 0 && label == "*")
                    || (!label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
            });
            if !ok {
                r.errors.push(h.loc.error(format!(
                    "\"{}\" is not a hostname (\"*.\" is allowed as the first label)",
                    h.value
                )));
            }
        }
        if names.is_empty() {
            r.error(&v.span(), &join(field, "hostnames"), "needs at least one hostname");
        }
    }
    let certificate =
        required(r, t, v, field, "certificate").and_then(|c| cert_key(r, c, &join(field, "certificate")));
    let client = client_auth(r, t, v, field, Some(parent));
    Some(Sni { hostnames: hostnames?, certificate: certificate?, client, loc: r.loc(&v.span(), field) })
}

fn certificates(r: &mut Reader, v: &Value<'_>) -> Vec<NamedCertificate> {
    let Some(t) = r.table(v, "certificates") else { return Vec::new() };
    let mut out = Vec::new();
    for (key, value) in t.iter() {
        let field = format!("certificates.{}", key.get_ref());
        let name = Located::new(key.get_ref().to_string(), r.loc(&key.span(), &field));
        match value.get_ref() {
            toml::de::DeValue::String(_) => {
                if let Some(cert) = r.path(value, &field) {
                    out.push(NamedCertificate { name, cert, key: None });
                }
            }
            _ => {
                let Some(ct) = r.table(value, &field) else { continue };
                r.check_keys(ct, &field, &["cert", "key"]);
                let cert =
                    required(r, ct, value, &field, "cert").and_then(|c| r.path(c, &join(&field, "cert")));
                let key = get(ct, "key").and_then(|k| r.path(k, &join(&field, "key")));
                if let Some(cert) = cert {
                    out.push(NamedCertificate { name, cert, key });
                }
            }
        }
    }
    out
}

/// A table of named files (`[thumbprints]`, `[subscriptions]`).
fn named_files(r: &mut Reader, v: &Value<'_>, section: &str) -> Vec<NamedFile> {
    let Some(t) = r.table(v, section) else { return Vec::new() };
    let mut out = Vec::new();
    for (key, value) in t.iter() {
        let field = format!("{section}.{}", key.get_ref());
        let name = Located::new(key.get_ref().to_string(), r.loc(&key.span(), &field));
        if let Some(path) = r.path(value, &field) {
            out.push(NamedFile { name, path });
        }
    }
    out
}

/// `(authority with port, base path, https)` of a backend URL.
pub(crate) fn parse_backend_url(url: &str) -> Result<(String, String, bool), String> {
    let (rest, https) = strip_scheme(url)?;
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if path.contains(['?', '#']) {
        return Err("a backend URL may have a path but no query or fragment".to_owned());
    }
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("\"{url}\" has no usable host"));
    }
    Ok((with_port(authority, https, url)?, path.trim_end_matches('/').to_owned(), https))
}

/// What follows the scheme of an `http://` or `https://` URL, and whether it is `https`.
pub(crate) fn strip_scheme(url: &str) -> Result<(&str, bool), String> {
    if let Some(rest) = url.strip_prefix("http://") {
        Ok((rest, false))
    } else if let Some(rest) = url.strip_prefix("https://") {
        Ok((rest, true))
    } else {
        Err(format!("\"{url}\" is not an http:// or https:// URL"))
    }
}

/// `authority` with the scheme's default port when it names none; an error for a port
/// outside 1..=65535. A bracketed IPv6 address is not mistaken for one with a port.
pub(crate) fn with_port(authority: &str, https: bool, url: &str) -> Result<String, String> {
    let has_port = authority.rfind(':').is_some_and(|i| !authority[i..].contains(']'));
    let authority =
        if has_port { authority.to_owned() } else { format!("{authority}:{}", if https { 443 } else { 80 }) };
    let port_ok = authority.rsplit(':').next().is_some_and(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(format!("\"{url}\" has an invalid port"));
    }
    Ok(authority)
}

/// The host of `host:port` (an IPv6 address without its brackets).
pub fn host_of(authority: &str) -> &str {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// `[[backend]] tls` (or a callout's `key`), for an `https://` URL whose host is `host`.
pub(crate) fn backend_tls(
    r: &mut Reader,
    (t, key): (&DeTable<'_>, &str),
    field: &str,
    host: &str,
    client_certificate: Option<Located<String>>,
) -> BackendTls {
    let mut tls = BackendTls {
        ca: Vec::new(),
        server_name: host.to_owned(),
        server_name_given: false,
        certificate: client_certificate,
        certificate_thumbprint: None,
        verify: true,
    };
    let Some(v) = get(t, key) else { return tls };
    let field = join(field, key);
    let Some(t) = r.table(v, &field) else { return tls };
    r.check_keys(t, &field, &["ca", "server_name", "certificate", "certificate_thumbprint", "verify"]);
    tls.ca = get(t, "ca").map(|c| r.paths(c, &join(&field, "ca"))).unwrap_or_default();
    if let Some(name) =
        get(t, "server_name").and_then(|n| r.non_empty_string(n, &join(&field, "server_name")))
    {
        tls.server_name = name.value;
        tls.server_name_given = true;
    }
    if let Some(c) = get(t, "certificate").and_then(|c| r.non_empty_string(c, &join(&field, "certificate"))) {
        if tls.certificate.is_some() {
            r.errors.push(
                c.loc.error("give the backend's certificate once: `tls.certificate` or `client_certificate`"),
            );
        }
        tls.certificate = Some(c);
    }
    if let Some(v) = get(t, "certificate_thumbprint") {
        let f = join(&field, "certificate_thumbprint");
        if let Some(mut thumb) = r.non_empty_string(v, &f) {
            thumb.value = thumb.value.replace([':', ' '], "").to_ascii_uppercase();
            if thumb.value.len() != 40 || !thumb.value.bytes().all(|b| b.is_ascii_hexdigit()) {
                r.error(&v.span(), &f, "must be a SHA-1 thumbprint: 40 hexadecimal digits");
            } else if tls.certificate.is_some() {
                r.error(&v.span(), &f, "give either `certificate` or `certificate_thumbprint`");
            } else {
                tls.certificate_thumbprint = Some(thumb);
            }
        }
    }
    if let Some(v) = get(t, "verify") {
        tls.verify = r.boolean(v, &join(&field, "verify")).unwrap_or(true);
    }
    tls
}

fn backend(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Backend> {
    let t = r.table(v, field)?;
    r.check_keys(
        t,
        field,
        &[
            "name",
            "url",
            "connect_timeout",
            "response_timeout",
            "idle_timeout",
            "max_idle",
            "client_certificate",
            "tls",
            "servers",
            "balance",
            "eject_after",
            "eject_for",
            "health_check",
        ],
    );
    let name = required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")));
    // `url` for one server, `servers` for several: the same scheme and base path each.
    let urls: Vec<Located<String>> = match (get(t, "url"), get(t, "servers")) {
        (Some(u), None) => r.non_empty_string(u, &join(field, "url")).into_iter().collect(),
        (None, Some(list)) => {
            let urls = r.strings(list, &join(field, "servers"));
            if urls.is_empty() {
                r.error(&list.span(), &join(field, "servers"), "must name at least one server");
            }
            urls
        }
        (Some(_), Some(list)) => {
            r.error(&list.span(), &join(field, "servers"), "give `url` (one server) or `servers`, not both");
            Vec::new()
        }
        (None, None) => {
            r.error(&v.span(), &join(field, "url"), "missing field `url` (or `servers`)");
            Vec::new()
        }
    };
    let mut servers = Vec::with_capacity(urls.len());
    let mut first: Option<(String, String, bool)> = None;
    for u in &urls {
        match parse_backend_url(&u.value) {
            Ok((authority, base_path, https)) => {
                match &first {
                    Some((_, b, h)) if *b != base_path || *h != https => {
                        r.errors
                            .push(u.loc.error("every server of a backend has the same scheme and base path"));
                    }
                    Some(_) => {}
                    None => first = Some((authority.clone(), base_path, https)),
                }
                servers.push(Located::new(authority, u.loc.clone()));
            }
            Err(msg) => r.errors.push(u.loc.error(msg)),
        }
    }
    let url = urls.first().cloned();
    let parts = first;
    let balance = match get(t, "balance") {
        Some(b) => r
            .choice(
                b,
                &join(field, "balance"),
                &[("round_robin", Balance::RoundRobin), ("least_requests", Balance::LeastRequests)],
            )
            .unwrap_or(Balance::RoundRobin),
        None => Balance::RoundRobin,
    };
    let eject_after = match get(t, "eject_after") {
        Some(n) => r.integer(n, &join(field, "eject_after"), 0..1001).map_or(5, |n| n as u32),
        None => 5,
    };
    let health_check = get(t, "health_check").and_then(|h| health_check(r, h, &join(field, "health_check")));
    let duration = |r: &mut Reader, key: &str, default: u64| match get(t, key) {
        Some(d) => {
            let f = join(field, key);
            match r.duration(d, &f) {
                Some(x) if x.is_zero() => {
                    r.error(&d.span(), &f, "must be greater than zero");
                    std::time::Duration::from_secs(default)
                }
                Some(x) => x,
                None => std::time::Duration::from_secs(default),
            }
        }
        None => std::time::Duration::from_secs(default),
    };
    let connect_timeout = duration(r, "connect_timeout", 5);
    let response_timeout = duration(r, "response_timeout", 60);
    let eject_for = duration(r, "eject_for", 30);
    let idle_timeout = duration(r, "idle_timeout", 60);
    let max_idle = match get(t, "max_idle") {
        Some(m) => r.integer(m, &join(field, "max_idle"), 0..100_001).map_or(64, |n| n as usize),
        None => 64,
    };
    let client_certificate =
        get(t, "client_certificate").and_then(|c| r.non_empty_string(c, &join(field, "client_certificate")));
    let (authority, base_path, https) = parts?;
    let tls = if https {
        Some(backend_tls(r, (t, "tls"), field, host_of(&authority), client_certificate))
    } else {
        for key in ["tls", "client_certificate"] {
            if let Some(v) = get(t, key) {
                r.error(&v.span(), &join(field, key), "TLS to the backend needs an https:// URL");
            }
        }
        None
    };
    Some(Backend {
        name: name?,
        url: url?,
        authority,
        base_path,
        connect_timeout,
        response_timeout,
        idle_timeout,
        max_idle,
        tls,
        servers,
        balance,
        eject_after,
        eject_for,
        health_check,
        loc: r.loc(&v.span(), field),
    })
}

/// `health_check = { path, interval, timeout, expect_status }`.
fn health_check(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<HealthCheck> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["path", "interval", "timeout", "expect_status"]);
    let path = match get(t, "path").and_then(|p| r.non_empty_string(p, &join(field, "path"))) {
        Some(p) if p.value.starts_with('/') && !p.value.bytes().any(|b| b <= b' ' || b == 0x7f) => p.value,
        Some(p) => {
            r.errors.push(p.loc.error(format!("\"{}\" is not a path like \"/healthz\"", p.value)));
            return None;
        }
        None => "/".to_owned(),
    };
    let bounded = |r: &mut Reader, key: &str, default: u64| match get(t, key) {
        None => Some(std::time::Duration::from_secs(default)),
        Some(d) => {
            let f = join(field, key);
            let x = r.duration(d, &f)?;
            if x < std::time::Duration::from_millis(100) || x > std::time::Duration::from_secs(3600) {
                r.error(&d.span(), &f, "must be between 100ms and 1h");
                return None;
            }
            Some(x)
        }
    };
    let interval = bounded(r, "interval", 5)?;
    let timeout = bounded(r, "timeout", 2)?;
    let expect_status = match get(t, "expect_status") {
        Some(s) => crate::callout::statuses(r, s, &join(field, "expect_status"))?,
        None => StatusRanges(vec![(200, 299)]),
    };
    Some(HealthCheck { path, interval, timeout, expect_status })
}

fn api(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Api> {
    let t = r.table(v, field)?;
    r.check_keys(
        t,
        field,
        &[
            "name",
            "path",
            "host",
            "backend",
            "inherit",
            "inbound",
            "outbound",
            "operations",
            "operation",
            "openapi",
            "timeout",
            "subscription_required",
            "subscription_key_header",
            "subscription_key_query",
        ],
    );
    let name = required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")));
    let openapi = get(t, "openapi").and_then(|p| r.path(p, &join(field, "openapi")));
    let path_value = if openapi.is_some() { get(t, "path") } else { required(r, t, v, field, "path") };
    let path = path_value.and_then(|p| {
        let s = r.string(p, &join(field, "path"))?;
        if !s.value.starts_with('/') || s.value.contains(['?', '#', ' ']) {
            r.errors.push(s.loc.error(format!("\"{}\" is not a path prefix like \"/todo\"", s.value)));
            return None;
        }
        let trimmed =
            if s.value.len() > 1 { s.value.trim_end_matches('/').to_owned() } else { s.value.clone() };
        Some(Located::new(if trimmed.is_empty() { "/".to_owned() } else { trimmed }, s.loc))
    });
    let host = get(t, "host").and_then(|h| r.non_empty_string(h, &join(field, "host")));
    let timeout = get(t, "timeout").and_then(|d| positive_duration(r, d, &join(field, "timeout")));
    let backend =
        required(r, t, v, field, "backend").and_then(|b| r.non_empty_string(b, &join(field, "backend")));
    let inherit = match get(t, "inherit") {
        Some(b) => r.boolean(b, &join(field, "inherit")).unwrap_or(true),
        None => true,
    };
    let inbound = get(t, "inbound").map(|s| steps(r, s, &join(field, "inbound"))).unwrap_or_default();
    let outbound = get(t, "outbound").map(|s| steps(r, s, &join(field, "outbound"))).unwrap_or_default();
    let mut operations = Vec::new();
    if let Some(list) = get(t, "operations") {
        for pattern in r.strings(list, &join(field, "operations")) {
            if let Some(pattern) = operation_pattern(r, pattern) {
                operations.push(Operation {
                    pattern,
                    id: None,
                    inherit: true,
                    inbound: Vec::new(),
                    outbound: Vec::new(),
                    timeout: None,
                });
            }
        }
    }
    // Imported operations first: `[[api.operation]] id = "…"` tables give them their steps.
    let mut imported_path = None;
    if let Some(doc) = &openapi {
        imported_path = import_operations(r, doc, &mut operations);
    }
    if let Some(tables) = get(t, "operation") {
        for (v, f) in r.tables(tables, &join(field, "operation")) {
            let Some(table) = operation(r, v, &f) else { continue };
            match (table.pattern, table.id) {
                (Some(pattern), None) => operations.push(Operation {
                    pattern,
                    id: None,
                    inherit: table.inherit,
                    inbound: table.inbound,
                    outbound: table.outbound,
                    timeout: table.timeout,
                }),
                (None, Some(id)) => {
                    match operations.iter_mut().find(|o| o.id.as_deref() == Some(&id.value)) {
                        Some(op) => {
                            (op.inherit, op.inbound, op.outbound, op.timeout) =
                                (table.inherit, table.inbound, table.outbound, table.timeout)
                        }
                        None => {
                            let why = match &openapi {
                            Some(doc) => format!("{} has no operation with operationId \"{}\"", doc.value.display(), id.value),
                            None => "`id` names an operation of the API's `openapi` document, and the API has none".to_owned(),
                        };
                            r.errors.push(id.loc.error(why));
                        }
                    }
                }
                _ => r.error(
                    &v.span(),
                    &f,
                    "an operation has `match` or `id` (an operationId of the API's `openapi` document)",
                ),
            }
        }
    }
    let subscription_required = flag(r, t, field, "subscription_required", false);
    let subscription_key_header = match get(t, "subscription_key_header") {
        Some(h) => r.non_empty_string(h, &join(field, "subscription_key_header")).and_then(|h| {
            if is_token(&h.value) {
                Some(h.value)
            } else {
                r.errors.push(h.loc.error(format!("\"{}\" is not a valid header name", h.value)));
                None
            }
        }),
        None => None,
    };
    let subscription_key_query = match get(t, "subscription_key_query") {
        Some(q) => r.non_empty_string(q, &join(field, "subscription_key_query")).and_then(|q| {
            if q.value.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b)) {
                Some(q.value)
            } else {
                r.errors.push(q.loc.error(format!(
                    "\"{}\" is not a query parameter name (letters, digits and -._~)",
                    q.value
                )));
                None
            }
        }),
        None => None,
    };
    let mut seen: Vec<&str> = Vec::new();
    for op in &operations {
        if seen.contains(&op.pattern.value.as_str()) {
            r.errors
                .push(op.pattern.loc.error(format!("operation \"{}\" is declared twice", op.pattern.value)));
        }
        seen.push(&op.pattern.value);
    }
    // The path: as given, else the document's (servers or basePath), else "/".
    let path = match (path, &openapi) {
        (Some(p), _) => p,
        (None, Some(doc)) => Located::new(imported_path.unwrap_or_else(|| "/".to_owned()), doc.loc.clone()),
        (None, None) => return None,
    };
    Some(Api {
        name: name?,
        path,
        host,
        backend: backend?,
        inherit,
        inbound,
        outbound,
        operations,
        openapi,
        timeout,
        subscription_required,
        subscription_key_header: subscription_key_header
            .unwrap_or_else(|| "Ocp-Apim-Subscription-Key".to_owned()),
        subscription_key_query: subscription_key_query.unwrap_or_else(|| "subscription-key".to_owned()),
        loc: r.loc(&v.span(), field),
    })
}

/// Checks `METHOD /template/{param}`; returns it normalised to single spaces.
fn operation_pattern(r: &mut Reader, pattern: Located<String>) -> Option<Located<String>> {
    let mut parts = pattern.value.split_whitespace();
    let (Some(method), Some(template), None) = (parts.next(), parts.next(), parts.next()) else {
        r.errors.push(
            pattern
                .loc
                .error(format!("\"{}\" is not an operation like \"GET /items/{{id}}\"", pattern.value)),
        );
        return None;
    };
    if method != "*" && !is_token(method) {
        r.errors.push(pattern.loc.error(format!("\"{method}\" is not a method (or \"*\" for any)")));
        return None;
    }
    if !template.starts_with('/') || template.contains(['?', '#']) {
        r.errors
            .push(pattern.loc.error(format!("\"{template}\" is not a path template like \"/items/{{id}}\"")));
        return None;
    }
    let mut names: Vec<&str> = Vec::new();
    for segment in template.split('/').skip(1) {
        if segment.contains(['{', '}']) {
            let name = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
            match name {
                Some(n)
                    if !n.is_empty()
                        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
                {
                    if names.contains(&n) {
                        r.errors.push(pattern.loc.error(format!("parameter {{{n}}} appears twice")));
                        return None;
                    }
                    names.push(n);
                }
                _ => {
                    r.errors.push(pattern.loc.error(format!(
                        "\"{segment}\": a parameter is a whole segment like {{deviceId}} (letters, digits, _ and -)"
                    )));
                    return None;
                }
            }
        }
    }
    Some(Located::new(format!("{method} {template}"), pattern.loc))
}

/// An `[[api.operation]]` table: an operation of its own (`match`), or steps for one imported
/// from the API's OpenAPI document (`id`).
struct OperationTable {
    pattern: Option<Located<String>>,
    id: Option<Located<String>>,
    inherit: bool,
    inbound: Vec<Step>,
    outbound: Vec<Step>,
    timeout: Option<std::time::Duration>,
}

/// A duration greater than zero.
fn positive_duration(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<std::time::Duration> {
    let d = r.duration(v, field)?;
    if d.is_zero() {
        r.error(&v.span(), field, "must be greater than zero");
        return None;
    }
    Some(d)
}

/// Reads the API's OpenAPI document into `operations`; returns the API path it gives. Errors
/// are located in the document.
fn import_operations(
    r: &mut Reader,
    doc: &Located<std::path::PathBuf>,
    operations: &mut Vec<Operation>,
) -> Option<String> {
    let text = match std::fs::read(&doc.value) {
        Ok(bytes) if bytes.len() > crate::openapi::MAX_DOCUMENT => {
            r.errors.push(doc.loc.error(format!("{}: larger than 8 MiB", doc.value.display())));
            return None;
        }
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(_) => {
                r.errors.push(doc.loc.error(format!("{}: not UTF-8", doc.value.display())));
                return None;
            }
        },
        Err(e) => {
            r.errors.push(doc.loc.error(format!("{}: {e}", doc.value.display())));
            return None;
        }
    };
    let file: std::sync::Arc<std::path::Path> = std::sync::Arc::from(doc.value.as_path());
    let at = |line: u32, column: u32, field: String| Loc { file: file.clone(), line, column, field };
    let document = match crate::openapi::read(&text) {
        Ok(d) => d,
        Err(e) => {
            r.errors.push(at(e.line, e.column, "openapi".to_owned()).error(e.message));
            return None;
        }
    };
    for op in document.operations {
        let loc = at(op.line, op.column, format!("paths.{}.{}", op.path, op.method.to_ascii_lowercase()));
        if let Some(pattern) = operation_pattern(r, Located::new(format!("{} {}", op.method, op.path), loc)) {
            operations.push(Operation {
                pattern,
                id: op.id,
                inherit: true,
                inbound: Vec::new(),
                outbound: Vec::new(),
                timeout: None,
            });
        }
    }
    document.base_path
}

fn operation(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<OperationTable> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["match", "id", "inherit", "inbound", "outbound", "timeout"]);
    let timeout = get(t, "timeout").and_then(|d| positive_duration(r, d, &join(field, "timeout")));
    let pattern = get(t, "match").and_then(|m| r.non_empty_string(m, &join(field, "match")));
    let pattern = pattern.and_then(|p| operation_pattern(r, p));
    let id = get(t, "id").and_then(|i| r.non_empty_string(i, &join(field, "id")));
    let inherit = flag(r, t, field, "inherit", true);
    let inbound = get(t, "inbound").map(|s| steps(r, s, &join(field, "inbound"))).unwrap_or_default();
    let outbound = get(t, "outbound").map(|s| steps(r, s, &join(field, "outbound"))).unwrap_or_default();
    Some(OperationTable { pattern, id, inherit, inbound, outbound, timeout })
}

const STEP_KINDS: [&str; 14] = [
    "set_header",
    "validate_client_certificate",
    "return_response",
    "validate_jwt",
    "ip_filter",
    "check_header",
    "rate_limit",
    "rate_limit_by_key",
    "quota",
    "quota_by_key",
    "send_request",
    "find_and_replace",
    "redirect_content_urls",
    "log_to_eventhub",
];

pub(crate) fn steps(r: &mut Reader, v: &Value<'_>, field: &str) -> Vec<Step> {
    r.tables(v, field).into_iter().filter_map(|(v, f)| step(r, v, &f)).collect()
}

fn step(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Step> {
    let t = r.table(v, field)?;
    if t.len() != 1 {
        r.error(&v.span(), field, format!("a step has exactly one of: {}", STEP_KINDS.join(", ")));
        return None;
    }
    r.check_keys(t, field, &STEP_KINDS);
    let (key, body) = t.iter().next()?;
    let field = join(field, key.get_ref());
    let kind = match key.get_ref().as_ref() {
        "set_header" => StepKind::SetHeader(set_header(r, body, &field)?),
        "validate_client_certificate" => {
            StepKind::ValidateClientCertificate(validate_client_certificate(r, body, &field)?)
        }
        "return_response" => StepKind::ReturnResponse(return_response(r, body, &field)?),
        "validate_jwt" => StepKind::ValidateJwt(Box::new(crate::callers::validate_jwt(r, body, &field)?)),
        "ip_filter" => StepKind::IpFilter(crate::traffic::ip_filter(r, body, &field)?),
        "check_header" => StepKind::CheckHeader(crate::traffic::check_header(r, body, &field)?),
        "rate_limit" => StepKind::RateLimit(crate::traffic::rate_limit(r, body, &field, false)?),
        "rate_limit_by_key" => StepKind::RateLimit(crate::traffic::rate_limit(r, body, &field, true)?),
        "quota" => StepKind::Quota(crate::traffic::quota(r, body, &field, false)?),
        "quota_by_key" => StepKind::Quota(crate::traffic::quota(r, body, &field, true)?),
        "send_request" => StepKind::SendRequest(Box::new(crate::callout::send_request(r, body, &field)?)),
        "find_and_replace" => StepKind::FindAndReplace(find_and_replace(r, body, &field)?),
        "redirect_content_urls" => StepKind::RedirectContentUrls(r.boolean(body, &field)?),
        "log_to_eventhub" => StepKind::LogToEventhub(crate::logger::log_to_eventhub(r, body, &field)?),
        _ => return None,
    };
    Some(Step { kind, loc: r.loc(&key.span(), &field) })
}

/// Longest `from` of a `find_and_replace` (what is held back between pieces of a body).
const MOST_FIND: usize = 4096;

fn find_and_replace(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<FindAndReplace> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["from", "to"]);
    let from = required(r, t, v, field, "from").and_then(|f| r.string(f, &join(field, "from")));
    if let Some(f) = &from
        && (f.value.is_empty() || f.value.len() > MOST_FIND)
    {
        r.errors.push(f.loc.error(format!("must be 1 to {MOST_FIND} bytes long")));
        return None;
    }
    let to = required(r, t, v, field, "to").and_then(|x| r.string(x, &join(field, "to")));
    Some(FindAndReplace { from: from?, to: to?.value })
}

pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Fields the proxy writes from a message's framing, never from a policy: a second
/// `Content-Length` or a `Connection` that names another field would change how the message is
/// delimited.
pub(crate) fn refuse_framing_field(r: &mut Reader, name: &Located<String>) {
    const FRAMING: [&str; 8] = [
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    ];
    if FRAMING.iter().any(|f| f.eq_ignore_ascii_case(&name.value)) {
        r.errors.push(name.loc.error(format!(
            "\"{}\" cannot be set by a policy: the proxy writes it from the message's framing",
            name.value
        )));
    }
}

fn set_header(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<SetHeader> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["name", "value", "action"]);
    let name = required(r, t, v, field, "name").and_then(|n| r.string(n, &join(field, "name")));
    if let Some(n) = &name
        && !is_token(&n.value)
    {
        r.errors.push(n.loc.error(format!("\"{}\" is not a valid header name", n.value)));
    }
    if let Some(n) = &name {
        refuse_framing_field(r, n);
    }
    let action = match get(t, "action") {
        Some(a) => r.choice(
            a,
            &join(field, "action"),
            &[
                ("override", SetHeaderAction::Override),
                ("skip", SetHeaderAction::Skip),
                ("append", SetHeaderAction::Append),
                ("delete", SetHeaderAction::Delete),
            ],
        )?,
        None => SetHeaderAction::Override,
    };
    let value = get(t, "value").and_then(|x| r.string(x, &join(field, "value")));
    if value.is_none() && action != SetHeaderAction::Delete && get(t, "value").is_none() {
        r.error(
            &v.span(),
            &join(field, "value"),
            "missing field `value` (only action = \"delete\" goes without)",
        );
        return None;
    }
    Some(SetHeader { name: name?, value, action })
}

pub(crate) fn flag(r: &mut Reader, t: &DeTable<'_>, field: &str, key: &str, default: bool) -> bool {
    match get(t, key) {
        Some(b) => r.boolean(b, &join(field, key)).unwrap_or(default),
        None => default,
    }
}

/// Hex digits with optional `:` or space separators (as thumbprints are often copied), upper-cased.
pub(crate) fn clean_hex(s: &str) -> String {
    s.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect::<String>().to_ascii_uppercase()
}

const IDENTITY_KEYS: [&str; 11] = [
    "thumbprint",
    "thumbprint_sha256",
    "thumbprint_in",
    "certificate",
    "serial_number",
    "common_name",
    "subject",
    "dns_name",
    "issuer_subject",
    "issuer_thumbprint",
    "issuer_certificate",
];

fn identity(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<Identity> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &IDENTITY_KEYS);
    if t.is_empty() {
        r.error(&v.span(), field, format!("an identity needs at least one of: {}", IDENTITY_KEYS.join(", ")));
        return None;
    }
    let mut attributes = Vec::new();
    for key in IDENTITY_KEYS {
        let Some(value) = get(t, key) else { continue };
        let f = join(field, key);
        let Some(text) = r.non_empty_string(value, &f) else { continue };
        let hex = |r: &mut Reader, digits: usize| {
            let h = clean_hex(&text.value);
            if h.len() != digits || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                r.errors.push(text.loc.error(format!("\"{}\" is not {digits} hex digits", text.value)));
                return None;
            }
            Some(h)
        };
        let attribute = match key {
            "thumbprint" => hex(r, 40).map(IdentityAttribute::Thumbprint),
            "thumbprint_sha256" => hex(r, 64).map(IdentityAttribute::ThumbprintSha256),
            "issuer_thumbprint" => hex(r, 40).map(IdentityAttribute::IssuerThumbprint),
            "serial_number" => {
                let h = clean_hex(&text.value);
                if h.is_empty() || h.len() > 40 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    r.errors.push(text.loc.error(format!("\"{}\" is not a hex serial number", text.value)));
                    None
                } else {
                    let trimmed = h.trim_start_matches('0');
                    Some(IdentityAttribute::SerialNumber(if trimmed.is_empty() {
                        "0".to_owned()
                    } else {
                        trimmed.to_owned()
                    }))
                }
            }
            "thumbprint_in" => Some(IdentityAttribute::ThumbprintIn(text.value.clone())),
            "certificate" => Some(IdentityAttribute::Certificate(text.value.clone())),
            "issuer_certificate" => Some(IdentityAttribute::IssuerCertificate(text.value.clone())),
            "common_name" => Some(IdentityAttribute::CommonName(text.value.clone())),
            "subject" => Some(IdentityAttribute::Subject(text.value.clone())),
            "dns_name" => Some(IdentityAttribute::DnsName(text.value.clone())),
            "issuer_subject" => Some(IdentityAttribute::IssuerSubject(text.value.clone())),
            _ => None,
        };
        if let Some(a) = attribute {
            attributes.push(Located::new(a, text.loc.clone()));
        }
    }
    Some(Identity { attributes, loc: Some(r.loc(&v.span(), field)) })
}

fn validate_client_certificate(
    r: &mut Reader,
    v: &Value<'_>,
    field: &str,
) -> Option<ValidateClientCertificate> {
    let t = r.table(v, field)?;
    r.check_keys(
        t,
        field,
        &[
            "validate_trust",
            "validate_revocation",
            "validate_not_before",
            "validate_not_after",
            "ignore_error",
            "identities",
            "status",
            "message",
        ],
    );
    let identities = match get(t, "identities") {
        Some(list) => r
            .tables(list, &join(field, "identities"))
            .into_iter()
            .filter_map(|(v, f)| identity(r, v, &f))
            .collect(),
        None => Vec::new(),
    };
    let message = get(t, "message").and_then(|m| r.string(m, &join(field, "message"))).map(|m| m.value);
    let status = match get(t, "status") {
        Some(s) => r.integer(s, &join(field, "status"), 400..600).map(|n| n as u16)?,
        None => 403,
    };
    Some(ValidateClientCertificate {
        validate_trust: flag(r, t, field, "validate_trust", true),
        validate_revocation: flag(r, t, field, "validate_revocation", true),
        validate_not_before: flag(r, t, field, "validate_not_before", true),
        validate_not_after: flag(r, t, field, "validate_not_after", true),
        ignore_error: flag(r, t, field, "ignore_error", false),
        identities,
        status,
        message: message.unwrap_or_else(|| "Invalid client certificate".to_owned()),
    })
}

fn return_response(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<ReturnResponse> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["status", "reason", "headers", "body"]);
    let status = match get(t, "status") {
        Some(s) => r.integer(s, &join(field, "status"), 200..600).map(|n| n as u16),
        None => {
            r.error(&v.span(), &join(field, "status"), "missing field `status`");
            None
        }
    };
    let reason = get(t, "reason").and_then(|x| r.string(x, &join(field, "reason"))).map(|x| x.value);
    if let Some(reason) = &reason
        && reason.bytes().any(|b| b < 0x20 || b == 0x7f)
    {
        r.error(&v.span(), &join(field, "reason"), "a reason phrase cannot contain control characters");
    }
    let mut headers = Vec::new();
    if let Some(h) = get(t, "headers")
        && let Some(ht) = r.table(h, &join(field, "headers"))
    {
        for (key, value) in ht.iter() {
            let f = format!("{}.{}", join(field, "headers"), key.get_ref());
            if !is_token(key.get_ref()) {
                r.error(&key.span(), &f, format!("\"{}\" is not a valid header name", key.get_ref()));
                continue;
            }
            if let Some(value) = r.string(value, &f) {
                let name = Located::new(key.get_ref().to_string(), r.loc(&key.span(), &f));
                refuse_framing_field(r, &name);
                headers.push((name, value));
            }
        }
    }
    let body_field = get(t, "body");
    let body =
        body_field.and_then(|b| r.string(b, &join(field, "body"))).map(|b| b.value).unwrap_or_default();
    // A 204 or 304 ends at its head (RFC 9112 §6.3): a body would be read as the next response.
    if let (Some(code @ (204 | 304)), Some(b)) = (status, body_field)
        && !body.is_empty()
    {
        r.error(&b.span(), &join(field, "body"), format!("a {code} response has no body"));
    }
    Some(ReturnResponse { status: status?, reason, headers, body })
}

/// Whether `dn` reads as a distinguished name: `attribute=value` pairs separated by commas (RFC
/// 4514; a backslash escapes a comma inside a value), or by slashes in the OpenSSL one-line form.
fn looks_like_dn(dn: &str) -> bool {
    let dn = dn.trim();
    // The OpenSSL one-line form, `/C=US/O=Contoso/CN=x`, separates with slashes.
    let slashes = dn.starts_with('/');
    let dn = dn.trim_start_matches('/');
    if dn.is_empty() {
        return false;
    }
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut escaped = false;
    for ch in dn.chars() {
        match ch {
            _ if escaped => {
                current.push(ch);
                escaped = false;
            }
            '\\' => escaped = true,
            '/' if slashes => parts.push(std::mem::take(&mut current)),
            ',' | '+' | ';' if !slashes => parts.push(std::mem::take(&mut current)),
            _ => current.push(ch),
        }
    }
    parts.push(current);
    parts.iter().all(|p| {
        p.split_once('=').is_some_and(|(k, _)| {
            let k = k.trim();
            !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        })
    })
}

/// Whether the operation declared at `loc` in `api` is written exactly as `text`.
fn first_text_equal(api: &Api, loc: &Loc, text: &str) -> bool {
    api.operations.iter().any(|o| {
        o.pattern.loc.line == loc.line && o.pattern.loc.column == loc.column && o.pattern.value == text
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_urls() {
        let ok = |a: &str, p: &str, https| Ok((a.to_owned(), p.to_owned(), https));
        assert_eq!(parse_backend_url("http://127.0.0.1:5000"), ok("127.0.0.1:5000", "", false));
        assert_eq!(parse_backend_url("http://svc/api/v1/"), ok("svc:80", "/api/v1", false));
        assert_eq!(parse_backend_url("http://[::1]:81/x"), ok("[::1]:81", "/x", false));
        assert_eq!(parse_backend_url("http://[::1]"), ok("[::1]:80", "", false));
        assert_eq!(parse_backend_url("https://svc/a"), ok("svc:443", "/a", true));
        assert_eq!(parse_backend_url("https://[::1]:8443"), ok("[::1]:8443", "", true));
        assert_eq!((host_of("[::1]:8443"), host_of("svc:443")), ("::1", "svc"));
        assert!(parse_backend_url("ftp://x").is_err());
        assert!(parse_backend_url("http://x:99999").is_err());
        assert!(parse_backend_url("http://x/?q").is_err());
    }
}
