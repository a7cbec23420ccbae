//! Operations of an API: `GET /devices/{deviceId}/telemetry`, matched against the path that
//! follows the API's prefix.

use bytes::Bytes;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(Bytes),
    Param,
}

/// A compiled `METHOD /template`.
#[derive(Debug, Clone)]
pub(crate) struct OperationPattern {
    /// `None` matches any method.
    method: Option<Bytes>,
    segments: Vec<Segment>,
    /// Each `{name}` with the index of its segment.
    pub(crate) params: Vec<(Bytes, usize)>,
}

impl OperationPattern {
    /// Parses a pattern the configuration crate has already validated.
    pub(crate) fn parse(pattern: &str) -> OperationPattern {
        let (method, template) = pattern.split_once(' ').unwrap_or(("*", pattern));
        let mut params = Vec::new();
        let segments = template
            .split('/')
            .skip(1)
            .enumerate()
            .map(|(i, s)| {
                if s.starts_with('{') {
                    let name = s.trim_start_matches('{').trim_end_matches('}');
                    params.push((Bytes::copy_from_slice(name.as_bytes()), i));
                    Segment::Param
                } else {
                    Segment::Literal(Bytes::copy_from_slice(s.as_bytes()))
                }
            })
            .collect();
        let method = (method != "*").then(|| Bytes::copy_from_slice(method.as_bytes()));
        OperationPattern { method, segments, params }
    }

    /// More literal segments first, so `/items/special` wins over `/items/{id}`.
    pub(crate) fn specificity(&self) -> (usize, usize) {
        let literals = self.segments.iter().filter(|s| matches!(s, Segment::Literal(_))).count();
        (literals, usize::MAX - self.segments.len())
    }

    /// Whether `method` and `path` (after the API prefix, no query) match. A trailing slash is
    /// not significant.
    pub(crate) fn matches(&self, method: &[u8], path: &[u8]) -> bool {
        if let Some(m) = &self.method
            && m.as_ref() != method
        {
            return false;
        }
        let path = if path.len() > 1 { path.strip_suffix(b"/").unwrap_or(path) } else { path };
        let path = if path.is_empty() { &b"/"[..] } else { path };
        let mut parts = path[1..].split(|&b| b == b'/');
        for segment in &self.segments {
            let Some(part) = parts.next() else { return false };
            match segment {
                Segment::Literal(l) if l.as_ref() != part => return false,
                Segment::Param if part.is_empty() => return false,
                _ => {}
            }
        }
        parts.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let p = OperationPattern::parse("GET /devices/{deviceId}/telemetry");
        assert!(p.matches(b"GET", b"/devices/42/telemetry"));
        assert!(p.matches(b"GET", b"/devices/42/telemetry/"));
        assert!(!p.matches(b"POST", b"/devices/42/telemetry"));
        assert!(!p.matches(b"GET", b"/devices//telemetry"));
        assert!(!p.matches(b"GET", b"/devices/42/telemetry/x"));
        assert!(!p.matches(b"GET", b"/devices/42"));
        let root = OperationPattern::parse("* /");
        assert!(root.matches(b"PUT", b"/"));
        assert!(root.matches(b"PUT", b""));
        assert!(!root.matches(b"PUT", b"/x"));
        assert!(
            OperationPattern::parse("GET /items/special").specificity()
                > OperationPattern::parse("GET /items/{id}").specificity()
        );
    }
}
