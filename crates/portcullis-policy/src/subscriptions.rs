//! Subscriptions and their keys: a million of them in one hash table over one byte arena, looked
//! up in the time one hash takes however close a wrong key comes to a right one.

use std::path::Path;
use std::sync::Arc;

use ahash::RandomState;
use hashbrown::HashTable;
use portcullis_config::{ConfigError, ConfigErrors, Loc, SubscriptionState, subscription_key_problem};

use crate::list_file::MAX_REPORTED;

/// What a subscription grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// A product's APIs (index into the policy set's products).
    Product(u32),
    /// One API (index into the configuration's APIs).
    Api(u32),
    AllApis,
}

#[derive(Debug)]
pub(crate) struct Subscription {
    /// Where its id is in `Subscriptions::ids`.
    id: (u32, u16),
    pub(crate) grant: Grant,
    pub(crate) active: bool,
}

/// Where a key's bytes are in the arena, and whose key it is.
#[derive(Debug, Clone, Copy)]
struct KeySlot {
    start: u32,
    len: u16,
    subscription: u32,
}

/// Every subscription of a configuration, with its keys: ids and keys each in one byte arena,
/// keys found through one hash table of slot indices (no allocation per subscription).
#[derive(Debug, Default)]
pub struct Subscriptions {
    list: Vec<Subscription>,
    ids: Vec<u8>,
    arena: Vec<u8>,
    slots: Vec<KeySlot>,
    table: HashTable<u32>,
    hasher: RandomState,
}

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn span(arena: &[u8], start: u32, len: u16) -> &[u8] {
    &arena[start as usize..start as usize + usize::from(len)]
}

/// The bucket count hashbrown gives a table made for `items` (its load factor is 7/8): keys are
/// inserted in bucket order, so that building the table walks its memory once.
fn buckets_for(items: usize) -> u64 {
    if items < 4 {
        4
    } else if items < 8 {
        8
    } else {
        (items.saturating_mul(8) / 7).next_power_of_two() as u64
    }
}

impl Subscriptions {
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn get(&self, index: u32) -> &Subscription {
        &self.list[index as usize]
    }

    /// The id of subscription `index`.
    pub(crate) fn id(&self, index: u32) -> &str {
        let (start, len) = self.list[index as usize].id;
        // Ids are stored from `&str`s.
        std::str::from_utf8(span(&self.ids, start, len)).unwrap_or("")
    }

    fn key_of(&self, slot: u32) -> &[u8] {
        let s = &self.slots[slot as usize];
        span(&self.arena, s.start, s.len)
    }

    /// The subscription whose primary or secondary key is `key`.
    pub(crate) fn find(&self, key: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |&slot| same(self.key_of(slot), key))
            .map(|&slot| self.slots[slot as usize].subscription)
    }
}

/// Collects subscriptions from the configuration and from files, then indexes them: repeated ids
/// and keys are found by sorting hashes (a million random probes into a growing table would
/// cost more), and every error is reported once.
pub(crate) struct Builder {
    subs: Subscriptions,
    /// (hash of the key, slot).
    key_hashes: Vec<(u64, u32)>,
    /// (hash of the id, subscription).
    id_hashes: Vec<(u64, u32)>,
    /// Per subscription: (index into `sources`, line in that file or 0 for the source's own
    /// place).
    origins: Vec<(u32, u32)>,
    /// Where subscriptions come from: a `[[subscription]]` table, or a file.
    sources: Vec<Loc>,
    pub(crate) errors: ConfigErrors,
}

impl Builder {
    pub(crate) fn new() -> Builder {
        Builder {
            subs: Subscriptions::default(),
            key_hashes: Vec::new(),
            id_hashes: Vec::new(),
            origins: Vec::new(),
            sources: Vec::new(),
            errors: ConfigErrors::default(),
        }
    }

    fn loc(&self, (source, line): (u32, u32)) -> Loc {
        let mut loc =
            self.sources.get(source as usize).cloned().unwrap_or_else(|| Loc::builtin("subscription"));
        if line > 0 {
            loc.line = line;
            loc.column = 1;
        }
        loc
    }

    fn reserve(&mut self, subscriptions: usize) {
        let s = &mut self.subs;
        s.list.reserve(subscriptions);
        s.slots.reserve(2 * subscriptions);
        s.ids.reserve(16 * subscriptions);
        s.arena.reserve(64 * subscriptions);
        self.key_hashes.reserve(2 * subscriptions);
        self.id_hashes.reserve(subscriptions);
        self.origins.reserve(subscriptions);
    }

