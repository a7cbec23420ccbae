//! `send_request`: a callout whose answer decides the request, sans-IO. The step renders the
//! request the service gets and returns [`Need::Callout`]; the server sends it on its own pooled
//! connection and hands back the answer ([`Answer::Response`], or [`Answer::Failed`]), and the
//! step then lets the request through (setting headers from the answer) or refuses it.

use std::cell::OnceCell;
use std::rc::Rc;
use std::time::Duration;

use ahash::AHashMap;
use bytes::{BufMut, Bytes, BytesMut};
use portcullis_config::{BackendTls, Loc, StatusRanges};
use portcullis_jose::Json;

use crate::facts::{Answer, Facts, HeaderEdits, HeaderList, RequestState};
use crate::policy::{Need, PolicySet, Response, SetHeader, Verdict, refuse, run_set_header};
use crate::template::{Context, Template};

/// Where a callout's connections go; the server makes its connection target from it. Callout
/// steps with equal targets share one (and its pooled connections).
#[derive(Debug, Clone, PartialEq)]
pub struct CalloutTarget {
    /// `host:port`.
    pub authority: String,
    pub https: bool,
    pub tls: Option<BackendTls>,
    /// For the whole callout: connecting, the TLS handshake, the answer.
    pub timeout: Duration,
    /// The callout's `url`, for errors.
    pub loc: Loc,
}

/// A callout's answer, as templates read it (shared by the cache and the requests it answers).
#[derive(Debug)]
pub(crate) struct CalloutAnswer {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
    /// The body as JSON, read the first time a template asks (`None`: it is not JSON).
    json: OnceCell<Option<Json>>,
}

impl CalloutAnswer {
    fn new(status: u16, body: Bytes) -> Rc<CalloutAnswer> {
        Rc::new(CalloutAnswer { status, body, json: OnceCell::new() })
    }

    pub(crate) fn json(&self) -> Option<&Json> {
        self.json.get_or_init(|| Json::parse(&self.body).ok()).as_ref()
    }
}

/// Answers kept per worker, by the callout's target and the whole rendered request (method, URL,
/// headers, body).
#[derive(Debug, Default)]
pub(crate) struct CalloutCache {
    /// The policy set the answers were got under: a reload drops them all.
    instance: u64,
    entries: AHashMap<Bytes, Cached>,
}

#[derive(Debug)]
struct Cached {
    until_ms: u64,
    answer: Rc<CalloutAnswer>,
}

/// Answers kept per worker at most.
const MOST_CACHED: usize = 10_000;

impl CalloutCache {
    fn get(&mut self, instance: u64, request: &[u8], now_ms: u64) -> Option<Rc<CalloutAnswer>> {
        if self.instance != instance {
            self.entries.clear();
            self.instance = instance;
            return None;
        }
        let hit = self.entries.get(request)?;
        (hit.until_ms > now_ms).then(|| hit.answer.clone())
    }

