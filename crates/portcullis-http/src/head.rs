//! Request and response heads: found, parsed and checked once, then kept as offsets into one
//! frozen buffer.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};

use crate::error::HeadError;
use crate::path::normalize_path;

/// The most header fields a head may carry, whatever the configuration says: it sizes the
/// parser's stack array.
pub const MAX_HEADERS_CAP: usize = 256;

/// Size limits for heads.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Request line plus all header lines, in bytes.
    pub max_head_size: usize,
    /// Number of header fields.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_head_size: 16 * 1024, max_headers: 100 }
    }
}

/// The HTTP version of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            Version::Http10 => b"HTTP/1.0",
            Version::Http11 => b"HTTP/1.1",
        }
    }
}

/// How the body of a message is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    None,
    /// Exactly this many bytes (never 0: that is `None`).
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the peer closes (responses only).
    UntilClose,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    end: u32,
}

impl Span {
    /// The span of `part` inside `base`, found by checked address arithmetic. A `part` that does
    /// not lie inside `base` (httparse hands out a static `""` for an absent or obs-text reason
    /// phrase) yields the empty span: nothing outside `base` is ever addressed through it.
    fn within(base: &[u8], part: &[u8]) -> Span {
        let offset = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize);
        match offset {
            Some(start) if start <= base.len() && part.len() <= base.len() - start => {
                // Heads are bounded far below 4 GiB by `Limits`; saturate rather than wrap.
                let start32 = u32::try_from(start).unwrap_or(u32::MAX);
                let end32 = u32::try_from(start + part.len()).unwrap_or(u32::MAX);
                Span { start: start32, end: end32 }
            }
            _ => Span::default(),
        }
    }

    /// The bytes of the span in `raw`; empty when the span does not fit (never panics).
    fn get(self, raw: &[u8]) -> &[u8] {
        raw.get(self.start as usize..self.end as usize).unwrap_or_default()
    }

    fn sub(self, from: usize, to: usize) -> Span {
        let start = self.start.saturating_add(from as u32);
        let end = self.start.saturating_add(to as u32).max(start);
        Span { start, end: end.min(self.end) }
    }
}

#[derive(Debug, Clone, Copy)]
struct Field {
    name: Span,
    value: Span,
    /// Connection-specific (RFC 9110 §7.6.1) or otherwise consumed by the proxy: never forwarded.
    hop: bool,
}

/// Header names that are never forwarded as received: connection-specific fields (RFC 9110
/// §7.6.1), `Trailer` (trailers are not forwarded) and `Expect` (the proxy answers it itself).
pub fn is_hop_by_hop_name(name: &[u8]) -> bool {
    const NAMES: [&[u8]; 8] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"transfer-encoding",
        b"upgrade",
        b"trailer",
        b"expect",
    ];
    NAMES.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// Finds where a head ends, across reads, without rescanning what it has already seen.
///
/// It also enforces the two rules a parser that waits for `\r\n\r\n` could not: a line must end
/// in CRLF (a bare LF is refused at once instead of waiting for a terminator that never comes),
/// and the head must fit the size limit.
#[derive(Debug, Default)]
pub struct HeadScanner {
    scanned: usize,
}

impl HeadScanner {
    /// Looks for the end of the head at the front of `buf`.
    ///
    /// Empty lines ahead of a request line are dropped from `buf` (RFC 9112 §2.2). Returns the
    /// head's length (its final CRLF included) once complete, `None` if more bytes are needed.
    pub fn scan(&mut self, buf: &mut BytesMut, max_head_size: usize) -> Result<Option<usize>, HeadError> {
        // Nothing seen yet, or only the CR of an empty line whose LF comes in this read.
        if self.scanned == 0 || (self.scanned == 1 && buf.first() == Some(&b'\r')) {
            while buf.starts_with(b"\r\n") {
                let _ = buf.split_to(2);
                self.scanned = 0;
            }
        }
        // The terminator may straddle the previous read: look again from three bytes back.
        let from = self.scanned.saturating_sub(3);
        let end = head_end_finder().find(&buf[from..]).map(|i| from + i + 4);
        let head = &buf[..end.unwrap_or(buf.len())];
        if let Some(e) = line_ending_error(head, self.scanned) {
            return Err(e);
        }
        match end {
            Some(len) if len > max_head_size => Err(HeadError::TooLarge),
            Some(len) => {
                self.scanned = 0;
                Ok(Some(len))
            }
            None if buf.len() >= max_head_size => Err(HeadError::TooLarge),
            None => {
                // A CR at the very end is checked against the byte that follows it next time.
                self.scanned = buf.len();
                Ok(None)
            }
        }
    }

    /// Forgets progress (when the buffer it was scanning is discarded).
    pub fn reset(&mut self) {
        self.scanned = 0;
    }
}

