//! `send_request`: a callout to a service (a device-authorisation service, say) whose answer
//! decides the request.

use std::time::Duration;

use toml::de::{DeTable, DeValue};

use crate::load::{
    backend_tls, flag, host_of, is_token, refuse_framing_field, required, strip_scheme, with_port,
};
use crate::model::{Located, SendRequest, StatusRanges};
use crate::reader::{Reader, Value, get, join};
use crate::traffic::status_message;

const KEYS: [&str; 15] = [
    "name",
    "method",
    "url",
    "headers",
    "body",
    "timeout",
    "ignore_error",
    "backend_tls",
    "cache_ttl",
    "expect_status",
    "status",
    "message",
    "set_headers",
    "max_response_size",
    "response_variable_name",
];

/// Longest callout answer that may be allowed (`max_response_size`).
const MOST_RESPONSE: i64 = 16 << 20;
/// Longest `cache_ttl`.
const MOST_TTL: Duration = Duration::from_secs(24 * 3600);

/// `(authority with port, path and query, https)` of a callout URL: the scheme and authority are
/// literal (they say where connections go, and are resolved when the configuration loads); the
/// path and query may hold templates.
pub(crate) fn split_url(url: &str) -> Result<(String, String, bool), String> {
    let (rest, https) = strip_scheme(url)?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains(['@', '{', '}', '#', ' ']) {
        return Err(format!(
            "\"{url}\" has no usable host (the scheme and host are literal; templates go in the path and query)"
        ));
    }
    if path.contains('#') {
        return Err("a callout URL has no fragment".to_owned());
    }
    let path = if path.starts_with('?') { format!("/{path}") } else { path.to_owned() };
    if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err("a callout URL cannot hold spaces or control characters (percent-encode them)".to_owned());
    }
    Ok((with_port(authority, https, url)?, path, https))
}

