//! Byte streams over monoio's owned-buffer I/O: plain TCP, and BoringSSL over staging buffers.
//!
//! io_uring owns a buffer from submission to completion, so BoringSSL cannot be handed the
//! socket. It runs instead over two in-memory buffers: `rx` (ciphertext received, not yet
//! consumed) and `tx` (ciphertext produced, not yet sent). The async side fills `rx` by moving it
//! into a socket read and back, and drains `tx` the same way, after every TLS call — reads
//! included, since TLS 1.3 writes tickets and alerts while reading.

use std::io::{self, Read, Write};
use std::mem;

use boring::ssl::{ErrorCode, SslStream};
use boring_sys as ffi;
use bytes::{Buf, BytesMut};
use foreign_types::ForeignTypeRef;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, CancelHandle, CancelableAsyncReadRent};

/// Bytes read from the socket in one go once data flows (a full TLS record and then some).
const READ_CHUNK: usize = 16 * 1024 + 512;
/// The first read into an empty buffer is small: on an idle connection the buffer of a pending
/// read is held for as long as the connection waits, so it had better be small.
const FIRST_READ: usize = 4 * 1024;
/// Below this much room, a buffer grows to a full chunk before the next read.
const MIN_SPARE: usize = 2 * 1024;
/// Ciphertext staged before it is flushed even in the middle of a write.
const TX_FLUSH_AT: usize = 64 * 1024;

