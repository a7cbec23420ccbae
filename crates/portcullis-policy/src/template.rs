//! Value templates such as `CN is {client_cert.subject}`, parsed once at load time into literal
//! and variable parts; rendering is a walk over the parts with no parsing.

use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};
use portcullis_config::{ConfigError, Loc};

use crate::facts::{Facts, HeaderList, RequestState};
use crate::policy::PolicySet;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    CertSubject,
    CertIssuer,
    CertThumbprint,
    CertThumbprintSha256,
    CertSerial,
    CertNotBefore,
    CertNotAfter,
    CertCommonName,
    CertVerifyErrors,
    CertPemUrlencoded,
    CertDerBase64,
    CertXfcc,
    RequestIp,
    RequestId,
    RequestMethod,
    RequestPath,
    ResponseStatus,
    SubscriptionId,
    ProductName,
    /// Index into `Template::header_names`.
    Header(usize),
    /// Index into `Template::claim_names`.
    Claim(usize),
    /// Index into `Template::route_names`.
    Route(usize),
    /// Index into `Template::callouts`.
    Callout(usize),
}

impl Var {
    /// Its values are printable ASCII without `"` or `\\` (hex, digits, addresses, times, a
    /// method, which the parser took as a token): a JSON string holds them as they are.
    fn json_plain(self) -> bool {
        matches!(
            self,
            Var::CertThumbprint
                | Var::CertThumbprintSha256
                | Var::CertSerial
                | Var::CertNotBefore
                | Var::CertNotAfter
                | Var::RequestIp
                | Var::RequestId
                | Var::RequestMethod
                | Var::ResponseStatus
        )
    }
}

/// What of a callout's answer a template reads (`{callout.NAME.FIELD}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CalloutField {
    Status,
    Body,
    /// A value in the JSON body, by member names and array indexes (`json.a.b.0`, or the JSON
    /// pointer `json/a/b/0`).
    Json(Vec<Box<str>>),
}

/// A callout's answer a template reads.
#[derive(Debug, Clone)]
pub(crate) struct CalloutRef {
    pub(crate) name: Box<str>,
    pub(crate) field: CalloutField,
}

/// `NAME.status`, `NAME.body`, `NAME.json.a.b`, `NAME.json/a/b`.
fn callout_ref(text: &str) -> Result<CalloutRef, String> {
    let (name, _) = text.split_once(['.', '/']).ok_or("a callout's field is missing")?;
    let field = &text[name.len()..];
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(format!("\"{name}\" is not a callout name"));
    }
    let field = match field {
        ".status" => CalloutField::Status,
        ".body" => CalloutField::Body,
        ".json" | "/json" => CalloutField::Json(Vec::new()),
        f => {
            if let Some(path) = f.strip_prefix(".json.") {
                CalloutField::Json(path.split('.').map(Box::from).collect())
            } else if let Some(pointer) = f.strip_prefix(".json/") {
                // RFC 6901: `~1` is '/', `~0` is '~'.
                CalloutField::Json(
                    pointer.split('/').map(|s| s.replace("~1", "/").replace("~0", "~").into()).collect(),
                )
            } else {
                return Err("a callout's field is status, body, json.PATH or json/POINTER".to_owned());
            }
        }
    };
    if let CalloutField::Json(path) = &field
        && path.iter().any(|s| s.is_empty())
    {
        return Err("an empty name in the JSON path".to_owned());
    }
    Ok(CalloutRef { name: name.into(), field })
}

const VARIABLES: [(&str, Var); 19] = [
    ("client_cert.subject", Var::CertSubject),
    ("client_cert.issuer", Var::CertIssuer),
    ("client_cert.thumbprint", Var::CertThumbprint),
    ("client_cert.thumbprint_sha256", Var::CertThumbprintSha256),
    ("client_cert.serial", Var::CertSerial),
    ("client_cert.not_before", Var::CertNotBefore),
    ("client_cert.not_after", Var::CertNotAfter),
    ("client_cert.common_name", Var::CertCommonName),
    ("client_cert.verify_errors", Var::CertVerifyErrors),
    ("client_cert.pem_urlencoded", Var::CertPemUrlencoded),
    ("client_cert.der_base64", Var::CertDerBase64),
    ("client_cert.xfcc", Var::CertXfcc),
    ("request.ip", Var::RequestIp),
    ("request.id", Var::RequestId),
    ("request.method", Var::RequestMethod),
    ("request.path", Var::RequestPath),
    ("response.status", Var::ResponseStatus),
    ("subscription.id", Var::SubscriptionId),
    ("product.name", Var::ProductName),
];

