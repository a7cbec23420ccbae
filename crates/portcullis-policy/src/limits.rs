//! `rate_limit`, `rate_limit_by_key`, `quota`, `quota_by_key`: API Management's semantics on the
//! host-wide [`Counters`].

use std::cell::RefCell;

use bytes::{BufMut, Bytes, BytesMut};
use portcullis_config::{ConfigErrors, Quota, RateLimit, StatusRanges};

use crate::counters::{Admit, Counters, QuotaAt};
use crate::facts::{Facts, HeaderEdits, RequestState, WorkerLocal};
use crate::fleet::{Deltas, Noted, Shape};
use crate::policy::{Countdown, Response};
use crate::template::{Context, Template};

/// Counters' clock starts here (2025-01-01T00:00:00Z, in ms), so that slot numbers stay small.
pub(crate) const ORIGIN_MS: u64 = 1_735_689_600_000;

/// What the counter of a limit is keyed by.
#[derive(Debug)]
enum Key {
    /// The request's subscription (`rate_limit`, `quota`): requests without one are not limited.
    Subscription,
    /// A template (`…_by_key`): requests for which it renders nothing are not limited.
    Template(Template),
}

/// A compiled rate limit.
#[derive(Debug)]
pub(crate) struct RateStep {
    key: Key,
    calls: u64,
    period_ms: u64,
    /// Index into the policy set's conditions.
    condition: Option<u16>,
    count: u64,
    retry_after: Bytes,
    remaining: Option<Bytes>,
    total: Option<Bytes>,
    refusal: Response,
    unavailable: Response,
}

/// A compiled quota.
#[derive(Debug)]
pub(crate) struct QuotaStep {
    key: Key,
    calls: Option<u64>,
    bytes: Option<u64>,
    period: i64,
    start: i64,
    condition: Option<u16>,
    calls_refusal: Response,
    bandwidth_refusal: Response,
    unavailable: Response,
}

/// What a request still owes its counters once its response is known.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pending {
    /// Calls of a rate limit with an `increment_condition`, counted in the window of `at_ms`
    /// (when the step admitted them, in ms since the counters' origin).
    Rate { hash: u64, period_ms: u64, at_ms: u64, count: u64, condition: Option<u16> },
    /// A call of a quota with an `increment_condition` (`calls`), and the bandwidth.
    Quota { hash: u64, at: QuotaAt, calls: bool, condition: Option<u16> },
}

/// What a limit decided.
#[derive(Debug)]
pub(crate) enum Decision<'p> {
    /// Within the limit (or not limited).
    Pass,
    /// Over it: this response.
    Refuse(&'p Response),
    /// Counts are shared and no sync has told this host about the key yet: wait for one (see
    /// [`Need::Sync`](crate::Need::Sync)), then run the step again.
    Sync,
}

/// A response whose message ends in a time (`… Try again in N seconds.`): built once, the time
/// written when it is sent.
fn countdown(status: u16, before: &str, after: &str, hms: bool) -> Response {
    let mut r = crate::policy::json_response(status, "");
    let prefix = format!("{{\"statusCode\":{status},\"message\":\"{before}");
    let suffix = format!("{after}\"}}");
    r.countdown = Some(Countdown {
        prefix: Bytes::from(prefix.into_bytes()),
        suffix: Bytes::from(suffix.into_bytes()),
        hms,
    });
    r
}

/// The answer while the store that shares counts is unreachable and limits refuse then
/// (`redis_failure = "deny"`).
fn unavailable() -> Response {
    crate::policy::json_response(503, "Service unavailable: the rate limit store cannot be reached.")
}

/// Headers of the retry time, written into a refusal.
fn add_number(edits: &mut HeaderEdits, name: &Bytes, n: u64) {
    edits.add_with(name, |out| {
        out.put_slice(n.to_string().as_bytes());
        true
    });
}

fn key_template(key: &Option<portcullis_config::Located<String>>, errors: &mut ConfigErrors) -> Option<Key> {
    match key {
        None => Some(Key::Subscription),
        Some(k) => match Template::parse(&k.value, &k.loc) {
            Ok(t) => Some(Key::Template(t)),
            Err(e) => {
                errors.push(e);
                None
            }
        },
    }
}

