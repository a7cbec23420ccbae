//! Counts shared across hosts, sans-IO: what a worker touched since its last sync (its own
//! calls, by key), the Lua script that adds them to the store and answers what the other hosts
//! counted, and applying that answer to the host's [`Counters`].
//!
//! In the store, a rate limit's window is one hash per slot (`…:r:<period>:<key>:<slot>`) and a
//! quota's period one hash (`…:q:<start>:<period>:<key>:<index>` for calls, `…:b` for bytes),
//! with a field per host. The script adds this host's deltas, keeps every hash until its slot or
//! period is over, and returns for each key the sum of the other hosts' fields: this host counts
//! its own calls exactly, and adds what the others had at the last sync.
//!
//! Counts seen at a sync are already old: between two syncs every host may admit calls the
//! others do not know of. So that hosts busy on one key together do not each spend what is left
//! of its limit, the script also hands out *claims*: a host's claim is the most calls it may
//! have counted until its next sync, and the script grants it its count plus an equal part of
//! what neither the others' counts nor their claims hold. A host's workers sync apart, each with
//! the calls it counted itself, so a sync also reports what the whole host has counted: a claim
//! never falls below what the host has already admitted. Claims (and the record of which hosts
//! asked for a key) live two seconds in the store, so a host that went quiet holds nothing. The
//! script numbers each host's syncs as it runs them, and an answer is applied only when it is the
//! latest the host has for the key: the workers' answers may come back in another order. With
//! every host within its claim, the fleet stays within the limit, but for the calls a host admits
//! on a key before its first sync of it.

use ahash::AHashMap;

use crate::counters::{Counters, N, QuotaAt};
use crate::limits::ORIGIN_MS;

/// What a key of a limit is, in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    /// A rate limit of this period and calls.
    Rate { period_ms: u64, limit: u64 },
    /// A quota: its period in seconds (0: for ever), start, the index of the period, its calls
    /// (0: it limits bandwidth only), and when the period ends (ms since the counters' origin).
    Quota { period: i64, start: i64, index: u64, limit: u64, ends_ms: u64 },
}

#[derive(Debug)]
struct Delta {
    /// The key's name in the store (without its slot or period index).
    name: Box<[u8]>,
    shape: Shape,
    calls: u64,
    bytes: u64,
    /// Requests that asked for the key (admitted or not; one that waited for a sync asks
    /// twice): the store records which hosts ask for a key.
    seen: u64,
    /// Requests on the key whose counts come when their responses are known.
    in_flight: u32,
    /// Syncs since the key was last noted.
    idle: u32,
    /// Noted since the last sync.
    fresh: bool,
}

/// What a check noted of a call.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Noted {
    /// Calls to add (0: the key was only checked; the other hosts' count is still wanted).
    pub(crate) calls: u64,
    /// The request will add to the key when its response is known (see [`Deltas::add`]): the
    /// key stays noted until then.
    pub(crate) awaits: bool,
    /// The call was refused.
    pub(crate) refused: bool,
}

/// What one worker's limited calls added since its last sync, by key. A worker records into its
/// own (no sharing); its sync task takes a batch from it.
#[derive(Debug, Default)]
pub struct Deltas {
    by_key: AHashMap<u64, Delta>,
    /// A key this worker had not noted before came up, or a call was refused: worth a sync
    /// before the interval is out (to learn of the others, or for a new claim).
    new_key: bool,
}

/// A stable 64-bit hash (FNV-1a) for names of long keys: every host must name a key alike.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Keys longer than this are named by their hash.
const LONGEST_NAME: usize = 200;
/// Keys a worker notes between syncs at most; more wait for a later call (while the store is
/// unreachable, this bounds what waits for it).
pub(crate) const MOST_KEYS: usize = 1 << 16;
/// Syncs a key with requests in flight stays noted without news (then they are taken to have
/// ended without a word: a connection that died).
const LONGEST_WAIT: u32 = 600;