    /// Adds a `[[subscription]]` written at `loc`.
    pub(crate) fn add_inline(
        &mut self,
        id: &str,
        grant: Grant,
        state: SubscriptionState,
        primary: &[u8],
        secondary: Option<&[u8]>,
        loc: &Loc,
    ) {
        self.sources.push(loc.clone());
        let origin = (self.sources.len() as u32 - 1, 0);
        self.add(id, grant, state, primary, secondary, origin);
    }

    /// Adds one subscription from `origin` (checked for repeats when the set is built).
    fn add(
        &mut self,
        id: &str,
        grant: Grant,
        state: SubscriptionState,
        primary: &[u8],
        secondary: Option<&[u8]>,
        origin: (u32, u32),
    ) {
        let s = &mut self.subs;
        let index = s.list.len() as u32;
        let start = s.ids.len() as u32;
        s.ids.extend_from_slice(id.as_bytes());
        let active = state == SubscriptionState::Active;
        s.list.push(Subscription { id: (start, id.len().min(usize::from(u16::MAX)) as u16), grant, active });
        self.id_hashes.push((s.hasher.hash_one(id.as_bytes()), index));
        self.origins.push(origin);
        for key in [Some(primary), secondary.filter(|k| *k != primary)].into_iter().flatten() {
            self.key_hashes.push((s.hasher.hash_one(key), s.slots.len() as u32));
            s.slots.push(KeySlot { start: s.arena.len() as u32, len: key.len() as u16, subscription: index });
            s.arena.extend_from_slice(key);
        }
    }

    /// Reads a file of subscriptions to `product`: one a line, `id, primary key, secondary key,
    /// state` (the secondary key may be left empty, the state defaults to active); `#` starts a
    /// comment.
    pub(crate) fn load_file(&mut self, path: &Path, product: u32, loc: &Loc) {
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) => {
                self.errors.push(loc.error(format!("cannot read {}: {e}", path.display())));
                return;
            }
        };
        self.reserve(memchr_count(&text));
        let file: Arc<Path> = Arc::from(path);
        let at = |line: usize| Loc {
            file: file.clone(),
            line: line as u32 + 1,
            column: 1,
            field: loc.field.clone(),
        };
        self.sources.push(at(0));
        let source = self.sources.len() as u32 - 1;
        let mut bad = 0usize;
        let report = |errors: &mut ConfigErrors, bad: &mut usize, e: ConfigError| {
            *bad += 1;
            if *bad <= MAX_REPORTED {
                errors.push(e);
            }
        };
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = match memchr::memchr(b'#', raw) {
                Some(hash) => &raw[..hash],
                None => raw,
            };
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split(|&b| b == b',').map(<[u8]>::trim_ascii);
            let (Some(id), Some(primary), secondary, state, None) = (
                fields.next(),
                fields.next(),
                fields.next().unwrap_or(b""),
                fields.next().unwrap_or(b"active"),
                fields.next(),
            ) else {
                report(
                    &mut self.errors,
                    &mut bad,
                    at(i).error("expected `id, primary key, secondary key, state`"),
                );
                continue;
            };
            let id = match std::str::from_utf8(id) {
                Ok(id) if !id.is_empty() && id.len() <= 256 && !id.bytes().any(|b| b.is_ascii_control()) => {
                    id
                }
                _ => {
                    report(
                        &mut self.errors,
                        &mut bad,
                        at(i).error(
                            "a subscription needs an id of 1 to 256 UTF-8 characters, no control characters",
                        ),
                    );
                    continue;
                }
            };
            let Some(state) =
                SubscriptionState::NAMES.iter().find(|(n, _)| n.as_bytes() == state).map(|(_, s)| *s)
            else {
                let shown = String::from_utf8_lossy(state);
                report(
                    &mut self.errors,
                    &mut bad,
                    at(i).error(format!(
                        "state \"{shown}\" is not one of active, suspended, cancelled, expired"
                    )),
                );
                continue;
            };
            if let Some(problem) = subscription_key_problem(primary)
                .or_else(|| (!secondary.is_empty()).then(|| subscription_key_problem(secondary)).flatten())
            {
                report(&mut self.errors, &mut bad, at(i).error(problem));
                continue;
            }
            let before = self.errors.0.len();
            let secondary = (!secondary.is_empty()).then_some(secondary);
            self.add(id, Grant::Product(product), state, primary, secondary, (source, i as u32 + 1));
            if self.errors.0.len() > before {
                // Counted like the other bad lines (and dropped past the limit).
                bad += 1;
                if bad > MAX_REPORTED {
                    self.errors.0.pop();
                }
            }
        }
        if bad > MAX_REPORTED {
            let whole = Loc { file: file.clone(), line: 0, column: 0, field: loc.field.clone() };
            self.errors.push(whole.error(format!("… and {} more invalid lines", bad - MAX_REPORTED)));
        }
    }

    /// Indexes the keys and reports repeated ids and keys (each at its later place).
    pub(crate) fn finish(mut self) -> (Subscriptions, ConfigErrors) {
        self.id_hashes.sort_unstable();
        for pair in self.id_hashes.windows(2) {
            let ((h1, first), (h2, second)) = (pair[0], pair[1]);
            if h1 == h2 && self.subs.id(first) == self.subs.id(second) {
                let later = first.max(second);
                let message = format!("subscription id \"{}\" is used twice", self.subs.id(later));
                self.errors.push(self.loc(self.origins[later as usize]).error(message));
            }
        }
        let mask = buckets_for(self.key_hashes.len()) - 1;
        self.key_hashes.sort_unstable_by_key(|&(h, slot)| (h & mask, h, slot));
        let mut table = HashTable::with_capacity(self.key_hashes.len());
        let subs = &self.subs;
        for (i, &(hash, slot)) in self.key_hashes.iter().enumerate() {
            // The same key earlier in the run of equal hashes: a key of two subscriptions.
            let earlier = self.key_hashes[..i]
                .iter()
                .rev()
                .take_while(|(h, _)| *h == hash)
                .find(|(_, other)| subs.key_of(*other) == subs.key_of(slot));
            if let Some(&(_, other)) = earlier {
                let (a, b) =
                    (subs.slots[other as usize].subscription, subs.slots[slot as usize].subscription);
                let (owner, later) = (a.min(b), a.max(b));
                let message = format!(
                    "a key of subscription \"{}\" is already a key of \"{}\"",
                    subs.id(later),
                    subs.id(owner)
                );
                self.errors.push(self.loc(self.origins[later as usize]).error(message));
                continue;
            }
            table.insert_unique(hash, slot, |&s| {
                let s = &subs.slots[s as usize];
                subs.hasher.hash_one(span(&subs.arena, s.start, s.len))
            });
        }
        self.subs.table = table;
        (self.subs, self.errors)
    }
}