/// What a template is rendered against: the request, what evaluation has learnt of it, and the
/// policy set (whose subscriptions and products those are).
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub facts: &'a Facts<'a>,
    pub state: &'a RequestState,
    pub set: &'a PolicySet,
    pub headers: &'a dyn HeaderList,
}

impl std::fmt::Debug for Context<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("facts", self.facts).finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
enum Part {
    Literal(Bytes),
    Var(Var),
}

/// A compiled value template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Vec<Part>,
    header_names: Vec<Bytes>,
    claim_names: Vec<String>,
    route_names: Vec<Bytes>,
    callouts: Vec<CalloutRef>,
    uses_client_cert: bool,
    /// Uses the subscription, the product, a token claim or a callout's answer.
    uses_caller: bool,
    /// How variables' values are written: as they are, percent-encoded, or JSON-escaped.
    mode: Mode,
    /// A variable without a value is left empty (a log message), instead of the whole value
    /// not being rendered (a header not set).
    lenient: bool,
}

/// Where a template's text goes, and so how its variables' values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A header value (control characters become spaces).
    Plain,
    /// A URL's path or query, or a form: all but RFC 3986's unreserved characters
    /// percent-encoded.
    Url,
    /// Inside a JSON string: `"`, `\` and control characters escaped, so that a value can never
    /// end the string it is in.
    Json,
}

impl Template {
    /// Parses `{name}` variables; `{{` and `}}` stand for literal braces.
    pub fn parse(text: &str, loc: &Loc) -> Result<Template, ConfigError> {
        Template::parse_as(text, loc, Mode::Plain)
    }

    /// A message for a logger: values JSON-escaped, a variable without a value left empty,
    /// control characters allowed in the text.
    pub(crate) fn parse_message(text: &str, loc: &Loc) -> Result<Template, ConfigError> {
        Template::parse_with(text, loc, Mode::Json, true)
    }

    /// A message's key: values as they are, a variable without a value left empty.
    pub(crate) fn parse_key(text: &str, loc: &Loc) -> Result<Template, ConfigError> {
        Template::parse_with(text, loc, Mode::Plain, true)
    }

    /// A template whose text is written `mode`'s way (see [`Mode`]).
    pub(crate) fn parse_as(text: &str, loc: &Loc, mode: Mode) -> Result<Template, ConfigError> {
        Template::parse_with(text, loc, mode, false)
    }

