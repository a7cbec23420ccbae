//! HTTP/1.1 for an edge proxy, sans-IO.
//!
//! This crate turns bytes into request and response heads and back, decides how a message's body
//! is framed, and decodes chunked bodies; it never touches a socket. The server crate reads into a
//! `BytesMut`, hands it here, and gets back either "need more bytes", a parsed head, or an error
//! that already knows its status code.
//!
//! - [`RequestHead`] / [`ResponseHead`]: parsed with `httparse`, kept as one frozen `Bytes` plus
//!   offsets, so parsing allocates nothing per header and forwarding copies nothing it need not.
//! - Framing is strict (RFC 9112 §6): a request with both `Content-Length` and
//!   `Transfer-Encoding`, differing `Content-Length`s, a `Transfer-Encoding` whose last coding is
//!   not `chunked`, obs-fold, bare CR or LF, or control bytes is rejected, never guessed at.
//! - [`ChunkedDecoder`] validates a chunked body and re-emits it in canonical form (or as plain
//!   data), so what reaches the other side has exactly one interpretation.
//! - [`write`] has the helpers that serialise heads and the proxy's own JSON error responses.
//!
//! Deliberately not here: routing, policy, TLS, timeouts, HTTP/2, upgrades (`Upgrade` is
//! treated as hop-by-hop and removed).
#![forbid(unsafe_code)]

pub mod arena;
mod chunked;
mod error;
pub mod forward;
mod head;
mod path;
pub mod proxy_protocol;
mod replace;
pub mod write;

pub use chunked::{ChunkedDecoder, ChunkedError, ChunkedOutput, Decoded};
pub use error::{HeadError, Reaction, Side};
pub use head::{
    Framing, HeadScanner, Limits, MAX_HEADERS_CAP, RequestHead, ResponseHead, Version, is_hop_by_hop_name,
};
pub use path::{normalize_path, remove_query_parameter};
pub use replace::{Replacer, replace_all};
