//! The inputs of an evaluation (what is known about a request) and its header output.

use std::net::SocketAddr;
use std::ops::Range;

use std::cell::RefCell;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use portcullis_facts::ClientCert;
use portcullis_http::arena::Arena;

use crate::fleet::Deltas;
use crate::jwt::{TokenCache, Verified};

/// What one worker keeps across its connections: the tokens it verified, and the limited calls
/// it has not yet shared with other hosts.
#[derive(Debug)]
pub struct WorkerLocal {
    pub(crate) tokens: TokenCache,
    pub deltas: Deltas,
    /// Callouts' answers kept for their `cache_ttl`.
    pub(crate) callouts: crate::callout::CalloutCache,
    /// Where `log_to_eventhub` messages are written, one after another: each is split off
    /// sharing its block, so that it costs no allocation of its own.
    log_arena: Arena,
}

impl Default for WorkerLocal {
    fn default() -> WorkerLocal {
        WorkerLocal {
            tokens: TokenCache::default(),
            deltas: Deltas::default(),
            callouts: crate::callout::CalloutCache::default(),
            log_arena: Arena::new(LOG_ARENA, KEPT_LOG_BLOCKS),
        }
    }
}

/// Room taken at a time for messages.
const LOG_ARENA: usize = 64 * 1024;
/// Free blocks of messages kept for reuse at least (and as many as are in use): a logger's
/// thread takes what a worker wrote within milliseconds.
const KEPT_LOG_BLOCKS: usize = 16;

impl WorkerLocal {
    /// A buffer to render the next message into (split it off when written).
    pub(crate) fn log_arena(&mut self) -> &mut BytesMut {
        self.log_arena.room(LOG_ARENA / 16)
    }
}

impl WorkerLocal {
    /// A handle for one worker's connections.
    pub fn shared() -> Rc<RefCell<WorkerLocal>> {
        Rc::new(RefCell::new(WorkerLocal::default()))
    }
}

/// What policy may look at for one request.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    pub client_cert: Option<&'a ClientCert>,
    pub client_addr: SocketAddr,
    /// `client_addr`'s IP as text, formatted once per connection.
    pub client_ip: &'a str,
    /// The request's id (also sent as a header when a policy asks for `{request.id}`).
    pub request_id: &'a str,
    /// Now, in seconds since the Unix epoch (read once per request).
    pub now: i64,
    /// Now, in milliseconds since the Unix epoch (the same reading).
    pub now_ms: u64,
    /// The request target's query, after `?` (empty when there is none), as received.
    pub query: &'a [u8],
    /// The path the API's operation matched, and where its parameters are.
    pub route: RouteMatch<'a>,
    /// The request's method and path (without the query), for messages (`{request.method}`,
    /// `{request.path}`); empty where the server gives none.
    pub method: &'a [u8],
    pub path: &'a [u8],
}

/// The path after the API's prefix (no query) and the matched operation's parameters: each
/// name with the index of the path segment it stands for.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteMatch<'a> {
    pub path: &'a [u8],
    pub params: &'a [(Bytes, usize)],
}

impl RouteMatch<'_> {
    /// The raw (still percent-encoded) segment of parameter `name`.
    pub fn param(&self, name: &[u8]) -> Option<&[u8]> {
        let &(_, index) = self.params.iter().find(|(n, _)| n.as_ref() == name)?;
        let path =
            if self.path.len() > 1 { self.path.strip_suffix(b"/").unwrap_or(self.path) } else { self.path };
        path.strip_prefix(b"/").unwrap_or(path).split(|&b| b == b'/').nth(index)
    }
}

