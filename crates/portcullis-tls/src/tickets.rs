//! Session tickets that carry the client certificate's facts.
//!
//! A resumed session must still know who the client is. Keeping the client's certificate chain
//! in every session (BoringSSL's default) makes each ticket ~1.5 KiB of DER to marshal, encrypt,
//! send, decrypt and parse again on every resumption; keeping it in a server-side cache breaks
//! when a client resumes on another worker, or after the cache forgets. Instead, sessions keep
//! only the SHA-256 of the certificate, and the ticket carries the facts themselves
//! ([`ClientCert::encode`]), sealed with AES-128-GCM under a key of this process: a resumed
//! connection learns them by opening its own ticket — no lookup, no lock, no re-verification.
//!
//! Ticket layout: `key id (4) ‖ nonce (12) ‖ AES-128-GCM(session ‖ facts ‖ facts length (2)) ‖ tag (16)`.
//! A ticket that does not open (another key, tampered, truncated) simply means a full handshake.

use std::cell::RefCell;
use std::ffi::c_int;
use std::fmt;
use std::sync::{Arc, OnceLock};

use boring::aead::{AeadCtx, Algorithm};
use boring::ex_data::Index;
use boring::ssl::{Ssl, SslContextBuilder, SslRef};
use boring_sys as ffi;
use foreign_types::ForeignTypeRef;

use portcullis_facts::ClientCert;

const ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Facts larger than this (absurdly long DNs) are not carried; such a ticket is refused when
/// presented, and the client does a full handshake.
const MAX_FACTS: usize = 8 * 1024;
/// Marks a ticket whose facts did not fit.
const NO_RESUME: u16 = u16::MAX;

/// The key that seals session tickets. One serves every context the process builds, so that
/// tickets stay valid across reloads.
#[derive(Clone)]
pub struct TicketKeys {
    id: [u8; ID_LEN],
    key: [u8; 16],
}

impl TicketKeys {
    pub fn generate() -> TicketKeys {
        let mut bytes = [0u8; ID_LEN + 16];
        boring::rand::rand_bytes(&mut bytes)
            .unwrap_or_else(|e| panic!("no randomness for session ticket keys: {e}"));
        let mut id = [0u8; ID_LEN];
        let mut key = [0u8; 16];
        id.copy_from_slice(&bytes[..ID_LEN]);
        key.copy_from_slice(&bytes[ID_LEN..]);
        TicketKeys { id, key }
    }
}

impl fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TicketKeys(..)")
    }
}

fn keys_index() -> Index<boring::ssl::SslContext, TicketKeys> {
    static INDEX: OnceLock<Index<boring::ssl::SslContext, TicketKeys>> = OnceLock::new();
    *INDEX.get_or_init(|| {
        boring::ssl::SslContext::new_ex_index()
            .unwrap_or_else(|e| panic!("cannot allocate an SSL_CTX ex_data index: {e}"))
    })
}

/// The facts a ticket brought, for the connection that presented it. Kept apart from the facts
/// a verification produced: if the session turns out not to be resumable, the handshake is a
/// full one and these must not be used.
pub(crate) fn ticket_facts_index() -> Index<Ssl, Arc<ClientCert>> {
    static INDEX: OnceLock<Index<Ssl, Arc<ClientCert>>> = OnceLock::new();
    *INDEX.get_or_init(|| {
        Ssl::new_ex_index().unwrap_or_else(|e| panic!("cannot allocate an SSL ex_data index: {e}"))
    })
}

/// Most decoded facts a thread keeps for tickets it sees again.
const FACTS_CACHE: usize = 1024;

