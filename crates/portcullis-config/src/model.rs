//! The typed configuration. Field-by-field documentation for operators is in `config/README.md`;
//! defaults live in the `Default` impls here and nowhere else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::Loc;

/// A value and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<T> {
    pub value: T,
    pub loc: Loc,
}

impl<T> Located<T> {
    pub fn new(value: T, loc: Loc) -> Self {
        Located { value, loc }
    }
}

/// A whole configuration file.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (relative paths inside it are resolved against its directory).
    pub path: PathBuf,
    pub server: Server,
    pub listeners: Vec<Listener>,
    pub certificates: Vec<NamedCertificate>,
    pub thumbprints: Vec<NamedFile>,
    pub backends: Vec<Backend>,
    pub apis: Vec<Api>,
    /// `[[product]]`: groups of APIs that subscriptions grant, with policy of their own.
    pub products: Vec<Product>,
    /// `[subscriptions]`: per product, a file of subscriptions.
    pub subscription_files: Vec<NamedFile>,
    /// `[[subscription]]`: subscriptions written in the configuration.
    pub subscriptions: Vec<Subscription>,
    /// `[[openid]]`: identity providers whose keys `validate_jwt` uses.
    pub openid: Vec<OpenId>,
    /// Steps of the global scope, applied to every API before its own.
    pub inbound: Vec<Step>,
    pub outbound: Vec<Step>,
    /// `[[logger]]`: where `log_to_eventhub` steps (and the access log, if it says so) write.
    pub loggers: Vec<Logger>,
}

impl Config {
    /// Every step of every scope: global, products', APIs' and operations'.
    pub fn all_steps(&self) -> impl Iterator<Item = &Step> {
        self.inbound
            .iter()
            .chain(&self.outbound)
            .chain(self.products.iter().flat_map(|p| p.inbound.iter().chain(&p.outbound)))
            .chain(self.apis.iter().flat_map(|a| {
                a.inbound
                    .iter()
                    .chain(&a.outbound)
                    .chain(a.operations.iter().flat_map(|o| o.inbound.iter().chain(&o.outbound)))
            }))
    }
}

/// `[[logger]]` of kind `kafka`: a Kafka topic (or an Azure Event Hub through its Kafka
/// endpoint) that `log_to_eventhub` steps and the access log write to, through a producer on a
/// thread of its own.
#[derive(Debug, Clone, PartialEq)]
pub struct Logger {
    /// What steps name (`logger_id`) and metrics label; `id` is accepted too.
    pub name: Located<String>,
    /// Brokers asked for the topic's layout, in turn (`host:port`).
    pub bootstrap: Vec<(String, u16)>,
    pub topic: String,
    /// TLS to the brokers, verified against these CAs (the system's when empty).
    pub tls: Option<Vec<Located<PathBuf>>>,
    pub sasl: Option<Sasl>,
    /// A template: the key of messages whose step gives none (it picks the partition).
    pub partition_key: Option<Located<String>>,
    pub linger: Duration,
    /// Bytes of messages per partition in one batch, at most.
    pub max_batch: usize,
    pub compression: LogCompression,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub retry_backoff_max: Duration,
    /// Bytes of messages held while the broker cannot take them; beyond it new ones are dropped.
    pub buffer: usize,
    /// Messages handed over by the workers and not yet taken by the logger's thread, at most.
    pub queue: usize,
    pub timeout: Duration,
    /// `-1` all in-sync replicas, `1` the leader, `0` no answer.
    pub acks: i16,
    /// At shutdown (or when a reload replaces the logger), how long held messages may take.
    pub drain: Duration,
    pub loc: Loc,
}

