//! What a proxy decides when it passes a message on, without doing any I/O: how each body is
//! delimited on the way out, which framing fields the forwarded head carries, what it adds
//! (`Via`, `X-Forwarded-*`), and which requests may be sent again.

use bytes::BytesMut;

use crate::chunked::ChunkedOutput;
use crate::head::{Framing, RequestHead, ResponseHead};
use crate::write;

/// Added to every request forwarded (RFC 9110 §7.6.3).
pub const VIA: &[u8] = b"1.1 portcullis";

/// How a body is delimited on the way in and re-delimited on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyMode {
    None,
    Length(u64),
    Chunked(ChunkedOutput),
    /// Until the source closes; `chunk` re-frames it as chunked for the destination.
    UntilClose {
        chunk: bool,
    },
}

/// The request body's way to the backend: lengths kept, chunked re-encoded canonically. (A
/// request has no close-delimited body, RFC 9112 §6.3.)
pub fn request_body(head: &RequestHead) -> BodyMode {
    match head.framing() {
        Framing::None | Framing::UntilClose => BodyMode::None,
        Framing::Length(n) => BodyMode::Length(n),
        Framing::Chunked => BodyMode::Chunked(ChunkedOutput::Reencode),
    }
}

/// The response body's way to the client, and whether the client connection may stay open
/// after it: an HTTP/1.0 client gets chunked bodies decoded and close-delimited ones as they
/// are, and the connection then ends; an HTTP/1.1 client gets close-delimited bodies chunked.
pub fn response_body(resp: &ResponseHead, request_was_head: bool, client_http10: bool) -> (BodyMode, bool) {
    match resp.framing(request_was_head) {
        Framing::None => (BodyMode::None, true),
        Framing::Length(n) => (BodyMode::Length(n), true),
        Framing::Chunked if client_http10 => (BodyMode::Chunked(ChunkedOutput::DataOnly), false),
        Framing::Chunked => (BodyMode::Chunked(ChunkedOutput::Reencode), true),
        Framing::UntilClose => (BodyMode::UntilClose { chunk: !client_http10 }, !client_http10),
    }
}

/// The framing field of a forwarded request, written from what the parser decided and never
/// copied: one value, one meaning.
pub fn write_request_framing(out: &mut BytesMut, head: &RequestHead) {
    match head.framing() {
        Framing::Length(n) => write::content_length(out, n),
        Framing::Chunked => write::header(out, b"Transfer-Encoding", b"chunked"),
        Framing::None if head.declares_empty_body() => write::content_length(out, 0),
        Framing::None | Framing::UntilClose => {}
    }
}

/// The framing field of a forwarded response sent as `mode`.
pub fn write_response_framing(
    out: &mut BytesMut,
    mode: BodyMode,
    resp: &ResponseHead,
    request_was_head: bool,
) {
    match mode {
        BodyMode::Length(n) => write::content_length(out, n),
        BodyMode::Chunked(ChunkedOutput::Reencode) | BodyMode::UntilClose { chunk: true } => {
            write::header(out, b"Transfer-Encoding", b"chunked");
        }
        BodyMode::None if request_was_head || resp.status() == 304 => {
            // The length the body would have had (RFC 9110 §8.6).
            if let Some(n) = resp.content_length() {
                write::content_length(out, n);
            }
        }
        // An empty body (`Content-Length: 0` from the backend) must still say so: a response
        // without a length is read until the connection closes (RFC 9112 §6.3). 1xx and 204
        // have no body by definition and must not carry the field (RFC 9110 §8.6).
        BodyMode::None if resp.status() != 204 && !resp.is_informational() => write::content_length(out, 0),
        _ => {}
    }
}

/// What the proxy says of the client and of itself to the backend: the client's address, that
/// it came over TLS, and this hop.
pub fn write_forwarding_fields(out: &mut BytesMut, client_ip: &[u8]) {
    write::header(out, b"X-Forwarded-For", client_ip);
    write::header(out, b"X-Forwarded-Proto", b"https");
    write::header(out, b"Via", VIA);
}

/// Fields the proxy writes itself and never takes from the client (the proxy is the edge).
pub fn is_forwarding_field(name: &[u8]) -> bool {
    name.eq_ignore_ascii_case(b"x-forwarded-for") || name.eq_ignore_ascii_case(b"x-forwarded-proto")
}

/// Methods that may be sent again when a connection fails before any answer (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::head::{HeadScanner, Limits};

    fn response(raw: &str) -> ResponseHead {
        let mut buf = BytesMut::from(raw.as_bytes());
        let len = HeadScanner::default().scan(&mut buf, 4096).expect("scan").expect("whole");
        let mut head = ResponseHead::default();
        head.parse(&mut buf, len, &Limits::default()).expect("parse");
        head
    }

    #[test]
    fn response_bodies_for_each_client() {
        let chunked = response("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(response_body(&chunked, false, false), (BodyMode::Chunked(ChunkedOutput::Reencode), true));
        assert_eq!(response_body(&chunked, false, true), (BodyMode::Chunked(ChunkedOutput::DataOnly), false));
        let close = response("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(response_body(&close, false, false), (BodyMode::UntilClose { chunk: true }, true));
        assert_eq!(response_body(&close, false, true), (BodyMode::UntilClose { chunk: false }, false));
        assert_eq!(response_body(&close, true, false), (BodyMode::None, true));
        let mut out = BytesMut::new();
        let empty = response("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        write_response_framing(&mut out, BodyMode::None, &empty, false);
        assert_eq!(&out[..], b"Content-Length: 0\r\n");
        out.clear();
        let none = response("HTTP/1.1 204 No Content\r\n\r\n");
        write_response_framing(&mut out, BodyMode::None, &none, false);
        assert!(out.is_empty());
    }

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(b"GET") && is_idempotent(b"DELETE"));
        assert!(!is_idempotent(b"POST") && !is_idempotent(b"PATCH") && !is_idempotent(b"get"));
    }
}
