//! Client certificate verification that records every error, not just the first.
//!
//! BoringSSL's verifier stops at the first problem unless its callback says to go on. Ours always
//! goes on and notes each `(depth, error)`, then checks every certificate of the chain against
//! the revocation set. In `require` mode any note fails the handshake; in `request` mode the notes
//! travel with the certificate's facts and policy decides which of them matter (APIM's
//! `validate_not_after = false`, say).
//!
//! Results are cached per worker thread, keyed by the verifier and the SHA-256 of the presented
//! chain, so a client that reconnects, or resumes a session, costs a lookup, not a verification.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use boring::hash::{Hasher, MessageDigest};
use boring::stack::{Stack, StackRef};
use boring::x509::store::{X509Store, X509StoreBuilder};
use boring::x509::{X509, X509Ref, X509StoreContext, X509StoreContextRef};
use boring_sys as ffi;
use foreign_types::{ForeignType, ForeignTypeRef};

use portcullis_facts::{ClientCert, RevocationSet, VerifyError, VerifyErrorKind, now_unix};

use crate::facts::{client_cert_from_x509, unix_time};
use crate::pki::is_cert_revoked;

/// Most verification results a worker keeps; beyond it, a few entries make room for each new one.
const CACHE_CAPACITY: usize = 16 * 1024;
/// A cached result is re-verified after this long, so that a CA or a clock change is noticed.
const CACHE_TTL_SECS: i64 = 300;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Trust anchors and revocation data for client certificates, as compiled from one config.
pub struct ClientVerifier {
    id: u64,
    store: X509Store,
    revoked: Arc<RevocationSet>,
}

impl std::fmt::Debug for ClientVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientVerifier").field("id", &self.id).field("revoked", &self.revoked.len()).finish()
    }
}

struct CacheEntry {
    facts: Arc<ClientCert>,
    recheck_at: i64,
}

thread_local! {
    static CACHE: RefCell<HashMap<(u64, [u8; 32]), CacheEntry>> = RefCell::new(HashMap::new());
}

/// Most CA certificates between a client certificate and its trust anchor (documented in
/// config/README.md).
const MAX_CHAIN_DEPTH: c_int = 8;

/// Entries looked at to make room for one more.
const EVICTION_SAMPLE: usize = 32;

/// Makes room in a full cache without emptying it (emptying would send every client of a busy
/// worker through a full verification at once): of a few entries, in the map's hash order, the
/// expired ones go, or else the first one.
fn make_room<K: Copy + Eq + std::hash::Hash, V>(
    c: &mut HashMap<K, V>,
    now: i64,
    recheck_at: impl Fn(&V) -> i64,
) {
    let mut expired = [None; EVICTION_SAMPLE];
    let mut n_expired = 0;
    let mut first = None;
    for (k, e) in c.iter().take(EVICTION_SAMPLE) {
        if recheck_at(e) <= now {
            expired[n_expired] = Some(*k);
            n_expired += 1;
        } else if first.is_none() {
            first = Some(*k);
        }
    }
    if n_expired == 0 {
        if let Some(k) = first {
            c.remove(&k);
        }
        return;
    }
    for k in expired.into_iter().flatten() {
        c.remove(&k);
    }
}

fn errors_index() -> boring::ex_data::Index<X509StoreContext, Vec<VerifyError>> {
    static INDEX: OnceLock<boring::ex_data::Index<X509StoreContext, Vec<VerifyError>>> = OnceLock::new();
    *INDEX.get_or_init(|| {
        X509StoreContext::new_ex_index()
            .unwrap_or_else(|e| panic!("cannot allocate an X509_STORE_CTX ex_data index: {e}"))
    })
}

/// Notes the error the verifier just found and tells it to carry on.
extern "C" fn collect_error(ok: c_int, ctx: *mut ffi::X509_STORE_CTX) -> c_int {
    if ok == 0 {
        // SAFETY: BoringSSL calls this with the live X509_STORE_CTX it is verifying with.
        let ctx = unsafe { X509StoreContextRef::from_ptr_mut(ctx) };
        let code = match ctx.verify_result() {
            Ok(()) => ffi::X509_V_ERR_UNSPECIFIED,
            Err(e) => e.as_raw(),
        };
        let error = VerifyError { depth: ctx.error_depth(), kind: VerifyErrorKind::from_code(code) };
        if let Some(errors) = ctx.ex_data_mut(errors_index())
            && !errors.contains(&error)
        {
            errors.push(error);
        }
    }
    1
}