/// SASL PLAIN: what Azure Event Hubs takes (`username = "$ConnectionString"`, the connection
/// string in `password_file`).
#[derive(Debug, Clone, PartialEq)]
pub struct Sasl {
    pub username: String,
    pub password_file: Located<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogCompression {
    None,
    Gzip,
    Snappy,
    Lz4,
    Zstd,
}

/// `log_to_eventhub`: API Management's `log-to-eventhub`: a message rendered from a template,
/// written to a logger.
#[derive(Debug, Clone)]
pub struct LogToEventhub {
    pub logger_id: Located<String>,
    /// A template; values are JSON-escaped, and a variable without a value is left empty.
    pub message: Located<String>,
    pub partition_id: Option<u32>,
    /// A template: the message's key (overrides the logger's `partition_key`).
    pub partition_key: Option<Located<String>>,
}

/// Which io driver the workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring when the kernel allows it, else epoll (said in one log line).
    Auto,
    IoUring,
    Epoll,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Worker threads; 0 means one per available core.
    pub workers: usize,
    pub driver: Driver,
    /// Largest request head (request line and header fields), in bytes.
    pub max_head_size: usize,
    /// Most header fields in a request head.
    pub max_headers: usize,
    /// Time for a complete request head to arrive once its first byte has (slowloris guard).
    pub head_timeout: Duration,
    /// Time a client keep-alive connection may sit idle between requests.
    pub idle_timeout: Duration,
    /// Time for a TLS handshake to complete.
    pub handshake_timeout: Duration,
    /// On SIGTERM/SIGINT, how long in-flight requests may take before the process exits anyway.
    pub drain_timeout: Duration,
    /// Time a client may take to send the next piece of a request body.
    pub body_timeout: Duration,
    /// The access log: one record per request, through the log thread.
    pub access_log: Option<AccessLog>,
    /// Open client connections per worker; more wait in the kernel's accept queue. `None`:
    /// sized from the open-file limit when the server starts.
    pub max_connections: Option<usize>,
    /// Forward request header fields whose names contain `_` (dropped by default: CGI/WSGI
    /// backends read `X_Foo` and `X-Foo` as one variable).
    pub allow_underscores_in_headers: bool,
    /// Largest request body, in bytes; a larger one is refused with 413. `None`: no limit.
    pub max_body_size: Option<u64>,
    /// Keys the rate-limit and quota counters hold (each kind); set at start.
    pub rate_limit_keys: usize,
    /// Rate-limit and quota counts shared with other hosts through Redis (`[server.redis]`).
    pub redis: Option<Redis>,
    /// The admin endpoint's address (`/metrics`, `/healthz`, `/ready`, `/config`); off when
    /// `None`.
    pub admin: Option<std::net::SocketAddr>,
    /// CPUs for the threads that are not workers (access log, loggers, admin, health checks,
    /// key fetchers, reloads); empty: they run wherever the process may. Set at start.
    pub background_cpus: Vec<Located<usize>>,
}

/// What limits do while Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisFailure {
    /// Count on this host alone until Redis is back.
    Local,
    /// Refuse calls that a rate limit or quota applies to (503).
    Deny,
}

/// `access_log = true` (JSON lines to stdout) or `{ path, format, queue }`.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLog {
    /// A file (opened again on `SIGUSR1`); `None` for stdout.
    pub path: Option<PathBuf>,
    /// Where `path` was written (for what `portcullis check` finds about the file).
    pub path_loc: Option<Loc>,
    pub format: AccessFormat,
    /// Records waiting for the log thread at most (more are dropped and counted). Read at start.
    pub queue: usize,
    /// Records go to this `[[logger]]` (as JSON, one message each) instead of `path`.
    pub logger: Option<Located<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessFormat {
    /// One JSON object per line.
    Json,
    /// nginx's and HAProxy's "combined".
    Combined,
}

