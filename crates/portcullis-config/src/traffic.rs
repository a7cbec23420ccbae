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
        let (a, b) = (canonical_ip(from), canonical_ip(to));
        // An IPv6 range that runs into the IPv4-mapped block stays IPv6 (the set looks up the
        // IPv4 addresses it holds); only both ends mapped make an IPv4 range.
        let (from, to) =
            if a.is_ipv4() != b.is_ipv4() && from.is_ipv6() && to.is_ipv6() { (from, to) } else { (a, b) };
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

/// `increment_condition`: `"status < 400"` (`<`, `<=`, `>`, `>=`, `==`, `!=` against a number)
/// or a list of statuses and ranges (`["200-299", "404"]`).
fn increment_condition(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<StatusRanges> {
    let range = |text: &str| -> Result<(u16, u16), String> {
        let n = |s: &str| s.trim().parse::<u16>().ok().filter(|n| (100..=599).contains(n));
        let (a, b) = text.split_once('-').unwrap_or((text, text));
        match (n(a), n(b)) {
            (Some(a), Some(b)) if a <= b => Ok((a, b)),
            _ => Err(format!("\"{text}\" is not a status or a range like \"200-299\" (100 to 599)")),
        }
    };
    if let toml::de::DeValue::String(text) = v.get_ref() {
        let parsed = (|| {
            let rest = text.trim().strip_prefix("status")?.trim_start();
            let (op, number) = ["<=", ">=", "==", "!=", "<", ">"]
                .iter()
                .find_map(|op| rest.strip_prefix(op).map(|n| (*op, n)))?;
            let n: u16 = number.trim().parse().ok().filter(|n| (100..=599).contains(n))?;
            Some(match op {
                "<" => vec![(100, n.saturating_sub(1))],
                "<=" => vec![(100, n)],
                ">" => vec![(n + 1, 599)],
                ">=" => vec![(n, 599)],
                "==" => vec![(n, n)],
                _ => vec![(100, n.saturating_sub(1)), (n + 1, 599)],
            })
        })();
        return match parsed {
            Some(ranges) => Some(StatusRanges(ranges.into_iter().filter(|(a, b)| a <= b).collect())),
            None => {
                r.error(
                    &v.span(),
                    field,
                    format!(
                        "\"{text}\" is not a condition like \"status < 400\" (or a list like [\"200-299\"])"
                    ),
                );
                None
            }
        };
    }
    let mut out = Vec::new();
    for s in r.strings(v, field) {
        match range(&s.value) {
            Ok(x) => out.push(x),
            Err(e) => r.errors.push(s.loc.error(e)),
        }
    }
    Some(StatusRanges(out))
}

fn header_name(r: &mut Reader, t: &toml::de::DeTable<'_>, field: &str, key: &str) -> Option<String> {
    let n = get(t, key).and_then(|v| r.non_empty_string(v, &join(field, key)))?;
    if !is_token(&n.value) {
        r.errors.push(n.loc.error(format!("\"{}\" is not a valid header name", n.value)));
        return None;
    }
    Some(n.value)
}

/// `rate_limit` (`by_key`: `rate_limit_by_key`).
/// The `counter_key` of a `…_by_key` limit (required there); `None` for the subscription's.
fn counter_key(
    r: &mut Reader,
    t: &toml::de::DeTable<'_>,
    v: &Value<'_>,
    field: &str,
    by_key: bool,
) -> Option<Located<String>> {
    if !by_key {
        return None;
    }
    required(r, t, v, field, "counter_key").and_then(|k| r.non_empty_string(k, &join(field, "counter_key")))
}

pub(crate) fn rate_limit(r: &mut Reader, v: &Value<'_>, field: &str, by_key: bool) -> Option<RateLimit> {
    let t = r.table(v, field)?;
    let mut known = vec![
        "calls",
        "renewal_period",
        "increment_condition",
        "increment_count",
        "retry_after_header_name",
        "remaining_calls_header_name",
        "total_calls_header_name",
    ];
    if by_key {
        known.push("counter_key");
    }
    r.check_keys(t, field, &known);
    let calls = required(r, t, v, field, "calls")
        .and_then(|c| r.integer(c, &join(field, "calls"), 1..i64::from(u32::MAX)));
    let period = required(r, t, v, field, "renewal_period").and_then(|p| {
        let f = join(field, "renewal_period");
        let d = r.duration(p, &f)?;
        if d < std::time::Duration::from_secs(1) || d > std::time::Duration::from_secs(300) {
            r.error(&p.span(), &f, "a rate limit's renewal period is 1 s to 300 s (API Management's bounds); use a quota for longer periods");
            return None;
        }
        Some(d)
    });
    let counter_key = counter_key(r, t, v, field, by_key);
    let increment_condition = get(t, "increment_condition")
        .and_then(|c| increment_condition(r, c, &join(field, "increment_condition")));
    let increment_count = match get(t, "increment_count") {
        Some(c) => r.integer(c, &join(field, "increment_count"), 1..1_000_001)? as u64,
        None => 1,
    };
    let retry_after_header_name =
        header_name(r, t, field, "retry_after_header_name").unwrap_or_else(|| "Retry-After".to_owned());
    let remaining_calls_header_name = header_name(r, t, field, "remaining_calls_header_name");
    let total_calls_header_name = header_name(r, t, field, "total_calls_header_name");
    if by_key && counter_key.is_none() {
        return None;
    }
    Some(RateLimit {
        calls: calls? as u64,
        renewal_period: period?,
        counter_key,
        increment_condition,
        increment_count,
        retry_after_header_name,
        remaining_calls_header_name,
        total_calls_header_name,
    })
}

/// Unix seconds of an RFC 3339 time in UTC (`2026-01-01T00:00:00Z`, or with `+00:00`).
pub(crate) fn parse_utc(text: &str) -> Option<i64> {
    let t = text.trim();
    let t = t.strip_suffix('Z').or_else(|| t.strip_suffix("+00:00"))?;
    let (date, time) = t.split_once(['T', 't'])?;
    let num = |s: &str, len: usize| {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<i64>().ok()).flatten()
    };
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    let mut c = time.split(':');
    let (h, min, s) = (num(c.next()?, 2)?, num(c.next()?, 2)?, num(c.next()?, 2)?);
    if d.next().is_some() || c.next().is_some() || !(1..=12).contains(&m) || h > 23 || min > 59 || s > 59 {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if day < 1 || day > days_in[(m - 1) as usize] {
        return None;
    }
    // Days from 1970-01-01 (the civil-from-days inverse, Howard Hinnant's).
    let (y2, m2) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400 + h * 3600 + min * 60 + s)
}