/// The counter of `key` for this request: `(kind, bytes)`; `None` when the request has none.
fn key_bytes<'s>(key: &Key, cx: &Context<'_>, scratch: &'s mut BytesMut) -> Option<&'s [u8]> {
    scratch.clear();
    match key {
        Key::Subscription => scratch.put_slice(cx.set.subscription_id(cx.state)?.as_bytes()),
        Key::Template(t) => {
            if !t.render(cx, scratch) || scratch.is_empty() {
                return None;
            }
        }
    }
    Some(&scratch[..])
}

/// Renders a limit's key into the state's scratch buffer and hands it to `f` with its hash (in
/// the table of `kind`, under `salt`) and the worker's own state; `None` when the key renders
/// nothing (the request is not limited).
fn with_key<R>(
    key: &Key,
    (kind, salt): (u8, u64),
    counters: &Counters,
    (facts, set, headers): (&Facts<'_>, &crate::PolicySet, &dyn crate::HeaderList),
    state: &mut RequestState,
    f: impl FnOnce(u64, &[u8], &RefCell<WorkerLocal>) -> R,
) -> Option<R> {
    let mut scratch = std::mem::take(&mut state.scratch);
    let rendered = key_bytes(key, &Context { facts, state, set, headers }, &mut scratch).is_some();
    let out = rendered.then(|| f(counters.hash(kind, salt, &scratch), &scratch, &state.local));
    state.scratch = scratch;
    out
}

/// Conditions of every limit, by index (kept in the policy set; pending counts name them).
pub(crate) fn condition_index(conditions: &mut Vec<StatusRanges>, c: &Option<StatusRanges>) -> Option<u16> {
    let c = c.as_ref()?;
    let i = conditions.iter().position(|x| x == c).unwrap_or_else(|| {
        conditions.push(c.clone());
        conditions.len() - 1
    });
    u16::try_from(i).ok()
}

impl RateStep {
    pub(crate) fn compile(
        r: &RateLimit,
        conditions: &mut Vec<StatusRanges>,
        errors: &mut ConfigErrors,
    ) -> Option<RateStep> {
        Some(RateStep {
            key: key_template(&r.counter_key, errors)?,
            calls: r.calls,
            period_ms: r.renewal_period.as_millis() as u64,
            condition: condition_index(conditions, &r.increment_condition),
            count: r.increment_count,
            retry_after: Bytes::from(r.retry_after_header_name.clone().into_bytes()),
            remaining: r.remaining_calls_header_name.clone().map(|h| Bytes::from(h.into_bytes())),
            total: r.total_calls_header_name.clone().map(|h| Bytes::from(h.into_bytes())),
            refusal: countdown(429, "Rate limit is exceeded. Try again in ", " seconds.", false),
            unavailable: unavailable(),
        })
    }

    /// Runs the limit. `may_wait`: the request has not waited for a sync on this step yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run<'p>(
        &'p self,
        may_wait: bool,
        counters: &Counters,
        facts: &Facts<'_>,
        set: &crate::PolicySet,
        headers: &dyn crate::HeaderList,
        state: &mut RequestState,
        edits: &mut HeaderEdits,
    ) -> Decision<'p> {
        let kind = if matches!(self.key, Key::Subscription) { 2 } else { 0 };
        let now = facts.now_ms.saturating_sub(ORIGIN_MS);
        let now_count = if self.condition.is_some() { 0 } else { self.count };
        let shape = Shape::Rate { period_ms: self.period_ms, limit: self.calls };
        let decided = with_key(
            &self.key,
            (kind, self.period_ms),
            counters,
            (facts, set, headers),
            state,
            |hash, key, local| {
                if may_wait && !counters.rate_known(hash, self.period_ms, now) {
                    local.borrow_mut().deltas.touch(hash, kind, shape, key, Noted::default());
                    return None;
                }
                let admit = counters.rate(hash, self.period_ms, self.calls, now, now_count);
                if counters.fleet() {
                    let admitted = matches!(admit, Admit::Yes { .. });
                    // With a condition, the call is counted when its response is known.
                    let noted = Noted {
                        calls: if admitted { now_count } else { 0 },
                        awaits: admitted && self.condition.is_some(),
                        refused: !admitted,
                    };
                    local.borrow_mut().deltas.touch(hash, kind, shape, key, noted);
                }
                Some((hash, admit))
            },
        );
        let (hash, admit) = match decided {
            None => return Decision::Pass,
            Some(None) => return Decision::Sync,
            Some(Some(decided)) => decided,
        };
        match admit {
            Admit::Yes { remaining } => {
                if self.condition.is_some() {
                    state.pending.push(Pending::Rate {
                        hash,
                        period_ms: self.period_ms,
                        at_ms: now,
                        count: self.count,
                        condition: self.condition,
                    });
                }
                if let Some(h) = &self.remaining {
                    state.response_headers.push((h.clone(), remaining));
                }
                if let Some(h) = &self.total {
                    state.response_headers.push((h.clone(), self.calls));
                }
                Decision::Pass
            }
            Admit::Untracked => Decision::Pass,
            Admit::Unavailable => {
                edits.clear_added();
                Decision::Refuse(&self.unavailable)
            }
            Admit::No { retry_after } => {
                state.wait_secs = retry_after;
                edits.clear_added();
                add_number(edits, &self.retry_after, retry_after);
                if let Some(h) = &self.remaining {
                    add_number(edits, h, 0);
                }
                if let Some(h) = &self.total {
                    add_number(edits, h, self.calls);
                }
                Decision::Refuse(&self.refusal)
            }
        }
    }
}