/// What the proxy needs from a connection, whether it is TLS or plain.
#[allow(
    async_fn_in_trait,
    reason = "used with concrete types on a single-threaded runtime; no Send bound wanted"
)]
pub trait Stream {
    /// Appends at least one byte to `dst`, or returns `Ok(0)` at the end of the stream.
    async fn read_buf(&mut self, dst: &mut BytesMut) -> io::Result<usize>;
    /// Sends all of `src`, then clears it (its capacity is kept for reuse).
    async fn write_all_buf(&mut self, src: &mut BytesMut) -> io::Result<()>;
    /// Ends the stream cleanly (TLS close_notify, then TCP FIN), and goes on reading.
    async fn close(&mut self) -> io::Result<()>;
    /// Ends the stream cleanly just before it is dropped: TLS close_notify; the FIN goes when the
    /// socket is closed, without a `shutdown` call of its own.
    async fn finish(&mut self) -> io::Result<()>;
    /// Like [`read_buf`](Self::read_buf), but gives up when `cancel` fires. Nothing is lost:
    /// bytes that arrived before the cancellation took effect are returned; otherwise the error
    /// is [`is_canceled`].
    async fn read_buf_cancelable(&mut self, dst: &mut BytesMut, cancel: CancelHandle) -> io::Result<usize>;
    /// Waits until reading would not block, without holding a buffer (for idle connections).
    async fn wait_readable(&mut self) -> io::Result<()>;
    /// Reads raw bytes from the socket, below any TLS (to drain a connection being closed).
    async fn read_raw(&mut self, dst: &mut BytesMut) -> io::Result<usize>;
    /// Gives back buffer memory while the connection is idle (no read may be pending).
    fn shrink(&mut self) {}
    /// What is waiting to be read, copied into `buf` and left in place, without waiting. Over
    /// TLS, the ciphertext waiting (records cannot be looked into this way: an alert, a late
    /// session ticket and stray bytes all count), and 1 for what is already buffered.
    fn peek(&self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

/// Whether an error is the one a cancelled read ends with.
pub fn is_canceled(e: &io::Error) -> bool {
    e.raw_os_error() == Some(125)
}

/// Waiting for readability, which monoio offers on its TCP stream (and not in a trait).
#[allow(async_fn_in_trait, reason = "used with concrete types on a single-threaded runtime")]
pub trait Readiness {
    async fn wait_readable(&self) -> io::Result<()>;
    /// Copies what is waiting to be read into `buf` without consuming it, without waiting.
    fn peek(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl Readiness for monoio::net::TcpStream {
    async fn wait_readable(&self) -> io::Result<()> {
        self.readable(false).await
    }

    fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::fd::AsRawFd as _;
        // SAFETY: a non-blocking peek into `buf`, at most its length; the fd is owned by `self`.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
    }
}

/// Prepares `dst` for a read of up to `want` bytes into its spare capacity.
fn reserve_for_read(dst: &mut BytesMut, want: usize) {
    if dst.capacity() == 0 {
        dst.reserve(FIRST_READ.min(want));
    } else if dst.capacity() - dst.len() < MIN_SPARE {
        dst.reserve(want);
    }
}

/// As [`read_into`], cancelable without losing data.
pub(crate) async fn read_into_cancelable<S: CancelableAsyncReadRent>(
    io: &mut S,
    dst: &mut BytesMut,
    want: usize,
    cancel: CancelHandle,
) -> io::Result<usize> {
    reserve_for_read(dst, want);
    let buf = mem::take(dst);
    let len = buf.len();
    let cap = buf.capacity();
    let (res, slice) = io.cancelable_read(buf.slice_mut(len..cap), cancel).await;
    *dst = slice.into_inner();
    res
}

/// Reads from a monoio socket into the spare capacity of `dst`.
pub(crate) async fn read_into<S: AsyncReadRent>(
    io: &mut S,
    dst: &mut BytesMut,
    want: usize,
) -> io::Result<usize> {
    reserve_for_read(dst, want);
    let buf = mem::take(dst);
    let len = buf.len();
    let cap = buf.capacity();
    let (res, slice) = io.read(buf.slice_mut(len..cap)).await;
    *dst = slice.into_inner();
    res
}

/// Writes all of `src` to a monoio socket and clears it.
pub(crate) async fn write_from<S: AsyncWriteRent>(io: &mut S, src: &mut BytesMut) -> io::Result<()> {
    if src.is_empty() {
        return Ok(());
    }
    let buf = mem::take(src);
    let (res, mut buf) = io.write_all(buf).await;
    buf.clear();
    *src = buf;
    res.map(|_| ())
}

/// A plain TCP (or any monoio) stream.
#[derive(Debug)]
pub struct PlainStream<S> {
    io: S,
}

impl<S> PlainStream<S> {
    pub fn new(io: S) -> Self {
        PlainStream { io }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: CancelableAsyncReadRent + AsyncWriteRent + Readiness> Stream for PlainStream<S> {
    async fn read_buf(&mut self, dst: &mut BytesMut) -> io::Result<usize> {
        read_into(&mut self.io, dst, READ_CHUNK).await
    }

    async fn read_buf_cancelable(&mut self, dst: &mut BytesMut, cancel: CancelHandle) -> io::Result<usize> {
        read_into_cancelable(&mut self.io, dst, READ_CHUNK, cancel).await
    }

    async fn wait_readable(&mut self) -> io::Result<()> {
        self.io.wait_readable().await
    }

    async fn read_raw(&mut self, dst: &mut BytesMut) -> io::Result<usize> {
        read_into(&mut self.io, dst, FIRST_READ).await
    }

    async fn write_all_buf(&mut self, src: &mut BytesMut) -> io::Result<()> {
        write_from(&mut self.io, src).await
    }

    async fn close(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }

    async fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.io.peek(buf)
    }
}

/// The in-memory transport BoringSSL reads from and writes to.
#[derive(Debug, Default)]
pub(crate) struct Staging {
    pub(crate) rx: BytesMut,
    pub(crate) tx: BytesMut,
}

impl Read for Staging {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rx.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.rx.len());
        buf[..n].copy_from_slice(&self.rx[..n]);
        self.rx.advance(n);
        Ok(n)
    }
}

impl Write for Staging {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Moves ciphertext between the staging buffers and the socket.
pub(crate) struct Wire<'a, S> {
    pub(crate) ssl: &'a mut SslStream<Staging>,
    pub(crate) io: &'a mut S,
}

impl<S: AsyncReadRent + AsyncWriteRent> Wire<'_, S> {
    /// Sends everything in `tx`.
    pub(crate) async fn flush(&mut self) -> io::Result<()> {
        let staging = self.ssl.get_mut();
        if staging.tx.is_empty() {
            return Ok(());
        }
        let mut tx = mem::take(&mut staging.tx);
        let res = write_from(self.io, &mut tx).await;
        self.ssl.get_mut().tx = tx;
        res
    }

    /// As [`fill`](Self::fill), cancelable without losing data.
    pub(crate) async fn fill_cancelable(&mut self, cancel: CancelHandle) -> io::Result<usize>
    where
        S: CancelableAsyncReadRent,
    {
        let mut rx = mem::take(&mut self.ssl.get_mut().rx);
        let res = read_into_cancelable(self.io, &mut rx, READ_CHUNK, cancel).await;
        self.ssl.get_mut().rx = rx;
        res
    }

    /// Reads more ciphertext into `rx`; `Ok(0)` when the peer closed.
    pub(crate) async fn fill(&mut self) -> io::Result<usize> {
        let mut rx = mem::take(&mut self.ssl.get_mut().rx);
        let res = read_into(self.io, &mut rx, READ_CHUNK).await;
        self.ssl.get_mut().rx = rx;
        res
    }
}

/// A TLS connection whose handshake is complete.
pub struct TlsStream<S> {
    pub(crate) ssl: SslStream<Staging>,
    pub(crate) io: S,
    pub(crate) info: crate::acceptor::SessionInfo,
}

impl<S> std::fmt::Debug for TlsStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream").field("info", &self.info).finish_non_exhaustive()
    }
}