/// The searcher for the blank line that ends a head, built once (building one costs more than
/// searching a typical head).
fn head_end_finder() -> &'static memchr::memmem::Finder<'static> {
    static FINDER: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    FINDER.get_or_init(|| memchr::memmem::Finder::new(b"\r\n\r\n"))
}

/// Whether every CR in `b` is followed by LF and every LF preceded by CR, looking at the bytes
/// from `from` on (those before were checked already). Said otherwise: byte `i` is LF exactly
/// when byte `i - 1` is CR. One pass without early exit, which vectorises; the slow search for
/// which rule broke runs only on a bad head.
fn line_ending_error(b: &[u8], from: usize) -> Option<HeadError> {
    if from == 0 && b.first() == Some(&b'\n') {
        return Some(HeadError::Malformed("bare LF"));
    }
    let from = from.max(1);
    if from >= b.len() {
        return None;
    }
    let mismatch = |(&cur, &prev): (&u8, &u8)| (cur == b'\n') != (prev == b'\r');
    let pairs = || b[from..].iter().zip(&b[from - 1..b.len() - 1]);
    if !pairs().fold(false, |bad, pair| bad | mismatch(pair)) {
        return None;
    }
    let (_, &prev) = pairs().find(|&pair| mismatch(pair))?;
    Some(HeadError::Malformed(if prev == b'\r' { "bare CR" } else { "bare LF" }))
}

fn httparse_reason(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "invalid byte in header name (or obs-fold)",
        httparse::Error::HeaderValue => "invalid byte in header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Status => "invalid status",
        httparse::Error::Token => "invalid token in start line",
        httparse::Error::TooManyHeaders => "too many headers",
        httparse::Error::Version => "invalid HTTP version",
    }
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Elements of a comma-separated list (RFC 9110 §5.6.1), trimmed, empty ones skipped.
fn list_elements(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|&b| b == b',').map(trim_ows).filter(|e| !e.is_empty())
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Parses a `Content-Length` value, list form included (`5, 5`); all elements must agree.
fn parse_content_length(v: &[u8]) -> Result<u64, HeadError> {
    let mut result = None;
    let mut elements = 0;
    for element in v.split(|&b| b == b',') {
        let element = trim_ows(element);
        if element.is_empty() || !element.iter().all(u8::is_ascii_digit) {
            return Err(HeadError::Malformed("invalid Content-Length"));
        }
        let mut n: u64 = 0;
        for &d in element {
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(d - b'0')))
                .ok_or(HeadError::Malformed("Content-Length overflow"))?;
        }
        if result.is_some_and(|r| r != n) {
            return Err(HeadError::Malformed("differing Content-Length values"));
        }
        result = Some(n);
        elements += 1;
    }
    debug_assert!(elements > 0);
    result.ok_or(HeadError::Malformed("invalid Content-Length"))
}

/// What the framing-relevant header fields of one message said.
#[derive(Debug, Default)]
struct FramingFields {
    content_length: Option<u64>,
    transfer_encoding: bool,
    codings: u32,
    chunked_count: u32,
    last_is_chunked: bool,
    close: bool,
    keep_alive: bool,
}

impl FramingFields {
    fn content_length(&mut self, value: &[u8]) -> Result<(), HeadError> {
        let n = parse_content_length(value)?;
        if self.content_length.is_some_and(|c| c != n) {
            return Err(HeadError::Malformed("differing Content-Length values"));
        }
        self.content_length = Some(n);
        Ok(())
    }

    fn transfer_encoding(&mut self, value: &[u8]) {
        self.transfer_encoding = true;
        for coding in list_elements(value) {
            self.codings += 1;
            self.last_is_chunked = coding.eq_ignore_ascii_case(b"chunked");
            if self.last_is_chunked {
                self.chunked_count += 1;
            }
        }
    }

    /// Records `close` / `keep-alive` and returns the other tokens: names of further
    /// connection-specific fields.
    fn connection<'a>(&mut self, value: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + use<'a, '_> {
        list_elements(value).filter(move |token| {
            if token.eq_ignore_ascii_case(b"close") {
                self.close = true;
                false
            } else if token.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
                false
            } else {
                true
            }
        })
    }
}

