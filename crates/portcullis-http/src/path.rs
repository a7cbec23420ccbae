//! Path normalisation before routing.
//!
//! The proxy routes and applies policy on the path, and forwards the same path it routed on: a
//! request for `/public/%2e%2e/admin` must not be routed as `/public/...` and then served by a
//! backend as `/admin`. So percent-encoded unreserved characters are decoded (RFC 3986 §6.2.2.2)
//! and dot-segments removed (RFC 3986 §5.2.4) before anything looks at the path.

/// Normalises the path part of an origin-form target (`/a/./b?q` → `/a/b?q`).
///
/// Returns `Ok(None)` when the target is already normal (the common case, no allocation),
/// `Ok(Some(normalised))` when it changed, and `Err` for a malformed percent-encoding.
pub fn normalize_path(target: &[u8]) -> Result<Option<Vec<u8>>, &'static str> {
    let (path, query) = match target.iter().position(|&b| b == b'?') {
        Some(q) => target.split_at(q),
        None => (target, &[][..]),
    };
    let has_percent = path.contains(&b'%');
    if !has_percent && !path.windows(2).any(|w| w == b"/.") {
        return Ok(None);
    }
    let decoded;
    let path = if has_percent {
        decoded = decode_unreserved(path)?;
        &decoded[..]
    } else {
        path
    };
    let segments: Vec<&[u8]> = path[1..].split(|&b| b == b'/').collect();
    let mut stack: Vec<&[u8]> = Vec::with_capacity(segments.len());
    let last = segments.len() - 1;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            b"." => {}
            b".." => {
                stack.pop();
            }
            other => {
                stack.push(other);
                continue;
            }
        }
        // A trailing dot-segment leaves the path ending in "/" (RFC 3986 §5.2.4, step 2).
        if i == last {
            stack.push(b"");
        }
    }
    let mut out = Vec::with_capacity(target.len());
    if stack.is_empty() {
        out.push(b'/');
    }
    for segment in stack {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    out.extend_from_slice(query);
    if out == target {
        return Ok(None);
    }
    Ok(Some(out))
}

fn decode_unreserved(path: &[u8]) -> Result<Vec<u8>, &'static str> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b != b'%' {
            out.push(b);
            i += 1;
            continue;
        }
        let (Some(hi), Some(lo)) =
            (path.get(i + 1).and_then(|&h| hex_value(h)), path.get(i + 2).and_then(|&l| hex_value(l)))
        else {
            return Err("malformed percent-encoding in path");
        };
        let decoded = hi << 4 | lo;
        if decoded.is_ascii_alphanumeric() || matches!(decoded, b'-' | b'.' | b'_' | b'~') {
            out.push(decoded);
        } else {
            // Reserved and other octets stay encoded, in the upper-case form of RFC 3986 §6.2.2.1.
            out.extend_from_slice(&[
                b'%',
                path[i + 1].to_ascii_uppercase(),
                path[i + 2].to_ascii_uppercase(),
            ]);
        }
        i += 3;
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Removes every `name` parameter (`name=…` or a bare `name`) from the query of `target`, in
/// place; the `?` goes too when nothing is left. Names are compared as received (not decoded).
pub fn remove_query_parameter(target: &mut Vec<u8>, name: &[u8]) {
    let Some(q) = target.iter().position(|&b| b == b'?') else { return };
    let query = target.split_off(q + 1);
    let mut first = true;
    for pair in query.split(|&b| b == b'&') {
        let key = pair.split(|&b| b == b'=').next().unwrap_or(pair);
        if key == name {
            continue;
        }
        if !first {
            target.push(b'&');
        }
        target.extend_from_slice(pair);
        first = false;
    }
    if first {
        target.pop(); // the '?'
    }
}

#[cfg(test)]
mod tests {
    use super::{normalize_path, remove_query_parameter};

    #[test]
    fn query_parameters_are_removed() {
        let strip = |t: &str| {
            let mut v = t.as_bytes().to_vec();
            remove_query_parameter(&mut v, b"subscription-key");
            String::from_utf8(v).expect("ascii")
        };
        assert_eq!(strip("/a?subscription-key=k"), "/a");
        assert_eq!(strip("/a?x=1&subscription-key=k&y=2"), "/a?x=1&y=2");
        assert_eq!(strip("/a?subscription-key=k&subscription-key=j&y"), "/a?y");
        assert_eq!(strip("/a?subscription-key"), "/a");
        assert_eq!(strip("/a?subscription-keys=1"), "/a?subscription-keys=1");
        assert_eq!(strip("/a?x=subscription-key"), "/a?x=subscription-key");
        assert_eq!(strip("/a"), "/a");
        assert_eq!(strip("/a?"), "/a?");
        assert_eq!(strip("/a?&subscription-key=1&"), "/a?&");
    }

    fn norm(p: &str) -> String {
        match normalize_path(p.as_bytes()).expect("valid") {
            Some(v) => String::from_utf8(v).expect("ascii"),
            None => p.to_owned(),
        }
    }

    #[test]
    fn normal_paths_are_untouched() {
        for p in ["/", "/a", "/a/b/", "/a//b", "/a.b/c.d", "/a?x=/../y", "/.well-known/x"] {
            assert_eq!(normalize_path(p.as_bytes()), Ok(None), "{p}");
        }
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(norm("/a/./b"), "/a/b");
        assert_eq!(norm("/a/b/.."), "/a/");
        assert_eq!(norm("/a/b/../c?q=1"), "/a/c?q=1");
        assert_eq!(norm("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(norm("/.."), "/");
        assert_eq!(norm("/public/../admin"), "/admin");
    }

    #[test]
    fn encoded_dots_count_as_dots() {
        assert_eq!(norm("/public/%2e%2e/admin"), "/admin");
        assert_eq!(norm("/public/%2E./admin"), "/admin");
        assert_eq!(norm("/%61dmin"), "/admin");
    }

    #[test]
    fn reserved_escapes_stay_encoded() {
        assert_eq!(norm("/a%2fb"), "/a%2Fb");
        assert_eq!(norm("/a%2F..%2Fb"), "/a%2F..%2Fb");
    }

    #[test]
    fn bad_escapes_are_errors() {
        assert!(normalize_path(b"/a%2").is_err());
        assert!(normalize_path(b"/a%zz").is_err());
    }
}