impl<S> TlsStream<S> {
    /// What the handshake established: client certificate facts, SNI, version, resumption.
    pub fn info(&self) -> &crate::acceptor::SessionInfo {
        &self.info
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

fn tls_io_error(e: boring::ssl::Error) -> io::Error {
    match e.into_io_error() {
        Ok(io) => io,
        Err(e) => io::Error::new(io::ErrorKind::InvalidData, e),
    }
}

impl<S: CancelableAsyncReadRent + AsyncWriteRent> TlsStream<S> {
    /// Whether BoringSSL could return anything without more ciphertext: staged bytes, or records
    /// or plaintext it has buffered itself.
    fn has_buffered_input(&self) -> bool {
        // SAFETY: the SSL is live for as long as `self.ssl`; SSL_has_pending only reads it.
        !self.ssl.get_ref().rx.is_empty() || unsafe { ffi::SSL_has_pending(self.ssl.ssl().as_ptr()) } != 0
    }

    async fn read_inner(&mut self, dst: &mut BytesMut, cancel: Option<&CancelHandle>) -> io::Result<usize> {
        // With nothing buffered, an SSL_read could only say WANT_READ: go to the socket first
        // (the usual case for the next request on a keep-alive connection; one TLS call saved).
        let mut need_input = !self.has_buffered_input();
        loop {
            if std::mem::take(&mut need_input) {
                let mut wire = Wire { ssl: &mut self.ssl, io: &mut self.io };
                wire.flush().await?;
                let n = match cancel {
                    Some(c) => wire.fill_cancelable(c.clone()).await?,
                    None => wire.fill().await?,
                };
                if n == 0 {
                    // The peer closed without close_notify: the end of the stream all the same
                    // for HTTP/1.1, whose messages are self-delimiting.
                    return Ok(0);
                }
            }
            if dst.capacity() - dst.len() < MIN_SPARE {
                dst.reserve(if dst.capacity() == 0 { FIRST_READ } else { READ_CHUNK });
            }
            let spare = dst.spare_capacity_mut();
            match self.ssl.ssl_read_uninit(spare) {
                Ok(n) => {
                    // SAFETY: SSL_read initialised the first `n` bytes of the spare capacity.
                    unsafe { dst.set_len(dst.len() + n) };
                    Wire { ssl: &mut self.ssl, io: &mut self.io }.flush().await?;
                    return Ok(n);
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => need_input = true,
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(0),
                Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => return Ok(0),
                Err(e) => {
                    // Send the alert BoringSSL queued, if any, before failing.
                    let _ = Wire { ssl: &mut self.ssl, io: &mut self.io }.flush().await;
                    return Err(tls_io_error(e));
                }
            }
        }
    }
}

impl<S: CancelableAsyncReadRent + AsyncWriteRent + Readiness> Stream for TlsStream<S> {
    async fn read_buf(&mut self, dst: &mut BytesMut) -> io::Result<usize> {
        self.read_inner(dst, None).await
    }

    async fn read_buf_cancelable(&mut self, dst: &mut BytesMut, cancel: CancelHandle) -> io::Result<usize> {
        self.read_inner(dst, Some(&cancel)).await
    }

    async fn wait_readable(&mut self) -> io::Result<()> {
        if self.ssl.ssl().pending() > 0 || !self.ssl.get_ref().rx.is_empty() {
            return Ok(());
        }
        self.io.wait_readable().await
    }

    async fn read_raw(&mut self, dst: &mut BytesMut) -> io::Result<usize> {
        read_into(&mut self.io, dst, FIRST_READ).await
    }

    async fn write_all_buf(&mut self, src: &mut BytesMut) -> io::Result<()> {
        let mut offset = 0;
        while offset < src.len() {
            match self.ssl.ssl_write(&src[offset..]) {
                Ok(n) => offset += n,
                Err(e) if e.code() == ErrorCode::WANT_WRITE => {
                    // The staging buffer takes every byte, so BoringSSL can only mean "send what
                    // you have first". With nothing to send, no progress is possible: fail
                    // rather than spin.
                    if self.ssl.get_ref().tx.is_empty() {
                        return Err(io::Error::other("TLS write made no progress"));
                    }
                    Wire { ssl: &mut self.ssl, io: &mut self.io }.flush().await?;
                    continue;
                }
                Err(e) => return Err(tls_io_error(e)),
            }
            if self.ssl.get_ref().tx.len() >= TX_FLUSH_AT {
                Wire { ssl: &mut self.ssl, io: &mut self.io }.flush().await?;
            }
        }
        src.clear();
        Wire { ssl: &mut self.ssl, io: &mut self.io }.flush().await
    }

    fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ssl.ssl().pending() > 0 || !self.ssl.get_ref().rx.is_empty() {
            return Ok(1);
        }
        self.io.peek(buf)
    }

    fn shrink(&mut self) {
        let staging = self.ssl.get_mut();
        if staging.rx.is_empty() {
            staging.rx = BytesMut::new();
        }
        if staging.tx.is_empty() {
            staging.tx = BytesMut::new();
        }
    }

    async fn close(&mut self) -> io::Result<()> {
        self.finish().await?;
        self.io.shutdown().await
    }

    async fn finish(&mut self) -> io::Result<()> {
        let _ = self.ssl.shutdown();
        Wire { ssl: &mut self.ssl, io: &mut self.io }.flush().await
    }
}