/// `quota` (`by_key`: `quota_by_key`).
pub(crate) fn quota(r: &mut Reader, v: &Value<'_>, field: &str, by_key: bool) -> Option<Quota> {
    let t = r.table(v, field)?;
    let mut known =
        vec!["calls", "bandwidth_kb", "renewal_period", "first_period_start", "increment_condition"];
    if by_key {
        known.push("counter_key");
    }
    r.check_keys(t, field, &known);
    let calls =
        get(t, "calls").and_then(|c| r.integer(c, &join(field, "calls"), 1..(1 << 40))).map(|n| n as u64);
    let bandwidth_kb = get(t, "bandwidth_kb")
        .and_then(|c| r.integer(c, &join(field, "bandwidth_kb"), 1..(1 << 30)))
        .map(|n| n as u64);
    if get(t, "calls").is_none() && get(t, "bandwidth_kb").is_none() {
        r.error(&v.span(), field, "a quota needs `calls`, `bandwidth_kb`, or both");
    }
    let period = required(r, t, v, field, "renewal_period").and_then(|p| {
        let f = join(field, "renewal_period");
        let d = r.duration(p, &f)?;
        if !d.is_zero() && d < std::time::Duration::from_secs(300) {
            r.error(&p.span(), &f, "a quota's renewal period is at least 300 s (0: one period for ever)");
            return None;
        }
        Some(d)
    });
    let counter_key = counter_key(r, t, v, field, by_key);
    let first_period_start = match get(t, "first_period_start") {
        Some(s) => {
            let f = join(field, "first_period_start");
            let text = r.string(s, &f)?;
            match parse_utc(&text.value) {
                Some(t) => t,
                None => {
                    r.errors.push(text.loc.error(format!(
                        "\"{}\" is not a UTC time like \"2026-01-01T00:00:00Z\"",
                        text.value
                    )));
                    return None;
                }
            }
        }
        None => 0,
    };
    let increment_condition = get(t, "increment_condition")
        .and_then(|c| increment_condition(r, c, &join(field, "increment_condition")));
    if by_key && counter_key.is_none() {
        return None;
    }
    if calls.is_none() && bandwidth_kb.is_none() {
        return None;
    }
    Some(Quota {
        calls,
        bandwidth_kb,
        renewal_period: period?,
        counter_key,
        first_period_start,
        increment_condition,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(s: &str) -> Result<(String, String), String> {
        IpRange::parse(s).map(|r| (r.from.to_string(), r.to.to_string()))
    }

    #[test]
    fn utc_times() {
        assert_eq!(parse_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_utc("2026-01-01T00:00:00Z"), Some(1_767_225_600));
        assert_eq!(parse_utc("2000-02-29T12:30:15+00:00"), Some(951_827_415));
        assert_eq!(parse_utc("2001-02-29T00:00:00Z"), None);
        assert_eq!(parse_utc("2026-01-01T00:00:00"), None, "no zone");
        assert_eq!(parse_utc("2026-01-01T24:00:00Z"), None);
        assert_eq!(parse_utc("2026-1-01T00:00:00Z"), None);
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

/// What a Redis URL says: `redis://[user[:password]@]host[:port][/db]`, or `rediss://` for TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub db: u32,
    pub username: Option<String>,
    pub password: Option<String>,
}

fn percent_decoded(text: &str, what: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => out.push(b),
                None => return Err(format!("the {what} has a `%` not followed by two hex digits")),
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("the {what} is not UTF-8 once decoded"))
}

/// Parses a Redis URL (the forms `redis-cli -u` takes, without query parameters).
pub fn parse_redis_url(url: &str) -> Result<RedisUrl, String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("redis://") {
        (false, rest)
    } else if let Some(rest) = url.strip_prefix("rediss://") {
        (true, rest)
    } else {
        return Err("must start with redis:// (or rediss:// for TLS)".to_owned());
    };
    if url.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return Err("holds spaces or characters outside ASCII (percent-encode them)".to_owned());
    }
    if rest.contains(['?', '#']) {
        return Err(
            "query parameters and fragments are not read; use the fields of [server.redis]".to_owned()
        );
    }
    // The user information ends at the last `@` (a password may hold a `/` or an `@` its writer
    // did not encode); the host, port and database follow it.
    let (userinfo, after) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let (hostport, path) = after.split_once('/').unwrap_or((after, ""));
    let (username, password) = match userinfo {
        None => (None, None),
        Some(u) => {
            let (user, pass) = match u.split_once(':') {
                Some((user, pass)) => (user, Some(pass)),
                None => (u, None),
            };
            let user = (!user.is_empty()).then(|| percent_decoded(user, "user name")).transpose()?;
            let pass = pass.map(|p| percent_decoded(p, "password")).transpose()?;
            (user, pass)
        }
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (inside, after) = v6.split_once(']').ok_or("has a `[` without its `]`")?;
        if inside.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("\"{inside}\" is not an IPv6 address"));
        }
        match after {
            "" => (inside, None),
            p => (inside, Some(p.strip_prefix(':').ok_or("has text after `]` that is not a port")?)),
        }
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    if host.is_empty() {
        return Err("names no host".to_owned());
    }
    if !host.contains(':')
        && !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err(format!("\"{host}\" is not a host name or address"));
    }
    let port = match port {
        None => 6379,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("\"{p}\" is not a port (1 to 65535)")),
        },
    };
    let db = match path {
        "" => 0,
        d => d.parse::<u32>().map_err(|_| format!("\"/{d}\" is not a database number"))?,
    };
    Ok(RedisUrl { tls, host: host.to_owned(), port, db, username, password })
}