impl Deltas {
    /// Notes a call on the key `hash` (`key` is its text).
    pub(crate) fn touch(&mut self, hash: u64, kind: u8, shape: Shape, key: &[u8], noted: Noted) {
        let Noted { calls, awaits, refused } = noted;
        // A refused call may be let through once a sync grants a new claim: sync soon.
        self.new_key |= refused;
        if let Some(entry) = self.by_key.get_mut(&hash) {
            // A quota's period may have moved on since the key was first noted.
            entry.shape = shape;
            entry.calls += calls;
            entry.seen += 1;
            entry.in_flight = entry.in_flight.saturating_add(u32::from(awaits));
            entry.idle = 0;
            entry.fresh = true;
            return;
        }
        if self.by_key.len() >= MOST_KEYS {
            return;
        }
        let mut name = Vec::with_capacity(32 + key.len().min(LONGEST_NAME));
        let prefix = match shape {
            Shape::Rate { period_ms, .. } => format!("portcullis:r{kind}:{period_ms}:"),
            Shape::Quota { period, start, .. } => format!("portcullis:q{kind}:{start}:{period}:"),
        };
        name.extend_from_slice(prefix.as_bytes());
        if key.len() <= LONGEST_NAME {
            name.extend_from_slice(key);
        } else {
            name.extend_from_slice(format!("#{:016x}", fnv1a(key)).as_bytes());
        }
        let delta = Delta {
            name: name.into_boxed_slice(),
            shape,
            calls,
            bytes: 0,
            seen: 1,
            in_flight: u32::from(awaits),
            idle: 0,
            fresh: true,
        };
        self.by_key.insert(hash, delta);
        self.new_key = true;
    }

    /// Adds calls and bytes counted after the fact (once the response was known) to a key noted
    /// at the request (with `awaits`).
    pub(crate) fn add(&mut self, hash: u64, calls: u64, bytes: u64) {
        if let Some(d) = self.by_key.get_mut(&hash) {
            d.in_flight = d.in_flight.saturating_sub(1);
            if calls > 0 || bytes > 0 {
                d.calls += calls;
                d.bytes += bytes;
                d.fresh = true;
            }
        }
    }

    /// Forgets the rate limits' calls not yet sent (the store was unreachable): sent later, they
    /// would land in a later slot than they were made in. Quotas' counts are kept: their period
    /// is long, and the other hosts must learn of them.
    pub fn drop_rate_calls(&mut self) {
        for d in self.by_key.values_mut() {
            if matches!(d.shape, Shape::Rate { .. }) {
                d.calls = 0;
            }
        }
    }

    /// Whether a key new to this worker came up, or a call was refused, since the last batch.
    pub fn has_new_key(&self) -> bool {
        self.new_key
    }

    /// Whether the next batch would be empty.
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        !self.by_key.values().any(|d| d.fresh)
    }

    /// Keys noted (fresh or kept from the last batch).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_key.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Forgets everything (counts are no longer shared).
    pub fn clear(&mut self) {
        self.by_key.clear();
        self.new_key = false;
    }

    /// Takes what was noted since the last batch, as this sync's batch. A key stays noted (with
    /// nothing to add) until a sync finds it untouched and none of its requests waiting for
    /// their responses, so that what those count still reaches a batch.
    pub fn take(&mut self) -> Batch {
        self.new_key = false;
        let mut keys = Vec::new();
        self.by_key.retain(|&hash, d| {
            if !d.fresh {
                d.idle += 1;
                return d.in_flight > 0 && d.idle < LONGEST_WAIT;
            }
            let delta = Delta { name: d.name.clone(), fresh: true, ..*d };
            keys.push((hash, delta));
            (d.calls, d.bytes, d.seen, d.idle, d.fresh) = (0, 0, 0, 0, false);
            true
        });
        Batch { keys }
    }
}

/// One sync: the keys, in the order of the script's arguments and answers.
#[derive(Debug, Default)]
pub struct Batch {
    keys: Vec<(u64, Delta)>,
}