/// Why a quota refuses a call.
enum Refused {
    Calls,
    Bandwidth,
    /// The store that shares counts is unreachable and limits refuse then.
    Unavailable,
}

impl QuotaStep {
    /// Checks the quota, counting the call now when `count` (increment-then-check).
    fn admit(&self, counters: &Counters, hash: u64, at: QuotaAt, count: bool) -> Result<(), Refused> {
        if counters.store_refuses() {
            return Err(Refused::Unavailable);
        }
        let (used_calls, used_bytes) = counters.quota_used(hash, at).unwrap_or((0, 0));
        if self.bytes.is_some_and(|b| used_bytes >= b) {
            return Err(Refused::Bandwidth);
        }
        if count {
            if !counters.quota_add(hash, at, 1, self.calls, 0) {
                return Err(Refused::Calls);
            }
        } else if self.calls.is_some_and(|limit| used_calls >= limit) {
            return Err(Refused::Calls);
        }
        Ok(())
    }

    pub(crate) fn compile(
        q: &Quota,
        conditions: &mut Vec<StatusRanges>,
        errors: &mut ConfigErrors,
    ) -> Option<QuotaStep> {
        Some(QuotaStep {
            key: key_template(&q.counter_key, errors)?,
            calls: q.calls,
            bytes: q.bandwidth_kb.map(|kb| kb * 1024),
            period: q.renewal_period.as_secs() as i64,
            start: q.first_period_start,
            condition: condition_index(conditions, &q.increment_condition),
            // A quota for ever (no renewal period) is never replenished: its refusal has no time.
            calls_refusal: if q.renewal_period.is_zero() {
                crate::policy::json_response(403, "Out of call volume quota.")
            } else {
                countdown(403, "Out of call volume quota. Quota will be replenished in ", ".", true)
            },
            bandwidth_refusal: if q.renewal_period.is_zero() {
                crate::policy::json_response(403, "Out of bandwidth quota.")
            } else {
                countdown(403, "Out of bandwidth quota. Quota will be replenished in ", ".", true)
            },
            unavailable: unavailable(),
        })
    }

    /// The period `now` is in, and the seconds until the next (`None`: a lifetime quota).
    fn period_of(&self, now: i64) -> (u64, Option<u64>) {
        if self.period <= 0 {
            return (0, None);
        }
        let index = (now - self.start).div_euclid(self.period);
        let next = self.start + (index + 1) * self.period;
        (index.rem_euclid(1 << 24) as u64, Some((next - now).max(1) as u64))
    }

