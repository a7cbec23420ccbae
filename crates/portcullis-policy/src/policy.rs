//! Compiled policies and their evaluation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use portcullis_config::{
    Config, ConfigErrors, IdentityAttribute, IpAction, Loc, ReturnResponse, SetHeaderAction, StatusRanges,
    Step as StepConfig, StepKind, SubscriptionScope, ValidateClientCertificate,
};
use portcullis_facts::{ClientCert, RevocationSet, VerifyError, normalize_dn};
use portcullis_jose::{Crypto, RemoteKeys};

use crate::callout::{CalloutStep, CalloutTarget};
use crate::counters::Counters;
use crate::facts::{Facts, HeaderEdits, HeaderList, RequestState};
use crate::ipset::IpSet;
use crate::jwt::{JwtStep, KeyInputs, Outcome, percent_decode, query_value};
use crate::limits::{Decision, QuotaStep, RateStep};
use crate::operations::OperationPattern;
use crate::subscriptions::{Builder, Grant, Subscriptions};
use crate::template::{Context, Mode, Template};
use crate::thumbprints::ThumbprintSet;

/// A response the policy answers with instead of forwarding the request.
#[derive(Debug, Default)]
pub struct Response {
    pub status: u16,
    /// Reason phrase; the standard one when `None`.
    pub reason: Option<Bytes>,
    pub content_type: Option<Bytes>,
    pub body: Bytes,
    /// Header templates, rendered into the request's [`HeaderEdits`] when the step runs.
    pub(crate) headers: Vec<(Bytes, Template)>,
    /// A body that ends in a time, written when sent (`body` is then unused).
    pub(crate) countdown: Option<Countdown>,
}

/// A JSON body with a time in its message: `prefix`, the time, `suffix`.
#[derive(Debug)]
pub(crate) struct Countdown {
    pub(crate) prefix: Bytes,
    pub(crate) suffix: Bytes,
    /// `HH:MM:SS` rather than a number of seconds.
    pub(crate) hms: bool,
}

impl Response {
    /// The body to send for the request whose evaluation ended with this response.
    pub fn body_for(&self, state: &RequestState) -> Bytes {
        match &self.countdown {
            None => self.body.clone(),
            Some(c) => {
                let mut out = BytesMut::with_capacity(c.prefix.len() + c.suffix.len() + 12);
                c.render(state.wait_secs, &mut out);
                out.freeze()
            }
        }
    }
}

/// What a request may do next.
#[derive(Debug, Clone, Copy)]
pub enum Verdict<'p> {
    /// Forward it.
    Continue,
    /// Answer with this response; its headers are in the edits' added list. `reason` says why,
    /// for the log (never for the client).
    Respond { response: &'p Response, reason: &'static str },
    /// Inbound step `step` needs something from outside first (a callout's answer, an identity
    /// provider's keys, a shared counter). Evaluation stays sans-IO: the server gets what `need`
    /// says without blocking its worker, keeps the answer in the request's [`RequestState`], and
    /// calls [`PolicySet::inbound_from`] with `step` to resume there.
    Wait { step: usize, need: Need<'p> },
}

/// What a waiting step needs.
#[derive(Debug, Clone, Copy)]
pub enum Need<'p> {
    /// A token named a `kid` no current key has: ask these providers to fetch their keys again
    /// ([`RemoteKeys::demand_refetch`]), wait for the fetch (at most each provider's
    /// `refetch_wait`), then answer [`Answer::KeysRefreshed`](crate::Answer::KeysRefreshed).
    Keys(&'p [Arc<RemoteKeys>]),
    /// Counts are shared across hosts and a rate limit's or quota's key is new to this host (or
    /// has not been synced within its window): have the worker sync at once, wait for that sync
    /// (or the store's timeout), then answer [`Answer::Synced`](crate::Answer::Synced). The key
    /// is already noted for the sync. No host then spends a key's limit before it has learnt
    /// what the others hold of it; a host's first call on a key pays one round trip.
    Sync,
    /// A `send_request` step's callout: send the request in
    /// [`RequestState::callout_request`](crate::RequestState::callout_request) to callout target
    /// `target` (see [`PolicySet::callout_targets`]), read at most `max_response` bytes of its
    /// body, and answer [`Answer::Response`](crate::Answer::Response), or
    /// [`Answer::Failed`](crate::Answer::Failed) when there was no answer.
    Callout { target: usize, max_response: usize },
    /// The step of this crate's tests that stands for one which waits.
    #[cfg(test)]
    Probe,
}

#[derive(Debug)]
pub(crate) struct SetHeader {
    /// As configured (its case is what the backend or client sees).
    pub(crate) name: Bytes,
    pub(crate) action: SetHeaderAction,
    pub(crate) value: Option<Template>,
}

/// One attribute of an identity, compiled to the form it is compared in.
#[derive(Debug)]
enum Attribute {
    Sha1([u8; 20]),
    Sha256([u8; 32]),
    /// Index into `PolicySet::lists`.
    InList(usize),
    /// Upper-case hex without leading zeros.
    Serial(String),
    /// Lower-case.
    CommonName(String),
    /// Normalised.
    Subject(String),
    /// Lower-case.
    DnsName(String),
    IssuerSubject(String),
    IssuerSha1([u8; 20]),
}

#[derive(Debug)]
struct ValidateStep {
    trust: bool,
    revocation: bool,
    not_before: bool,
    not_after: bool,
    ignore_error: bool,
    /// OR of ANDs.
    identities: Vec<Vec<Attribute>>,
    reject: Response,
}

#[derive(Debug)]
struct IpFilterStep {
    allow: bool,
    set: IpSet,
    reject: Response,
}

#[derive(Debug)]
struct CheckHeaderStep {
    /// Lower case.
    name: Bytes,
    values: Vec<Bytes>,
    ignore_case: bool,
    reject: Response,
}

impl CheckHeaderStep {
    /// Whether the request has the header, with an allowed value when values are listed (any of
    /// its fields may hold it).
    fn passes(&self, headers: &dyn HeaderList) -> bool {
        let mut fields = (0..headers.count()).filter(|&i| headers.name(i).eq_ignore_ascii_case(&self.name));
        if self.values.is_empty() {
            return fields.next().is_some();
        }
        fields.any(|i| {
            let v = headers.value(i).trim_ascii();
            self.values.iter().any(|a| if self.ignore_case { a.eq_ignore_ascii_case(v) } else { a == v })
        })
    }
}

#[derive(Debug)]
enum Step {
    SetHeader(SetHeader),
    ValidateClientCertificate(ValidateStep),
    ReturnResponse(Response),
    ValidateJwt(Box<JwtStep>),
    IpFilter(IpFilterStep),
    CheckHeader(CheckHeaderStep),
    RateLimit(RateStep),
    Quota(QuotaStep),
    SendRequest(Box<CalloutStep>),
    /// Replaces `from` by `to` in the response body.
    FindAndReplace(Bytes, Bytes),
    /// Rewrites the backend's URL to the public one in `Location` and `Content-Location`.
    RedirectContentUrls,
    LogToEventhub(Box<LogStep>),
    /// Waits for [`Need::Probe`]; goes on when the answer's status is `allow`, answers `reject`
    /// otherwise.
    #[cfg(test)]
    Probe {
        allow: u16,
        reject: Response,
    },
}