/// The answer to what a waiting step needed (see [`Verdict::Wait`]).
///
/// [`Verdict::Wait`]: crate::Verdict::Wait
#[derive(Debug, Clone)]
pub enum Answer {
    /// A response from outside (a callout).
    Response { status: u16, body: Bytes },
    /// The identity providers' keys were fetched again, or the wait for them is over: the step
    /// decides with the keys there are now.
    KeysRefreshed,
    /// What was needed could not be had (a callout that failed: unreachable, timed out, an
    /// answer that is no HTTP); the details are in the server's log.
    Failed(&'static str),
    /// The worker synced its counts with the fleet (or the wait for it is over): the limit
    /// decides with what is known now.
    Synced,
}

/// What evaluation learns and keeps for one request: the answers of its waiting steps, the
/// subscription and product it runs under, the token it proved. The server keeps one per
/// connection and clears it per request; it holds the worker's token cache.
#[derive(Debug, Default)]
pub struct RequestState {
    answers: Vec<(usize, Answer)>,
    /// Index of the subscription whose key the request carried.
    pub(crate) subscription: Option<u32>,
    /// Index of the product the request runs under (a product subscription's, or an open one).
    pub(crate) product: Option<u32>,
    /// The last token a `validate_jwt` step accepted.
    pub(crate) token: Option<Rc<Verified>>,
    /// The request's query carried the API's subscription-key parameter: not forwarded.
    pub(crate) strip_query: bool,
    /// Where steps copy what they read (a token), reused across requests.
    pub(crate) scratch: BytesMut,
    /// What the request owes the rate limits and quotas once its response is known.
    pub(crate) pending: Vec<crate::limits::Pending>,
    /// Headers for the response (remaining and total calls of rate limits).
    pub(crate) response_headers: Vec<(Bytes, u64)>,
    /// The time in a refusal's message (seconds until a limit frees up).
    pub(crate) wait_secs: u64,
    /// The request a waiting callout step wants sent (head and body, from the offset given),
    /// kept until its answer is read: it is the key of the answer in the cache.
    pub(crate) callout_request: Option<(Bytes, usize)>,
    /// The answers of the request's callouts that let it through, by name.
    pub(crate) callouts: Vec<(std::sync::Arc<str>, Rc<crate::callout::CalloutAnswer>)>,
    pub(crate) local: Rc<RefCell<WorkerLocal>>,
    /// Messages `log_to_eventhub` steps rendered, for the server to hand to their loggers.
    pub(crate) logs: RefCell<Vec<LogMessage>>,
    /// Loggers (by index, the first 64) whose buffer is full: their steps do not render a
    /// message, which counts as dropped.
    pub(crate) loggers_full: u64,
    /// The backend's status, once its response is in (`{response.status}` in outbound steps).
    pub(crate) response_status: u16,
    /// Callout steps answered from the cache.
    pub(crate) callout_hits: u32,
}

/// A message for a logger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogMessage {
    /// Index of the logger in the configuration's `[[logger]]` list.
    pub logger: usize,
    pub partition: Option<u32>,
    pub key: Option<Bytes>,
    pub value: Bytes,
    /// Not rendered: the logger's buffer was full (see [`RequestState::set_loggers_full`]); the
    /// message counts as dropped.
    pub dropped: bool,
}

impl RequestState {
    /// A state for a connection served by the worker whose token cache is `cache`.
    pub fn new(local: Rc<RefCell<WorkerLocal>>) -> RequestState {
        RequestState { local, ..RequestState::default() }
    }

    /// Starts over for a new request (the cache stays).
    pub fn clear(&mut self) {
        self.answers.clear();
        self.subscription = None;
        self.product = None;
        self.token = None;
        self.strip_query = false;
        self.pending.clear();
        self.response_headers.clear();
        self.wait_secs = 0;
        self.callout_request = None;
        self.callouts.clear();
        self.logs.get_mut().clear();
        self.loggers_full = 0;
        self.response_status = 0;
        self.callout_hits = 0;
    }

    /// Callout steps the request's evaluation answered from the cache, since the last call.
    pub fn take_callout_hits(&mut self) -> u32 {
        std::mem::take(&mut self.callout_hits)
    }