impl ClientVerifier {
    /// A verifier trusting `cas` (roots and intermediates alike) and refusing what `revoked` lists.
    pub fn new(
        cas: &[X509],
        revoked: Arc<RevocationSet>,
    ) -> Result<ClientVerifier, boring::error::ErrorStack> {
        let mut builder = X509StoreBuilder::new()?;
        for ca in cas {
            builder.add_cert(ca)?;
        }
        Ok(ClientVerifier { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), store: builder.build(), revoked })
    }

    pub fn revoked(&self) -> &Arc<RevocationSet> {
        &self.revoked
    }

    /// The facts of the certificate a client presented, `chain` being its DER, leaf first,
    /// verification errors included. `None` if any certificate of it does not parse.
    pub fn verify(&self, chain: &[&[u8]]) -> Option<Arc<ClientCert>> {
        // Without a key (no memory for hashing) nothing is cached: a shared key would mix up
        // chains.
        let key = chain_key(chain);
        let now = now_unix();
        let cached = key.and_then(|key| {
            CACHE.with(|c| {
                c.borrow().get(&(self.id, key)).filter(|e| e.recheck_at > now).map(|e| e.facts.clone())
            })
        });
        if cached.is_some() {
            return cached;
        }
        let leaf = parse_exact(chain.first()?)?;
        let mut presented = Stack::new().ok()?;
        for der in &chain[1..] {
            presented.push(parse_exact(der)?).ok()?;
        }
        let (errors, cas, recheck_at) = self.verify_chain(&leaf, &presented, now);
        let cas: Vec<&X509Ref> = cas.iter().map(|c| &**c).collect();
        let facts = Arc::new(client_cert_from_x509(&leaf, &cas, errors));
        if let Some(key) = key {
            CACHE.with(|c| {
                let mut c = c.borrow_mut();
                if c.len() >= CACHE_CAPACITY {
                    make_room(&mut c, now, |e| e.recheck_at);
                }
                c.insert((self.id, key), CacheEntry { facts: facts.clone(), recheck_at });
            });
        }
        Some(facts)
    }

    fn verify_chain(
        &self,
        leaf: &X509Ref,
        chain: &StackRef<X509>,
        now: i64,
    ) -> (Vec<VerifyError>, Vec<X509>, i64) {
        let result = X509StoreContext::new().and_then(|mut ctx| {
            ctx.init(&self.store, leaf, chain, |ctx| {
                // SAFETY: `ctx` is initialised; "ssl_client" is a static, NUL-terminated name, and
                // `collect_error` has the signature BoringSSL expects.
                unsafe {
                    ffi::X509_STORE_CTX_set_default(ctx.as_ptr(), c"ssl_client".as_ptr());
                    ffi::X509_STORE_CTX_set_depth(ctx.as_ptr(), MAX_CHAIN_DEPTH);
                    ffi::X509_STORE_CTX_set_verify_cb(ctx.as_ptr(), Some(collect_error));
                }
                ctx.set_ex_data(errors_index(), Vec::new());
                let _ = ctx.verify_cert();
                let mut errors = ctx.ex_data_mut(errors_index()).map(std::mem::take).unwrap_or_default();
                // At the depth limit the verifier stops building and reports the issuer it did
                // not look for as missing: say what happened instead.
                if ctx.chain().is_some_and(|c| c.len() > MAX_CHAIN_DEPTH as usize) {
                    for e in errors.iter_mut().filter(|e| e.kind == VerifyErrorKind::UnknownIssuer) {
                        e.kind = VerifyErrorKind::ChainTooLong;
                    }
                }
                let mut recheck_at = now + CACHE_TTL_SECS;
                let mut cas = Vec::new();
                if let Some(built) = ctx.chain() {
                    for (depth, cert) in built.iter().enumerate() {
                        if is_cert_revoked(&self.revoked, cert) {
                            let e = VerifyError { depth: depth as u32, kind: VerifyErrorKind::Revoked };
                            if !errors.contains(&e) {
                                errors.push(e);
                            }
                        }
                        // Re-verify when any certificate of the chain reaches a validity edge.
                        for edge in [unix_time(cert.not_before()), unix_time(cert.not_after())] {
                            if edge > now && edge < recheck_at {
                                recheck_at = edge;
                            }
                        }
                    }
                    cas = built.iter().skip(1).map(ToOwned::to_owned).collect();
                }
                Ok((errors, cas, recheck_at))
            })
        });
        match result {
            Ok(r) => r,
            Err(_) => (vec![unspecified()], Vec::new(), now),
        }
    }
}

fn unspecified() -> VerifyError {
    VerifyError { depth: 0, kind: VerifyErrorKind::from_code(ffi::X509_V_ERR_UNSPECIFIED) }
}

/// SHA-256 over the digests of the leaf and every certificate presented with it.
fn chain_key(chain: &[&[u8]]) -> Option<[u8; 32]> {
    let mut hasher = Hasher::new(MessageDigest::sha256()).ok()?;
    for der in chain {
        hasher.update(&boring::hash::hash(MessageDigest::sha256(), der).ok()?).ok()?;
    }
    let d = hasher.finish().ok()?;
    let mut out = [0u8; 32];
    out.copy_from_slice(d.get(..32)?);
    Some(out)
}

/// A certificate from exactly `der`: nothing missing, nothing after it.
fn parse_exact(der: &[u8]) -> Option<X509> {
    let len = std::ffi::c_long::try_from(der.len()).ok()?;
    let mut p = der.as_ptr();
    // SAFETY: `p` points at `len` readable bytes; d2i_X509 advances it past what it parsed and
    // returns a new X509 (or null), which `from_ptr` takes ownership of.
    unsafe {
        let x = ffi::d2i_X509(std::ptr::null_mut(), &mut p, len);
        if x.is_null() {
            return None;
        }
        let x = X509::from_ptr(x);
        (p == der.as_ptr().add(der.len())).then_some(x)
    }
}

#[cfg(test)]
mod eviction_tests {
    use super::*;

    fn entry(recheck_at: i64) -> i64 {
        recheck_at
    }

    #[test]
    fn a_full_cache_loses_a_few_entries_not_all() {
        let mut c: HashMap<u32, i64> = (0..1000).map(|k| (k, entry(100))).collect();
        make_room(&mut c, 50, |e| *e);
        assert_eq!(c.len(), 999, "one live entry makes room");
        for k in 0..10 {
            c.insert(k + 5000, entry(10));
        }
        make_room(&mut c, 50, |e| *e);
        assert!(c.len() >= 999 - EVICTION_SAMPLE && c.len() < 1009, "{}", c.len());
        let mut c: HashMap<u32, i64> = (0..10).map(|k| (k, entry(10))).collect();
        make_room(&mut c, 50, |e| *e);
        assert!(c.is_empty(), "expired entries are all dropped when seen");
    }
}