/// Lines in `text` (for reserving room up front).
fn memchr_count(text: &[u8]) -> usize {
    memchr::memchr_iter(b'\n', text).count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_find_their_subscription() {
        let mut b = Builder::new();
        let loc = Loc::builtin("subscription");
        b.add_inline("a", Grant::AllApis, SubscriptionState::Active, b"key-a-1", Some(b"key-a-2"), &loc);
        b.add_inline("b", Grant::Api(1), SubscriptionState::Suspended, b"key-b-1", None, &loc);
        b.add_inline("c", Grant::Api(1), SubscriptionState::Active, b"key-b-1", None, &loc);
        b.add_inline("a", Grant::Api(1), SubscriptionState::Active, b"key-x", None, &loc);
        b.add_inline("d", Grant::Product(0), SubscriptionState::Active, b"same", Some(b"same"), &loc);
        let (subs, errors) = b.finish();
        assert_eq!(errors.0.len(), 2, "{errors:?}");
        // Subscriptions in error stay in the (refused) set; the others are found by their keys.
        assert_eq!(subs.find(b"key-a-1"), Some(0));
        assert_eq!(subs.find(b"key-a-2"), Some(0));
        assert_eq!(subs.find(b"key-b-1"), Some(1));
        assert!(!subs.get(1).active);
        assert_eq!(subs.find(b"same").map(|i| subs.id(i)), Some("d"));
        assert_eq!(subs.find(b"key-a-"), None);
        assert_eq!(subs.find(b"key-a-3"), None);
        assert_eq!(subs.find(b""), None);
    }

    #[test]
    fn files_are_read_line_by_line_with_located_errors() {
        let dir = std::env::temp_dir().join(format!("portcullis-subs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("starter.keys");
        std::fs::write(
            &path,
            "# id, primary, secondary, state\n\
             s1, k1primary, k1secondary, active\n\
             s2,k2primary,,suspended\n\
             s3, k3primary\n\
             s4, bad key\n\
             s5, k5, k6, paused\n\
             s1, k7\n\
             only-an-id\n",
        )
        .expect("write");
        let mut b = Builder::new();
        b.load_file(&path, 0, &Loc::builtin("subscriptions.starter"));
        let (subs, errors) = b.finish();
        let mut lines: Vec<u32> = errors.iter().map(|e| e.loc.line).collect();
        lines.sort();
        assert_eq!(lines, [5, 6, 7, 8], "{errors:?}");
        assert_eq!(subs.find(b"k2primary").map(|i| subs.get(i).active), Some(false));
        assert_eq!(subs.find(b"k3primary").map(|i| subs.id(i)), Some("s3"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