/// `[server.redis]`: where counts are shared, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct Redis {
    /// As written (`redis://` or `rediss://`), for messages; the password is not kept in it.
    pub url: Located<String>,
    pub host: String,
    pub port: u16,
    /// `rediss://`: TLS, verified against `ca` (or the system's CAs).
    pub tls: bool,
    pub ca: Vec<Located<PathBuf>>,
    pub db: u32,
    pub username: Option<String>,
    /// From the URL.
    pub password: Option<String>,
    /// Read when the configuration is applied (start and reload).
    pub password_file: Option<Located<PathBuf>>,
    /// How often each worker shares its counts.
    pub sync_interval: Duration,
    /// For connecting, and for each answer.
    pub timeout: Duration,
    pub failure: RedisFailure,
    pub loc: Loc,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            workers: 0,
            driver: Driver::Auto,
            max_head_size: 16 * 1024,
            max_headers: 100,
            head_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            access_log: None,
            max_connections: None,
            allow_underscores_in_headers: false,
            max_body_size: None,
            rate_limit_keys: 65_536,
            redis: None,
            admin: None,
            background_cpus: Vec::new(),
        }
    }
}

/// Whether and how a client certificate is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertMode {
    /// Not asked for.
    Off,
    /// Asked for; a missing or invalid one does not fail the handshake, policy decides.
    Request,
    /// The handshake fails without a certificate that chains to `client_ca`.
    Require,
}

/// Lowest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct CertKey {
    pub cert: Located<PathBuf>,
    pub key: Located<PathBuf>,
    pub loc: Loc,
}

/// The client-certificate side of a listener or an SNI entry.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    pub mode: Located<ClientCertMode>,
    /// CA certificates a client certificate may chain to: roots and intermediates.
    pub client_ca: Vec<Located<PathBuf>>,
    /// CRLs, PEM or DER, issued by those CAs.
    pub crl: Vec<Located<PathBuf>>,
}

/// `[[listener]]`.
#[derive(Debug, Clone)]
pub struct Listener {
    pub bind: Located<SocketAddr>,
    pub certificate: CertKey,
    pub client: ClientAuth,
    pub tls_min_version: TlsVersion,
    /// Stateless session resumption (RFC 8446 tickets); the client certificate's facts survive it.
    pub session_tickets: bool,
    /// A PROXY protocol header (v1 or v2) precedes TLS on every connection: the client's address
    /// is the one it carries.
    pub proxy_protocol: bool,
    /// Who may send a PROXY protocol header (empty: anyone).
    pub proxy_protocol_from: Vec<Located<IpRange>>,
    pub sni: Vec<Sni>,
    pub loc: Loc,
}

/// `[[listener.sni]]`: a certificate and client-certificate mode for some hostnames.
#[derive(Debug, Clone)]
pub struct Sni {
    pub hostnames: Vec<Located<String>>,
    pub certificate: CertKey,
    /// Inherits the listener's mode, CAs and CRLs where not set.
    pub client: ClientAuth,
    pub loc: Loc,
}

/// `[certificates]`: a named certificate (with its key, when the proxy presents it).
#[derive(Debug, Clone)]
pub struct NamedCertificate {
    pub name: Located<String>,
    pub cert: Located<PathBuf>,
    pub key: Option<Located<PathBuf>>,
}

/// `[thumbprints]`: a named file.
#[derive(Debug, Clone)]
pub struct NamedFile {
    pub name: Located<String>,
    pub path: Located<PathBuf>,
}

/// `[[backend]]`.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: Located<String>,
    /// `http://host:port[/base/path]`.
    pub url: Located<String>,
    /// `host:port` from the URL.
    pub authority: String,
    /// The URL's path without a trailing slash ("" for none): forwarded paths are appended to it.
    pub base_path: String,
    pub connect_timeout: Duration,
    /// Time to wait for the response head after the request was sent, and between reads of a
    /// response body.
    pub response_timeout: Duration,
    /// How long an idle pooled connection is kept.
    pub idle_timeout: Duration,
    /// Idle connections kept per worker.
    pub max_idle: usize,
    /// TLS to the backend (`https://` URLs).
    pub tls: Option<BackendTls>,
    /// Its servers (`servers`, or the one of `url`): `host:port` each, with its URL.
    pub servers: Vec<Located<String>>,
    pub balance: Balance,
    /// Consecutive failures that take a server out of rotation (0: never).
    pub eject_after: u32,
    /// How long a server is out after its first ejection (longer after each next one).
    pub eject_for: Duration,
    pub health_check: Option<HealthCheck>,
    pub loc: Loc,
}