    /// The messages the request's `log_to_eventhub` steps rendered since the last call.
    pub fn take_logs(&mut self) -> std::vec::Drain<'_, LogMessage> {
        self.logs.get_mut().drain(..)
    }

    /// Which loggers (bit `i` for the logger of index `i`, the first 64) are full for this
    /// request: their steps count a dropped message instead of rendering one.
    pub fn set_loggers_full(&mut self, mask: u64) {
        self.loggers_full = mask;
    }

    /// Whether a step rendered a message for a logger.
    pub fn has_logs(&self) -> bool {
        !self.logs.borrow().is_empty()
    }

    /// The backend's response status, for the outbound steps about to run.
    pub fn set_response_status(&mut self, status: u16) {
        self.response_status = status;
    }

    /// The request a callout step waits to have sent ([`Need::Callout`](crate::Need::Callout)).
    pub fn callout_request(&self) -> Option<Bytes> {
        self.callout_request.as_ref().map(|(key, at)| key.slice(*at..))
    }

    /// The answer of the request's callout `name`.
    pub(crate) fn callout(&self, name: &str) -> Option<&crate::callout::CalloutAnswer> {
        self.callouts.iter().rev().find(|(n, _)| &**n == name).map(|(_, a)| &**a)
    }

    /// Keeps `answer` for inbound step `step`, replacing an earlier one.
    pub fn put(&mut self, step: usize, answer: Answer) {
        self.answers.retain(|(s, _)| *s != step);
        self.answers.push((step, answer));
    }

    /// The answer for inbound step `step`, if it has one.
    pub fn answer(&self, step: usize) -> Option<&Answer> {
        self.answers.iter().find(|(s, _)| *s == step).map(|(_, a)| a)
    }

    /// The claim `name` of the token a `validate_jwt` step accepted.
    pub fn token_claim(&self, name: &str) -> Option<&portcullis_jose::Json> {
        self.token.as_ref()?.claims.get(name)
    }
}

/// A message's header fields as the server holds them (the policy crate does not parse HTTP).
pub trait HeaderList {
    fn count(&self) -> usize;
    fn name(&self, i: usize) -> &[u8];
    fn value(&self, i: usize) -> &[u8];
}

/// Changes a policy makes to a header list: fields of the original list it removes, fields it
/// adds. The server applies them while it writes the head; nothing is copied twice.
///
/// One is kept per connection and reset per message, so evaluation does not allocate once the
/// vectors have grown to the connection's usual size.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    removed: Vec<bool>,
    added: Vec<(Bytes, Range<usize>)>,
    arena: BytesMut,
}

impl HeaderEdits {
    /// Starts over for a list of `original` fields.
    pub fn reset(&mut self, original: usize) {
        self.removed.clear();
        self.removed.resize(original, false);
        self.added.clear();
        self.arena.clear();
    }

    /// Whether field `i` of the original list is dropped.
    pub fn is_removed(&self, i: usize) -> bool {
        self.removed.get(i).copied().unwrap_or(false)
    }

    /// Fields to add after the kept original ones, in order.
    pub fn added(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.added.iter().map(|(n, r)| (&n[..], &self.arena[r.clone()]))
    }

    /// Drops the added fields (a response replaces whatever was prepared for the backend).
    pub(crate) fn clear_added(&mut self) {
        self.added.clear();
        self.arena.clear();
    }

    pub(crate) fn remove_named(&mut self, headers: &dyn HeaderList, name: &[u8]) {
        for i in 0..headers.count().min(self.removed.len()) {
            if headers.name(i).eq_ignore_ascii_case(name) {
                self.removed[i] = true;
            }
        }
        self.added.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    pub(crate) fn is_present(&self, headers: &dyn HeaderList, name: &[u8]) -> bool {
        (0..headers.count().min(self.removed.len()))
            .any(|i| !self.removed[i] && headers.name(i).eq_ignore_ascii_case(name))
            || self.added.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }

    /// Drops every field `name` of the list (and any added one).
    pub fn remove(&mut self, headers: &dyn HeaderList, name: &[u8]) {
        self.remove_named(headers, name);
    }

    /// Sets field `name` to `value`, in place of whatever the list had of it.
    pub fn replace(&mut self, headers: &dyn HeaderList, name: &Bytes, value: &[u8]) {
        self.remove_named(headers, name);
        self.add_with(name, |out| {
            out.extend_from_slice(value);
            true
        });
    }

    /// Renders a value with `render` into the arena and records it; `render` returning false
    /// means "no value", and nothing is added.
    pub(crate) fn add_with(&mut self, name: &Bytes, render: impl FnOnce(&mut BytesMut) -> bool) {
        let start = self.arena.len();
        if render(&mut self.arena) {
            self.added.push((name.clone(), start..self.arena.len()));
        } else {
            self.arena.truncate(start);
        }
    }
}