/// Parses header lines shared by requests and responses: spans, hop-by-hop marks, framing
/// fields. `on_field` sees every field first and may claim it (returning `Ok(true)`).
fn collect_fields<'b>(
    base: &'b [u8],
    headers: &[httparse::Header<'b>],
    fields: &mut Vec<Field>,
    framing: &mut FramingFields,
    mut on_field: impl FnMut(&[u8], Span, &'b [u8]) -> Result<bool, HeadError>,
) -> Result<(), HeadError> {
    fields.clear();
    let mut connection_tokens: [Span; 8] = [Span::default(); 8];
    let mut n_tokens = 0;
    for h in headers {
        let name = h.name.as_bytes();
        let value = trim_ows(h.value);
        let value_span = Span::within(base, value);
        let mut hop = is_hop_by_hop_name(name);
        if name.eq_ignore_ascii_case(b"content-length") {
            framing.content_length(value)?;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            framing.transfer_encoding(value);
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in framing.connection(value) {
                if !token.iter().all(|&b| is_tchar(b)) {
                    return Err(HeadError::Malformed("invalid Connection token"));
                }
                // Naming a framing field as hop-by-hop would make a proxy drop it and the next hop
                // read the body as another message: refuse, never guess.
                if [&b"content-length"[..], b"transfer-encoding", b"host"]
                    .iter()
                    .any(|f| token.eq_ignore_ascii_case(f))
                {
                    return Err(HeadError::Malformed("Connection names a framing field"));
                }
                if n_tokens == connection_tokens.len() {
                    return Err(HeadError::Malformed("too many Connection tokens"));
                }
                connection_tokens[n_tokens] = Span::within(base, token);
                n_tokens += 1;
            }
        } else if on_field(name, value_span, value)? {
            hop = true;
        }
        fields.push(Field { name: Span::within(base, name), value: value_span, hop });
    }
    if n_tokens > 0 {
        for field in fields.iter_mut() {
            let name = field.name.get(base);
            if connection_tokens[..n_tokens].iter().any(|t| t.get(base).eq_ignore_ascii_case(name)) {
                field.hop = true;
            }
        }
    }
    Ok(())
}

fn version_of(v: Option<u8>) -> Result<Version, HeadError> {
    match v {
        Some(0) => Ok(Version::Http10),
        Some(1) => Ok(Version::Http11),
        _ => Err(HeadError::Malformed("unsupported HTTP version")),
    }
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2, RFC 3986 §3.2.2): a reg-name or a bracketed IP
/// literal, then digits after at most one colon. Anything else in a Host or an absolute-form
/// authority is refused, so that later code splitting off the port sees only these shapes.
fn is_authority(value: &[u8]) -> bool {
    let is_reg_name_char = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
    let (host_ok, rest) = match value.strip_prefix(b"[") {
        Some(literal) => match literal.iter().position(|&b| b == b']') {
            Some(end) => {
                let inside = &literal[..end];
                let ok = !inside.is_empty() && inside.iter().all(|&b| is_reg_name_char(b) || b == b':');
                (ok, &literal[end + 1..])
            }
            None => (false, &b""[..]),
        },
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            (value[..end].iter().all(|&b| is_reg_name_char(b)), &value[end..])
        }
    };
    host_ok
        && match rest.strip_prefix(b":") {
            Some(port) => port.iter().all(u8::is_ascii_digit),
            None => rest.is_empty(),
        }
}

/// A parsed request head. One per connection, reused for each request so that the field list
/// keeps its capacity.
#[derive(Debug)]
pub struct RequestHead {
    raw: Bytes,
    method: Span,
    target: Span,
    path: Span,
    /// The normalised path (and query), when it differs from the one received.
    normalized: Option<Bytes>,
    authority: Option<Span>,
    host: Option<Span>,
    version: Version,
    fields: Vec<Field>,
    framing: Framing,
    /// `Content-Length: 0` was sent (framing says `None` either way).
    declared_empty: bool,
    keep_alive: bool,
    expect_continue: bool,
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            raw: Bytes::new(),
            method: Span::default(),
            target: Span::default(),
            path: Span::default(),
            normalized: None,
            authority: None,
            host: None,
            version: Version::Http11,
            fields: Vec::with_capacity(32),
            framing: Framing::None,
            declared_empty: false,
            keep_alive: false,
            expect_continue: false,
        }
    }
}

impl RequestHead {
    /// Parses the first `len` bytes of `buf` (as found by [`HeadScanner::scan`]) and, on success,
    /// splits them off `buf`. What follows in `buf` is the start of the body or the next request.
    pub fn parse(&mut self, buf: &mut BytesMut, len: usize, limits: &Limits) -> Result<(), HeadError> {
        let base = &buf[..len];
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
        let cap = limits.max_headers.clamp(1, MAX_HEADERS_CAP);
        let mut req = httparse::Request::new(&mut []);
        match req.parse_with_uninit_headers(base, &mut storage[..cap]) {
            Ok(httparse::Status::Complete(n)) if n == len => {}
            Ok(_) => return Err(HeadError::Malformed("incomplete head")),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Malformed(httparse_reason(e))),
        }
        let (Some(method), Some(target)) = (req.method, req.path) else {
            return Err(HeadError::Malformed("incomplete request line"));
        };
        let version = version_of(req.version)?;
        let method_b = method.as_bytes();
        if method_b == b"CONNECT" {
            return Err(HeadError::MethodNotAllowed);
        }
        let target_b = target.as_bytes();
        if !target_b.iter().all(|&b| (0x21..0x7f).contains(&b)) {
            return Err(HeadError::Malformed("non-ASCII byte in request-target"));
        }
        let target_span = Span::within(base, target_b);