thread_local! {
    /// One AEAD context per thread (sealing with a shared one would need a lock).
    static AEAD: RefCell<Option<([u8; ID_LEN], AeadCtx)>> = const { RefCell::new(None) };
    /// Facts decoded from tickets, by their encoding: a client that resumes again and again
    /// presents the same facts each time, and decoding them (strings, normalised DNs) costs
    /// more than hashing them. Same bytes, same facts: nothing can go stale.
    static DECODED: RefCell<ahash::AHashMap<Box<[u8]>, Arc<ClientCert>>> = RefCell::new(ahash::AHashMap::new());
}

/// The facts encoded in `bytes`, decoded once per thread.
fn decode_facts(bytes: &[u8]) -> Option<Arc<ClientCert>> {
    DECODED.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some(facts) = cache.get(bytes) {
            return Some(facts.clone());
        }
        let facts = Arc::new(ClientCert::decode(bytes)?);
        if cache.len() >= FACTS_CACHE {
            cache.clear();
        }
        cache.insert(bytes.into(), facts.clone());
        Some(facts)
    })
}

fn with_aead<T>(keys: &TicketKeys, f: impl FnOnce(&mut AeadCtx) -> Option<T>) -> Option<T> {
    AEAD.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(id, _)| *id != keys.id) {
            let ctx = AeadCtx::new_default_tag(&Algorithm::aes_128_gcm(), &keys.key).ok()?;
            *slot = Some((keys.id, ctx));
        }
        let (_, ctx) = slot.as_mut()?;
        f(ctx)
    })
}

/// Seals and opens tickets on `b` (the context sessions belong to) with `keys`. Contexts the
/// connection may switch to (SNI) get the keys too, since the callbacks find them through the
/// current context.
pub(crate) fn install(b: &mut SslContextBuilder, keys: &TicketKeys) {
    b.set_ex_data(keys_index(), keys.clone());
    // SAFETY: `b` is a live SSL_CTX; METHOD is a static that outlives it.
    unsafe { ffi::SSL_CTX_set_ticket_aead_method(b.as_ptr(), &METHOD) };
}

/// Gives an SNI context the keys (it never seals, but the callbacks look the keys up on it).
pub(crate) fn share_keys(b: &mut SslContextBuilder, keys: &TicketKeys) {
    b.set_ex_data(keys_index(), keys.clone());
}

static METHOD: ffi::SSL_TICKET_AEAD_METHOD =
    ffi::SSL_TICKET_AEAD_METHOD { max_overhead: Some(max_overhead), seal: Some(seal), open: Some(open) };

unsafe extern "C" fn max_overhead(_ssl: *mut ffi::SSL) -> usize {
    ID_LEN + NONCE_LEN + TAG_LEN + 2 + MAX_FACTS
}

/// SAFETY (for both callbacks): BoringSSL passes a live SSL and buffers of the stated lengths.
unsafe fn ssl_ref<'a>(ssl: *mut ffi::SSL) -> &'a mut SslRef {
    // SAFETY: see above; the reference does not outlive the callback.
    unsafe { SslRef::from_ptr_mut(ssl) }
}