/// The steps one route runs: the API's and the operation's; before them, unless a scope left
/// them out with `inherit = false`, the global scope's and the request's product's.
#[derive(Debug, Default)]
pub struct ApiPolicy {
    /// Index of the API (into `PolicySet::apis`).
    api: usize,
    /// The operation's route parameters, each with the index of its path segment.
    params: Vec<(Bytes, usize)>,
    /// Whether the global and product scopes run first.
    parents: bool,
    inbound: Vec<Step>,
    outbound: Vec<Step>,
    /// The operation's (else the API's) response timeout, over the backend's.
    timeout: Option<std::time::Duration>,
    /// For logs: the operation's `operationId`, else its pattern; "-" for an API without
    /// operations.
    operation: Box<str>,
    /// 0 for the API without operations, else 1 + the operation's index in the API's list.
    slot: usize,
}

impl ApiPolicy {
    /// The route parameters of the operation (for [`crate::RouteMatch`]).
    pub fn route_params(&self) -> &[(Bytes, usize)] {
        &self.params
    }

    /// The response timeout the operation or its API sets, if either does.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.timeout
    }

    /// The operation's name in logs: its `operationId`, else its pattern (`GET /items/{id}`).
    pub fn operation(&self) -> &str {
        &self.operation
    }

    /// 0 for an API without operations, else 1 + the operation's index in the API's list (as
    /// the configuration and its OpenAPI import give them).
    pub fn operation_slot(&self) -> usize {
        self.slot
    }
}

/// Steps of a scope that is not an API's: the global scope, a product.
#[derive(Debug, Default)]
struct Scope {
    inbound: Vec<Step>,
    outbound: Vec<Step>,
}

/// A compiled `[[product]]`.
#[derive(Debug)]
struct Product {
    name: Box<str>,
    steps: Scope,
}

/// How an API takes subscription keys.
#[derive(Debug, Default)]
struct Keys {
    /// A request needs a key (unless an open product grants the API).
    required: bool,
    /// Lower case.
    header: Bytes,
    query: Bytes,
    /// The open product that grants the API to callers without a key.
    open_product: Option<u32>,
    /// Products that grant the API.
    products: Vec<u32>,
}

#[derive(Debug)]
struct Operation {
    pattern: OperationPattern,
    policy: ApiPolicy,
}

/// An API's policies: one for the whole API, or one per operation.
#[derive(Debug, Default)]
pub struct ApiRoutes {
    /// Used when the API declares no operations.
    all: ApiPolicy,
    /// When not empty, a request must match one of these.
    operations: Vec<Operation>,
    keys: Keys,
}

impl ApiRoutes {
    /// The policy for a request, or `None` when the API has operations and none matches.
    /// `path` is the request path after the API prefix, without the query.
    pub fn select(&self, method: &[u8], path: &[u8]) -> Option<&ApiPolicy> {
        if self.operations.is_empty() {
            return Some(&self.all);
        }
        self.operations.iter().find(|op| op.pattern.matches(method, path)).map(|op| &op.policy)
    }
}

/// Every API's policy, and the data the steps refer to.
#[derive(Debug, Default)]
pub struct PolicySet {
    /// Indexed like `Config::apis`.
    pub apis: Vec<ApiRoutes>,
    /// Lower-case names of the headers the proxy derives from who the caller is (certificate,
    /// subscription, token claims): removed from every incoming request before anything else
    /// looks at it.
    pub identity_headers: Vec<Bytes>,
    global: Scope,
    products: Vec<Product>,
    subscriptions: Subscriptions,
    /// Whether the configuration uses subscriptions at all (else keys are not looked for).
    subscriptions_in_use: bool,
    missing_key: Response,
    invalid_key: Response,
    /// Rate-limit and quota counts of the host (kept across reloads).
    counters: Arc<Counters>,
    /// The limits' increment conditions, by index.
    conditions: Vec<StatusRanges>,
    /// Compiled `[thumbprints]` lists.
    lists: Vec<ThumbprintSet>,
    /// Revoked certificates from every CRL of the configuration, checked on every request.
    revoked: Arc<RevocationSet>,
    /// Where the callouts go, by index (their steps name it).
    callout_targets: Vec<CalloutTarget>,
    /// Tells policy sets apart (what a worker cached under an earlier one is dropped).
    pub(crate) instance: u64,
}

impl PolicySet {
    /// Where the configuration's callouts go, by the index [`Need::Callout`] names.
    pub fn callout_targets(&self) -> &[CalloutTarget] {
        &self.callout_targets
    }
}

/// What compiling needs from outside: named certificates' SHA-1 thumbprints and public keys
/// (loaded by the TLS crate), the revocation set, the crypto library that makes token keys, and
/// the `[[openid]]` providers' shared keys (kept by the server across reloads), by name.
#[derive(Debug, Default)]
pub struct Inputs {
    pub certificates: HashMap<String, [u8; 20]>,
    /// DER `SubjectPublicKeyInfo` of each `[certificates]` entry.
    pub certificate_keys: HashMap<String, Vec<u8>>,
    pub revoked: Arc<RevocationSet>,
    pub crypto: Option<Arc<dyn Crypto>>,
    pub providers: Vec<(String, Arc<RemoteKeys>)>,
    /// The host's rate-limit and quota counters (new ones when not given).
    pub counters: Option<Arc<Counters>>,
}

const MISSING_KEY: &str = "Access denied due to missing subscription key. Make sure to include subscription key when making requests to an API.";
const INVALID_KEY: &str = "Access denied due to invalid subscription key. Make sure to provide a valid key for an active subscription.";

fn hex_bytes<const N: usize>(hex: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, pair) in hex.as_bytes().chunks(2).take(N).enumerate() {
        let text = std::str::from_utf8(pair).unwrap_or("00");
        out[i] = u8::from_str_radix(text, 16).unwrap_or(0);
    }
    out
}

/// A JSON error response, built once.
pub(crate) fn json_response(status: u16, message: &str) -> Response {
    let mut body = BytesMut::new();
    body.put_slice(b"{\"statusCode\":");
    body.put_slice(status.to_string().as_bytes());
    body.put_slice(b",\"message\":\"");
    for c in message.chars() {
        match c {
            '"' => body.put_slice(b"\\\""),
            '\\' => body.put_slice(b"\\\\"),
            c if (c as u32) < 0x20 => body.put_slice(format!("\\u{:04x}", c as u32).as_bytes()),
            c => body.put_slice(c.encode_utf8(&mut [0u8; 4]).as_bytes()),
        }
    }
    body.put_slice(b"\"}");
    Response {
        status,
        reason: None,
        content_type: Some(Bytes::from_static(b"application/json")),
        body: body.freeze(),
        headers: Vec::new(),
        countdown: None,
    }
}