        // Request-target forms (RFC 9112 §3.2).
        let mut authority = None;
        let path_span = if target_b.first() == Some(&b'/') {
            target_span
        } else if target_b == b"*" {
            if method_b != b"OPTIONS" {
                return Err(HeadError::Malformed("asterisk-form outside OPTIONS"));
            }
            target_span
        } else {
            let scheme_len = if target_b.len() > 7 && target_b[..7].eq_ignore_ascii_case(b"http://") {
                7
            } else if target_b.len() > 8 && target_b[..8].eq_ignore_ascii_case(b"https://") {
                8
            } else {
                return Err(HeadError::Malformed("unsupported request-target form"));
            };
            let rest = &target_b[scheme_len..];
            let auth_len = rest.iter().position(|&b| matches!(b, b'/' | b'?' | b'#')).unwrap_or(rest.len());
            let auth = &rest[..auth_len];
            // RFC 9110 §4.2.4: userinfo in an http(s) URI is to be treated as an error.
            if auth.is_empty() || auth.contains(&b'@') || !is_authority(auth) {
                return Err(HeadError::Malformed("invalid authority in absolute-form"));
            }
            authority = Some(target_span.sub(scheme_len, scheme_len + auth_len));
            target_span.sub(scheme_len + auth_len, target_b.len())
        };
        // A fragment is not part of a request-target; never forward one.
        let mut path_span = path_span;
        if let Some(hash) = path_span.get(base).iter().position(|&b| b == b'#') {
            path_span = path_span.sub(0, hash);
        }

        let mut framing = FramingFields::default();
        let mut host = None;
        let mut host_count = 0;
        let mut expect_continue = false;
        collect_fields(base, req.headers, &mut self.fields, &mut framing, |name, span, value| {
            if name.eq_ignore_ascii_case(b"host") {
                host_count += 1;
                if !is_authority(value) {
                    return Err(HeadError::Malformed("invalid Host"));
                }
                host = Some(span);
            } else if name.eq_ignore_ascii_case(b"expect") && version == Version::Http11 {
                // RFC 9110 §10.1.1: an HTTP/1.0 request's expectation is ignored.
                if !value.eq_ignore_ascii_case(b"100-continue") {
                    return Err(HeadError::UnsupportedExpectation);
                }
                expect_continue = true;
            }
            Ok(false)
        })?;
        // RFC 9112 §3.2: exactly one Host in HTTP/1.1, at most one in HTTP/1.0.
        if host_count > 1 || (version == Version::Http11 && host_count == 0) {
            return Err(HeadError::Malformed("missing or repeated Host"));
        }
        let body = if framing.transfer_encoding {
            // RFC 9112 §6.1: TE in HTTP/1.0 is faulty framing; TE with CL is a smuggling vector.
            if version == Version::Http10 {
                return Err(HeadError::Malformed("Transfer-Encoding in an HTTP/1.0 request"));
            }
            if framing.content_length.is_some() {
                return Err(HeadError::Malformed("both Content-Length and Transfer-Encoding"));
            }
            if framing.codings == 0 || !framing.last_is_chunked {
                return Err(HeadError::Malformed("Transfer-Encoding does not end in chunked"));
            }
            if framing.chunked_count > 1 {
                return Err(HeadError::Malformed("chunked applied more than once"));
            }
            if framing.codings > 1 {
                return Err(HeadError::UnsupportedTransferCoding);
            }
            Framing::Chunked
        } else {
            match framing.content_length {
                Some(0) | None => Framing::None,
                Some(n) => Framing::Length(n),
            }
        };

        let normalized = if path_span.get(base).first() == Some(&b'/') {
            normalize_path(path_span.get(base)).map_err(HeadError::Malformed)?.map(Bytes::from)
        } else if path_span.start == path_span.end {
            // absolute-form without a path: "http://host" or "http://host?q" means "/".
            Some(Bytes::from_static(b"/"))
        } else if path_span.get(base).first() == Some(&b'?') {
            let mut p = Vec::with_capacity(1 + (path_span.end - path_span.start) as usize);
            p.push(b'/');
            p.extend_from_slice(path_span.get(base));
            Some(Bytes::from(p))
        } else {
            None
        };

