//! Compiled policies and their evaluation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use portcullis_config::{
    Config, ConfigErrors, IdentityAttribute, Loc, ReturnResponse, SetHeaderAction, Step as StepConfig,
    StepKind, ValidateClientCertificate,
};
use portcullis_facts::{ClientCert, RevocationSet, VerifyError, normalize_dn};

use crate::facts::{Facts, HeaderEdits, HeaderList};
use crate::operations::OperationPattern;
use crate::template::Template;
use crate::thumbprints::ThumbprintSet;

/// A response the policy answers with instead of forwarding the request.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// Reason phrase; the standard one when `None`.
    pub reason: Option<Bytes>,
    pub content_type: Option<Bytes>,
    pub body: Bytes,
    /// Header templates, rendered into the request's [`HeaderEdits`] when the step runs.
    headers: Vec<(Bytes, Template)>,
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
    /// says without blocking its worker, keeps it for the step, and calls
    /// [`PolicySet::inbound_from`] with `step` to resume there.
    Wait { step: usize, need: &'p Need },
}

/// What a waiting step needs. The steps that wait (`send_request`, and any other step that
/// cannot decide without a round trip) add their variants; no configurable step waits yet.
#[derive(Debug)]
pub enum Need {
    /// The step of this crate's tests that stands for one which waits.
    #[cfg(test)]
    Probe,
}

#[derive(Debug)]
struct SetHeader {
    /// As configured (its case is what the backend or client sees).
    name: Bytes,
    action: SetHeaderAction,
    value: Option<Template>,
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
enum Step {
    SetHeader(SetHeader),
    ValidateClientCertificate(ValidateStep),
    ReturnResponse(Response),
    /// Waits for [`Need::Probe`]; goes on when the answer's status is `allow`, answers `reject`
    /// otherwise.
    #[cfg(test)]
    Probe {
        allow: u16,
        reject: Response,
    },
}

/// The steps one route runs: the global scope's, the API's, the operation's (each scope may
/// leave out its parents' with `inherit = false`).
#[derive(Debug, Default)]
pub struct ApiPolicy {
    inbound: Vec<Step>,
    outbound: Vec<Step>,
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
    /// Lower-case names of the headers the proxy derives from a certificate: removed from every
    /// incoming request before anything else looks at it.
    pub identity_headers: Vec<Bytes>,
    /// Compiled `[thumbprints]` lists.
    lists: Vec<ThumbprintSet>,
    /// Revoked certificates from every CRL of the configuration, checked on every request.
    revoked: Arc<RevocationSet>,
}

/// What compiling needs from outside: named certificates' SHA-1 thumbprints (loaded by the TLS
/// crate) and the revocation set.
#[derive(Debug, Default)]
pub struct Inputs {
    pub certificates: HashMap<String, [u8; 20]>,
    pub revoked: Arc<RevocationSet>,
}

fn hex_bytes<const N: usize>(hex: &str) -> [u8; N] {
    let mut out = [0u8; N];
    for (i, pair) in hex.as_bytes().chunks(2).take(N).enumerate() {
        let text = std::str::from_utf8(pair).unwrap_or("00");
        out[i] = u8::from_str_radix(text, 16).unwrap_or(0);
    }
    out
}

/// A JSON error response, built once.
fn json_response(status: u16, message: &str) -> Response {
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
    }
}

struct Compiler<'a> {
    inputs: &'a Inputs,
    list_names: &'a [String],
    errors: ConfigErrors,
    identity: Vec<Bytes>,
}

impl Compiler<'_> {
    fn template(&mut self, text: &str, loc: &Loc) -> Option<Template> {
        match Template::parse(text, loc) {
            Ok(t) => Some(t),
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
                if inbound && value.as_ref().is_some_and(Template::uses_client_cert) {
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
        }
    }
}

