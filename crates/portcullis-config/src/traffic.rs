//! Traffic policy: `ip_filter`, `check_header`, address ranges (also for `proxy_protocol_from`).

use std::net::{IpAddr, Ipv4Addr};

use crate::load::{flag, is_token, required};
use crate::model::*;
use crate::reader::{Reader, Value, get, join};

/// The address as compared: an IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) is the IPv4 one.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn prefix_range(ip: IpAddr, bits: u8) -> Result<IpRange, String> {
    match canonical_ip(ip) {
        IpAddr::V4(a) if ip.is_ipv6() => {
            // ::ffff:a.b.c.d/N: the prefix counts the 96 mapping bits.
            if !(96..=128).contains(&bits) {
                return Err(format!("/{bits} does not fit an IPv4-mapped address (96 to 128)"));
            }
            prefix_range(IpAddr::V4(a), bits - 96)
        }
        IpAddr::V4(a) => {
            if bits > 32 {
                return Err(format!("/{bits} is longer than an IPv4 address"));
            }
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - u32::from(bits)) };
            let base = u32::from(a);
            if base & !mask != 0 {
                return Err(format!(
                    "{a}/{bits} has bits set past its prefix (did you mean {}/{bits}?)",
                    Ipv4Addr::from(base & mask)
                ));
            }
            Ok(IpRange { from: IpAddr::V4(a), to: IpAddr::V4((base | !mask).into()) })
        }
        IpAddr::V6(a) => {
            if bits > 128 {
                return Err(format!("/{bits} is longer than an IPv6 address"));
            }
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - u32::from(bits)) };
            let base = u128::from(a);
            if base & !mask != 0 {
                return Err(format!(
                    "{a}/{bits} has bits set past its prefix (did you mean {}/{bits}?)",
                    std::net::Ipv6Addr::from(base & mask)
                ));
            }
            Ok(IpRange { from: IpAddr::V6(a), to: IpAddr::V6((base | !mask).into()) })
        }
    }
}

impl IpRange {
    /// One address.
    pub fn single(ip: IpAddr) -> IpRange {
        let ip = canonical_ip(ip);
        IpRange { from: ip, to: ip }
    }

    /// `from` to `to` inclusive, of one family, in order.
    pub fn between(from: IpAddr, to: IpAddr) -> Result<IpRange, String> {
        let (from, to) = (canonical_ip(from), canonical_ip(to));
        match (from, to) {
            (IpAddr::V4(a), IpAddr::V4(b)) if a <= b => Ok(IpRange { from, to }),
            (IpAddr::V6(a), IpAddr::V6(b)) if a <= b => Ok(IpRange { from, to }),
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Err(format!("the range {from} – {to} ends before it starts"))
            }
            _ => Err(format!("the range {from} – {to} mixes IPv4 and IPv6")),
        }
    }

    /// An address (`203.0.113.7`), a CIDR block (`192.0.2.0/24`) or a range
    /// (`10.0.0.1-10.0.0.255`, spaces allowed around the dash).
    pub fn parse(text: &str) -> Result<IpRange, String> {
        let text = text.trim();
        let ip = |s: &str| {
            s.trim().parse::<IpAddr>().map_err(|_| format!("\"{}\" is not an IP address", s.trim()))
        };
        if let Some((addr, bits)) = text.split_once('/') {
            let bits: u8 = bits
                .trim()
                .parse()
                .ok()
                .filter(|_| bits.trim().bytes().all(|b| b.is_ascii_digit()))
                .ok_or_else(|| format!("\"{text}\": the prefix length is not a number"))?;
            return prefix_range(ip(addr)?, bits);
        }
        // A dash separates a range (IPv6 addresses have no dashes).
        if let Some((from, to)) = text.split_once('-') {
            return IpRange::between(ip(from)?, ip(to)?);
        }
        Ok(IpRange::single(ip(text)?))
    }
}

/// A list of addresses (`addresses`, `cidrs`) or `{ from, to }` tables (`ranges`).
fn entries(r: &mut Reader, v: &Value<'_>, field: &str, kind: &str, out: &mut Vec<Located<IpRange>>) {
    if kind == "ranges" {
        for (item, f) in r.tables(v, field) {
            let Some(t) = r.table(item, &f) else { continue };
            r.check_keys(t, &f, &["from", "to"]);
            let from =
                required(r, t, item, &f, "from").and_then(|x| r.non_empty_string(x, &join(&f, "from")));
            let to = required(r, t, item, &f, "to").and_then(|x| r.non_empty_string(x, &join(&f, "to")));
            let (Some(from), Some(to)) = (from, to) else { continue };
            let range = match (from.value.trim().parse::<IpAddr>(), to.value.trim().parse::<IpAddr>()) {
                (Ok(a), Ok(b)) => IpRange::between(a, b),
                (Err(_), _) => Err(format!("\"{}\" is not an IP address", from.value)),
                (_, Err(_)) => Err(format!("\"{}\" is not an IP address", to.value)),
            };
            match range {
                Ok(range) => out.push(Located::new(range, from.loc)),
                Err(e) => r.errors.push(from.loc.error(e)),
            }
        }
        return;
    }
    for s in r.strings(v, field) {
        let parsed = match kind {
            "addresses" => s
                .value
                .trim()
                .parse::<IpAddr>()
                .map(IpRange::single)
                .map_err(|_| format!("\"{}\" is not an IP address", s.value)),
            _ => {
                if s.value.contains('/') {
                    IpRange::parse(&s.value)
                } else {
                    Err(format!("\"{}\" is not a CIDR block like \"192.0.2.0/24\"", s.value))
                }
            }
        };
        match parsed {
            Ok(range) => out.push(Located::new(range, s.loc)),
            Err(e) => r.errors.push(s.loc.error(e)),
        }
    }
}