        self.method = Span::within(base, method_b);
        self.target = target_span;
        self.path = path_span;
        self.normalized = normalized;
        self.authority = authority;
        self.host = host;
        self.version = version;
        self.framing = body;
        self.declared_empty = !framing.transfer_encoding && framing.content_length == Some(0);
        self.keep_alive = match version {
            Version::Http11 => !framing.close,
            Version::Http10 => framing.keep_alive && !framing.close,
        };
        self.expect_continue = expect_continue && body != Framing::None;
        self.raw = buf.split_to(len).freeze();
        Ok(())
    }

    /// Lets go of the head's bytes (and the buffer they share), keeping the field list's room.
    pub fn clear(&mut self) {
        self.raw = Bytes::new();
        self.normalized = None;
        self.fields.clear();
        self.method = Span::default();
        self.target = Span::default();
        self.path = Span::default();
        self.authority = None;
        self.host = None;
        self.framing = Framing::None;
        self.declared_empty = false;
    }

    pub fn method(&self) -> &[u8] {
        self.method.get(&self.raw)
    }

    /// The request-target exactly as received.
    pub fn target(&self) -> &[u8] {
        self.target.get(&self.raw)
    }

    /// The path and query to route on and to forward: normalised, without fragment, origin-form.
    pub fn path(&self) -> &[u8] {
        match &self.normalized {
            Some(p) => p,
            None => self.path.get(&self.raw),
        }
    }

    /// The path without its query.
    pub fn path_only(&self) -> &[u8] {
        let p = self.path();
        match p.iter().position(|&b| b == b'?') {
            Some(q) => &p[..q],
            None => p,
        }
    }

    /// The authority the request is for: the absolute-form target's, else the `Host` field's.
    pub fn host(&self) -> Option<&[u8]> {
        self.authority.or(self.host).map(|s| s.get(&self.raw))
    }

    pub fn version(&self) -> Version {
        self.version
    }

    pub fn framing(&self) -> Framing {
        self.framing
    }

    /// Whether the request said `Content-Length: 0` (a POST with no body, say), which is worth
    /// saying again to the backend: some refuse such a request without a length (411).
    pub fn declares_empty_body(&self) -> bool {
        self.declared_empty
    }

    /// Whether the client asked to keep the connection open after this request.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// `Expect: 100-continue` on a request that has a body.
    pub fn expect_continue(&self) -> bool {
        self.expect_continue
    }

    pub fn is_head(&self) -> bool {
        self.method() == b"HEAD"
    }

    /// Every header field as `(name, value, hop_by_hop)`, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8], bool)> {
        self.fields.iter().map(|f| (f.name.get(&self.raw), f.value.get(&self.raw), f.hop))
    }

    /// Number of header fields, hop-by-hop ones included.
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// Header field `i` as `(name, value, hop_by_hop)`.
    pub fn field(&self, i: usize) -> (&[u8], &[u8], bool) {
        let f = &self.fields[i];
        (f.name.get(&self.raw), f.value.get(&self.raw), f.hop)
    }

    /// Whether the target was in absolute-form (`GET http://host/path`): its authority then
    /// replaces any `Host` field (RFC 9112 §3.2.2).
    pub fn is_absolute_form(&self) -> bool {
        self.authority.is_some()
    }

    /// The end-to-end header fields: what a proxy may forward.
    pub fn forwardable(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields().filter(|f| !f.2).map(|(n, v, _)| (n, v))
    }

    /// The first value of the named field.
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields().find(|f| f.0.eq_ignore_ascii_case(name)).map(|f| f.1)
    }

    /// The head as received, for the rare case it must be inspected whole.
    pub fn raw(&self) -> &Bytes {
        &self.raw
    }
}

/// A parsed response head from a backend.
#[derive(Debug)]
pub struct ResponseHead {
    raw: Bytes,
    status: u16,
    reason: Span,
    version: Version,
    fields: Vec<Field>,
    content_length: Option<u64>,
    chunked: bool,
    transfer_encoding: bool,
    keep_alive: bool,
}

impl Default for ResponseHead {
    fn default() -> Self {
        ResponseHead {
            raw: Bytes::new(),
            status: 0,
            reason: Span::default(),
            version: Version::Http11,
            fields: Vec::with_capacity(32),
            content_length: None,
            chunked: false,
            transfer_encoding: false,
            keep_alive: false,
        }
    }
}