    fn put(&mut self, instance: u64, request: Bytes, until_ms: u64, answer: Rc<CalloutAnswer>, now_ms: u64) {
        if self.instance != instance {
            self.entries.clear();
            self.instance = instance;
        }
        if self.entries.len() >= MOST_CACHED {
            self.entries.retain(|_, c| c.until_ms > now_ms);
            if self.entries.len() >= MOST_CACHED {
                self.entries.clear();
            }
        }
        self.entries.insert(request, Cached { until_ms, answer });
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A compiled `send_request`.
#[derive(Debug)]
pub(crate) struct CalloutStep {
    pub(crate) name: std::sync::Arc<str>,
    /// Index into the policy set's callout targets.
    pub(crate) target: usize,
    pub(crate) method: Bytes,
    /// The path and query (values percent-encoded).
    pub(crate) path: Template,
    /// The `Host` value: the URL's host, and its port when it is not the scheme's.
    pub(crate) host: Bytes,
    pub(crate) headers: Vec<(Bytes, Template)>,
    pub(crate) body: Option<Template>,
    pub(crate) ignore_error: bool,
    pub(crate) cache_ttl_ms: u64,
    pub(crate) expect: StatusRanges,
    pub(crate) max_response: usize,
    /// A template reads the answer as JSON: a body that is not JSON is a failed callout.
    pub(crate) wants_json: bool,
    pub(crate) refusal: Response,
    pub(crate) set_headers: Vec<SetHeader>,
}

impl CalloutStep {
    /// Appends the request the service gets to `out`; false when a template of its URL or body
    /// has no value for this request (a header whose template has none is left out).
    fn render(&self, cx: &Context<'_>, out: &mut BytesMut) -> bool {
        out.put_slice(&self.method);
        out.put_u8(b' ');
        if !self.path.render(cx, out) {
            return false;
        }
        out.put_slice(b" HTTP/1.1\r\nHost: ");
        out.put_slice(&self.host);
        out.put_slice(b"\r\n");
        for (name, value) in &self.headers {
            let at = out.len();
            out.put_slice(name);
            out.put_slice(b": ");
            if value.render(cx, out) {
                out.put_slice(b"\r\n");
            } else {
                out.truncate(at);
            }
        }
        let Some(t) = &self.body else {
            if matches!(&self.method[..], b"POST" | b"PUT" | b"PATCH") {
                out.put_slice(b"Content-Length: 0\r\n");
            }
            out.put_slice(b"\r\n");
            return true;
        };
        let mut body = BytesMut::new();
        if !t.render(cx, &mut body) {
            return false;
        }
        out.put_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        out.put_slice(&body);
        true
    }

    /// Runs the step at inbound position `index`: asks for the callout, or decides on its
    /// answer. `Some` when it decides the request (a wait, or a refusal).
    pub(crate) fn run<'p>(
        &'p self,
        index: usize,
        set: &'p PolicySet,
        facts: &Facts<'_>,
        headers: &dyn HeaderList,
        state: &mut RequestState,
        edits: &mut HeaderEdits,
    ) -> Option<Verdict<'p>> {
        let now = facts.now_ms;
        let answer = match state.answer(index) {
            Some(Answer::Response { status, body }) => {
                let answer = CalloutAnswer::new(*status, body.clone());
                // Fresh from the service: kept for the next request that renders alike (not a
                // server error, which may be gone by then).
                if let Some((request, _)) = state.callout_request.take()
                    && self.cache_ttl_ms > 0
                    && answer.status < 500
                {
                    let until = now + self.cache_ttl_ms;
                    state.local.borrow_mut().callouts.put(set.instance, request, until, answer.clone(), now);
                }
                Ok(answer)
            }
            Some(Answer::Failed(why)) => Err(*why),
            Some(_) => Err("callout not answered"),
            None => {
                // The key in the cache: the target, then the request.
                let mut out = std::mem::take(&mut state.scratch);
                out.clear();
                out.put_slice(&(self.target as u64).to_le_bytes());
                let rendered = self.render(&Context { facts, state, set, headers }, &mut out);
                let cached = (rendered && self.cache_ttl_ms > 0)
                    .then(|| state.local.borrow_mut().callouts.get(set.instance, &out, now))
                    .flatten();
                let request = (rendered && cached.is_none()).then(|| Bytes::copy_from_slice(&out));
                state.scratch = out;
                match (cached, request) {
                    (Some(answer), _) => {
                        state.callout_hits += 1;
                        Ok(answer)
                    }
                    (None, Some(request)) => {
                        state.callout_request = Some((request, 8));
                        let need = Need::Callout { target: self.target, max_response: self.max_response };
                        return Some(Verdict::Wait { step: index, need });
                    }
                    (None, None) => Err("callout has no value for this request"),
                }
            }
        };
        let refused = match answer {
            Err(why) => Some(why),
            Ok(answer) => {
                let why = if !self.expect.contains(answer.status) {
                    Some("callout refused the request")
                } else if self.wants_json && answer.json().is_none() {
                    Some("callout answer is not JSON")
                } else {
                    None
                };
                // A refusal's fields stay empty.
                if why.is_none() {
                    state.callouts.push((self.name.clone(), answer));
                }
                why
            }
        };
        let cx = Context { facts, state, set, headers };
        match refused {
            Some(_) if self.ignore_error => None,
            Some(why) => Some(refuse(&self.refusal, why, &cx, edits)),
            None => {
                for h in &self.set_headers {
                    run_set_header(h, &cx, edits);
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_answers_for_their_time_and_one_policy_set() {
        let mut cache = CalloutCache::default();
        let key = Bytes::from_static(b"GET /check?d=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        cache.put(7, key.clone(), 1_000, CalloutAnswer::new(200, Bytes::from_static(b"{}")), 0);
        assert_eq!(cache.get(7, &key, 999).map(|a| a.status), Some(200));
        assert!(cache.get(7, &key, 1_000).is_none(), "expired");
        assert!(cache.get(7, b"GET /check?d=2 HTTP/1.1\r\nHost: a\r\n\r\n", 0).is_none());
        assert!(cache.get(8, &key, 0).is_none(), "another policy set: dropped");
        assert_eq!(cache.len(), 0);
        for i in 0..MOST_CACHED + 5 {
            cache.put(8, Bytes::from(format!("k{i}")), 10, CalloutAnswer::new(200, Bytes::new()), 0);
        }
        assert!(cache.len() <= MOST_CACHED, "bounded: {}", cache.len());
    }
}