/// How a backend's server is picked for each request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// The less busy of two servers picked at random (by requests in flight on the worker).
    LeastRequests,
}

/// `health_check = { path, interval, timeout, expect_status }`: active checks of each server.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub expect_status: StatusRanges,
}

/// `[[backend]] tls = { … }`: how the proxy speaks TLS to an `https://` backend.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendTls {
    /// CAs the backend's chain must lead to (the system's when empty).
    pub ca: Vec<Located<PathBuf>>,
    /// The name sent as SNI and checked against the backend's certificate (the URL's host).
    pub server_name: String,
    /// `server_name` was given (else each server of a backend is checked against its own host).
    pub server_name_given: bool,
    /// The certificate the proxy presents (mutual TLS): a name in `[certificates]`, given as
    /// `certificate` (or the older `client_certificate` of the backend)…
    pub certificate: Option<Located<String>>,
    /// …or as the SHA-1 thumbprint of one (APIM's `authentication-certificate thumbprint`), in
    /// upper-case hex without separators.
    pub certificate_thumbprint: Option<Located<String>>,
    /// Verify the backend's chain and name (`false` only with a warning at every load).
    pub verify: bool,
}

/// `[[api]]`.
#[derive(Debug, Clone)]
pub struct Api {
    pub name: Located<String>,
    /// Path prefix, matched on segment boundaries; stripped before forwarding (APIM's API URL
    /// suffix), the backend URL's path is put in its place.
    pub path: Located<String>,
    /// Only for requests to this host (`Host` without port, case-insensitive).
    pub host: Option<Located<String>>,
    pub backend: Located<String>,
    /// Whether the global steps run before this API's.
    pub inherit: bool,
    pub inbound: Vec<Step>,
    pub outbound: Vec<Step>,
    /// When not empty, only requests matching one of these reach the backend (others get 404).
    pub operations: Vec<Operation>,
    /// The OpenAPI document the operations (and the path, unless given) come from.
    pub openapi: Option<Located<PathBuf>>,
    /// Overrides the backend's `response_timeout` for this API.
    pub timeout: Option<Duration>,
    /// A request needs a subscription key (unless an open product grants the API).
    pub subscription_required: bool,
    /// Header that carries the subscription key.
    pub subscription_key_header: String,
    /// Query parameter that carries the key when the header is absent.
    pub subscription_key_query: String,
    pub loc: Loc,
}

/// `[[product]]`: APIs granted together, by subscriptions to the product or (when the product is
/// open) to anyone.
#[derive(Debug, Clone)]
pub struct Product {
    pub name: Located<String>,
    /// Names of the APIs it grants.
    pub apis: Vec<Located<String>>,
    /// `false`: an open product, its APIs reachable without a key (its steps still run).
    pub subscription_required: bool,
    /// Steps of the product scope: after the global scope's, before the API's.
    pub inbound: Vec<Step>,
    pub outbound: Vec<Step>,
    pub loc: Loc,
}

/// What a subscription grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionScope {
    /// The APIs of a product (its steps run for the subscription's requests).
    Product(String),
    /// One API.
    Api(String),
    /// Every API.
    AllApis,
}

/// A subscription's state: only active ones grant access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriptionState {
    Active,
    Suspended,
    Cancelled,
    Expired,
}

