//! Subscriptions and their keys: a million of them in one hash table over one byte arena, looked
//! up in the time one hash takes however close a wrong key comes to a right one.

use std::path::Path;
use std::sync::Arc;

use ahash::{AHashSet, RandomState};
use hashbrown::HashTable;
use portcullis_config::{ConfigError, ConfigErrors, Loc, SubscriptionState, subscription_key_problem};

/// Errors listed for one file before the rest are summarised.
const MAX_REPORTED: usize = 20;

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
    pub(crate) id: Box<str>,
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

/// Every subscription of a configuration, with its keys.
#[derive(Debug, Default)]
pub struct Subscriptions {
    list: Vec<Subscription>,
    arena: Vec<u8>,
    slots: Vec<KeySlot>,
    table: HashTable<u32>,
    hasher: RandomState,
}

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Subscriptions {
    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn get(&self, index: u32) -> &Subscription {
        &self.list[index as usize]
    }

    fn key_of(&self, slot: &KeySlot) -> &[u8] {
        &self.arena[slot.start as usize..slot.start as usize + usize::from(slot.len)]
    }

    /// The subscription whose primary or secondary key is `key`.
    pub(crate) fn find(&self, key: &[u8]) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        self.table
            .find(hash, |&slot| same(self.key_of(&self.slots[slot as usize]), key))
            .map(|&slot| self.slots[slot as usize].subscription)
    }

    /// Adds a subscription; `Err` names the subscription that already has one of its keys.
    fn add(&mut self, sub: Subscription, primary: &[u8], secondary: Option<&[u8]>) -> Result<(), u32> {
        let index = self.list.len() as u32;
        let secondary = secondary.filter(|s| *s != primary);
        let keys = [Some(primary), secondary];
        if let Some(owner) = keys.iter().flatten().find_map(|k| self.find(k)) {
            return Err(owner);
        }
        for key in keys.into_iter().flatten() {
            let slot_index = self.slots.len() as u32;
            self.slots.push(KeySlot {
                start: self.arena.len() as u32,
                len: key.len() as u16,
                subscription: index,
            });
            self.arena.extend_from_slice(key);
            let (slots, arena, hasher) = (&self.slots, &self.arena, &self.hasher);
            self.table.insert_unique(hasher.hash_one(key), slot_index, |&s| {
                let s = &slots[s as usize];
                hasher.hash_one(&arena[s.start as usize..s.start as usize + usize::from(s.len)])
            });
        }
        self.list.push(sub);
        Ok(())
    }
}

/// Collects subscriptions from the configuration and from files, reporting every error once.
pub(crate) struct Builder {
    subs: Subscriptions,
    ids: AHashSet<Box<str>>,
    pub(crate) errors: ConfigErrors,
}

impl Builder {
    pub(crate) fn new() -> Builder {
        Builder { subs: Subscriptions::default(), ids: AHashSet::new(), errors: ConfigErrors::default() }
    }

    /// Adds one subscription; `at` locates it for errors.
    pub(crate) fn add(
        &mut self,
        id: &str,
        grant: Grant,
        state: SubscriptionState,
        primary: &[u8],
        secondary: Option<&[u8]>,
        at: impl Fn() -> Loc,
    ) {
        if self.ids.contains(id) {
            self.errors.push(at().error(format!("subscription id \"{id}\" is used twice")));
            return;
        }
        let sub = Subscription { id: id.into(), grant, active: state == SubscriptionState::Active };
        match self.subs.add(sub, primary, secondary) {
            Ok(()) => {
                self.ids.insert(id.into());
            }
            Err(owner) => {
                let other = &self.subs.list[owner as usize].id;
                self.errors.push(
                    at().error(format!("a key of subscription \"{id}\" is already a key of \"{other}\"")),
                );
            }
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
        let file: Arc<Path> = Arc::from(path);
        let at = |line: usize| Loc {
            file: file.clone(),
            line: line as u32 + 1,
            column: 1,
            field: loc.field.clone(),
        };
        let mut bad = 0usize;
        let report = |errors: &mut ConfigErrors, bad: &mut usize, e: ConfigError| {
            *bad += 1;
            if *bad <= MAX_REPORTED {
                errors.push(e);
            }
        };
        for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
            let line = match raw.iter().position(|&b| b == b'#') {
                Some(hash) => &raw[..hash],
                None => raw,
            };
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let Ok(line) = std::str::from_utf8(line) else {
                report(&mut self.errors, &mut bad, at(i).error("not UTF-8"));
                continue;
            };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let (id, primary, secondary, state) = match fields[..] {
                [id, p] => (id, p, "", "active"),
                [id, p, s] => (id, p, s, "active"),
                [id, p, s, st] => (id, p, s, st),
                _ => {
                    report(
                        &mut self.errors,
                        &mut bad,
                        at(i).error("expected `id, primary key, secondary key, state`"),
                    );
                    continue;
                }
            };
            if id.is_empty() || id.bytes().any(|b| b.is_ascii_control()) {
                report(
                    &mut self.errors,
                    &mut bad,
                    at(i).error("a subscription needs an id (no control characters)"),
                );
                continue;
            }
            let Some(state) = SubscriptionState::NAMES.iter().find(|(n, _)| *n == state).map(|(_, s)| *s)
            else {
                report(
                    &mut self.errors,
                    &mut bad,
                    at(i).error(format!(
                        "state \"{state}\" is not one of active, suspended, cancelled, expired"
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
            let secondary = (!secondary.is_empty()).then_some(secondary.as_bytes());
            self.add(id, Grant::Product(product), state, primary.as_bytes(), secondary, || at(i));
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

    pub(crate) fn finish(self) -> (Subscriptions, ConfigErrors) {
        (self.subs, self.errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_find_their_subscription() {
        let mut b = Builder::new();
        let loc = || Loc::builtin("subscription");
        b.add("a", Grant::AllApis, SubscriptionState::Active, b"key-a-1", Some(b"key-a-2"), loc);
        b.add("b", Grant::Api(1), SubscriptionState::Suspended, b"key-b-1", None, loc);
        b.add("c", Grant::Api(1), SubscriptionState::Active, b"key-b-1", None, loc);
        b.add("a", Grant::Api(1), SubscriptionState::Active, b"key-x", None, loc);
        b.add("d", Grant::Product(0), SubscriptionState::Active, b"same", Some(b"same"), loc);
        let (subs, errors) = b.finish();
        assert_eq!(errors.0.len(), 2, "{errors:?}");
        assert_eq!(subs.len(), 3);
        assert_eq!(subs.find(b"key-a-1"), Some(0));
        assert_eq!(subs.find(b"key-a-2"), Some(0));
        assert_eq!(subs.find(b"key-b-1"), Some(1));
        assert!(!subs.get(1).active);
        assert_eq!(subs.find(b"same"), Some(2));
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
        assert_eq!(subs.len(), 3);
        let lines: Vec<u32> = errors.iter().map(|e| e.loc.line).collect();
        assert_eq!(lines, [5, 6, 7, 8], "{errors:?}");
        assert_eq!(subs.find(b"k2primary").map(|i| subs.get(i).active), Some(false));
        assert_eq!(subs.find(b"k3primary").map(|i| &*subs.get(i).id), Some("s3"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