    fn parse_with(text: &str, loc: &Loc, mode: Mode, lenient: bool) -> Result<Template, ConfigError> {
        let mut parts = Vec::new();
        let mut callouts = Vec::new();
        let mut header_names = Vec::new();
        let mut claim_names = Vec::new();
        let mut route_names: Vec<Bytes> = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            match c {
                // In a message (JSON, mostly), `{NAME}` is a variable and any other brace is
                // text as it is: `{"n":{header.x-n}}` needs no doubled braces.
                '{' if lenient && !names_variable(&text[i + 1..]) => literal.push('{'),
                '}' if lenient => literal.push('}'),
                '{' if chars.peek().map(|p| p.1) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|p| p.1) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '}' => {
                    return Err(
                        loc.error(format!("unmatched '}}' at offset {i} (write '}}}}' for a literal brace)"))
                    );
                }
                '{' => {
                    let rest = &text[i + 1..];
                    let Some(end) = rest.find('}') else {
                        return Err(loc.error(format!("unclosed '{{' at offset {i}")));
                    };
                    let name = rest[..end].trim();
                    for _ in 0..=end {
                        chars.next();
                    }
                    let var = if let Some(header) = name.strip_prefix("header.") {
                        if header.is_empty() || !header.bytes().all(is_tchar) {
                            return Err(loc.error(format!("\"{header}\" is not a header name in {{{name}}}")));
                        }
                        header_names.push(Bytes::copy_from_slice(header.to_ascii_lowercase().as_bytes()));
                        Var::Header(header_names.len() - 1)
                    } else if let Some(claim) = name.strip_prefix("jwt.claim.") {
                        if claim.is_empty() || claim.chars().any(|c| c.is_control() || c == '{' || c == '}') {
                            return Err(loc.error(format!("\"{claim}\" is not a claim name in {{{name}}}")));
                        }
                        claim_names.push(claim.to_owned());
                        Var::Claim(claim_names.len() - 1)
                    } else if let Some(param) = name.strip_prefix("route.") {
                        if param.is_empty()
                            || !param.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                        {
                            return Err(
                                loc.error(format!("\"{param}\" is not a route parameter name in {{{name}}}"))
                            );
                        }
                        route_names.push(Bytes::copy_from_slice(param.as_bytes()));
                        Var::Route(route_names.len() - 1)
                    } else if let Some(callout) = name.strip_prefix("callout.") {
                        callouts
                            .push(callout_ref(callout).map_err(|e| loc.error(format!("{{{name}}}: {e}")))?);
                        Var::Callout(callouts.len() - 1)
                    } else if let Some((_, v)) = VARIABLES.iter().find(|(n, _)| *n == name) {
                        *v
                    } else {
                        let known: Vec<&str> = VARIABLES.iter().map(|(n, _)| *n).collect();
                        return Err(loc.error(format!(
                            "unknown variable {{{name}}}; known: {}, header.NAME, jwt.claim.NAME, route.NAME, callout.NAME.FIELD",
                            known.join(", ")
                        )));
                    };
                    if !literal.is_empty() {
                        parts.push(Part::Literal(Bytes::from(std::mem::take(&mut literal).into_bytes())));
                    }
                    parts.push(Part::Var(var));
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(Bytes::from(literal.into_bytes())));
        }
        if let Some(Part::Literal(l)) =
            parts.iter().find(|p| matches!(p, Part::Literal(l) if !lenient && !is_header_safe(l)))
        {
            return Err(loc.error(format!(
                "{:?} contains a control character; a header value cannot",
                String::from_utf8_lossy(l)
            )));
        }
        let uses_client_cert = parts.iter().any(|p| {
            matches!(
                p,
                Part::Var(
                    Var::CertSubject
                        | Var::CertIssuer
                        | Var::CertThumbprint
                        | Var::CertThumbprintSha256
                        | Var::CertSerial
                        | Var::CertNotBefore
                        | Var::CertNotAfter
                        | Var::CertCommonName
                        | Var::CertVerifyErrors
                        | Var::CertPemUrlencoded
                        | Var::CertDerBase64
                        | Var::CertXfcc
                )
            )
        });
        let uses_caller = parts.iter().any(|p| {
            matches!(p, Part::Var(Var::SubscriptionId | Var::ProductName | Var::Claim(_) | Var::Callout(_)))
        });
        Ok(Template {
            parts,
            header_names,
            claim_names,
            route_names,
            callouts,
            uses_client_cert,
            uses_caller,
            mode,
            lenient,
        })
    }

    /// The callouts whose answers the template reads, by name.
    pub(crate) fn callout_names(&self) -> impl Iterator<Item = &str> {
        self.callouts.iter().map(|c| &*c.name)
    }

    /// Whether the template reads a callout's JSON body.
    pub(crate) fn reads_json_of(&self, callout: &str) -> bool {
        self.callouts.iter().any(|c| &*c.name == callout && matches!(c.field, CalloutField::Json(_)))
    }

    /// The route parameters the template reads (`{route.NAME}`).
    pub fn route_names(&self) -> impl Iterator<Item = &str> {
        self.route_names.iter().map(|n| std::str::from_utf8(n).unwrap_or_default())
    }

    /// Whether the value comes (partly) from the client certificate.
    pub fn uses_client_cert(&self) -> bool {
        self.uses_client_cert
    }

    /// Whether the value says who the caller is (certificate, subscription, product, token
    /// claims): such a header is an identity header, never taken from the client.
    pub fn is_identity(&self) -> bool {
        self.uses_client_cert || self.uses_caller
    }

    /// Renders into `out`. Returns false (and leaves `out` as it was) when a variable has no
    /// value for this request — no certificate, no subscription or product, no token or not
    /// that claim: the header is then not set at all.
    pub fn render(&self, cx: &Context<'_>, out: &mut BytesMut) -> bool {
        if self.uses_client_cert && cx.facts.client_cert.is_none() && !self.lenient {
            return false;
        }
        let start = out.len();
        for part in &self.parts {
            let present = match part {
                Part::Literal(l) => {
                    out.put_slice(l);
                    true
                }
                Part::Var(v) if self.mode != Mode::Plain => {
                    let at = out.len();
                    let present = self.render_var(*v, cx, out);
                    // Most values need no escaping: left where they were written. The others
                    // are copied out and written again, escaped.
                    let clean = match self.mode {
                        Mode::Json if v.json_plain() => {
                            debug_assert!(portcullis_http::write::json_plain(&out[at..]), "{v:?}");
                            true
                        }
                        // Plain ASCII, or UTF-8 text with nothing to escape.
                        Mode::Json => {
                            let value = &out[at..];
                            portcullis_http::write::json_plain(value)
                                || (!value.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\' || b == 0x7f)
                                    && std::str::from_utf8(value).is_ok())
                        }
                        _ => out[at..].iter().all(|&b| is_unreserved(b)),
                    };
                    if !clean {
                        let value = out[at..].to_vec();
                        out.truncate(at);
                        match self.mode {
                            Mode::Json => put_json_escaped(out, &value),
                            _ => put_url_encoded(out, &value),
                        }
                    }
                    present
                }
                Part::Var(v) => self.render_var(*v, cx, out),
            };
            if !present && !self.lenient {
                out.truncate(start);
                return false;
            }
        }
        true
    }

    /// Writes one variable; false when it has no value.
    fn render_var(&self, var: Var, cx: &Context<'_>, out: &mut BytesMut) -> bool {
        let (facts, headers) = (cx.facts, cx.headers);
        let cert = facts.client_cert;
        match var {
            Var::CertSubject => put_safe(out, cert.map_or("", |c| &c.subject).as_bytes()),
            Var::CertIssuer => put_safe(out, cert.map_or("", |c| &c.issuer).as_bytes()),
            Var::CertThumbprint => out.put_slice(cert.map_or("", |c| &c.thumbprint).as_bytes()),
            Var::CertThumbprintSha256 => out.put_slice(cert.map_or("", |c| &c.thumbprint_sha256).as_bytes()),
            Var::CertSerial => out.put_slice(cert.map_or("", |c| &c.serial).as_bytes()),
            Var::CertNotBefore => put_time(out, cert.map_or(0, |c| c.not_before)),
            Var::CertNotAfter => put_time(out, cert.map_or(0, |c| c.not_after)),
            Var::CertCommonName => {
                put_safe(out, cert.and_then(|c| c.common_name.as_deref()).unwrap_or("").as_bytes())
            }
            // OpenSSL's static descriptions and numbers: nothing to make header-safe.
            Var::CertVerifyErrors => {
                if let Some(c) = cert {
                    let _ = c.write_verify_summary(out);
                }
            }
            // The certificate itself, for backends that authorise by it (nothing when it is not
            // known: a session resumed from a ticket written before it was kept).
            Var::CertPemUrlencoded | Var::CertDerBase64 | Var::CertXfcc => {
                let Some(c) = cert.filter(|c| !c.der.is_empty()) else { return false };
                match var {
                    Var::CertPemUrlencoded => out.put_slice(c.pem_urlencoded().as_bytes()),
                    Var::CertDerBase64 => out.put_slice(c.der_base64().as_bytes()),
                    _ => put_safe(out, c.xfcc().as_bytes()),
                }
            }
            Var::RequestIp => out.put_slice(facts.client_ip.as_bytes()),
            Var::RequestId => out.put_slice(facts.request_id.as_bytes()),
            Var::RequestMethod => put_safe(out, facts.method),
            Var::RequestPath => put_safe(out, facts.path),
            Var::ResponseStatus => match cx.state.response_status {
                0 => return false,
                status => portcullis_http::write::decimal(out, u64::from(status)),
            },
            Var::Header(i) => {
                let name = &self.header_names[i];
                if let Some(v) = (0..headers.count()).find(|&h| headers.name(h).eq_ignore_ascii_case(name)) {
                    put_safe(out, headers.value(v));
                }
            }
            Var::SubscriptionId => match cx.set.subscription_id(cx.state) {
                Some(id) => put_safe(out, id.as_bytes()),
                None => return false,
            },
            Var::ProductName => match cx.set.product_name(cx.state) {
                Some(name) => put_safe(out, name.as_bytes()),
                None => return false,
            },
            // The segment of the path the operation's `{NAME}` matched, percent-decoded.
            Var::Route(i) => match facts.route.param(&self.route_names[i]) {
                Some(raw) => put_safe(out, &percent_decoded(raw)),
                None => return false,
            },
            Var::Callout(i) => {
                let r = &self.callouts[i];
                let Some(answer) = cx.state.callout(&r.name) else { return false };
                match &r.field {
                    CalloutField::Status => {
                        let _ = write!(out, "{}", answer.status);
                    }
                    CalloutField::Body => put_safe(out, &answer.body),
                    CalloutField::Json(path) => {
                        let Some(mut value) = answer.json() else { return false };
                        for step in path {
                            value = match value {
                                portcullis_jose::Json::Object(_) => value.get(step),
                                portcullis_jose::Json::Array(items) => {
                                    step.parse::<usize>().ok().and_then(|i| items.get(i))
                                }
                                _ => None,
                            }
                            .unwrap_or(&portcullis_jose::Json::Null);
                        }
                        match value {
                            portcullis_jose::Json::Null => return false,
                            portcullis_jose::Json::String(s) => put_safe(out, s.as_bytes()),
                            other => {
                                let mut text = Vec::new();
                                other.write_compact(&mut text);
                                put_safe(out, &text);
                            }
                        }
                    }
                }
            }
            Var::Claim(i) => match cx.state.token_claim(&self.claim_names[i]) {
                None => return false,
                Some(portcullis_jose::Json::String(s)) => put_safe(out, s.as_bytes()),
                Some(other) => {
                    let mut text = Vec::new();
                    other.write_compact(&mut text);
                    put_safe(out, &text);
                }
            },
        }
        true
    }
}