impl ResponseHead {
    /// Parses the first `len` bytes of `buf` and splits them off on success.
    pub fn parse(&mut self, buf: &mut BytesMut, len: usize, limits: &Limits) -> Result<(), HeadError> {
        let base = &buf[..len];
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS_CAP];
        let cap = limits.max_headers.clamp(1, MAX_HEADERS_CAP);
        let mut res = httparse::Response::new(&mut []);
        let config = httparse::ParserConfig::default();
        match config.parse_response_with_uninit_headers(&mut res, base, &mut storage[..cap]) {
            Ok(httparse::Status::Complete(n)) if n == len => {}
            Ok(_) => return Err(HeadError::Malformed("incomplete head")),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Malformed(httparse_reason(e))),
        }
        let (Some(status), Some(reason)) = (res.code, res.reason) else {
            return Err(HeadError::Malformed("incomplete status line"));
        };
        // RFC 9110 §15: the status code is three digits, 100 to 599; anything else has no
        // defined meaning for the client and is not passed on.
        if !(100..=599).contains(&status) {
            return Err(HeadError::Malformed("status code outside 100-599"));
        }
        let version = version_of(res.version)?;
        let mut framing = FramingFields::default();
        collect_fields(base, res.headers, &mut self.fields, &mut framing, |_, _, _| Ok(false))?;
        if framing.transfer_encoding && framing.content_length.is_some() {
            return Err(HeadError::Malformed("both Content-Length and Transfer-Encoding"));
        }
        if framing.chunked_count > 1 {
            return Err(HeadError::Malformed("chunked applied more than once"));
        }
        // A proxy that re-frames bodies as chunked cannot carry another transfer coding through
        // without changing the body's meaning.
        if framing.transfer_encoding && !(framing.codings == 1 && framing.last_is_chunked) {
            return Err(HeadError::Malformed("transfer coding other than chunked"));
        }
        self.status = status;
        self.reason = Span::within(base, reason.as_bytes());
        self.version = version;
        self.content_length = framing.content_length;
        self.transfer_encoding = framing.transfer_encoding;
        // A response whose last coding is not chunked is delimited by close (RFC 9112 §6.3 #4).
        self.chunked = framing.transfer_encoding && framing.last_is_chunked && framing.codings == 1;
        self.keep_alive = match version {
            Version::Http11 => !framing.close,
            // Transfer-Encoding in HTTP/1.0 is faulty framing: the connection is closed after
            // this message, whatever it says (RFC 9112 §6.1).
            Version::Http10 => framing.keep_alive && !framing.close && !framing.transfer_encoding,
        };
        self.raw = buf.split_to(len).freeze();
        Ok(())
    }

    /// Lets go of the head's bytes (and the buffer they share), keeping the field list's room.
    pub fn clear(&mut self) {
        self.raw = Bytes::new();
        self.fields.clear();
        self.reason = Span::default();
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// The reason phrase to send on: the backend's, or the canonical one for the status when the
    /// backend sent none (valid, RFC 9112 §4) or one with obs-text, which httparse does not hand
    /// out.
    pub fn reason(&self) -> &[u8] {
        match self.reason.get(&self.raw) {
            b"" => crate::write::reason_phrase(self.status).as_bytes(),
            r => r,
        }
    }

    pub fn version(&self) -> Version {
        self.version
    }

    /// Whether the backend allows the connection to be reused after this response.
    pub fn keep_alive(&self) -> bool {
        self.keep_alive
    }

    /// An informational (1xx) response, to be skipped while waiting for the final one.
    pub fn is_informational(&self) -> bool {
        (100..200).contains(&self.status)
    }

    /// The body framing of this response to a request with the given method (RFC 9112 §6.3).
    pub fn framing(&self, request_was_head: bool) -> Framing {
        if request_was_head || self.is_informational() || self.status == 204 || self.status == 304 {
            return Framing::None;
        }
        if self.transfer_encoding {
            return if self.chunked { Framing::Chunked } else { Framing::UntilClose };
        }
        match self.content_length {
            Some(0) => Framing::None,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    }

    /// The `Content-Length` field's value, if any (also meaningful on responses to HEAD).
    pub fn content_length(&self) -> Option<u64> {
        self.content_length
    }

    /// Every header field as `(name, value, hop_by_hop)`, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8], bool)> {
        self.fields.iter().map(|f| (f.name.get(&self.raw), f.value.get(&self.raw), f.hop))
    }

    /// The first value of the named field.
    pub fn header(&self, name: &[u8]) -> Option<&[u8]> {
        self.fields().find(|f| f.0.eq_ignore_ascii_case(name)).map(|f| f.1)
    }

    /// Number of header fields, hop-by-hop ones included.
    pub fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// Header field `i` as `(name, value, hop_by_hop)`.
    pub fn field(&self, i: usize) -> (&[u8], &[u8], bool) {
        let f = &self.fields[i];
        (f.name.get(&self.raw), f.value.get(&self.raw), f.hop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<RequestHead, HeadError> {
        let mut buf = BytesMut::from(raw.as_bytes());
        let mut scanner = HeadScanner::default();
        let len = scanner.scan(&mut buf, 16 * 1024)?.ok_or(HeadError::Malformed("partial"))?;
        let mut head = RequestHead::default();
        head.parse(&mut buf, len, &Limits::default())?;
        Ok(head)
    }

    #[test]
    fn simple_get() {
        let h = parse("GET /a/b?c=d HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n").expect("ok");
        assert_eq!(h.method(), b"GET");
        assert_eq!(h.path(), b"/a/b?c=d");
        assert_eq!(h.path_only(), b"/a/b");
        assert_eq!(h.host(), Some(&b"example.com"[..]));
        assert_eq!(h.framing(), Framing::None);
        assert!(h.keep_alive());
        assert_eq!(h.header(b"accept"), Some(&b"*/*"[..]));
    }

    #[test]
    fn scanner_waits_for_the_end_and_resumes() {
        let mut s = HeadScanner::default();
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHost: a\r\n\r"[..]);
        assert_eq!(s.scan(&mut buf, 1024), Ok(None));
        buf.extend_from_slice(b"\nrest");
        assert_eq!(s.scan(&mut buf, 1024), Ok(Some(27)));
    }

    /// Byte by byte, the scanner finds the end exactly once, at the right place, and refuses a
    /// bad line ending as soon as the byte that shows it arrives.
    #[test]
    fn scanner_byte_by_byte() {
        let feed = |raw: &[u8]| -> Vec<Result<Option<usize>, HeadError>> {
            let mut s = HeadScanner::default();
            let mut buf = BytesMut::new();
            raw.iter()
                .map(|&b| {
                    buf.extend_from_slice(&[b]);
                    s.scan(&mut buf, 1024)
                })
                .collect()
        };
        let good = b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\nbody";
        let results = feed(good);
        let end = good.len() - 4;
        assert!(results[..end - 1].iter().all(|r| *r == Ok(None)), "{results:?}");
        assert_eq!(results[end - 1], Ok(Some(end)));
        for (raw, at, why) in [
            (&b"GET / HTTP/1.1\nHost: a\r\n\r\n"[..], 14, "bare LF"),
            (b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n", 24, "bare CR"),
            (b"GET / HTTP/1.1\r\nHost: a\n\r\n", 23, "bare LF"),
            (b"\nGET / HTTP/1.1\r\n\r\n", 0, "bare LF"),
        ] {
            let results = feed(raw);
            assert!(results[..at].iter().all(|r| *r == Ok(None)), "{results:?}");
            assert_eq!(results[at], Err(HeadError::Malformed(why)), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn bare_cr_is_refused_before_the_head_ends() {
        let mut s = HeadScanner::default();
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\rLine: 1"[..]);
        assert_eq!(s.scan(&mut buf, 1024), Err(HeadError::Malformed("bare CR")));
        let mut s = HeadScanner::default();
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r"[..]);
        assert_eq!(s.scan(&mut buf, 1024), Ok(None));
        buf.extend_from_slice(b"\nHost: a\r\n\r\n");
        assert_eq!(s.scan(&mut buf, 1024), Ok(Some(27)));
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let h = parse("\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n").expect("ok");
        assert_eq!(h.method(), b"GET");
        // However the reads split them.
        let raw = b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut s = HeadScanner::default();
        let mut buf = BytesMut::new();
        let mut found = None;
        for &b in raw {
            buf.extend_from_slice(&[b]);
            if let Some(len) = s.scan(&mut buf, 1024).expect("no error") {
                found = Some(len);
                break;
            }
        }
        assert_eq!(found, Some(raw.len() - 4));
        assert!(buf.starts_with(b"GET "));
    }

    #[test]
    fn framing_rules() {
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 003\r\n\r\n").expect("ok").framing(),
            Framing::Length(3)
        );
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n").expect("ok").framing(),
            Framing::Length(5)
        );
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n").expect("ok").framing(),
            Framing::Chunked
        );
        let bad = [
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: content-length\r\nContent-Length: 3\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Transfer-Encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: a, b, c, d, e, f, g, h, i\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        ];
        for raw in bad {
            assert!(matches!(parse(raw), Err(HeadError::Malformed(_))), "{raw:?}");
        }
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").err(),
            Some(HeadError::UnsupportedTransferCoding)
        );
    }

    #[test]
    fn line_and_byte_rules() {
        let bad = [
            "GET / HTTP/1.1\nHost: a\n\n",
            "GET / HTTP/1.1\r\nHost: a\nX: y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\x0cb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
            "GET http://u@h/ HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n",
        ];
        for raw in bad {
            assert!(matches!(parse(raw), Err(HeadError::Malformed(_))), "{raw:?}");
        }
        assert_eq!(
            parse("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n").err(),
            Some(HeadError::MethodNotAllowed)
        );
        assert_eq!(
            parse("POST / HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\nContent-Length: 1\r\n\r\n").err(),
            Some(HeadError::UnsupportedExpectation)
        );
    }

    #[test]
    fn limits() {
        let mut s = HeadScanner::default();
        let mut buf = BytesMut::from(&[b'a'; 100][..]);
        assert_eq!(s.scan(&mut buf, 64), Err(HeadError::TooLarge));
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..101 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        assert_eq!(parse(&raw).err(), Some(HeadError::TooManyHeaders));
    }

    #[test]
    fn hop_by_hop_fields_are_marked() {
        let h = parse(
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nUpgrade: h2c\r\nX-Kept: 2\r\n\r\n",
        )
        .expect("ok");
        let names: Vec<&[u8]> = h.forwardable().map(|(n, _)| n).collect();
        assert_eq!(names, vec![&b"Host"[..], b"X-Kept"]);
    }

    #[test]
    fn keep_alive_by_version() {
        assert!(!parse("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").expect("ok").keep_alive());
        assert!(!parse("GET / HTTP/1.0\r\n\r\n").expect("ok").keep_alive());
        assert!(parse("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").expect("ok").keep_alive());
    }

    #[test]
    fn absolute_form_gives_host_and_path() {
        let h = parse("GET http://Example.com:8080?x=1#frag HTTP/1.1\r\nHost: other\r\n\r\n").expect("ok");
        assert_eq!(h.host(), Some(&b"Example.com:8080"[..]));
        assert_eq!(h.path(), b"/?x=1");
        let h = parse("GET /a/../b#x HTTP/1.1\r\nHost: a\r\n\r\n").expect("ok");
        assert_eq!(h.path(), b"/b");
    }

    #[test]
    fn host_must_be_a_host_and_an_optional_port() {
        for good in
            ["a", "a.example:8443", "[::1]", "[::1]:8443", "127.0.0.1:80", "xn--bcher-kva.example", ""]
        {
            let raw = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert!(parse(&raw).is_ok(), "{good:?} is a valid Host");
        }
        for bad in
            [":]", "]", "[", "[]", "[::1", "a:b", "a:80:80", "[::1]x", "[::1]:x", "a]:80", "a[b]", "a:8]"]
        {
            let raw = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_eq!(parse(&raw).err(), Some(HeadError::Malformed("invalid Host")), "{bad:?}");
            let raw = format!("GET http://{bad}/ HTTP/1.1\r\nHost: a\r\n\r\n");
            assert!(parse(&raw).is_err(), "absolute-form {bad:?}");
        }
    }

    fn parse_response(raw: &str) -> Result<ResponseHead, HeadError> {
        let mut buf = BytesMut::from(raw.as_bytes());
        let len = HeadScanner::default().scan(&mut buf, 16 * 1024)?.ok_or(HeadError::Malformed("partial"))?;
        let mut head = ResponseHead::default();
        head.parse(&mut buf, len, &Limits::default())?;
        Ok(head)
    }

    #[test]
    fn response_framing() {
        let r = parse_response("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n").expect("ok");
        assert_eq!(r.framing(false), Framing::Length(10));
        assert_eq!(r.framing(true), Framing::None);
        let r = parse_response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").expect("ok");
        assert_eq!(r.framing(false), Framing::Chunked);
        assert!(parse_response("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").is_err());
        assert!(
            parse_response("HTTP/1.1 200 OK\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\n")
                .is_err()
        );
        let r = parse_response("HTTP/1.1 204 No Content\r\n\r\n").expect("ok");
        assert_eq!(r.framing(false), Framing::None);
        let r = parse_response("HTTP/1.0 200 OK\r\n\r\n").expect("ok");
        assert_eq!(r.framing(false), Framing::UntilClose);
        assert!(!r.keep_alive());
        let r = parse_response("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\n")
            .expect("ok");
        assert!(r.keep_alive());
        // Faulty framing in HTTP/1.0: read as chunked, but the connection is not kept.
        let r =
            parse_response("HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n")
                .expect("ok");
        assert_eq!(r.framing(false), Framing::Chunked);
        assert!(!r.keep_alive());
        assert!(
            parse_response("HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n")
                .is_err()
        );
    }

    #[test]
    fn reason_phrases_absent_or_with_obs_text_become_canonical() {
        for (raw, reason) in [
            ("HTTP/1.1 200\r\nContent-Length: 2\r\n\r\n", &b"OK"[..]),
            ("HTTP/1.1 404 \r\n\r\n", b"Not Found"),
            ("HTTP/1.1 421\r\n\r\n", b"Misdirected Request"),
            ("HTTP/1.1 200 Fine\tThanks\r\n\r\n", b"Fine\tThanks"),
        ] {
            let r = parse_response(raw).expect(raw);
            assert_eq!(r.reason(), reason, "{raw:?}");
        }
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 \xe9t\xe9\r\n\r\n"[..]);
        let len = HeadScanner::default().scan(&mut buf, 1024).expect("scan").expect("whole");
        let mut head = ResponseHead::default();
        head.parse(&mut buf, len, &Limits::default()).expect("obs-text is valid");
        assert_eq!(head.reason(), b"OK");
    }

    #[test]
    fn status_codes_outside_100_to_599_are_refused() {
        for raw in ["HTTP/1.1 099 X\r\n\r\n", "HTTP/1.1 600 X\r\n\r\n", "HTTP/1.1 999 X\r\n\r\n"] {
            assert!(parse_response(raw).is_err(), "{raw:?}");
        }
        assert!(parse_response("HTTP/1.1 599 X\r\n\r\n").is_ok());
        assert!(parse_response("HTTP/1.1 100 X\r\n\r\n").is_ok());
    }

    #[test]
    fn spans_outside_their_base_are_empty_never_out_of_bounds() {
        let base = b"HTTP/1.1 200 OK";
        let outside: &'static [u8] = b"";
        assert_eq!(Span::within(base, outside).get(base), b"");
        assert_eq!(Span::within(base, &base[9..12]).get(base), b"200");
        assert_eq!(Span { start: 10, end: 99 }.get(base), b"");
    }
}
