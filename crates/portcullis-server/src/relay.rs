//! Moving a body from one side to the other, re-delimited on the way: lengths kept, chunked
//! re-encoded (or decoded for HTTP/1.0 clients), close-delimited bodies chunked; a request body
//! watched for the backend refusing it early.

use std::io;
use std::pin::pin;
use std::time::Duration;

use bytes::BytesMut;
use portcullis_http::forward::BodyMode;
use portcullis_http::{ChunkedDecoder, ChunkedError, Decoded, Side, write};
use portcullis_tls::Stream;

use crate::timer::Timer;

/// Why relaying a body stopped short, and on which side.
#[derive(Debug)]
pub(crate) enum RelayError {
    SourceIo(io::Error),
    SourceTimeout,
    SourceClosed,
    SourceFraming(ChunkedError),
    /// More than `server.max_body_size`.
    SourceTooLarge,
    Destination(io::Error),
}

impl RelayError {
    /// Which side failed, for a request body (client → backend). For a response body the
    /// sides are the other way round, and the caller says so.
    pub(crate) fn side(&self) -> Side {
        match self {
            RelayError::Destination(_) => Side::Backend,
            _ => Side::Client,
        }
    }
}

impl std::fmt::Display for RelayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayError::SourceIo(e) => write!(f, "read failed: {e}"),
            RelayError::SourceTimeout => f.write_str("read timed out"),
            RelayError::SourceClosed => f.write_str("closed before the end of the body"),
            RelayError::SourceFraming(e) => write!(f, "{e}"),
            RelayError::SourceTooLarge => f.write_str("body larger than server.max_body_size"),
            RelayError::Destination(e) => write!(f, "write failed: {e}"),
        }
    }
}

/// Reads more of a body into `sbuf` within `t`; 0 at the end of the stream.
async fn fill<R: Stream>(
    src: &mut R,
    sbuf: &mut BytesMut,
    timer: &mut Timer,
    t: Duration,
) -> Result<usize, RelayError> {
    match timer.within(t, pin!(src.read_buf(sbuf))).await {
        Ok(Ok(n)) => Ok(n),
        Ok(Err(e)) => Err(RelayError::SourceIo(e)),
        Err(_) => Err(RelayError::SourceTimeout),
    }
}

/// Sends what `out` holds within `t`.
async fn flush<W: Stream>(
    dst: &mut W,
    out: &mut BytesMut,
    timer: &mut Timer,
    t: Duration,
) -> Result<(), RelayError> {
    match timer.within(t, pin!(dst.write_all_buf(out))).await {
        Ok(r) => r.map_err(RelayError::Destination),
        Err(_) => Err(RelayError::Destination(io::Error::new(io::ErrorKind::TimedOut, "write timed out"))),
    }
}

/// Reads a body of `length` bytes whole (after what `sbuf` holds), each read within
/// `read_timeout`: for a body small enough to be rewritten before its head is sent.
pub(crate) async fn read_length<R: Stream>(
    (src, sbuf): (&mut R, &mut BytesMut),
    length: u64,
    read_timeout: Duration,
    timer: &mut Timer,
) -> Result<BytesMut, RelayError> {
    let length = usize::try_from(length).map_err(|_| RelayError::SourceTooLarge)?;
    while sbuf.len() < length {
        sbuf.reserve(length - sbuf.len());
        if fill(src, sbuf, timer, read_timeout).await? == 0 {
            return Err(RelayError::SourceClosed);
        }
    }
    Ok(sbuf.split_to(length))
}