/// `log_to_eventhub`: a message for logger `logger`.
#[derive(Debug)]
pub(crate) struct LogStep {
    logger: usize,
    message: Template,
    partition: Option<u32>,
    /// The step's `partition_key`, or else the logger's.
    key: Option<Template>,
}

impl LogStep {
    /// Renders the message (and its key) into the request's logs.
    fn run(&self, cx: &Context<'_>) {
        if self.logger < 64 && cx.state.loggers_full >> self.logger & 1 == 1 {
            // Its buffer is full: the message would be dropped once handed over.
            cx.state.logs.borrow_mut().push(crate::facts::LogMessage {
                logger: self.logger,
                partition: None,
                key: None,
                value: Bytes::new(),
                dropped: true,
            });
            return;
        }
        // Templates never read the worker's local state: it stays borrowed while they render.
        let mut local = cx.state.local.borrow_mut();
        let arena = local.log_arena();
        let key = self.key.as_ref().map(|k| {
            k.render(cx, arena);
            arena.split().freeze()
        });
        self.message.render(cx, arena);
        let value = arena.split().freeze();
        drop(local);
        cx.state.logs.borrow_mut().push(crate::facts::LogMessage {
            logger: self.logger,
            partition: self.partition,
            key,
            value,
            dropped: false,
        });
    }
}

struct Compiler<'a> {
    inputs: &'a Inputs,
    loggers: &'a [portcullis_config::Logger],
    list_names: &'a [String],
    errors: ConfigErrors,
    identity: Vec<Bytes>,
    conditions: Vec<StatusRanges>,
    /// Where callouts go (equal targets share an index).
    callout_targets: Vec<CalloutTarget>,
    /// Callouts defined (`send_request` names), and those templates read, with where.
    callouts_defined: Vec<String>,
    callouts_read: Vec<(String, Loc)>,
    /// While compiling an API's or an operation's steps: the route parameters they may read,
    /// and the operation they belong to (for messages). `None`: not checked (global and product
    /// steps, which run for many APIs).
    route: Option<(Vec<String>, String)>,
    /// Route errors already reported (an API's step is compiled once per operation).
    route_errors: ahash::AHashSet<(String, String)>,
}

impl Compiler<'_> {
    fn scope(&mut self, inbound: &[StepConfig], outbound: &[StepConfig]) -> Scope {
        Scope {
            inbound: self.steps(&inbound.iter().collect::<Vec<_>>(), true),
            outbound: self.steps(&outbound.iter().collect::<Vec<_>>(), false),
        }
    }
}