/// The script, run with `EVALSHA` (`EVAL` when the store does not have it yet).
///
/// `ARGV[1]`: this host's field; `ARGV[2]`: the time (Unix seconds); then per key ten
/// arguments: name, kind (`r` or `q`), position (the current slot, or the period index), span
/// (slots in a window; 1 for a quota), TTL in ms, the calls and the bytes to add, the requests
/// that asked for the key, its limit of calls (0: none), and the calls this host has counted in
/// the window or period, all its workers' (the store's count of the host lags it: each worker
/// syncs its own calls). Answers how many other hosts synced in the last two seconds, the
/// number of this host's sync (its syncs counted as the store runs them, for a minute after the
/// last), then per key the other hosts' calls and bytes, and this host's claim (-1: none). With
/// no keys, it registers the host and counts the others (a heartbeat).
pub const SCRIPT: &str = r#"
local host, now = ARGV[1], tonumber(ARGV[2])
-- This host's syncs, numbered as they run: a host's workers sync apart, and the answers may come
-- back in another order.
local sync = redis.call('HINCRBY', 'portcullis:syncs', host, 1)
redis.call('EXPIRE', 'portcullis:syncs', 60)
-- The hosts that synced in the last two seconds, this one now among them.
redis.call('HSET', 'portcullis:hosts', host, now)
redis.call('EXPIRE', 'portcullis:hosts', 60)
local live = 0
local all_hosts = redis.call('HGETALL', 'portcullis:hosts')
for j = 1, #all_hosts, 2 do
  local at = tonumber(all_hosts[j + 1]) or 0
  if all_hosts[j] ~= host and at >= now - 2 then live = live + 1 end
  if at < now - 60 then
    redis.call('HDEL', 'portcullis:hosts', all_hosts[j])
    redis.call('HDEL', 'portcullis:syncs', all_hosts[j])
  end