/// Compiles the policy of every API in `config`, loading its thumbprint lists; reports every
/// error. `inputs` brings what other crates loaded.
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
    let mut c = Compiler { inputs, list_names: &list_names, errors, identity: Vec::new() };
    let mut apis = Vec::with_capacity(config.apis.len());
    for api in &config.apis {
        let scope = |inherit: bool, global: &'_ [StepConfig], own: &'_ [StepConfig]| -> Vec<StepConfig> {
            let mut v: Vec<StepConfig> = if inherit { global.to_vec() } else { Vec::new() };
            v.extend(own.iter().cloned());
            v
        };
        let api_in = scope(api.inherit, &config.inbound, &api.inbound);
        let api_out = scope(api.inherit, &config.outbound, &api.outbound);
        let all = ApiPolicy {
            inbound: c.steps(&api_in.iter().collect::<Vec<_>>(), true),
            outbound: c.steps(&api_out.iter().collect::<Vec<_>>(), false),
        };
        let mut operations = Vec::with_capacity(api.operations.len());
        for op in &api.operations {
            let policy = if op.inbound.is_empty() && op.outbound.is_empty() && op.inherit {
                ApiPolicy {
                    inbound: c.steps(&api_in.iter().collect::<Vec<_>>(), true),
                    outbound: c.steps(&api_out.iter().collect::<Vec<_>>(), false),
                }
            } else {
                let inbound = scope(op.inherit, &api_in, &op.inbound);
                let outbound = scope(op.inherit, &api_out, &op.outbound);
                ApiPolicy {
                    inbound: c.steps(&inbound.iter().collect::<Vec<_>>(), true),
                    outbound: c.steps(&outbound.iter().collect::<Vec<_>>(), false),
                }
            };
            operations.push(Operation { pattern: OperationPattern::parse(&op.pattern.value), policy });
        }
        operations.sort_by_key(|op| std::cmp::Reverse(op.pattern.specificity()));
        apis.push(ApiRoutes { all, operations });
    }
    // Steps of the global scope name identity headers even for APIs that opted out.
    let global: Vec<&StepConfig> = config.inbound.iter().collect();
    let _ = c.steps(&global, true);
    let Compiler { errors, identity, .. } = c;
    errors.into_result(PolicySet { apis, identity_headers: identity, lists, revoked: inputs.revoked.clone() })
}

fn run_set_header(s: &SetHeader, facts: &Facts<'_>, headers: &dyn HeaderList, edits: &mut HeaderEdits) {
    match s.action {
        SetHeaderAction::Delete => edits.remove_named(headers, &s.name),
        SetHeaderAction::Skip if edits.is_present(headers, &s.name) => {}
        action => {
            let Some(template) = &s.value else { return };
            if action == SetHeaderAction::Override {
                edits.remove_named(headers, &s.name);
            }
            edits.add_with(&s.name, |out| template.render(facts, headers, out));
        }
    }
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

    /// Runs a route's inbound steps. Header changes for the upstream request (or, on
    /// `Respond`, the response's headers) go to `edits`.
    pub fn inbound<'p>(
        &self,
        policy: &'p ApiPolicy,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        edits: &mut HeaderEdits,
    ) -> Verdict<'p> {
        self.inbound_from(policy, 0, facts, headers, edits)
    }

    /// Runs a route's inbound steps from step `from` on: `0` for a new request, or the step a
    /// [`Verdict::Wait`] named, once what it waited for is there.
    pub fn inbound_from<'p>(
        &self,
        policy: &'p ApiPolicy,
        from: usize,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        edits: &mut HeaderEdits,
    ) -> Verdict<'p> {
        for (index, step) in policy.inbound.iter().enumerate().skip(from) {
            let _ = index; // read only by steps that wait
            match step {
                Step::SetHeader(s) => run_set_header(s, facts, headers, edits),
                Step::ValidateClientCertificate(v) => {
                    if let Err(reason) = self.validate(v, facts)
                        && !v.ignore_error
                    {
                        edits.clear_added();
                        return Verdict::Respond { response: &v.reject, reason };
                    }
                }
                Step::ReturnResponse(r) => {
                    edits.clear_added();
                    for (name, template) in &r.headers {
                        edits.add_with(name, |out| template.render(facts, headers, out));
                    }
                    return Verdict::Respond { response: r, reason: "return_response" };
                }
                #[cfg(test)]
                Step::Probe { allow, reject } => match facts.answers.get(index) {
                    None => return Verdict::Wait { step: index, need: &Need::Probe },
                    Some(a) if a.status == *allow => {}
                    Some(_) => {
                        edits.clear_added();
                        return Verdict::Respond { response: reject, reason: "probe refused" };
                    }
                },
            }
        }
        Verdict::Continue
    }

    /// Runs a route's outbound steps on a backend's response headers.
    pub fn outbound(
        &self,
        policy: &ApiPolicy,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        edits: &mut HeaderEdits,
    ) {
        for step in &policy.outbound {
            match step {
                Step::SetHeader(s) => run_set_header(s, facts, headers, edits),
                Step::ValidateClientCertificate(_) | Step::ReturnResponse(_) => {}
                #[cfg(test)]
                Step::Probe { .. } => {}
            }
        }
    }

    /// Number of thumbprints across all lists (for the reload log line).
    pub fn thumbprint_count(&self) -> usize {
        self.lists.iter().map(ThumbprintSet::len).sum()
    }
}

