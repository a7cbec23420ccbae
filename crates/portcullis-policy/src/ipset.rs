//! Sets of addresses: ranges merged into two sorted lists (IPv4, IPv6), looked up by binary search
//! (O(log n) for thousands of entries), IPv4-mapped IPv6 addresses compared as IPv4. An IPv6 range
//! that covers part of the mapped block (`::ffff:0:0/96`; `::/0` covers all of it) covers those
//! IPv4 addresses too: it holds them, in their IPv6 spelling.

use std::net::IpAddr;
use std::path::Path;

use portcullis_config::{ConfigErrors, IpRange, Loc, canonical_ip};

use crate::list_file::read_entries;

/// A set of addresses.
#[derive(Debug, Default, Clone)]
pub struct IpSet {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge<T: Ord + Copy>(mut ranges: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Vec<(T, T)> {
    ranges.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(ranges.len());
    for (from, to) in ranges {
        match out.last_mut() {
            Some(last) if next(last.1).is_none_or(|n| from <= n) => last.1 = last.1.max(to),
            _ => out.push((from, to)),
        }
    }
    out
}

fn within<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
    // The last range starting at or before x.
    let i = ranges.partition_point(|r| r.0 <= x);
    i > 0 && x <= ranges[i - 1].1
}

impl IpSet {
    pub fn new(ranges: impl IntoIterator<Item = IpRange>) -> IpSet {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for r in ranges {
            match (r.from, r.to) {
                (IpAddr::V4(a), IpAddr::V4(b)) => v4.push((u32::from(a), u32::from(b))),
                (IpAddr::V6(a), IpAddr::V6(b)) => {
                    let (a, b) = (u128::from(a), u128::from(b));
                    v6.push((a, b));
                    // The IPv4 addresses it holds as ::ffff:a.b.c.d.
                    const MAPPED: (u128, u128) = (0xffff_0000_0000, 0xffff_ffff_ffff);
                    if a <= MAPPED.1 && b >= MAPPED.0 {
                        let (from, to) = (a.max(MAPPED.0) - MAPPED.0, b.min(MAPPED.1) - MAPPED.0);
                        v4.push((from as u32, to as u32));
                    }
                }
                _ => {} // IpRange never mixes families
            }
        }
        IpSet { v4: merge(v4, |x: u32| x.checked_add(1)), v6: merge(v6, |x: u128| x.checked_add(1)) }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match canonical_ip(ip) {
            IpAddr::V4(a) => within(&self.v4, u32::from(a)),
            IpAddr::V6(a) => within(&self.v6, u128::from(a)),
        }
    }

    /// Ranges after merging.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads a file of addresses, CIDR blocks and `a-b` ranges, one a line (`#` starts a
    /// comment); errors name the file and line.
    pub fn read_file(path: &Path, loc: &Loc) -> Result<Vec<IpRange>, ConfigErrors> {
        let text =
            std::fs::read(path).map_err(|e| loc.error(format!("cannot read {}: {e}", path.display())))?;
        let mut out = Vec::new();
        let errors = read_entries(&text, path, loc, |line| {
            out.push(std::str::from_utf8(line).map_err(|_| "not UTF-8".to_owned()).and_then(IpRange::parse)?);
            Ok(())
        });
        errors.into_result(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(entries: &[&str]) -> IpSet {
        IpSet::new(entries.iter().map(|e| IpRange::parse(e).expect("entry")))
    }

    fn has(s: &IpSet, ip: &str) -> bool {
        s.contains(ip.parse().expect("ip"))
    }

    #[test]
    fn lookups() {
        let s = set(&[
            "10.0.0.1-10.0.0.255",
            "10.0.0.100-10.0.1.5",
            "192.0.2.0/24",
            "203.0.113.7",
            "2001:db8::/32",
            "255.255.255.255",
        ]);
        assert_eq!(s.len(), 5, "two overlapping ranges merged");
        for ip in [
            "10.0.0.1",
            "10.0.0.255",
            "10.0.1.5",
            "192.0.2.77",
            "203.0.113.7",
            "::ffff:203.0.113.7",
            "2001:db8:1::9",
            "255.255.255.255",
        ] {
            assert!(has(&s, ip), "{ip}");
        }
        for ip in ["10.0.0.0", "10.0.1.6", "192.0.3.0", "203.0.113.8", "2001:db9::", "::1", "0.0.0.0"] {
            assert!(!has(&s, ip), "{ip}");
        }
        let adjacent = set(&["10.0.0.0/25", "10.0.0.128/25"]);
        assert_eq!(adjacent.len(), 1);
        assert!(IpSet::default().is_empty() && !has(&IpSet::default(), "10.0.0.1"));
        let all = set(&["0.0.0.0/0", "::/0"]);
        assert!(has(&all, "1.2.3.4") && has(&all, "::") && has(&all, "ffff::1"));
    }

    #[test]
    fn ipv6_ranges_over_the_mapped_block_hold_those_ipv4_addresses() {
        // Found by fuzzing: ::/80 ends at ::ffff:255.255.255.255, so it holds every IPv4 address.
        let s = set(&["::/80"]);
        assert!(has(&s, "10.0.0.1") && has(&s, "::ffff:10.0.0.1") && has(&s, "::1"));
        assert!(!has(&s, "2001:db8::1"));
        let part = set(&["::ffff:0.0.0.0-::ffff:10.0.0.255"]);
        assert!(has(&part, "10.0.0.255") && !has(&part, "10.0.1.0"));
        let part = set(&["::fffe:ffff:ffff-::ffff:0.0.0.9"]);
        assert!(has(&part, "0.0.0.9") && !has(&part, "0.0.0.10") && has(&part, "::fffe:ffff:ffff"));
        assert!(has(&set(&["::/0"]), "192.0.2.1"), "::/0 is every address");
        assert!(!has(&set(&["2001:db8::/32", "::1"]), "0.0.0.1"));
    }
}