impl Compiler<'_> {
    fn send_request(&mut self, s: &portcullis_config::SendRequest) -> Option<CalloutStep> {
        let name = s.name.value.as_str();
        if !self.callouts_defined.iter().any(|n| n == name) {
            self.callouts_defined.push(name.to_owned());
        }
        let path = self.template_as(&s.path, &s.url.loc, Mode::Url);
        let headers: Vec<_> = s
            .headers
            .iter()
            .map(|(n, v)| Some((Bytes::from(n.value.clone().into_bytes()), self.template(&v.value, &v.loc)?)))
            .collect();
        // What a client sends (a route parameter, a header) cannot change the body's structure:
        // its values are escaped for JSON (a JSON body, or one sent as JSON) or for a form.
        let content_type = s
            .headers
            .iter()
            .find(|(n, _)| n.value.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.value.to_ascii_lowercase());
        let body = match &s.body {
            Some(b) => {
                let mode = match content_type.as_deref() {
                    Some(t) if t.contains("json") => Mode::Json,
                    Some(t) if t.contains("x-www-form-urlencoded") => Mode::Url,
                    _ if b.value.trim_start().starts_with(['{', '[']) => Mode::Json,
                    _ => Mode::Plain,
                };
                Some(self.template_as(&b.value, &b.loc, mode)?)
            }
            None => None,
        };
        let mut set_headers = Vec::with_capacity(s.set_headers.len());
        for (n, v) in &s.set_headers {
            let value = self.template(&v.value, &v.loc)?;
            // What a callout says of the caller is an identity header: never the client's.
            let lower = Bytes::from(n.value.to_ascii_lowercase().into_bytes());
            if !self.identity.contains(&lower) {
                self.identity.push(lower);
            }
            set_headers.push(SetHeader {
                name: Bytes::from(n.value.clone().into_bytes()),
                action: SetHeaderAction::Override,
                value: Some(value),
            });
        }
        let wants_json = set_headers.iter().any(|h| h.value.as_ref().is_some_and(|t| t.reads_json_of(name)));
        let target = CalloutTarget {
            authority: s.authority.clone(),
            https: s.https,
            tls: s.tls.clone(),
            timeout: s.timeout,
            loc: s.url.loc.clone(),
        };
        let target = match self.callout_targets.iter().position(|t| *t == target) {
            Some(i) => i,
            None => {
                self.callout_targets.push(target);
                self.callout_targets.len() - 1
            }
        };
        let default_port = if s.https { ":443" } else { ":80" };
        let host = s.authority.strip_suffix(default_port).unwrap_or(&s.authority);
        Some(CalloutStep {
            name: name.into(),
            target,
            method: Bytes::from(s.method.clone().into_bytes()),
            path: path?,
            host: Bytes::from(host.to_owned().into_bytes()),
            headers: headers.into_iter().collect::<Option<_>>()?,
            body,
            ignore_error: s.ignore_error,
            cache_ttl_ms: s.cache_ttl.map_or(0, |d| d.as_millis() as u64),
            expect: s.expect_status.clone(),
            max_response: s.max_response_size,
            wants_json,
            refusal: json_response(s.status, &s.message),
            set_headers,
        })
    }

    fn template(&mut self, text: &str, loc: &Loc) -> Option<Template> {
        self.template_as(text, loc, Mode::Plain)
    }

    /// A template whose values are written `mode`'s way (percent-encoded in a URL, escaped in
    /// JSON).
    fn template_as(&mut self, text: &str, loc: &Loc, mode: Mode) -> Option<Template> {
        match Template::parse_as(text, loc, mode) {
            Ok(t) => {
                for name in t.callout_names() {
                    self.callouts_read.push((name.to_owned(), loc.clone()));
                }
                if let Some((params, operation)) = &self.route {
                    for name in t.route_names() {
                        if params.iter().any(|p| p == name)
                            || !self.route_errors.insert((loc.to_string(), name.to_owned()))
                        {
                            continue;
                        }
                        self.errors.push(loc.error(format!(
                            "{{route.{name}}}: {operation} has no parameter {{{name}}} (an API's steps run in every operation: give the step to the operations that have it)"
                        )));
                    }
                }
                Some(t)
            }
            Err(e) => {
                self.errors.push(e);
                None
            }
        }
    }

    fn steps(&mut self, steps: &[&StepConfig], inbound: bool) -> Vec<Step> {
        steps.iter().filter_map(|s| self.step(s, inbound)).collect()
    }

    fn step(&mut self, step: &StepConfig, inbound: bool) -> Option<Step> {
        match &step.kind {
            StepKind::SetHeader(s) => {
                let value = match &s.value {
                    Some(v) => Some(self.template(&v.value, &v.loc)?),
                    None => None,
                };
                if inbound && value.as_ref().is_some_and(Template::is_identity) {
                    let lower = Bytes::from(s.name.value.to_ascii_lowercase().into_bytes());
                    if !self.identity.contains(&lower) {
                        self.identity.push(lower);
                    }
                }
                Some(Step::SetHeader(SetHeader {
                    name: Bytes::from(s.name.value.clone().into_bytes()),
                    action: s.action,
                    value,
                }))
            }
            StepKind::ValidateClientCertificate(v) => {
                if !inbound {
                    self.errors.push(step.loc.error("validate_client_certificate is an inbound step"));
                    return None;
                }
                Some(Step::ValidateClientCertificate(self.validate(v)))
            }
            StepKind::ReturnResponse(r) => {
                if !inbound {
                    self.errors.push(step.loc.error("return_response is an inbound step"));
                    return None;
                }
                Some(Step::ReturnResponse(self.return_response(r)))
            }
            StepKind::ValidateJwt(v) => {
                if !inbound {
                    self.errors.push(step.loc.error("validate_jwt is an inbound step"));
                    return None;
                }
                let keys = KeyInputs {
                    crypto: self.inputs.crypto.as_deref(),
                    certificate_keys: &self.inputs.certificate_keys,
                    providers: &self.inputs.providers,
                };
                JwtStep::compile(v, &step.loc, &keys, &mut self.errors)
                    .map(|j| Step::ValidateJwt(Box::new(j)))
            }
            StepKind::IpFilter(f) => {
                if !inbound {
                    self.errors.push(step.loc.error("ip_filter is an inbound step"));
                    return None;
                }
                let mut ranges: Vec<_> = f.entries.iter().map(|e| e.value).collect();
                for list in &f.lists {
                    match IpSet::read_file(&list.value, &list.loc) {
                        Ok(more) => ranges.extend(more),
                        Err(e) => self.errors.extend(e),
                    }
                }
                Some(Step::IpFilter(IpFilterStep {
                    allow: f.action == IpAction::Allow,
                    set: IpSet::new(ranges),
                    reject: json_response(f.status, &f.message),
                }))
            }
            StepKind::RateLimit(r) => {
                if !inbound {
                    self.errors.push(step.loc.error("a rate limit is an inbound step"));
                    return None;
                }
                RateStep::compile(r, &mut self.conditions, &mut self.errors).map(Step::RateLimit)
            }
            StepKind::Quota(q) => {
                if !inbound {
                    self.errors.push(step.loc.error("a quota is an inbound step"));
                    return None;
                }
                QuotaStep::compile(q, &mut self.conditions, &mut self.errors).map(Step::Quota)
            }
            StepKind::FindAndReplace(f) => Some(Step::FindAndReplace(
                Bytes::from(f.from.value.clone().into_bytes()),
                Bytes::from(f.to.clone().into_bytes()),
            )),
            StepKind::RedirectContentUrls(on) => {
                if inbound {
                    self.errors.push(step.loc.error("redirect_content_urls is an outbound step"));
                    return None;
                }
                on.then_some(Step::RedirectContentUrls)
            }
            StepKind::SendRequest(s) => {
                if !inbound {
                    self.errors.push(step.loc.error("send_request is an inbound step"));
                    return None;
                }
                self.send_request(s).map(|c| Step::SendRequest(Box::new(c)))
            }
            StepKind::LogToEventhub(l) => {
                // A name no logger has is reported by the configuration's own check.
                let logger = self.loggers.iter().position(|g| g.name.value == l.logger_id.value)?;
                let message = match Template::parse_message(&l.message.value, &l.message.loc) {
                    Ok(t) => t,
                    Err(e) => {
                        self.errors.push(e);
                        return None;
                    }
                };
                let key = match l.partition_key.as_ref().or(self.loggers[logger].partition_key.as_ref()) {
                    Some(k) if l.partition_id.is_none() => match Template::parse_key(&k.value, &k.loc) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            self.errors.push(e);
                            return None;
                        }
                    },
                    _ => None,
                };
                Some(Step::LogToEventhub(Box::new(LogStep {
                    logger,
                    message,
                    partition: l.partition_id,
                    key,
                })))
            }
            StepKind::CheckHeader(c) => {
                if !inbound {
                    self.errors.push(step.loc.error("check_header is an inbound step"));
                    return None;
                }
                Some(Step::CheckHeader(CheckHeaderStep {
                    name: Bytes::from(c.name.value.to_ascii_lowercase().into_bytes()),
                    values: c.values.iter().map(|v| Bytes::from(v.trim().to_owned().into_bytes())).collect(),
                    ignore_case: c.ignore_case,
                    reject: json_response(c.status, &c.message),
                }))
            }
        }
    }

    fn validate(&mut self, v: &ValidateClientCertificate) -> ValidateStep {
        let mut identities = Vec::with_capacity(v.identities.len());
        for identity in &v.identities {
            let mut attributes = Vec::with_capacity(identity.attributes.len());
            for a in &identity.attributes {
                // A name that resolves to nothing is an error, never an attribute left out: an
                // identity missing one of its attributes would match more than it says. (Worded
                // as the configuration's own check words it, so that `check` shows it once.)
                let unknown = |what: &str, name: &str, table: &str| {
                    a.loc.error(format!("no {what} named \"{name}\" in {table}"))
                };
                attributes.push(match &a.value {
                    IdentityAttribute::Thumbprint(h) => Attribute::Sha1(hex_bytes(h)),
                    IdentityAttribute::ThumbprintSha256(h) => Attribute::Sha256(hex_bytes(h)),
                    IdentityAttribute::IssuerThumbprint(h) => Attribute::IssuerSha1(hex_bytes(h)),
                    IdentityAttribute::ThumbprintIn(name) => {
                        match self.list_names.iter().position(|n| n == name) {
                            Some(i) => Attribute::InList(i),
                            None => {
                                self.errors.push(unknown("thumbprint list", name, "[thumbprints]"));
                                continue;
                            }
                        }
                    }
                    IdentityAttribute::Certificate(name) | IdentityAttribute::IssuerCertificate(name) => {
                        let Some(sha1) = self.inputs.certificates.get(name) else {
                            self.errors.push(unknown("certificate", name, "[certificates]"));
                            continue;
                        };
                        if matches!(a.value, IdentityAttribute::Certificate(_)) {
                            Attribute::Sha1(*sha1)
                        } else {
                            Attribute::IssuerSha1(*sha1)
                        }
                    }
                    IdentityAttribute::SerialNumber(s) => Attribute::Serial(s.clone()),
                    // Lower-cased character by character, as the certificate's name is when compared
                    // (`str::to_lowercase` would treat a final sigma differently).
                    IdentityAttribute::CommonName(s) => {
                        Attribute::CommonName(s.chars().flat_map(char::to_lowercase).collect())
                    }
                    IdentityAttribute::Subject(s) => Attribute::Subject(normalize_dn(s)),
                    IdentityAttribute::DnsName(s) => Attribute::DnsName(s.to_ascii_lowercase()),
                    IdentityAttribute::IssuerSubject(s) => Attribute::IssuerSubject(normalize_dn(s)),
                });
            }
            identities.push(attributes);
        }
        ValidateStep {
            trust: v.validate_trust,
            revocation: v.validate_revocation,
            not_before: v.validate_not_before,
            not_after: v.validate_not_after,
            ignore_error: v.ignore_error,
            identities,
            reject: json_response(v.status, &v.message),
        }
    }

    fn return_response(&mut self, r: &ReturnResponse) -> Response {
        let headers = r
            .headers
            .iter()
            .filter_map(|(name, value)| {
                let t = self.template(&value.value, &value.loc)?;
                Some((Bytes::from(name.value.clone().into_bytes()), t))
            })
            .collect::<Vec<_>>();
        let has_content_type = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(b"content-type"));
        Response {
            status: r.status,
            reason: r.reason.as_ref().map(|s| Bytes::from(s.clone().into_bytes())),
            content_type: (!has_content_type && !r.body.is_empty())
                .then(|| Bytes::from_static(b"text/plain")),
            body: Bytes::from(r.body.clone().into_bytes()),
            headers,
            countdown: None,
        }
    }
}