impl ApiPolicy {
    /// Whether the outbound side has anything to do (the server skips the walk otherwise).
    pub fn has_outbound(&self) -> bool {
        !self.outbound.is_empty()
    }
}

/// Reads a thumbprint list the way `compile` does (for benches and tools).
pub fn load_thumbprints(path: &Path) -> Result<ThumbprintSet, ConfigErrors> {
    ThumbprintSet::load(path, &Loc::builtin("thumbprints"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::facts::{Answer, Answers};

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

    fn facts(answers: &Answers) -> Facts<'_> {
        Facts {
            client_cert: None,
            client_addr: "127.0.0.1:9".parse().expect("addr"),
            client_ip: "127.0.0.1",
            request_id: "0123456789abcdef",
            now: 1_800_000_000,
            answers,
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
            inbound: vec![
                add("X-Before", "{request.id}"),
                Step::Probe { allow: 200, reject: json_response(403, "Forbidden") },
                add("X-After", "1"),
            ],
            outbound: Vec::new(),
        };
        let mut edits = HeaderEdits::default();
        edits.reset(0);
        let mut answers = Answers::default();
        let step = match set.inbound(&policy, &facts(&answers), &NoHeaders, &mut edits) {
            Verdict::Wait { step, need: Need::Probe } => step,
            v => panic!("expected Wait, got {v:?}"),
        };
        assert_eq!(step, 1);
        assert_eq!(added(&edits), [("X-Before".into(), "0123456789abcdef".into())]);

        // Resumed without the answer, it waits again at the same step.
        assert!(matches!(
            set.inbound_from(&policy, step, &facts(&answers), &NoHeaders, &mut edits),
            Verdict::Wait { step: 1, .. }
        ));

        answers.put(step, Answer { status: 200, body: Bytes::new() });
        assert!(matches!(
            set.inbound_from(&policy, step, &facts(&answers), &NoHeaders, &mut edits),
            Verdict::Continue
        ));
        assert_eq!(
            added(&edits),
            [("X-Before".into(), "0123456789abcdef".into()), ("X-After".into(), "1".into())]
        );

        // Another answer: the step refuses, and nothing prepared for the backend goes out.
        let mut edits = HeaderEdits::default();
        edits.reset(0);
        answers.clear();
        assert!(matches!(
            set.inbound(&policy, &facts(&answers), &NoHeaders, &mut edits),
            Verdict::Wait { step: 1, .. }
        ));
        answers.put(1, Answer { status: 500, body: Bytes::from_static(b"down") });
        answers.put(1, Answer { status: 404, body: Bytes::new() });
        assert_eq!(answers.get(1).map(|a| a.status), Some(404), "a later answer replaces an earlier one");
        match set.inbound_from(&policy, 1, &facts(&answers), &NoHeaders, &mut edits) {
            Verdict::Respond { response, reason } => {
                assert_eq!((response.status, reason), (403, "probe refused"));
            }
            v => panic!("expected Respond, got {v:?}"),
        }
        assert!(added(&edits).is_empty());
        assert!(Answers::none().get(1).is_none());
    }
}