    /// Runs the quota. `may_wait`: as for [`RateStep::run`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run<'p>(
        &'p self,
        may_wait: bool,
        counters: &Counters,
        facts: &Facts<'_>,
        set: &crate::PolicySet,
        headers: &dyn crate::HeaderList,
        state: &mut RequestState,
        edits: &mut HeaderEdits,
    ) -> Decision<'p> {
        let kind = if matches!(self.key, Key::Subscription) { 3 } else { 1 };
        let salt = (self.period as u64) << 32 ^ self.start as u64;
        let (index, left) = self.period_of((facts.now_ms / 1000) as i64);
        let since_origin = facts.now_ms.saturating_sub(ORIGIN_MS);
        let ends_ms = left.map_or(u64::MAX, |l| since_origin + l * 1000);
        let at = QuotaAt { index, now_ms: since_origin, ends_ms };
        let counted_now = self.condition.is_none() && self.calls.is_some();
        let limit = self.calls.unwrap_or(0);
        let shape = Shape::Quota { period: self.period, start: self.start, index, limit, ends_ms };
        let decided =
            with_key(&self.key, (kind, salt), counters, (facts, set, headers), state, |hash, key, local| {
                if may_wait && !counters.quota_known(hash, at) {
                    local.borrow_mut().deltas.touch(hash, kind, shape, key, Noted::default());
                    return None;
                }
                let admitted = self.admit(counters, hash, at, counted_now);
                if counters.fleet() {
                    // Its bytes (and its call, under a condition) are counted when the response is
                    // known.
                    let noted = Noted {
                        calls: u64::from(counted_now && admitted.is_ok()),
                        awaits: admitted.is_ok(),
                        refused: admitted.is_err(),
                    };
                    local.borrow_mut().deltas.touch(hash, kind, shape, key, noted);
                }
                Some((hash, admitted))
            });
        let (hash, admitted) = match decided {
            None => return Decision::Pass,
            Some(None) => return Decision::Sync,
            Some(Some(decided)) => decided,
        };
        let refuse = |state: &mut RequestState, edits: &mut HeaderEdits, response: &'p Response| {
            // A lifetime quota is never replenished: its refusal says so with no time.
            state.wait_secs = left.unwrap_or(0);
            edits.clear_added();
            if let Some(left) = left {
                add_number(edits, &Bytes::from_static(b"Retry-After"), left);
            }
            Decision::Refuse(response)
        };
        match admitted {
            Err(Refused::Bandwidth) => return refuse(state, edits, &self.bandwidth_refusal),
            Err(Refused::Calls) => return refuse(state, edits, &self.calls_refusal),
            Err(Refused::Unavailable) => {
                edits.clear_added();
                return Decision::Refuse(&self.unavailable);
            }
            Ok(()) => {}
        }
        state.pending.push(Pending::Quota {
            hash,
            at,
            calls: !counted_now && self.calls.is_some(),
            condition: self.condition,
        });
        Decision::Pass
    }
}

/// Settles what a request owes its counters once its status and body sizes are known.
pub(crate) fn settle(
    counters: &Counters,
    conditions: &[StatusRanges],
    pending: &[Pending],
    (status, bytes): (u16, u64),
    deltas: &mut Deltas,
) {
    let holds =
        |c: Option<u16>| c.is_none_or(|i| conditions.get(usize::from(i)).is_none_or(|r| r.contains(status)));
    for p in pending {
        match *p {
            Pending::Rate { hash, period_ms, at_ms, count, condition } => {
                if holds(condition) {
                    counters.count(hash, period_ms, at_ms, count);
                    deltas.add(hash, count, 0);
                } else {
                    deltas.add(hash, 0, 0);
                }
            }
            Pending::Quota { hash, at, calls, condition } => {
                if holds(condition) {
                    counters.quota_add(hash, at, u64::from(calls), None, bytes);
                    deltas.add(hash, u64::from(calls), bytes);
                } else {
                    deltas.add(hash, 0, 0);
                }
            }
        }
    }
}

impl Countdown {
    /// The body, with `secs` written as a number of seconds or as `HH:MM:SS`.
    pub(crate) fn render(&self, secs: u64, out: &mut BytesMut) {
        out.put_slice(&self.prefix);
        if self.hms {
            out.put_slice(format!("{:02}:{:02}:{:02}", secs / 3600, secs % 3600 / 60, secs % 60).as_bytes());
        } else {
            out.put_slice(secs.to_string().as_bytes());
        }
        out.put_slice(&self.suffix);
    }
}
