//! Find-and-replace over a body that arrives in pieces (API Management's `find-and-replace`),
//! in bounded memory: a match split between two pieces is found, and no more than the longest
//! search string (less one byte) is held back between pieces.

use bytes::{BufMut, Bytes, BytesMut};
use memchr::memmem::Finder;

/// One `from` → `to` replacement.
#[derive(Debug, Clone)]
struct Stage {
    finder: Finder<'static>,
    to: Bytes,
    /// The tail of the input that may be the start of a match, kept for the next piece.
    carry: BytesMut,
}

impl Stage {
    /// Replaces in `data` (the carry and a new piece) every match that lies wholly within it,
    /// left to right, without overlaps; keeps the tail that could start one.
    fn scan(&mut self, data: &[u8], out: &mut BytesMut) {
        let len = self.finder.needle().len();
        let mut at = 0;
        for found in self.finder.find_iter(data) {
            out.put_slice(&data[at..found]);
            out.put_slice(&self.to);
            at = found + len;
        }
        let keep_from = data.len().saturating_sub(len - 1).max(at);
        out.put_slice(&data[at..keep_from]);
        self.carry.put_slice(&data[keep_from..]);
    }

    fn feed(&mut self, piece: &[u8], out: &mut BytesMut) {
        if self.carry.is_empty() {
            return self.scan(piece, out);
        }
        let mut data = std::mem::take(&mut self.carry);
        data.put_slice(piece);
        self.scan(&data, out);
        // The buffer's room is kept for the next carry.
        if self.carry.is_empty() {
            data.clear();
            self.carry = data;
        }
    }
}

/// Replacements applied in order, each to what the one before produced (as a series of
/// `find-and-replace` policies would).
#[derive(Debug, Clone, Default)]
pub struct Replacer {
    stages: Vec<Stage>,
    /// What each stage but the last produced from the current piece.
    between: Vec<BytesMut>,
}

impl Replacer {
    /// `pairs` of (from, to); an empty `from` matches nothing and is skipped.
    pub fn new(pairs: &[(Bytes, Bytes)]) -> Replacer {
        let stages: Vec<Stage> = pairs
            .iter()
            .filter(|(from, _)| !from.is_empty())
            .map(|(from, to)| Stage {
                finder: Finder::new(from.as_ref()).into_owned(),
                to: to.clone(),
                carry: BytesMut::new(),
            })
            .collect();
        let between = (1..stages.len()).map(|_| BytesMut::new()).collect();
        Replacer { stages, between }
    }

    /// Whether there is nothing to replace.
    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    /// Bytes held back between pieces at most: the longest `from`, less one, per stage.
    pub fn most_held(&self) -> usize {
        self.stages.iter().map(|s| s.finder.needle().len() - 1).sum()
    }

    /// The next piece of the body: what can be written now is appended to `out`.
    pub fn feed(&mut self, piece: &[u8], out: &mut BytesMut) {
        self.run(piece, out, false);
    }

    /// The body is over: what was held back goes out.
    pub fn finish(&mut self, out: &mut BytesMut) {
        self.run(&[], out, true);
    }

    fn run(&mut self, piece: &[u8], out: &mut BytesMut, last: bool) {
        let n = self.stages.len();
        if n == 0 {
            out.put_slice(piece);
            return;
        }
        let mut input = BytesMut::new();
        for i in 0..n {
            let sink = if i + 1 == n { &mut *out } else { &mut self.between[i] };
            let source: &[u8] = if i == 0 { piece } else { &input };
            self.stages[i].feed(source, sink);
            if last {
                // Nothing follows: what could have started a match is plain text after all.
                let rest = std::mem::take(&mut self.stages[i].carry);
                sink.put_slice(&rest);
            }
            if i + 1 < n {
                // This stage's output is the next one's input; its buffer is reused.
                let produced = std::mem::take(&mut self.between[i]);
                input.clear();
                self.between[i] = std::mem::replace(&mut input, produced);
            }
        }
    }
}

/// The same replacements on a whole body at once, by the plain definition: for checking the
/// streaming form.
pub fn replace_all(body: &[u8], pairs: &[(Bytes, Bytes)]) -> Vec<u8> {
    let mut text = body.to_vec();
    for (from, to) in pairs.iter().filter(|(f, _)| !f.is_empty()) {
        let mut out = Vec::with_capacity(text.len());
        let mut i = 0;
        while i < text.len() {
            if text[i..].starts_with(from) {
                out.extend_from_slice(to);
                i += from.len();
            } else {
                out.push(text[i]);
                i += 1;
            }
        }
        text = out;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Vec<(Bytes, Bytes)> {
        p.iter()
            .map(|(a, b)| (Bytes::copy_from_slice(a.as_bytes()), Bytes::copy_from_slice(b.as_bytes())))
            .collect()
    }

    fn streamed(body: &[u8], cuts: &[usize], pairs: &[(Bytes, Bytes)]) -> Vec<u8> {
        let mut r = Replacer::new(pairs);
        let mut out = BytesMut::new();
        let mut at = 0;
        for &cut in cuts {
            r.feed(&body[at..cut], &mut out);
            at = cut;
        }
        r.feed(&body[at..], &mut out);
        r.finish(&mut out);
        out.to_vec()
    }

    #[test]
    fn a_match_split_at_every_point_is_found() {
        let p = pairs(&[("http://backend.internal:8080", "https://api.example.com")]);
        let body = b"see http://backend.internal:8080/items and http://backend.internal:8080/x, http://backend.internal:808";
        let want = replace_all(body, &p);
        assert_eq!(
            want,
            b"see https://api.example.com/items and https://api.example.com/x, http://backend.internal:808"
                .to_vec()
        );
        for a in 0..=body.len() {
            for b in a..=body.len() {
                assert_eq!(streamed(body, &[a, b], &p), want, "cut at {a} and {b}");
            }
        }
        // One byte at a time.
        let cuts: Vec<usize> = (1..body.len()).collect();
        assert_eq!(streamed(body, &cuts, &p), want);
    }

    #[test]
    fn replacements_chain_in_order_and_do_not_overlap() {
        let p = pairs(&[("aa", "a"), ("ab", "X"), ("", "never")]);
        let body = b"aaab aaaab";
        let want = replace_all(body, &p);
        assert_eq!(want, b"aX aX".to_vec(), "aaab -> aab -> aX; aaaab -> aab -> aX");
        for cut in 0..=body.len() {
            assert_eq!(streamed(body, &[cut], &p), want, "cut at {cut}");
        }
        let r = Replacer::new(&p);
        assert_eq!(r.most_held(), 2);
        assert!(Replacer::new(&pairs(&[("", "x")])).is_empty());
    }

    #[test]
    fn what_is_held_back_stays_bounded() {
        let p = pairs(&[("needle-that-never-comes", "x")]);
        let mut r = Replacer::new(&p);
        let mut out = BytesMut::new();
        let piece = vec![b'n'; 16 * 1024];
        for _ in 0..64 {
            r.feed(&piece, &mut out);
            assert!(r.stages[0].carry.len() < 23);
            out.clear();
        }
    }
}