/// `expect_status`: statuses (`200`) or ranges (`"200-299"`).
pub(crate) fn statuses(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<StatusRanges> {
    let DeValue::Array(items) = v.get_ref() else {
        r.error(&v.span(), field, "expected an array of statuses, like [200] or [\"200-299\"]");
        return None;
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        match item.get_ref() {
            DeValue::Integer(_) => {
                if let Some(n) = r.integer(item, &f, 100..600) {
                    out.push((n as u16, n as u16));
                }
            }
            DeValue::String(text) => {
                let n = |s: &str| s.trim().parse::<u16>().ok().filter(|n| (100..=599).contains(n));
                match text.split_once('-').map(|(a, b)| (n(a), n(b))) {
                    Some((Some(a), Some(b))) if a <= b => out.push((a, b)),
                    _ => r.error(&item.span(), &f, format!("\"{text}\" is not a range like \"200-299\"")),
                }
            }
            _ => r.error(&item.span(), &f, "expected a status (200) or a range (\"200-299\")"),
        }
    }
    if out.is_empty() {
        r.error(&v.span(), field, "must name at least one status");
        return None;
    }
    Some(StatusRanges(out))
}

/// A table of header names to value templates.
fn header_table(
    r: &mut Reader,
    t: &DeTable<'_>,
    field: &str,
    key: &str,
) -> Vec<(Located<String>, Located<String>)> {
    let mut out = Vec::new();
    let Some(h) = get(t, key) else { return out };
    let field = join(field, key);
    let Some(ht) = r.table(h, &field) else { return out };
    for (name, value) in ht.iter() {
        let f = format!("{field}.{}", name.get_ref());
        if !is_token(name.get_ref()) {
            r.error(&name.span(), &f, format!("\"{}\" is not a valid header name", name.get_ref()));
            continue;
        }
        if let Some(value) = r.string(value, &f) {
            let name = Located::new(name.get_ref().to_string(), r.loc(&name.span(), &f));
            refuse_framing_field(r, &name);
            if name.value.eq_ignore_ascii_case("host") {
                r.errors.push(name.loc.error("\"Host\" comes from the URL"));
            }
            out.push((name, value));
        }
    }
    out
}

pub(crate) fn send_request(r: &mut Reader, v: &Value<'_>, field: &str) -> Option<SendRequest> {
    let t = r.table(v, field)?;
    r.check_keys(t, field, &KEYS);
    let name = required(r, t, v, field, "name").and_then(|n| r.non_empty_string(n, &join(field, "name")));
    if let Some(n) = &name
        && !n.value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        r.errors.push(n.loc.error(format!(
            "\"{}\" is not a callout name (letters, digits, '_' and '-'): templates read it as {{callout.NAME…}}",
            n.value
        )));
    }
    // APIM's attribute of the same meaning.
    if let Some(v) = get(t, "response_variable_name") {
        r.error(
            &v.span(),
            &join(field, "response_variable_name"),
            "use `name`: the answer is read as {callout.NAME…}",
        );
    }
    let method = match get(t, "method").and_then(|m| r.non_empty_string(m, &join(field, "method"))) {
        Some(m) if is_token(&m.value) => m.value.to_ascii_uppercase(),
        Some(m) => {
            r.errors.push(m.loc.error(format!("\"{}\" is not a method", m.value)));
            return None;
        }
        None => "GET".to_owned(),
    };
    let url = required(r, t, v, field, "url").and_then(|u| r.non_empty_string(u, &join(field, "url")));
    let parts = url.as_ref().and_then(|u| match split_url(&u.value) {
        Ok(p) => Some(p),
        Err(e) => {
            r.errors.push(u.loc.error(e));
            None
        }
    });
    let headers = header_table(r, t, field, "headers");
    let body = get(t, "body").and_then(|b| r.string(b, &join(field, "body")));
    let bounded = |r: &mut Reader, key: &str, default: Duration, most: Duration| match get(t, key) {
        None => Some(default),
        Some(d) => {
            let f = join(field, key);
            match r.duration(d, &f)? {
                x if x.is_zero() || x > most => {
                    r.error(&d.span(), &f, format!("must be more than 0 s and at most {} s", most.as_secs()));
                    None
                }
                x => Some(x),
            }
        }
    };
    let timeout = bounded(r, "timeout", Duration::from_secs(60), Duration::from_secs(600))?;
    let cache_ttl = match get(t, "cache_ttl") {
        Some(_) => Some(bounded(r, "cache_ttl", Duration::ZERO, MOST_TTL)?),
        None => None,
    };
    let ignore_error = flag(r, t, field, "ignore_error", false);
    let expect_status = match get(t, "expect_status") {
        Some(s) => statuses(r, s, &join(field, "expect_status"))?,
        None => StatusRanges(vec![(200, 299)]),
    };
    let (status, message) = status_message(r, t, field, 403, "Forbidden")?;
    let set_headers = header_table(r, t, field, "set_headers");
    let max_response_size = match get(t, "max_response_size") {
        Some(m) => r.integer(m, &join(field, "max_response_size"), 0..MOST_RESPONSE + 1)? as usize,
        None => 64 * 1024,
    };
    let (authority, path, https) = parts?;
    let tls = if https {
        Some(backend_tls(r, (t, "backend_tls"), field, host_of(&authority), None))
    } else {
        if let Some(v) = get(t, "backend_tls") {
            r.error(&v.span(), &join(field, "backend_tls"), "TLS to the service needs an https:// URL");
        }
        None
    };
    Some(SendRequest {
        name: name?,
        method,
        url: url?,
        authority,
        https,
        path,
        headers,
        body,
        timeout,
        ignore_error,
        tls,
        cache_ttl,
        expect_status,
        status,
        message,
        set_headers,
        max_response_size,
    })
}

#[cfg(test)]
mod tests {
    use super::split_url;

    #[test]
    fn callout_urls() {
        let ok = |a: &str, p: &str, https| Ok((a.to_owned(), p.to_owned(), https));
        assert_eq!(
            split_url("https://devauth.internal/check?t={client_cert.thumbprint}"),
            ok("devauth.internal:443", "/check?t={client_cert.thumbprint}", true)
        );
        assert_eq!(split_url("http://127.0.0.1:9000"), ok("127.0.0.1:9000", "/", false));
        assert_eq!(split_url("http://svc?x=1"), ok("svc:80", "/?x=1", false));
        assert_eq!(split_url("https://[::1]/a"), ok("[::1]:443", "/a", true));
        assert_eq!(split_url("https://[::1]:8443/a"), ok("[::1]:8443", "/a", true));
        for bad in [
            "ftp://x/",
            "https://{route.host}/x",
            "http://u@x/",
            "http://x/a b",
            "http://x/#f",
            "http://x:0/",
        ] {
            assert!(split_url(bad).is_err(), "{bad}");
        }
    }
}