end
local out = {live, sync}
local i = 3
while i + 9 <= #ARGV do
  local name, kind = ARGV[i], ARGV[i + 1]
  local pos, span, ttl = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  local calls, bytes, seen = tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), tonumber(ARGV[i + 7])
  local limit, own = tonumber(ARGV[i + 8]), tonumber(ARGV[i + 9])
  local c = name .. ':' .. pos
  if calls > 0 then
    redis.call('HINCRBY', c, host, calls)
    redis.call('PEXPIRE', c, ttl)
  end
  local b = c .. ':b'
  if bytes > 0 then
    redis.call('HINCRBY', b, host, bytes)
    redis.call('PEXPIRE', b, ttl)
  end
  local busy = name .. ':s:' .. now
  if seen > 0 then
    redis.call('HINCRBY', busy, host, seen)
    redis.call('PEXPIRE', busy, 3000)
  end
  -- Calls per host in the window (or period).
  local count = {}
  for p = pos - span + 1, pos do
    local all = redis.call('HGETALL', name .. ':' .. p)
    for j = 1, #all, 2 do
      count[all[j]] = (count[all[j]] or 0) + (tonumber(all[j + 1]) or 0)
    end
  end
  local mine, others = count[host] or 0, 0
  for h, n in pairs(count) do
    if h ~= host then others = others + n end
  end
  local other_bytes = 0
  if kind == 'q' then
    local all = redis.call('HGETALL', b)
    for j = 1, #all, 2 do
      if all[j] ~= host then other_bytes = other_bytes + (tonumber(all[j + 1]) or 0) end
    end
  end
  local claim = -1
  if limit > 0 then
    -- The hosts that asked for the key lately, and their claims (the later one first).
    local hosts, held = 0, 0
    local asked = {}
    for _, s in ipairs({busy, name .. ':s:' .. (now - 1)}) do
      for _, h in ipairs(redis.call('HKEYS', s)) do
        if h ~= host and not asked[h] then
          asked[h] = true
          hosts = hosts + 1
        end
      end
    end
    local claims = {}
    for _, g in ipairs({name .. ':g:' .. (now - 1), name .. ':g:' .. now}) do
      local all = redis.call('HGETALL', g)
      for j = 1, #all, 2 do claims[all[j]] = tonumber(all[j + 1]) end
    end
    for h, n in pairs(count) do
      if h ~= host then
        local cl = asked[h] and claims[h] or 0
        held = held + math.max(n, cl)
      end
    end
    for h, _ in pairs(asked) do
      if not count[h] then held = held + (claims[h] or 0) end
    end
    -- A claim never falls below what this host has admitted, synced or not: the others take
    -- it for the most this host may count.
    mine = math.max(mine, own)
    local left = limit - mine - held
    local share = 0
    if left > 0 then share = math.ceil(left / (hosts + 1)) end
    claim = mine + share
    local g = name .. ':g:' .. now
    redis.call('HSET', g, host, claim)
    redis.call('PEXPIRE', g, 3000)
  end
  out[#out + 1] = others
  out[#out + 1] = other_bytes
  out[#out + 1] = claim
  i = i + 10
end
return out
"#;

/// Keys per script call: a larger batch is split into several calls, sent together.
pub(crate) const KEYS_PER_CALL: usize = 256;

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys.len()
    }

    /// The script calls for this batch: per call, its arguments for host `host` at `now_ms`
    /// (Unix ms), with what the host's `counters` hold of each key. An empty batch makes one call
    /// with no keys (a heartbeat).
    pub fn calls(&self, host: &str, counters: &Counters, now_ms: u64) -> Vec<Vec<Vec<u8>>> {
        if self.keys.is_empty() {
            return vec![arguments(&[], host, counters, now_ms)];
        }
        self.keys.chunks(KEYS_PER_CALL).map(|keys| arguments(keys, host, counters, now_ms)).collect()
    }

    /// Applies the answer of call number `call` (the count of live hosts, the sync's number, then
    /// three integers per key) to the host's counters, at `now_ms` (Unix ms: when the answer
    /// came). Answers that do not fit are ignored (counts then stay this host's own).
    pub fn apply(&self, call: usize, counters: &Counters, answer: &[i64], now_ms: u64) {
        let t = now_ms.saturating_sub(ORIGIN_MS);
        let keys = self.keys.chunks(KEYS_PER_CALL).nth(call).unwrap_or_default();
        let [hosts, sync, answer @ ..] = answer else { return };
        if answer.len() != 3 * keys.len() {
            return;
        }
        counters.set_fleet_hosts(u64::try_from(*hosts).unwrap_or(0));
        let sync = u64::try_from(*sync).unwrap_or(0);
        for ((hash, d), answer) in keys.iter().zip(answer.chunks_exact(3)) {
            let [calls, bytes] = [answer[0], answer[1]].map(|n| n.max(0) as u64);
            let claim = u64::try_from(answer[2]).ok();
            match d.shape {
                Shape::Rate { period_ms, .. } => {
                    counters.set_others(*hash, period_ms, (t, sync), calls, claim)
                }
                Shape::Quota { index, ends_ms, .. } => {
                    let at = QuotaAt { index, now_ms: t, ends_ms };
                    counters.set_quota_others(*hash, (at, sync), (calls, bytes), claim)
                }
            }
        }
    }
}

fn arguments(keys: &[(u64, Delta)], host: &str, counters: &Counters, now_ms: u64) -> Vec<Vec<u8>> {
    let mut args = Vec::with_capacity(2 + 10 * keys.len());
    args.push(host.as_bytes().to_vec());
    args.push((now_ms / 1000).to_string().into_bytes());
    let t = now_ms.saturating_sub(ORIGIN_MS);
    for &(hash, ref d) in keys {
        let (kind, pos, span, ttl, limit, own) = match d.shape {
            Shape::Rate { period_ms, limit } => {
                let slot = (period_ms / N).max(1);
                // A slot's hash lives until it has left every window.
                ("r", t / slot, N + 1, (N + 2) * slot, limit, counters.rate_own(hash, period_ms, t))
            }
            Shape::Quota { period, index, limit, .. } => {
                // Until the period ends (a quota for ever: a year after its last call).
                let ttl = if period > 0 { period as u64 * 1000 + 60_000 } else { 365 * 86_400_000 };
                ("q", index, 1, ttl, limit, counters.quota_own(hash, index))
            }
        };
        args.push(d.name.to_vec());
        args.push(kind.as_bytes().to_vec());
        for n in [pos, span, ttl, d.calls, d.bytes, d.seen, limit, own] {
            args.push(n.to_string().into_bytes());
        }
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_add_up_per_key_and_name_long_keys_by_hash() {
        let mut d = Deltas::default();
        d.touch(
            1,
            0,
            Shape::Rate { period_ms: 60_000, limit: 100 },
            b"10.0.0.1",
            Noted { calls: 1, awaits: false, refused: false },
        );
        d.touch(
            1,
            0,
            Shape::Rate { period_ms: 60_000, limit: 100 },
            b"10.0.0.1",
            Noted { calls: 2, awaits: false, refused: false },
        );
        let quota = Shape::Quota { period: 3600, start: 0, index: 7, limit: 0, ends_ms: 9_000_000 };
        d.touch(2, 1, quota, &[b'x'; 300], Noted { calls: 1, awaits: true, refused: false });
        d.add(2, 0, 500);
        let batch = d.take();
        assert!(d.is_idle() && batch.len() == 2);
        // What the host's counters hold of the keys, every worker's calls together.
        let counters = Counters::default();
        assert!(matches!(counters.rate(1, 60_000, 100, 120_000, 4), crate::counters::Admit::Yes { .. }));
        let at = QuotaAt { index: 7, now_ms: 120_000, ends_ms: 9_000_000 };
        assert!(counters.quota_add(2, at, 6, None, 500));
        let calls = batch.calls("host-a", &counters, ORIGIN_MS + 120_000);
        assert_eq!(calls.len(), 1);
        let args = &calls[0];
        assert_eq!(args.len(), 2 + 20);
        assert_eq!(args[1], b"1735689720");
        let text: Vec<String> = args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let rate = text.iter().position(|a| a == "portcullis:r0:60000:10.0.0.1").expect("rate key");
        assert_eq!(&text[rate + 1..rate + 10], ["r", "20", "11", "72000", "3", "0", "2", "100", "4"]);
        let quota = text
            .iter()
            .position(|a| a.starts_with("portcullis:q1:0:3600:#"))
            .expect("quota key named by hash");
        assert_eq!(&text[quota + 1..quota + 10], ["q", "7", "1", "3660000", "1", "500", "1", "0", "6"]);
    }

    #[test]
    fn a_key_waits_for_its_responses_and_then_goes() {
        let mut d = Deltas::default();
        let rate = Shape::Rate { period_ms: 60_000, limit: 10 };
        d.touch(1, 0, rate, b"slow", Noted { calls: 0, awaits: true, refused: false });
        d.touch(2, 0, rate, b"quick", Noted { calls: 1, awaits: false, refused: false });
        assert_eq!(d.take().len(), 2);
        // Nothing new: the key with a response still to come stays, the other goes.
        assert_eq!(d.take().len(), 0);
        assert_eq!(d.len(), 1);
        // The slow response counts: it reaches the next batch, and then the key goes too.
        d.add(1, 1, 0);
        let batch = d.take();
        let args = &batch.calls("h", &Counters::default(), ORIGIN_MS)[0];
        assert_eq!(String::from_utf8_lossy(&args[2]), "portcullis:r0:60000:slow");
        assert_eq!(String::from_utf8_lossy(&args[7]), "1", "the call counted after the fact");
        assert_eq!(d.take().len(), 0);
        assert!(d.is_empty());
        // Calls noted while the store was unreachable are not sent late into a later slot.
        d.touch(3, 0, rate, b"k", Noted { calls: 5, awaits: false, refused: false });
        d.drop_rate_calls();
        let batch = d.take();
        assert_eq!(String::from_utf8_lossy(&batch.calls("h", &Counters::default(), ORIGIN_MS)[0][7]), "0");
    }
}