/// Whether `rest` (what follows a `{`) starts with a variable's name and its `}`.
fn names_variable(rest: &str) -> bool {
    rest.find('}').is_some_and(|end| {
        end > 0 && rest[..end].bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-/~".contains(&b))
    })
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_header_safe(v: &[u8]) -> bool {
    // A fold without early exit: it vectorises, and values are short.
    !v.iter().fold(false, |bad, &b| bad | ((b < 0x20 && b != b'\t') | (b == 0x7f)))
}

/// Copies a value that may come from a certificate or a client: a control character in it
/// (a CN of "x\r\nX-Admin: 1", say) becomes a space, so it can never split a header.
/// `%XX` escapes decoded (a `%` not followed by two hex digits is kept as it is).
fn percent_decoded(raw: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if !raw.contains(&b'%') {
        return std::borrow::Cow::Borrowed(raw);
    }
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match (raw[i], raw.get(i + 1).copied().and_then(hex), raw.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push(h << 4 | l);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Escapes a value for the inside of a JSON string.
fn put_json_escaped(out: &mut BytesMut, v: &[u8]) {
    portcullis_http::write::json_escaped_bytes(out, v);
}

/// RFC 3986's unreserved characters: never percent-encoded.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn put_url_encoded(out: &mut BytesMut, v: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in v {
        if is_unreserved(b) {
            out.put_u8(b);
        } else {
            out.put_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

fn put_safe(out: &mut BytesMut, v: &[u8]) {
    if is_header_safe(v) {
        out.put_slice(v);
    } else {
        out.extend(v.iter().map(|&b| if b == b'\t' || (b >= 0x20 && b != 0x7f) { b } else { b' ' }));
    }
}

/// Unix seconds as RFC 3339 UTC (`2027-01-31T23:59:59Z`).
fn put_time(out: &mut BytesMut, t: i64) {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (year, month, day) = portcullis_http::write::civil_date(days);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_time(t: i64) -> String {
        let mut out = BytesMut::new();
        put_time(&mut out, t);
        String::from_utf8(out.to_vec()).expect("ascii")
    }

    #[test]
    fn times() {
        assert_eq!(render_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(render_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(render_time(1_798_761_599), "2026-12-31T23:59:59Z");
    }

    #[test]
    fn parse_errors_are_located() {
        let loc = Loc::builtin("api[0].inbound[0].set_header.value");
        let e = Template::parse("{client_cert.subjekt}", &loc).expect_err("unknown");
        assert!(e.message.contains("unknown variable {client_cert.subjekt}"), "{}", e.message);
        assert!(Template::parse("{client_cert.subject", &loc).is_err());
        assert!(Template::parse("a}b", &loc).is_err());
        assert!(Template::parse("{header.bad name}", &loc).is_err());
        let t = Template::parse("{{literal}} {request.ip}", &loc).expect("valid");
        assert!(!t.uses_client_cert());
    }

    #[test]
    fn control_characters_never_reach_a_header() {
        let mut out = BytesMut::new();
        put_safe(&mut out, b"CN=x\r\nX-Admin: 1");
        assert_eq!(&out[..], b"CN=x  X-Admin: 1");
    }

    #[test]
    fn callout_fields_and_url_values() {
        for (text, name, field) in [
            ("device.status", "device", CalloutField::Status),
            ("device.body", "device", CalloutField::Body),
            ("d-1.json.a.0.b", "d-1", CalloutField::Json(vec!["a".into(), "0".into(), "b".into()])),
            ("d.json/a~1b/~0c", "d", CalloutField::Json(vec!["a/b".into(), "~c".into()])),
            ("d.json", "d", CalloutField::Json(Vec::new())),
        ] {
            let r = callout_ref(text).expect(text);
            assert_eq!((&*r.name, r.field), (name, field), "{text}");
        }
        for bad in ["device", "device.", "device.headers", "de vice.status", "d.json.a..b", ".status"] {
            assert!(callout_ref(bad).is_err(), "{bad}");
        }
        let mut out = BytesMut::new();
        put_url_encoded(&mut out, b"a b/c?d=e&f~g.h-i_j%");
        assert_eq!(&out[..], b"a%20b%2Fc%3Fd%3De%26f~g.h-i_j%25");
        out.clear();
        put_json_escaped(&mut out, b"x\",\"admin\":true\\\x01");
        assert_eq!(&out[..], br#"x\",\"admin\":true\\\u0001"#);
    }

    #[test]
    fn route_parameters_are_decoded_segments() {
        assert_eq!(&*percent_decoded(b"a%20b%zz%4"), b"a b%zz%4");
        assert_eq!(&*percent_decoded(b"plain"), b"plain");
        let params = [(Bytes::from_static(b"id"), 1), (Bytes::from_static(b"v"), 3)];
        let route = crate::RouteMatch { path: b"/devices/d%2F7/firmware/", params: &params };
        assert_eq!(route.param(b"id"), Some(&b"d%2F7"[..]));
        assert_eq!(route.param(b"v"), None, "past the end of the path");
        assert_eq!(route.param(b"other"), None);
        let t = Template::parse("{route.id}", &Loc::builtin("t")).expect("template");
        assert_eq!(t.route_names().collect::<Vec<_>>(), ["id"]);
        assert!(Template::parse("{route.}", &Loc::builtin("t")).is_err());
        assert!(Template::parse("{route.a b}", &Loc::builtin("t")).is_err());
    }
}