impl SubscriptionState {
    pub const NAMES: [(&'static str, SubscriptionState); 4] = [
        ("active", SubscriptionState::Active),
        ("suspended", SubscriptionState::Suspended),
        ("cancelled", SubscriptionState::Cancelled),
        ("expired", SubscriptionState::Expired),
    ];
}

/// `[[subscription]]`.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: Located<String>,
    pub scope: Located<SubscriptionScope>,
    pub primary_key: Located<String>,
    pub secondary_key: Option<Located<String>>,
    pub state: SubscriptionState,
    pub loc: Loc,
}

/// `[[openid]]`: an OpenID Connect provider, its keys fetched off the data path.
#[derive(Debug, Clone)]
pub struct OpenId {
    pub name: Located<String>,
    /// The discovery document (`…/.well-known/openid-configuration`), https.
    pub url: Located<String>,
    /// CA certificates the provider's TLS certificate must chain to; empty: the system's store.
    pub ca: Vec<Located<PathBuf>>,
    /// How often the keys are fetched again.
    pub refresh: Duration,
    /// Least time between two refetches asked for by tokens with an unknown `kid`.
    pub min_refetch: Duration,
    /// How long a request whose token named an unknown `kid` waits for the refetch.
    pub refetch_wait: Duration,
    /// Time for one fetch (connect, TLS, request and response).
    pub timeout: Duration,
    pub loc: Loc,
}

/// An operation of an API: `GET /devices/{deviceId}/telemetry`, relative to the API's path.
#[derive(Debug, Clone)]
pub struct Operation {
    /// `METHOD /template` as written; `*` as the method matches any.
    pub pattern: Located<String>,
    /// The `operationId` of an operation imported from an OpenAPI document.
    pub id: Option<String>,
    /// Whether the API's (and through it the global) steps run before the operation's.
    pub inherit: bool,
    pub inbound: Vec<Step>,
    pub outbound: Vec<Step>,
    /// Overrides the API's (or the backend's) response timeout for this operation.
    pub timeout: Option<Duration>,
}

/// One policy step as configured.
#[derive(Debug, Clone)]
pub struct Step {
    pub kind: StepKind,
    pub loc: Loc,
}

#[derive(Debug, Clone)]
pub enum StepKind {
    SetHeader(SetHeader),
    ValidateClientCertificate(ValidateClientCertificate),
    ReturnResponse(ReturnResponse),
    ValidateJwt(Box<ValidateJwt>),
    IpFilter(IpFilter),
    CheckHeader(CheckHeader),
    /// `rate_limit` (per subscription) or `rate_limit_by_key`.
    RateLimit(RateLimit),
    /// `quota` (per subscription) or `quota_by_key`.
    Quota(Quota),
    SendRequest(Box<SendRequest>),
    /// `find_and_replace = { from, to }`: in a response body (outbound).
    FindAndReplace(FindAndReplace),
    /// `redirect_content_urls = true`: `Location` and `Content-Location` from the backend's URL
    /// to the public one (outbound).
    RedirectContentUrls(bool),
    LogToEventhub(LogToEventhub),
}

/// `find_and_replace`: API Management's policy of that name, on response bodies.
#[derive(Debug, Clone)]
pub struct FindAndReplace {
    pub from: Located<String>,
    pub to: String,
}

/// `send_request`: APIM's `send-request` as an authorisation callout. The request waits for the
/// service's answer; a status in `expect_status` lets it through (with `set_headers` rendered
/// from the answer), anything else gets the refusal.
#[derive(Debug, Clone)]
pub struct SendRequest {
    /// Names the answer for templates: `{callout.NAME.status}`, `{callout.NAME.json.PATH}`.
    pub name: Located<String>,
    pub method: String,
    pub url: Located<String>,
    /// `host:port` of the URL (literal: no template there), and whether it is `https://`.
    pub authority: String,
    pub https: bool,
    /// The URL's path and query, a template whose values are percent-encoded.
    pub path: String,
    /// Request headers (templates); the callout carries nothing else of the client's request.
    pub headers: Vec<(Located<String>, Located<String>)>,
    pub body: Option<Located<String>>,
    /// For the whole callout: connecting, the TLS handshake, the answer.
    pub timeout: Duration,
    /// Carry on when the callout fails or refuses, with its fields empty.
    pub ignore_error: bool,
    /// TLS to the service (`https://` only; `backend_tls = { … }`, as a backend's `tls`).
    pub tls: Option<BackendTls>,
    /// Answers are kept this long per rendered request (method, URL, headers and body).
    pub cache_ttl: Option<Duration>,
    /// Statuses that let the request through (default: 200–299).
    pub expect_status: StatusRanges,
    pub status: u16,
    pub message: String,
    /// Headers set on the forwarded request from the answer (templates).
    pub set_headers: Vec<(Located<String>, Located<String>)>,
    /// Longest answer body read (default 64 KiB).
    pub max_response_size: usize,
}