const REDIS_KEYS: [&str; 7] =
    ["url", "ca", "password_file", "sync_interval", "timeout", "redis_failure", "db"];

/// `[server.redis]`.
pub(crate) fn redis(r: &mut Reader, v: &Value<'_>) -> Option<Redis> {
    let field = "server.redis";
    let t = r.table(v, field)?;
    r.check_keys(t, field, &REDIS_KEYS);
    let url = required(r, t, v, field, "url").and_then(|u| r.non_empty_string(u, "server.redis.url"));
    let parsed = url.as_ref().and_then(|u| match parse_redis_url(&u.value) {
        Ok(p) => Some(p),
        Err(e) => {
            r.errors.push(u.loc.error(format!("\"{}\" {e}", masked(&u.value))));
            None
        }
    });
    let ca = get(t, "ca").map(|c| r.paths(c, "server.redis.ca")).unwrap_or_default();
    let password_file = get(t, "password_file").and_then(|p| r.path(p, "server.redis.password_file"));
    let mut sync_interval = std::time::Duration::from_millis(100);
    if let Some(d) = get(t, "sync_interval") {
        match r.duration(d, "server.redis.sync_interval") {
            Some(i)
                if (std::time::Duration::from_millis(10)..=std::time::Duration::from_secs(1))
                    .contains(&i) =>
            {
                sync_interval = i;
            }
            Some(_) => r.error(&d.span(), "server.redis.sync_interval", "must be from 10ms to 1s"),
            None => {}
        }
    }
    let mut timeout = std::time::Duration::from_secs(1);
    if let Some(d) = get(t, "timeout") {
        match r.duration(d, "server.redis.timeout") {
            Some(i) if !i.is_zero() && i <= std::time::Duration::from_secs(60) => timeout = i,
            Some(_) => r.error(&d.span(), "server.redis.timeout", "must be more than zero and at most 60s"),
            None => {}
        }
    }
    let failure = get(t, "redis_failure")
        .and_then(|f| {
            r.choice(
                f,
                "server.redis.redis_failure",
                &[("local", RedisFailure::Local), ("deny", RedisFailure::Deny)],
            )
        })
        .unwrap_or(RedisFailure::Local);
    let db = get(t, "db")
        .and_then(|d| r.integer(d, "server.redis.db", 0..i64::from(u32::MAX) + 1))
        .map(|d| d as u32);
    let (url, parsed) = (url?, parsed?);
    if !parsed.tls && !ca.is_empty() {
        r.errors.push(url.loc.error("`ca` is for rediss:// (TLS); this URL is redis://"));
    }
    if parsed.password.is_some() && password_file.is_some() {
        r.errors
            .push(url.loc.error("the URL holds a password and `password_file` names one: keep one of them"));
    }
    Some(Redis {
        url: Located::new(masked(&url.value), url.loc.clone()),
        host: parsed.host,
        port: parsed.port,
        tls: parsed.tls,
        ca,
        db: db.unwrap_or(parsed.db),
        username: parsed.username,
        password: parsed.password,
        password_file,
        sync_interval,
        timeout,
        failure,
        loc: r.loc(&v.span(), field),
    })
}

/// The URL with any password replaced by `***` (for messages and logs): whatever lies between the
/// first `:` after the scheme and the last `@`, even when the URL does not parse.
fn masked(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    match rest.rfind('@') {
        Some(at) if rest[..at].contains(':') => {
            let user = rest[..at].split_once(':').map_or("", |(u, _)| u);
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        _ => url.to_owned(),
    }
}