/// Compiles the policy of every API in `config`, loading its thumbprint lists and subscription
/// files; reports every error. `inputs` brings what other crates loaded.
pub fn compile(config: &Config, inputs: &Inputs) -> Result<PolicySet, ConfigErrors> {
    let mut errors = ConfigErrors::default();
    let mut lists = Vec::with_capacity(config.thumbprints.len());
    let mut list_names = Vec::with_capacity(config.thumbprints.len());
    for named in &config.thumbprints {
        // A list that does not load is reported once, here; it still has its place, so that the
        // steps naming it compile (the result is an error anyway).
        lists.push(ThumbprintSet::load(&named.path.value, &named.path.loc).unwrap_or_else(|e| {
            errors.extend(e);
            ThumbprintSet::default()
        }));
        list_names.push(named.name.value.clone());
    }
    let mut c = Compiler {
        inputs,
        loggers: &config.loggers,
        list_names: &list_names,
        errors,
        identity: Vec::new(),
        conditions: Vec::new(),
        route: None,
        route_errors: Default::default(),
        callout_targets: Vec::new(),
        callouts_defined: Vec::new(),
        callouts_read: Vec::new(),
    };
    let global = c.scope(&config.inbound, &config.outbound);
    let products: Vec<Product> = config
        .products
        .iter()
        .map(|p| Product { name: p.name.value.as_str().into(), steps: c.scope(&p.inbound, &p.outbound) })
        .collect();
    let product_index =
        |name: &str| config.products.iter().position(|p| p.name.value == name).map(|i| i as u32);
    let api_index = |name: &str| config.apis.iter().position(|a| a.name.value == name).map(|i| i as u32);
    let mut apis = Vec::with_capacity(config.apis.len());
    for (index, api) in config.apis.iter().enumerate() {
        let own =
            |c: &mut Compiler<'_>,
             parents: bool,
             inbound: Vec<&StepConfig>,
             outbound: Vec<&StepConfig>,
             params: Vec<(Bytes, usize)>,
             (timeout, operation, slot): (Option<std::time::Duration>, &str, usize)| ApiPolicy {
                api: index,
                params,
                parents,
                inbound: c.steps(&inbound, true),
                outbound: c.steps(&outbound, false),
                timeout,
                operation: operation.into(),
                slot,
            };
        // An API with operations runs their policies, not this one (its steps are checked there).
        c.route = api
            .operations
            .is_empty()
            .then(|| (Vec::new(), format!("API \"{}\" (it declares no operations)", api.name.value)));
        let all = own(
            &mut c,
            api.inherit,
            api.inbound.iter().collect(),
            api.outbound.iter().collect(),
            Vec::new(),
            (api.timeout, "-", 0),
        );
        let mut operations = Vec::with_capacity(api.operations.len());
        for (slot, op) in (1..).zip(&api.operations) {
            // An operation that inherits runs the API's steps, then its own; one that does not,
            // only its own (and no global or product steps either).
            let (inbound, outbound, parents) = if op.inherit {
                (
                    api.inbound.iter().chain(&op.inbound).collect(),
                    api.outbound.iter().chain(&op.outbound).collect(),
                    api.inherit,
                )
            } else {
                (op.inbound.iter().collect(), op.outbound.iter().collect(), false)
            };
            let pattern = OperationPattern::parse(&op.pattern.value);
            let names = pattern.params.iter().map(|(n, _)| String::from_utf8_lossy(n).into_owned()).collect();
            c.route = Some((names, format!("operation \"{}\"", op.pattern.value)));
            let name = op.id.as_deref().unwrap_or(&op.pattern.value);
            let policy = own(
                &mut c,
                parents,
                inbound,
                outbound,
                pattern.params.clone(),
                (op.timeout.or(api.timeout), name, slot),
            );
            operations.push(Operation { pattern, policy });
        }
        c.route = None;
        operations.sort_by_key(|op| std::cmp::Reverse(op.pattern.specificity()));
        let granting: Vec<u32> = config
            .products
            .iter()
            .enumerate()
            .filter(|(_, p)| p.apis.iter().any(|a| a.value == api.name.value))
            .map(|(i, _)| i as u32)
            .collect();
        let keys = Keys {
            required: api.subscription_required,
            header: Bytes::from(api.subscription_key_header.to_ascii_lowercase().into_bytes()),
            query: Bytes::from(api.subscription_key_query.clone().into_bytes()),
            open_product: granting
                .iter()
                .copied()
                .find(|&p| !config.products[p as usize].subscription_required),
            products: granting,
        };
        apis.push(ApiRoutes { all, operations, keys });
    }
    let mut subs = Builder::new();
    for s in &config.subscriptions {
        let grant = match &s.scope.value {
            SubscriptionScope::Product(name) => product_index(name).map(Grant::Product),
            SubscriptionScope::Api(name) => api_index(name).map(Grant::Api),
            SubscriptionScope::AllApis => Some(Grant::AllApis),
        };
        // A name that resolves to nothing was reported by the configuration's check.
        let Some(grant) = grant else { continue };
        let secondary = s.secondary_key.as_ref().map(|k| k.value.as_bytes());
        subs.add_inline(&s.id.value, grant, s.state, s.primary_key.value.as_bytes(), secondary, &s.id.loc);
    }
    for file in &config.subscription_files {
        if let Some(product) = product_index(&file.name.value) {
            subs.load_file(&file.path.value, product, &file.path.loc);
        }
    }
    let (subscriptions, sub_errors) = subs.finish();
    let Compiler {
        mut errors, identity, conditions, callout_targets, callouts_defined, callouts_read, ..
    } = c;
    let mut reported = ahash::AHashSet::new();
    for (name, loc) in callouts_read {
        if !callouts_defined.contains(&name) && reported.insert((name.clone(), loc.to_string())) {
            errors.push(loc.error(format!("{{callout.{name}…}}: no send_request is named \"{name}\"")));
        }
    }
    static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    errors.extend(sub_errors);
    let subscriptions_in_use = !config.products.is_empty()
        || !config.subscriptions.is_empty()
        || !config.subscription_files.is_empty()
        || config.apis.iter().any(|a| a.subscription_required);
    errors.into_result(PolicySet {
        apis,
        identity_headers: identity,
        global,
        products,
        subscriptions,
        subscriptions_in_use,
        missing_key: json_response(401, MISSING_KEY),
        invalid_key: json_response(401, INVALID_KEY),
        counters: inputs.counters.clone().unwrap_or_default(),
        conditions,
        lists,
        revoked: inputs.revoked.clone(),
        callout_targets,
        instance: INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    })
}

