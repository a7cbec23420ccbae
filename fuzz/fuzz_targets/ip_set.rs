//! Address lists (`ip_list` files, `ip_filter` entries): the first lines are parsed as entries
//! (an address, a CIDR block or a range), the rest as addresses to look up. The set built from
//! the entries must agree with a plain scan of them, for every entry's ends and every probe
//! (an IPv4 address and its IPv4-mapped IPv6 spelling being the same address).
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use portcullis_config::IpRange;
use portcullis_policy::IpSet;

/// Every address as IPv6 (an IPv4 address as ::ffff:a.b.c.d): the set's meaning, spelled out.
fn as_v6(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn scan(ranges: &[IpRange], ip: IpAddr) -> bool {
    let ip = as_v6(ip);
    ranges.iter().any(|r| as_v6(r.from) <= ip && ip <= as_v6(r.to))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let ranges: Vec<IpRange> = lines.by_ref().take(32).filter_map(|l| IpRange::parse(l).ok()).collect();
    for r in &ranges {
        assert_eq!(r.from.is_ipv4(), r.to.is_ipv4(), "{r:?} mixes families");
        assert!(r.from <= r.to, "{r:?} runs backwards");
    }
    let set = IpSet::new(ranges.iter().copied());
    let mut probes: Vec<IpAddr> = ranges.iter().flat_map(|r| [r.from, r.to]).collect();
    probes.extend(lines.filter_map(|l| l.trim().parse::<IpAddr>().ok()));
    for ip in probes {
        assert_eq!(set.contains(ip), scan(&ranges, ip), "{ip} against {ranges:?}");
    }
});