unsafe extern "C" fn seal(
    ssl: *mut ffi::SSL,
    out: *mut u8,
    out_len: *mut usize,
    max_out_len: usize,
    input: *const u8,
    in_len: usize,
) -> c_int {
    // SAFETY: BoringSSL's contract for this callback.
    let ssl = unsafe { ssl_ref(ssl) };
    // SAFETY: `input` points to `in_len` readable bytes.
    let session = unsafe { std::slice::from_raw_parts(input, in_len) };
    let Some(keys) = ssl.ssl_context().ex_data(keys_index()).cloned() else { return 0 };
    let mut plain = Vec::with_capacity(in_len + 1024);
    plain.extend_from_slice(session);
    // A fresh verification's facts; or, on a resumed session, those its own ticket brought.
    let facts = ssl
        .ex_data(crate::acceptor::facts_index())
        .cloned()
        .or_else(|| if ssl.session_reused() { ssl.ex_data(ticket_facts_index()).cloned() } else { None });
    let mut facts_len = 0u16;
    if let Some(facts) = facts {
        let start = plain.len();
        facts.encode(&mut plain);
        let len = plain.len() - start;
        if len > MAX_FACTS {
            plain.truncate(start);
            facts_len = NO_RESUME;
        } else {
            facts_len = len as u16;
        }
    }
    plain.extend_from_slice(&facts_len.to_be_bytes());
    let total = ID_LEN + NONCE_LEN + plain.len() + TAG_LEN;
    if total > max_out_len {
        return 0;
    }
    let mut nonce = [0u8; NONCE_LEN];
    if boring::rand::rand_bytes(&mut nonce).is_err() {
        return 0;
    }
    let sealed = with_aead(&keys, |ctx| {
        let mut tag = [0u8; TAG_LEN];
        let written = ctx.seal_in_place_mut(&nonce, &mut plain, &mut tag, &keys.id).ok()?.len();
        (written == TAG_LEN).then_some(tag)
    });
    let Some(tag) = sealed else { return 0 };
    // SAFETY: `out` has room for `max_out_len` bytes and `total` fits.
    let out = unsafe { std::slice::from_raw_parts_mut(out, total) };
    out[..ID_LEN].copy_from_slice(&keys.id);
    out[ID_LEN..ID_LEN + NONCE_LEN].copy_from_slice(&nonce);
    out[ID_LEN + NONCE_LEN..total - TAG_LEN].copy_from_slice(&plain);
    out[total - TAG_LEN..].copy_from_slice(&tag);
    // SAFETY: `out_len` is a valid pointer.
    unsafe { *out_len = total };
    1
}

unsafe extern "C" fn open(
    ssl: *mut ffi::SSL,
    out: *mut u8,
    out_len: *mut usize,
    max_out_len: usize,
    input: *const u8,
    in_len: usize,
) -> ffi::ssl_ticket_aead_result_t {
    let ignore = ffi::ssl_ticket_aead_result_t::ssl_ticket_aead_ignore_ticket;
    // SAFETY: BoringSSL's contract for this callback.
    let ssl = unsafe { ssl_ref(ssl) };
    // SAFETY: `input` points to `in_len` readable bytes.
    let ticket = unsafe { std::slice::from_raw_parts(input, in_len) };
    let Some(keys) = ssl.ssl_context().ex_data(keys_index()).cloned() else { return ignore };
    if in_len < ID_LEN + NONCE_LEN + 2 + TAG_LEN || ticket[..ID_LEN] != keys.id {
        return ignore;
    }
    let nonce = &ticket[ID_LEN..ID_LEN + NONCE_LEN];
    let tag = &ticket[in_len - TAG_LEN..];
    let mut plain = ticket[ID_LEN + NONCE_LEN..in_len - TAG_LEN].to_vec();
    if with_aead(&keys, |ctx| ctx.open_in_place_mut(nonce, &mut plain, tag, &keys.id).ok()).is_none() {
        return ignore;
    }
    let facts_len = u16::from_be_bytes([plain[plain.len() - 2], plain[plain.len() - 1]]);
    if facts_len == NO_RESUME {
        return ignore;
    }
    let facts_len = facts_len as usize;
    let Some(session_len) = (plain.len() - 2).checked_sub(facts_len) else { return ignore };
    if facts_len > 0 {
        let Some(facts) = decode_facts(&plain[session_len..plain.len() - 2]) else { return ignore };
        ssl.set_ex_data(ticket_facts_index(), facts);
    }
    if session_len > max_out_len {
        return ignore;
    }
    // SAFETY: `out` has room for `max_out_len` bytes; `session_len` fits.
    let out = unsafe { std::slice::from_raw_parts_mut(out, session_len) };
    out.copy_from_slice(&plain[..session_len]);
    // SAFETY: `out_len` is a valid pointer.
    unsafe { *out_len = session_len };
    ffi::ssl_ticket_aead_result_t::ssl_ticket_aead_success
}