pub(crate) fn run_set_header(s: &SetHeader, cx: &Context<'_>, edits: &mut HeaderEdits) {
    match s.action {
        SetHeaderAction::Delete => edits.remove_named(cx.headers, &s.name),
        SetHeaderAction::Skip if edits.is_present(cx.headers, &s.name) => {}
        action => {
            let Some(template) = &s.value else { return };
            if action == SetHeaderAction::Override {
                edits.remove_named(cx.headers, &s.name);
            }
            edits.add_with(&s.name, |out| template.render(cx, out));
        }
    }
}

/// Prepares a refusal: nothing prepared for the backend goes out; the response's own headers do.
pub(crate) fn refuse<'p>(
    response: &'p Response,
    reason: &'static str,
    cx: &Context<'_>,
    edits: &mut HeaderEdits,
) -> Verdict<'p> {
    edits.clear_added();
    for (name, template) in &response.headers {
        edits.add_with(name, |out| template.render(cx, out));
    }
    Verdict::Respond { response, reason }
}

/// Errors that are about the chain, not about the client certificate's own dates or about
/// revocation anywhere in the chain (both judged per request, against today's clock and today's
/// CRLs).
fn is_trust_error(e: &VerifyError) -> bool {
    !(e.is_revoked() || (e.depth == 0 && (e.is_expired() || e.is_not_yet_valid())))
}

impl PolicySet {
    fn identity_matches(&self, attributes: &[Attribute], c: &ClientCert) -> bool {
        attributes.iter().all(|a| match a {
            Attribute::Sha1(t) => &c.sha1 == t,
            Attribute::Sha256(t) => &c.sha256 == t,
            Attribute::InList(i) => {
                self.lists[*i].contains_sha1(&c.sha1) || self.lists[*i].contains_sha256(&c.sha256)
            }
            Attribute::Serial(s) => &c.serial == s,
            Attribute::CommonName(n) => c
                .common_name
                .as_deref()
                .is_some_and(|cn| cn.chars().flat_map(char::to_lowercase).eq(n.chars())),
            Attribute::Subject(s) => &c.subject_normalized == s,
            Attribute::DnsName(d) => c.dns_names.iter().any(|n| n.eq_ignore_ascii_case(d)),
            Attribute::IssuerSubject(s) => &c.issuer_normalized == s,
            Attribute::IssuerSha1(t) => c.issuer_sha1.as_ref() == Some(t),
        })
    }

    /// Whether a CRL of the current configuration revokes `cert` (or a CA of its chain).
    pub fn revokes(&self, cert: &ClientCert) -> bool {
        self.revoked.revokes(cert)
    }

    /// APIM's `validate-client-certificate`: every enabled check passes, and the certificate
    /// matches all attributes of at least one identity (if any are listed). `Err` says which
    /// check failed.
    fn validate(&self, v: &ValidateStep, facts: &Facts<'_>) -> Result<(), &'static str> {
        let Some(c) = facts.client_cert else { return Err("no client certificate") };
        if v.trust && c.verify_errors.iter().any(is_trust_error) {
            return Err("client certificate not trusted");
        }
        if v.not_before && facts.now < c.not_before {
            return Err("client certificate not yet valid");
        }
        if v.not_after && facts.now > c.not_after {
            return Err("client certificate expired");
        }
        if v.revocation && self.revoked.revokes(c) {
            return Err("client certificate revoked");
        }
        if v.identities.is_empty() || v.identities.iter().any(|identity| self.identity_matches(identity, c)) {
            Ok(())
        } else {
            Err("client certificate matches no identity")
        }
    }

    /// The steps a request runs on `policy`, scope by scope: global, product, API and operation.
    fn scopes<'p>(&'p self, policy: &'p ApiPolicy, state: &RequestState, inbound: bool) -> [&'p [Step]; 3] {
        let pick = |s: &'p Scope| if inbound { &s.inbound[..] } else { &s.outbound[..] };
        let own = if inbound { &policy.inbound[..] } else { &policy.outbound[..] };
        if !policy.parents {
            return [&[], &[], own];
        }
        let product =
            state.product.and_then(|p| self.products.get(p as usize)).map_or(&[][..], |p| pick(&p.steps));
        [pick(&self.global), product, own]
    }