/// `validate_client_certificate`: APIM's policy of the same name.
#[derive(Debug, Clone)]
pub struct ValidateClientCertificate {
    pub validate_trust: bool,
    pub validate_revocation: bool,
    pub validate_not_before: bool,
    pub validate_not_after: bool,
    /// Carry on when validation fails (the request is not refused).
    pub ignore_error: bool,
    /// The certificate must match all attributes of at least one of these (when any are given).
    pub identities: Vec<Identity>,
    pub status: u16,
    pub message: String,
}

/// One identity: every attribute given must match.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub attributes: Vec<Located<IdentityAttribute>>,
    pub loc: Option<Loc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityAttribute {
    /// SHA-1 thumbprint, hex.
    Thumbprint(String),
    ThumbprintSha256(String),
    /// Name of a `[thumbprints]` list.
    ThumbprintIn(String),
    /// Name of a `[certificates]` entry the client certificate must be.
    Certificate(String),
    SerialNumber(String),
    CommonName(String),
    Subject(String),
    DnsName(String),
    IssuerSubject(String),
    IssuerThumbprint(String),
    /// Name of a `[certificates]` entry that must have issued the client certificate.
    IssuerCertificate(String),
}

/// `return_response`: answer without asking the backend.
#[derive(Debug, Clone)]
pub struct ReturnResponse {
    pub status: u16,
    pub reason: Option<String>,
    /// `(name, template)` pairs.
    pub headers: Vec<(Located<String>, Located<String>)>,
    pub body: String,
}

/// What `set_header` does when the header is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetHeaderAction {
    /// Replace every existing value.
    Override,
    /// Leave an existing header alone; set it only when absent.
    Skip,
    /// Add a value after any existing ones.
    Append,
    /// Remove the header.
    Delete,
}

/// `set_header = { name, value, action }`.
#[derive(Debug, Clone)]
pub struct SetHeader {
    pub name: Located<String>,
    /// A template: `{client_cert.subject}`, `{request.ip}`, `{header.NAME}`…
    pub value: Option<Located<String>>,
    pub action: SetHeaderAction,
}

/// Where `validate_jwt` finds the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// A header; `scheme` (e.g. `Bearer`) must precede the token when given.
    Header { name: String, scheme: Option<String> },
    /// A query parameter.
    Query(String),
    /// A template (`token_value`).
    Value(Located<String>),
}

/// One of `issuer_signing_keys`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SigningKeySource {
    /// A PEM file: a public key or a certificate.
    Pem(PathBuf),
    /// A `[certificates]` entry's public key.
    Certificate(String),
    /// A JWK Set file.
    Jwks(PathBuf),
    /// An RSA key's modulus and exponent, base64url.
    Rsa { n: String, e: String },
    /// An HMAC secret, base64.
    Secret(String),
}

/// A key `validate_jwt` verifies with.
#[derive(Debug, Clone)]
pub struct SigningKey {
    pub source: SigningKeySource,
    pub kid: Option<String>,
    /// The one algorithm the key verifies (else implied by the key's type).
    pub alg: Option<String>,
    pub loc: Loc,
}