/// Address ranges written as a list of addresses, CIDR blocks and `a-b` ranges (for
/// `proxy_protocol_from`).
pub(crate) fn ranges(r: &mut Reader, v: &Value<'_>, field: &str) -> Vec<Located<IpRange>> {
    let mut out = Vec::new();
    for s in r.strings(v, field) {
        match IpRange::parse(&s.value) {
            Ok(range) => out.push(Located::new(range, s.loc)),
            Err(e) => r.errors.push(s.loc.error(e)),
        }
    }
    out
}

pub(crate) fn ip_filter(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<IpFilter> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["action", "addresses", "ranges", "cidrs", "ip_list", "status", "message"]);
    let action = match required(r, t, v, field, "action") {
        Some(a) => {
            r.choice(a, &join(field, "action"), &[("allow", IpAction::Allow), ("forbid", IpAction::Forbid)])?
        }
        None => return None,
    };
    let mut list = Vec::new();
    for kind in ["addresses", "ranges", "cidrs"] {
        if let Some(x) = get(t, kind) {
            entries(r, x, &join(field, kind), kind, &mut list);
        }
    }
    let lists = get(t, "ip_list").map(|l| r.paths(l, &join(field, "ip_list"))).unwrap_or_default();
    if list.is_empty()
        && lists.is_empty()
        && [get(t, "addresses"), get(t, "ranges"), get(t, "cidrs")].iter().all(Option::is_none)
    {
        r.error(&v.span(), field, "ip_filter needs `addresses`, `ranges`, `cidrs` or `ip_list`");
    }
    let (status, message) = status_message(r, t, field, 403, "Forbidden")?;
    Some(IpFilter { action, entries: list, lists, status, message })
}

/// `status` (400–599) and `message` of a refusal, with defaults.
pub(crate) fn status_message(
    r: &mut Reader,
    t: &toml::de::DeTable<'_>,
    field: &str,
    status: u16,
    message: &str,
) -> Option<(u16, String)> {
    let status = match get(t, "status") {
        Some(s) => r.integer(s, &join(field, "status"), 400..600).map(|n| n as u16)?,
        None => status,
    };
    let message = match get(t, "message").and_then(|m| r.string(m, &join(field, "message"))) {
        Some(m) if m.value.chars().any(char::is_control) => {
            r.errors.push(m.loc.error("a message cannot contain control characters"));
            return None;
        }
        Some(m) => m.value,
        None => message.to_owned(),
    };
    Some((status, message))
}

pub(crate) fn check_header(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<CheckHeader> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &["name", "values", "ignore_case", "status", "message"]);
    let name = required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")))?;
    if !is_token(&name.value) {
        r.errors.push(name.loc.error(format!("\"{}\" is not a valid header name", name.value)));
        return None;
    }
    let values = match get(t, "values") {
        Some(x) => r.strings(x, &join(field, "values")).into_iter().map(|s| s.value).collect(),
        None => Vec::new(),
    };
    let ignore_case = flag(r, t, field, "ignore_case", true);
    let default_message = format!("Header {} is missing or has a value that is not allowed", name.value);
    let (status, message) = status_message(r, t, field, 400, &default_message)?;
    Some(CheckHeader { name, values, ignore_case, status, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Result<(String, String), String> {
        IpRange::parse(s).map(|r| (r.from.to_string(), r.to.to_string()))
    }

    #[test]
    fn entries_read_as_ranges() {
        assert_eq!(range("203.0.113.7"), Ok(("203.0.113.7".into(), "203.0.113.7".into())));
        assert_eq!(range("::ffff:203.0.113.7"), Ok(("203.0.113.7".into(), "203.0.113.7".into())));
        assert_eq!(range("192.0.2.0/24"), Ok(("192.0.2.0".into(), "192.0.2.255".into())));
        assert_eq!(range("0.0.0.0/0"), Ok(("0.0.0.0".into(), "255.255.255.255".into())));
        assert_eq!(range("10.0.0.1/32"), Ok(("10.0.0.1".into(), "10.0.0.1".into())));
        assert_eq!(
            range("2001:db8::/32"),
            Ok(("2001:db8::".into(), "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".into()))
        );
        assert_eq!(range("::ffff:10.0.0.0/104"), Ok(("10.0.0.0".into(), "10.255.255.255".into())));
        assert_eq!(range("10.0.0.1 - 10.0.0.255"), Ok(("10.0.0.1".into(), "10.0.0.255".into())));
        assert!(range("10.0.0.9-10.0.0.1").unwrap_err().contains("ends before"));
        assert!(range("10.0.0.1-::1").unwrap_err().contains("mixes"));
        assert!(range("192.0.2.1/24").unwrap_err().contains("did you mean 192.0.2.0/24"));
        assert!(range("192.0.2.0/33").is_err());
        assert!(range("192.0.2.0/+8").is_err());
        assert!(range("::ffff:10.0.0.0/8").is_err());
        assert!(range("example.com").is_err());
        assert!(range("").is_err());
    }
}