    /// API Management's subscription check, before any step: a key from the header (else the
    /// query) must belong to an active subscription that grants the API; without a valid key, an
    /// open product that grants the API lets the request through under that product, and an API
    /// that does not require a subscription lets it through alone. The key is not forwarded.
    fn check_subscription<'p>(
        &'p self,
        policy: &ApiPolicy,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        state: &mut RequestState,
        edits: &mut HeaderEdits,
    ) -> Result<(), Verdict<'p>> {
        let keys = &self.apis[policy.api].keys;
        let mut scratch = std::mem::take(&mut state.scratch);
        scratch.clear();
        let from_header = (0..headers.count())
            .find(|&i| headers.name(i).eq_ignore_ascii_case(&keys.header))
            .map(|i| headers.value(i).trim_ascii())
            .filter(|v| !v.is_empty());
        if let Some(v) = from_header {
            scratch.extend_from_slice(v);
        }
        edits.remove_named(headers, &keys.header);
        if let Some(raw) = query_value(facts.query, &keys.query) {
            state.strip_query = true;
            if from_header.is_none() && percent_decode(raw, &mut scratch).is_err() {
                scratch.clear();
                scratch.extend_from_slice(b"%");
            }
        }
        let presented = !scratch.is_empty();
        let valid = if presented {
            self.subscriptions.find(&scratch).filter(|&i| {
                let sub = self.subscriptions.get(i);
                sub.active
                    && match sub.grant {
                        Grant::AllApis => true,
                        Grant::Api(a) => a as usize == policy.api,
                        Grant::Product(p) => keys.products.contains(&p),
                    }
            })
        } else {
            None
        };
        state.scratch = scratch;
        if let Some(i) = valid {
            state.subscription = Some(i);
            // Product steps run for product subscriptions only (API Management: not for API or
            // all-APIs subscriptions).
            if let Grant::Product(p) = self.subscriptions.get(i).grant {
                state.product = Some(p);
            }
            return Ok(());
        }
        if let Some(open) = keys.open_product {
            state.product = Some(open);
            return Ok(());
        }
        let cx = Context { facts, state, set: self, headers };
        if presented {
            return Err(refuse(&self.invalid_key, "subscription key invalid", &cx, edits));
        }
        if keys.required {
            return Err(refuse(&self.missing_key, "subscription key missing", &cx, edits));
        }
        Ok(())
    }

    /// Runs a route's inbound steps. Header changes for the upstream request (or, on
    /// `Respond`, the response's headers) go to `edits`; what the request proves (its
    /// subscription, its token) goes to `state`.
    pub fn inbound<'p>(
        &'p self,
        policy: &'p ApiPolicy,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        state: &mut RequestState,
        edits: &mut HeaderEdits,
    ) -> Verdict<'p> {
        self.inbound_from(policy, 0, facts, headers, state, edits)
    }

    /// Runs a route's inbound steps from step `from` on: `0` for a new request, or the step a
    /// [`Verdict::Wait`] named, once what it waited for is in `state`.
    pub fn inbound_from<'p>(
        &'p self,
        policy: &'p ApiPolicy,
        from: usize,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        state: &mut RequestState,
        edits: &mut HeaderEdits,
    ) -> Verdict<'p> {
        if from == 0
            && self.subscriptions_in_use
            && let Err(refusal) = self.check_subscription(policy, facts, headers, state, edits)
        {
            return refusal;
        }
        let mut index = 0;
        for steps in self.scopes(policy, state, true) {
            for step in steps {
                index += 1;
                if index - 1 < from {
                    continue;
                }
                if let Some(verdict) = self.run(step, index - 1, facts, headers, state, edits) {
                    return verdict;
                }
            }
        }
        Verdict::Continue
    }

    /// Runs one inbound step; `Some` when it decides the request.
    fn run<'p>(
        &'p self,
        step: &'p Step,
        index: usize,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        state: &mut RequestState,
        edits: &mut HeaderEdits,
    ) -> Option<Verdict<'p>> {
        match step {
            Step::SetHeader(s) => run_set_header(s, &Context { facts, state, set: self, headers }, edits),
            Step::LogToEventhub(l) => l.run(&Context { facts, state, set: self, headers }),
            // Outbound only (refused inbound at load).
            Step::FindAndReplace(..) | Step::RedirectContentUrls => {}
            Step::ValidateClientCertificate(v) => {
                if let Err(reason) = self.validate(v, facts)
                    && !v.ignore_error
                {
                    return Some(refuse(
                        &v.reject,
                        reason,
                        &Context { facts, state, set: self, headers },
                        edits,
                    ));
                }
            }
            Step::ReturnResponse(r) => {
                return Some(refuse(
                    r,
                    "return_response",
                    &Context { facts, state, set: self, headers },
                    edits,
                ));
            }
            Step::IpFilter(f) => {
                if f.set.contains(facts.client_addr.ip()) != f.allow {
                    return Some(refuse(
                        &f.reject,
                        "ip filter",
                        &Context { facts, state, set: self, headers },
                        edits,
                    ));
                }
            }
            Step::RateLimit(r) => {
                let may_wait = state.answer(index).is_none();
                match r.run(may_wait, &self.counters, facts, self, headers, state, edits) {
                    Decision::Pass => {}
                    Decision::Refuse(response) => {
                        return Some(Verdict::Respond { response, reason: "rate limit exceeded" });
                    }
                    Decision::Sync => return Some(Verdict::Wait { step: index, need: Need::Sync }),
                }
            }
            Step::Quota(q) => {
                let may_wait = state.answer(index).is_none();
                match q.run(may_wait, &self.counters, facts, self, headers, state, edits) {
                    Decision::Pass => {}
                    Decision::Refuse(response) => {
                        return Some(Verdict::Respond { response, reason: "quota exceeded" });
                    }
                    Decision::Sync => return Some(Verdict::Wait { step: index, need: Need::Sync }),
                }
            }
            Step::CheckHeader(c) => {
                if !c.passes(headers) {
                    return Some(refuse(
                        &c.reject,
                        "check header",
                        &Context { facts, state, set: self, headers },
                        edits,
                    ));
                }
            }
            Step::SendRequest(c) => return c.run(index, self, facts, headers, state, edits),
            Step::ValidateJwt(j) => match j.run(index, self, facts, headers, state) {
                Outcome::Valid(token) => state.token = Some(token),
                Outcome::WaitForKeys => {
                    return Some(Verdict::Wait { step: index, need: Need::Keys(&j.providers) });
                }
                Outcome::Refused(failure) => {
                    let cx = Context { facts, state, set: self, headers };
                    return Some(refuse(j.response(failure), failure.reason(), &cx, edits));
                }
            },
            #[cfg(test)]
            Step::Probe { allow, reject } => match state.answer(index) {
                None => return Some(Verdict::Wait { step: index, need: Need::Probe }),
                Some(crate::facts::Answer::Response { status, .. }) if status == allow => {}
                Some(_) => {
                    return Some(refuse(
                        reject,
                        "probe refused",
                        &Context { facts, state, set: self, headers },
                        edits,
                    ));
                }
            },
        }
        None
    }

    /// Runs a route's outbound steps on a backend's response headers.
    pub fn outbound(
        &self,
        policy: &ApiPolicy,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        state: &RequestState,
        edits: &mut HeaderEdits,
    ) {
        let cx = Context { facts, state, set: self, headers };
        // What the rate limits report (remaining and total calls).
        for (name, value) in &state.response_headers {
            edits.remove_named(headers, name);
            edits.add_with(name, |out| {
                out.put_slice(value.to_string().as_bytes());
                true
            });
        }
        for step in self.scopes(policy, state, false).into_iter().flatten() {
            match step {
                Step::SetHeader(s) => run_set_header(s, &cx, edits),
                Step::LogToEventhub(l) => l.run(&cx),
                Step::ValidateClientCertificate(_)
                | Step::ReturnResponse(_)
                | Step::ValidateJwt(_)
                | Step::IpFilter(_)
                | Step::CheckHeader(_)
                | Step::RateLimit(_)
                | Step::Quota(_)
                | Step::SendRequest(_)
                | Step::FindAndReplace(..)
                | Step::RedirectContentUrls => {}
                #[cfg(test)]
                Step::Probe { .. } => {}
            }
        }
    }

    /// Settles what the request owes the rate limits and quotas it passed, once its response's
    /// `status` is known and `bytes` of request and response bodies went through.
    pub fn complete(&self, state: &mut RequestState, status: u16, bytes: u64) {
        if !state.pending.is_empty() {
            let mut local = state.local.borrow_mut();
            crate::limits::settle(
                &self.counters,
                &self.conditions,
                &state.pending,
                (status, bytes),
                &mut local.deltas,
            );
            drop(local);
            state.pending.clear();
        }
    }

    /// The query parameter that carried this request's subscription key: left out of the
    /// forwarded request.
    pub fn stripped_query_parameter(&self, policy: &ApiPolicy, state: &RequestState) -> Option<&[u8]> {
        state.strip_query.then(|| &self.apis[policy.api].keys.query[..])
    }

    /// The id of the request's subscription.
    pub fn subscription_id(&self, state: &RequestState) -> Option<&str> {
        state.subscription.map(|i| self.subscriptions.id(i))
    }

    /// The name of the product the request runs under.
    pub fn product_name(&self, state: &RequestState) -> Option<&str> {
        state.product.and_then(|p| self.products.get(p as usize)).map(|p| &*p.name)
    }

    /// Number of subscriptions (for the reload log line).
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Number of thumbprints across all lists (for the reload log line).
    pub fn thumbprint_count(&self) -> usize {
        self.lists.iter().map(ThumbprintSet::len).sum()
    }
}