/// One of `required_claims`.
#[derive(Debug, Clone)]
pub struct RequiredClaim {
    pub name: String,
    pub values: Vec<String>,
    /// `match = "all"` (every value) or `"any"`.
    pub match_all: bool,
    /// Splits a string claim into values (`" "` for `scope`).
    pub separator: Option<String>,
    pub loc: Loc,
}

/// `validate_jwt`: API Management's `validate-jwt`.
#[derive(Debug, Clone)]
pub struct ValidateJwt {
    pub source: TokenSource,
    /// Names of `[[openid]]` providers whose keys verify tokens.
    pub openid: Vec<Located<String>>,
    pub keys: Vec<SigningKey>,
    /// Any one of these must be in `aud` (when given).
    pub audiences: Vec<String>,
    /// `iss` must be one of these (when given; else an OpenID provider's issuer, when used).
    pub issuers: Vec<String>,
    pub required_claims: Vec<RequiredClaim>,
    pub clock_skew: Duration,
    pub require_expiration_time: bool,
    /// Only binds tokens to the TLS client certificate (RFC 8705 `cnf.x5t#S256`) when set.
    pub require_certificate_binding: bool,
    /// Largest token accepted, in bytes.
    pub max_token_size: usize,
    pub status: u16,
    /// When set, the message of every failure; else one that says what failed.
    pub message: Option<String>,
}

/// An inclusive range of addresses of one family (IPv4-mapped IPv6 addresses are IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub from: std::net::IpAddr,
    pub to: std::net::IpAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpAction {
    /// Only the listed addresses pass.
    Allow,
    /// The listed addresses are refused.
    Forbid,
}

/// `ip_filter`: API Management's `ip-filter`.
#[derive(Debug, Clone)]
pub struct IpFilter {
    pub action: IpAction,
    /// From `addresses`, `ranges` and `cidrs`.
    pub entries: Vec<Located<IpRange>>,
    /// Files of addresses, ranges and CIDR blocks, one a line.
    pub lists: Vec<Located<PathBuf>>,
    pub status: u16,
    pub message: String,
}

/// `check_header`: API Management's `check-header`.
#[derive(Debug, Clone)]
pub struct CheckHeader {
    pub name: Located<String>,
    /// Allowed values (empty: the header must only be present).
    pub values: Vec<String>,
    pub ignore_case: bool,
    pub status: u16,
    pub message: String,
}

/// Status codes as inclusive ranges: when a call counts (`increment_condition`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusRanges(pub Vec<(u16, u16)>);

impl StatusRanges {
    pub fn contains(&self, status: u16) -> bool {
        self.0.iter().any(|(a, b)| (*a..=*b).contains(&status))
    }
}

/// `rate_limit` / `rate_limit_by_key`: API Management's policies of those names.
#[derive(Debug, Clone)]
pub struct RateLimit {
    pub calls: u64,
    /// At most 300 s.
    pub renewal_period: std::time::Duration,
    /// A template; `None` for `rate_limit` (the subscription is the key).
    pub counter_key: Option<Located<String>>,
    /// When given, a call counts only when its response's status is one of these.
    pub increment_condition: Option<StatusRanges>,
    pub increment_count: u64,
    pub retry_after_header_name: String,
    pub remaining_calls_header_name: Option<String>,
    pub total_calls_header_name: Option<String>,
}

/// `quota` / `quota_by_key`: API Management's policies of those names.
#[derive(Debug, Clone)]
pub struct Quota {
    pub calls: Option<u64>,
    pub bandwidth_kb: Option<u64>,
    /// At least 300 s; zero: one period for ever.
    pub renewal_period: std::time::Duration,
    /// A template; `None` for `quota` (the subscription is the key).
    pub counter_key: Option<Located<String>>,
    /// Periods count from here (Unix seconds).
    pub first_period_start: i64,
    pub increment_condition: Option<StatusRanges>,
}
