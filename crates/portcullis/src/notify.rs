//! systemd's readiness protocol (`Type=notify`): `READY=1` once serving, `RELOADING=1` (with the
//! monotonic time, as `sd_notify` wants it) while a `SIGHUP` reload runs, `STOPPING=1` when
//! draining begins. Nothing happens unless systemd set `NOTIFY_SOCKET`.

use std::os::unix::net::UnixDatagram;

/// Sends `text` to the service manager, if there is one; failures are only logged.
pub(crate) fn state(text: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        let bytes = path.as_encoded_bytes();
        match bytes.strip_prefix(b"@") {
            // An abstract socket (Linux): its name after the '@'.
            Some(name) => {
                use std::os::linux::net::SocketAddrExt as _;
                let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(text.as_bytes(), &addr)
            }
            None => socket.send_to(text.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not tell the service manager ({text})");
    }
}

/// `RELOADING=1` with `MONOTONIC_USEC`, the time systemd compares with its own.
pub(crate) fn reloading() {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the local timespec and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000;
    state(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}