impl PolicySet {
    /// Whether a request on `policy` has outbound steps to run (the server skips the walk
    /// otherwise).
    pub fn has_outbound(&self, policy: &ApiPolicy, state: &RequestState) -> bool {
        !state.response_headers.is_empty() || self.scopes(policy, state, false).iter().any(|s| !s.is_empty())
    }

    /// What a request on `policy` does to its response beyond headers: the `find_and_replace`
    /// pairs for the body, in order, and whether `redirect_content_urls` rewrites its URLs.
    pub fn response_rewrites(&self, policy: &ApiPolicy, state: &RequestState) -> (Vec<(Bytes, Bytes)>, bool) {
        let mut pairs = Vec::new();
        let mut redirect = false;
        for step in self.scopes(policy, state, false).into_iter().flatten() {
            match step {
                Step::FindAndReplace(from, to) => pairs.push((from.clone(), to.clone())),
                Step::RedirectContentUrls => redirect = true,
                _ => {}
            }
        }
        (pairs, redirect)
    }

    /// The inbound `find_and_replace` pairs for the request body, in order.
    pub fn request_rewrites(&self, policy: &ApiPolicy, state: &RequestState) -> Vec<(Bytes, Bytes)> {
        let mut pairs = Vec::new();
        for step in self.scopes(policy, state, true).into_iter().flatten() {
            if let Step::FindAndReplace(from, to) = step {
                pairs.push((from.clone(), to.clone()));
            }
        }
        pairs
    }

    /// Whether the API's own or its operation's outbound steps, or the global ones, rewrite the
    /// body: the proxy then asks the backend for an uncompressed one.
    pub fn rewrites_body(&self, policy: &ApiPolicy) -> bool {
        let any = |steps: &[Step]| steps.iter().any(|s| matches!(s, Step::FindAndReplace(..)));
        any(&policy.outbound)
            || policy.parents
                && (any(&self.global.outbound) || self.products.iter().any(|p| any(&p.steps.outbound)))
    }
}

/// Reads a thumbprint list the way `compile` does (for benches and tools).
pub fn load_thumbprints(path: &Path) -> Result<ThumbprintSet, ConfigErrors> {
    ThumbprintSet::load(path, &Loc::builtin("thumbprints"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::Answer;

    struct NoHeaders;

    impl HeaderList for NoHeaders {
        fn count(&self) -> usize {
            0
        }
        fn name(&self, _: usize) -> &[u8] {
            b""
        }
        fn value(&self, _: usize) -> &[u8] {
            b""
        }
    }

    fn add(name: &'static str, value: &str) -> Step {
        Step::SetHeader(SetHeader {
            name: Bytes::from_static(name.as_bytes()),
            action: SetHeaderAction::Append,
            value: Some(Template::parse(value, &Loc::builtin("test")).expect("template")),
        })
    }

    fn facts() -> Facts<'static> {
        Facts {
            client_cert: None,
            client_addr: "127.0.0.1:9".parse().expect("addr"),
            client_ip: "127.0.0.1",
            request_id: "0123456789abcdef",
            now: 1_800_000_000,
            now_ms: 1_800_000_000_000,
            query: b"",
            route: Default::default(),
            method: b"GET",
            path: b"/",
        }
    }

    fn added(edits: &HeaderEdits) -> Vec<(String, String)> {
        edits
            .added()
            .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }

    /// A step that waits stops evaluation with `Wait` naming it; resumed there with its answer,
    /// evaluation goes on after it, and what the steps before it did is kept, not done twice.
    #[test]
    fn a_waiting_step_resumes_where_it_stopped() {
        let set = PolicySet::default();
        let policy = ApiPolicy {
            api: 0,
            params: Vec::new(),
            parents: false,
            inbound: vec![
                add("X-Before", "{request.id}"),
                Step::Probe { allow: 200, reject: json_response(403, "Forbidden") },
                add("X-After", "1"),
            ],
            outbound: Vec::new(),
            timeout: None,
            operation: "-".into(),
            slot: 0,
        };
        let mut edits = HeaderEdits::default();
        edits.reset(0);
        let mut state = RequestState::default();
        let step = match set.inbound(&policy, &facts(), &NoHeaders, &mut state, &mut edits) {
            Verdict::Wait { step, need: Need::Probe } => step,
            v => panic!("expected Wait, got {v:?}"),
        };
        assert_eq!(step, 1);
        assert_eq!(added(&edits), [("X-Before".into(), "0123456789abcdef".into())]);

        // Resumed without the answer, it waits again at the same step.
        assert!(matches!(
            set.inbound_from(&policy, step, &facts(), &NoHeaders, &mut state, &mut edits),
            Verdict::Wait { step: 1, .. }
        ));

        state.put(step, Answer::Response { status: 200, body: Bytes::new() });
        assert!(matches!(
            set.inbound_from(&policy, step, &facts(), &NoHeaders, &mut state, &mut edits),
            Verdict::Continue
        ));
        assert_eq!(
            added(&edits),
            [("X-Before".into(), "0123456789abcdef".into()), ("X-After".into(), "1".into())]
        );

        // Another answer: the step refuses, and nothing prepared for the backend goes out.
        let mut edits = HeaderEdits::default();
        edits.reset(0);
        state.clear();
        assert!(matches!(
            set.inbound(&policy, &facts(), &NoHeaders, &mut state, &mut edits),
            Verdict::Wait { step: 1, .. }
        ));
        state.put(1, Answer::Response { status: 500, body: Bytes::from_static(b"down") });
        state.put(1, Answer::Response { status: 404, body: Bytes::new() });
        assert!(
            matches!(state.answer(1), Some(Answer::Response { status: 404, .. })),
            "a later answer replaces an earlier one"
        );
        match set.inbound_from(&policy, 1, &facts(), &NoHeaders, &mut state, &mut edits) {
            Verdict::Respond { response, reason } => {
                assert_eq!((response.status, reason), (403, "probe refused"));
            }
            v => panic!("expected Respond, got {v:?}"),
        }
        assert!(added(&edits).is_empty());
        state.clear();
        assert!(state.answer(1).is_none());
    }
}