/// Moves a response body from `src` to `dst` through `replacer`, as it comes: `mode` is how the
/// backend framed it (a length, chunked, or until it closes); it goes out chunked (`chunk`), or
/// as it is, delimited by the close of the connection (an HTTP/1.0 client). Memory stays
/// bounded by what one read brings and what the replacer holds back. A body longer than
/// `max_len` (before rewriting) is refused. Returns the bytes sent.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn relay_rewritten<R: Stream, W: Stream>(
    mode: BodyMode,
    (src, sbuf): (&mut R, &mut BytesMut),
    dst: &mut W,
    out: &mut BytesMut,
    replacer: &mut portcullis_http::Replacer,
    (read_timeout, write_timeout, max_len): (Duration, Duration, Option<u64>),
    timer: &mut Timer,
    chunk: bool,
) -> Result<u64, RelayError> {
    let mut read = 0u64;
    let mut decoder = matches!(mode, BodyMode::Chunked(_))
        .then(|| ChunkedDecoder::new(portcullis_http::ChunkedOutput::DataOnly));
    let mut remaining = if let BodyMode::Length(n) = mode { n } else { u64::MAX };
    let (mut data, mut piece) = (BytesMut::new(), BytesMut::new());
    let mut sent = 0u64;
    loop {
        let done = match (mode, decoder.as_mut()) {
            (BodyMode::None, _) => true,
            (BodyMode::Length(_), _) => {
                let take = (sbuf.len() as u64).min(remaining) as usize;
                data.extend_from_slice(&sbuf.split_to(take));
                remaining -= take as u64;
                remaining == 0
            }
            (_, Some(decoder)) => {
                decoder.decode(sbuf, &mut data).map_err(RelayError::SourceFraming)? == Decoded::Done
            }
            _ => {
                data.extend_from_slice(sbuf);
                sbuf.clear();
                false
            }
        };
        read += data.len() as u64;
        if max_len.is_some_and(|max| read > max) {
            return Err(RelayError::SourceTooLarge);
        }
        replacer.feed(&data, &mut piece);
        data.clear();
        if !done {
            emit(out, &mut piece, chunk, &mut sent);
            if !out.is_empty() {
                flush(dst, out, timer, write_timeout).await?;
            }
            if fill(src, sbuf, timer, read_timeout).await? > 0 {
                continue;
            }
            // The end of the stream ends a close-delimited body, and breaks any other.
            if !matches!(mode, BodyMode::UntilClose { .. }) {
                return Err(RelayError::SourceClosed);
            }
        }
        replacer.finish(&mut piece);
        emit(out, &mut piece, chunk, &mut sent);
        if chunk {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        flush(dst, out, timer, write_timeout).await?;
        return Ok(sent);
    }
}

/// Appends `piece` to `out`, as a chunk when `chunk`, and empties it.
fn emit(out: &mut BytesMut, piece: &mut BytesMut, chunk: bool, sent: &mut u64) {
    if piece.is_empty() {
        return;
    }
    *sent += piece.len() as u64;
    if chunk {
        write::chunk_header(out, piece.len());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    } else {
        out.extend_from_slice(piece);
    }
    piece.clear();
}

/// Moves one body from `src` to `dst`, re-delimiting it as `mode` says. `out` may already hold
/// bytes for `dst` (a head): they go out with the first piece of the body, in one write.
pub(crate) async fn relay_body<R: Stream, W: Stream>(
    mode: BodyMode,
    (src, sbuf): (&mut R, &mut BytesMut),
    dst: &mut W,
    out: &mut BytesMut,
    (read_timeout, write_timeout, max_len): (Duration, Duration, Option<u64>),
    timer: &mut Timer,
    // A request body (client → backend): watched for the backend's early refusal, and after a
    // framing fault nothing of it is sent on.
    request: bool,
) -> Result<u64, RelayError> {
    /// Like `fill`, but gives up (a `Destination` error) when the backend refuses the body
    /// first: it closes, or sends an error response (RFC 9112 §9.5). Anything else it sends
    /// early (a 1xx, a response that streams while the body comes) is left where it is for
    /// later. Returns what was read (`None`: nothing yet, fill as usual) and whether to go on
    /// watching. The read is cancelled, not dropped, when the backend speaks: nothing of the
    /// client's bytes is lost.
    async fn fill_unless_refused<R: Stream, W: Stream>(
        src: &mut R,
        sbuf: &mut BytesMut,
        dst: &mut W,
        timer: &mut Timer,
        t: Duration,
    ) -> Result<(Option<usize>, bool), RelayError> {
        let canceller = monoio::io::Canceller::new();
        let mut read = pin!(src.read_buf_cancelable(sbuf, canceller.handle()));
        let raced = timer
            .within(
                t,
                pin!(async {
                    monoio::select! {
                        biased;
                        r = &mut read => Some(r),
                        _ = dst.wait_readable() => None,
                    }
                }),
            )
            .await;
        match raced {
            Ok(Some(Ok(n))) => Ok((Some(n), true)),
            Ok(Some(Err(e))) => Err(RelayError::SourceIo(e)),
            Err(_) => Err(RelayError::SourceTimeout),
            Ok(None) => {
                // "HTTP/1.1 413" is enough to tell an error response.
                let mut start = [0u8; 12];
                match dst.peek(&mut start) {
                    Ok(0) => {
                        return Err(RelayError::Destination(io::Error::other(
                            "closed before the whole body",
                        )));
                    }
                    Ok(n) if n >= 10 && start.starts_with(b"HTTP/1.") && matches!(start[9], b'4' | b'5') => {
                        return Err(RelayError::Destination(io::Error::other(
                            "answered with an error before the whole body",
                        )));
                    }
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(RelayError::Destination(e)),
                }
                let _ = canceller.cancel();
                match read.await {
                    Ok(n) => Ok((Some(n), false)),
                    Err(e) if portcullis_tls::is_canceled(&e) => Ok((None, false)),
                    Err(e) => Err(RelayError::SourceIo(e)),
                }
            }
        }
    }
    /// The next piece of a request body: watching `dst` for a refusal while `watching`, which
    /// ends once `dst` has said something else.
    async fn fill_body<R: Stream, W: Stream>(
        src: &mut R,
        sbuf: &mut BytesMut,
        dst: &mut W,
        timer: &mut Timer,
        t: Duration,
        watching: &mut bool,
    ) -> Result<usize, RelayError> {
        if *watching {
            let (n, still) = fill_unless_refused(src, sbuf, dst, timer, t).await?;
            *watching = still;
            if let Some(n) = n {
                return Ok(n);
            }
        }
        fill(src, sbuf, timer, t).await
    }
    // Watching `dst` while waiting for `src`, until it has said something that is no refusal.
    let mut watching = request;
    match mode {
        BodyMode::None => flush(dst, out, timer, write_timeout).await.map(|()| 0),
        BodyMode::Length(length) => {
            let mut remaining = length;
            loop {
                let take = (sbuf.len() as u64).min(remaining) as usize;
                out.extend_from_slice(&sbuf[..take]);
                let _ = sbuf.split_to(take);
                remaining -= take as u64;
                if remaining == 0 {
                    return flush(dst, out, timer, write_timeout).await.map(|()| length);
                }
                if !out.is_empty() {
                    flush(dst, out, timer, write_timeout).await?;
                }
                if fill_body(src, sbuf, dst, timer, read_timeout, &mut watching).await? == 0 {
                    return Err(RelayError::SourceClosed);
                }
            }
        }
        BodyMode::Chunked(output) => {
            let mut decoder = ChunkedDecoder::new(output);
            loop {
                let progress = match decoder.decode(sbuf, out) {
                    Ok(p) => p,
                    Err(e) => {
                        if request {
                            // A request body: nothing of it is worth sending on.
                            return Err(RelayError::SourceFraming(e));
                        }
                        // What was decoded before the fault goes out (the head with it, when
                        // nothing has been sent yet); the connection then ends where the body
                        // broke, never with a made-up end.
                        let _ = flush(dst, out, timer, write_timeout).await;
                        return Err(RelayError::SourceFraming(e));
                    }
                };
                if max_len.is_some_and(|max| decoder.announced_len() > max) {
                    return Err(RelayError::SourceTooLarge);
                }
                if progress == Decoded::Done {
                    return flush(dst, out, timer, write_timeout).await.map(|()| decoder.announced_len());
                }
                if !out.is_empty() {
                    flush(dst, out, timer, write_timeout).await?;
                }
                if fill_body(src, sbuf, dst, timer, read_timeout, &mut watching).await? == 0 {
                    return Err(RelayError::SourceClosed);
                }
            }
        }
        BodyMode::UntilClose { chunk } => {
            let mut relayed = 0u64;
            loop {
                if !sbuf.is_empty() {
                    relayed += sbuf.len() as u64;
                    if chunk {
                        write::chunk_header(out, sbuf.len());
                        out.extend_from_slice(sbuf);
                        out.extend_from_slice(b"\r\n");
                    } else {
                        out.extend_from_slice(sbuf);
                    }
                    sbuf.clear();
                }
                flush(dst, out, timer, write_timeout).await?;
                if fill(src, sbuf, timer, read_timeout).await? == 0 {
                    if chunk {
                        out.extend_from_slice(b"0\r\n\r\n");
                        flush(dst, out, timer, write_timeout).await?;
                    }
                    return Ok(relayed);
                }
            }
        }
    }
}
