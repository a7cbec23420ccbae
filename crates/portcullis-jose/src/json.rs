//! A strict JSON reader (RFC 8259) for what tokens and identity providers send: duplicate member
//! names, lone surrogates, control characters in strings, leading zeros, trailing commas and
//! anything after the value are errors; nesting is bounded. Numbers keep their text, so that a
//! claim is written back exactly as it came and compared by value.

use std::fmt;

/// Deepest nesting of arrays and objects accepted (a token's claims are rarely deeper than 3).
pub const MAX_DEPTH: usize = 32;

/// A JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(Number),
    String(Box<str>),
    Array(Box<[Json]>),
    /// Members in the order they came; names are unique.
    Object(Box<[(Box<str>, Json)]>),
}

/// A number as written, and its value.
#[derive(Debug, Clone)]
pub struct Number {
    text: Box<str>,
    value: f64,
}

impl PartialEq for Number {
    fn eq(&self, other: &Number) -> bool {
        self.value == other.value
    }
}

impl Number {
    /// The number's value (large integers lose precision, as in any JSON reader that uses
    /// doubles; `as_i64` reads integers exactly).
    pub fn value(&self) -> f64 {
        self.value
    }

    /// The number as it was written.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The number as an integer, when it is written as one and fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.text.parse().ok()
    }
}

/// Why a text is not JSON; `at` is the byte offset where reading stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    pub at: usize,
    pub what: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.at, self.what)
    }
}

impl std::error::Error for JsonError {}

impl Json {
    /// Reads one JSON text (surrounding whitespace allowed, nothing else).
    pub fn parse(text: &[u8]) -> Result<Json, JsonError> {
        let mut r = Reader { text, at: 0 };
        r.skip_ws();
        let value = r.value(0)?;
        r.skip_ws();
        if r.at != text.len() {
            return Err(r.error("data after the value"));
        }
        Ok(value)
    }

    /// The member `name` of an object (`None` for other values or a missing member).
    pub fn get(&self, name: &str) -> Option<&Json> {
        match self {
            Json::Object(members) => members.iter().find(|(n, _)| &**n == name).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Json]> {
        match self {
            Json::Array(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&[(Box<str>, Json)]> {
        match self {
            Json::Object(members) => Some(members),
            _ => None,
        }
    }

    /// The JSON type's name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "boolean",
            Json::Number(_) => "number",
            Json::String(_) => "string",
            Json::Array(_) => "array",
            Json::Object(_) => "object",
        }
    }

    /// Writes the value in compact form (no whitespace; strings escaped as RFC 8259 requires,
    /// and every control character escaped, so the text is safe in a header value once it is
    /// ASCII-only — non-ASCII characters are written as `\u` escapes too).
    pub fn write_compact(&self, out: &mut Vec<u8>) {
        match self {
            Json::Null => out.extend_from_slice(b"null"),
            Json::Bool(true) => out.extend_from_slice(b"true"),
            Json::Bool(false) => out.extend_from_slice(b"false"),
            Json::Number(n) => out.extend_from_slice(n.text.as_bytes()),
            Json::String(s) => write_string(s, out),
            Json::Array(items) => {
                out.push(b'[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    item.write_compact(out);
                }
                out.push(b']');
            }
            Json::Object(members) => {
                out.push(b'{');
                for (i, (name, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_string(name, out);
                    out.push(b':');
                    value.write_compact(out);
                }
                out.push(b'}');
            }
        }
    }
}

/// A JSON string literal, ASCII only.
fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for c in s.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            ' '..='~' => out.push(c as u8),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.extend_from_slice(format!("\\u{unit:04x}").as_bytes());
                }
            }
        }
    }
    out.push(b'"');
}

struct Reader<'a> {
    text: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn error(&self, what: &'static str) -> JsonError {
        JsonError { at: self.at, what }
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.at += 1;
        }
    }

    fn literal(&mut self, word: &'static [u8], value: Json) -> Result<Json, JsonError> {
        if self.text[self.at..].starts_with(word) {
            self.at += word.len();
            Ok(value)
        } else {
            Err(self.error("unknown literal"))
        }
    }

    fn value(&mut self, depth: usize) -> Result<Json, JsonError> {
        match self.peek() {
            None => Err(self.error("unexpected end")),
            Some(b'{') => self.object(depth + 1),
            Some(b'[') => self.array(depth + 1),
            Some(b'"') => Ok(Json::String(self.string()?.into_boxed_str())),
            Some(b't') => self.literal(b"true", Json::Bool(true)),
            Some(b'f') => self.literal(b"false", Json::Bool(false)),
            Some(b'n') => self.literal(b"null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(_) => Err(self.error("unexpected character")),
        }
    }

    fn array(&mut self, depth: usize) -> Result<Json, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.at += 1;
        let mut items = Vec::new();
        self.skip_ws();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Ok(Json::Array(items.into_boxed_slice()));
        }
        loop {
            self.skip_ws();
            items.push(self.value(depth)?);
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {
                    self.at += 1;
                    return Ok(Json::Array(items.into_boxed_slice()));
                }
                _ => return Err(self.error("expected ',' or ']'")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<Json, JsonError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        self.at += 1;
        let mut members: Vec<(Box<str>, Json)> = Vec::new();
        // Past a few members, names are checked for repeats through a set (an object with many
        // members must not cost a quadratic scan).
        let mut names: Option<ahash::AHashSet<Box<str>>> = None;
        self.skip_ws();
        if self.peek() == Some(b'}') {
            self.at += 1;
            return Ok(Json::Object(members.into_boxed_slice()));
        }
        loop {
            self.skip_ws();
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a member name"));
            }
            let start = self.at;
            let name = self.string()?.into_boxed_str();
            let repeated = match &mut names {
                Some(set) => !set.insert(name.clone()),
                None => {
                    let repeated = members.iter().any(|(n, _)| *n == name);
                    if members.len() >= 16 {
                        names = Some(members.iter().map(|(n, _)| n.clone()).chain([name.clone()]).collect());
                    }
                    repeated
                }
            };
            if repeated {
                return Err(JsonError { at: start, what: "duplicate member name" });
            }
            self.skip_ws();
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':'"));
            }
            self.at += 1;
            self.skip_ws();
            let value = self.value(depth)?;
            members.push((name, value));
            self.skip_ws();
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Json::Object(members.into_boxed_slice()));
                }
                _ => return Err(self.error("expected ',' or '}'")),
            }
        }
    }

    fn hex4(&mut self) -> Result<u16, JsonError> {
        let digits = self.text.get(self.at..self.at + 4).ok_or_else(|| self.error("short \\u escape"))?;
        let mut v = 0u16;
        for &d in digits {
            let n = match d {
                b'0'..=b'9' => d - b'0',
                b'a'..=b'f' => d - b'a' + 10,
                b'A'..=b'F' => d - b'A' + 10,
                _ => return Err(self.error("bad \\u escape")),
            };
            v = v << 4 | u16::from(n);
        }
        self.at += 4;
        Ok(v)
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.at += 1; // the opening quote
        let mut out = String::new();
        loop {
            // A run of plain characters at once (validated as UTF-8 as a whole).
            let start = self.at;
            while let Some(b) = self.peek() {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.at += 1;
            }
            let run = std::str::from_utf8(&self.text[start..self.at])
                .map_err(|e| JsonError { at: start + e.valid_up_to(), what: "invalid UTF-8" })?;
            out.push_str(run);
            match self.peek() {
                None => return Err(self.error("unterminated string")),
                Some(b'"') => {
                    self.at += 1;
                    return Ok(out);
                }
                Some(b'\\') => {
                    self.at += 1;
                    let escape = self.peek().ok_or_else(|| self.error("unterminated string"))?;
                    self.at += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let unit = self.hex4()?;
                            let c = match unit {
                                0xD800..=0xDBFF => {
                                    if !self.text[self.at..].starts_with(b"\\u") {
                                        return Err(self.error("lone surrogate"));
                                    }
                                    self.at += 2;
                                    let low = self.hex4()?;
                                    if !(0xDC00..=0xDFFF).contains(&low) {
                                        return Err(self.error("lone surrogate"));
                                    }
                                    let code = 0x10000
                                        + ((u32::from(unit) - 0xD800) << 10)
                                        + (u32::from(low) - 0xDC00);
                                    char::from_u32(code).ok_or_else(|| self.error("lone surrogate"))?
                                }
                                0xDC00..=0xDFFF => return Err(self.error("lone surrogate")),
                                _ => char::from_u32(u32::from(unit))
                                    .ok_or_else(|| self.error("bad \\u escape"))?,
                            };
                            out.push(c);
                        }
                        _ => return Err(self.error("unknown escape")),
                    }
                }
                Some(_) => return Err(self.error("control character in a string")),
            }
        }
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.at += 1;
        }
        self.at - start
    }

    fn number(&mut self) -> Result<Json, JsonError> {
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => {
                self.at += 1;
                if matches!(self.peek(), Some(b'0'..=b'9')) {
                    return Err(self.error("leading zero"));
                }
            }
            Some(b'1'..=b'9') => {
                self.digits();
            }
            _ => return Err(self.error("expected a digit")),
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return Err(self.error("expected a digit after '.'"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.at += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return Err(self.error("expected a digit in the exponent"));
            }
        }
        // Only ASCII digits and signs were consumed.
        let text = std::str::from_utf8(&self.text[start..self.at]).map_err(|_| self.error("bad number"))?;
        let value: f64 = text.parse().map_err(|_| self.error("bad number"))?;
        Ok(Json::Number(Number { text: text.into(), value }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> Json {
        Json::parse(text.as_bytes()).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    fn bad(text: &[u8]) -> &'static str {
        match Json::parse(text) {
            Ok(v) => panic!("{:?} parsed as {v:?}", String::from_utf8_lossy(text)),
            Err(e) => e.what,
        }
    }

    #[test]
    fn values() {
        let v = ok(r#" {"a":[1,-2.5e3,true,false,null],"b":"x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00","c":{}} "#);
        assert_eq!(v.get("a").and_then(Json::as_array).map(<[Json]>::len), Some(5));
        assert_eq!(v.get("b").and_then(Json::as_str), Some("x\"\\/\u{8}\u{c}\n\r\t\u{e9}\u{1f600}"));
        let Some(Json::Number(n)) = v.get("a").and_then(Json::as_array).map(|a| a[1].clone()) else {
            panic!()
        };
        assert_eq!((n.value(), n.text(), n.as_i64()), (-2500.0, "-2.5e3", None));
        let mut out = Vec::new();
        v.write_compact(&mut out);
        assert_eq!(
            String::from_utf8(out).expect("ascii"),
            r#"{"a":[1,-2.5e3,true,false,null],"b":"x\"\\/\u0008\u000c\u000a\u000d\u0009\u00e9\ud83d\ude00","c":{}}"#
        );
        assert_eq!(ok("0"), ok("0.0"));
        assert_eq!(ok("[]"), Json::Array(Box::new([])));
    }

    #[test]
    fn refusals() {
        assert_eq!(bad(br#"{"a":1,"a":2}"#), "duplicate member name");
        let many: String = (0..40).map(|i| format!("\"k{i}\":0,")).collect();
        assert_eq!(bad(format!("{{{many}\"k39\":1}}").as_bytes()), "duplicate member name");
        assert_eq!(bad(br#""\ud800""#), "lone surrogate");
        assert_eq!(bad(br#""\udc00""#), "lone surrogate");
        assert_eq!(bad(br#""\ud800\u0041""#), "lone surrogate");
        assert_eq!(bad(b"\"a\x01\""), "control character in a string");
        assert_eq!(bad(b"\"\xff\""), "invalid UTF-8");
        assert_eq!(bad(b"01"), "leading zero");
        assert_eq!(bad(b"[1,]"), "unexpected character");
        assert_eq!(bad(b"{\"a\":1,}"), "expected a member name");
        assert_eq!(bad(b"1 2"), "data after the value");
        assert_eq!(bad(b"1."), "expected a digit after '.'");
        assert_eq!(bad(b"-"), "expected a digit");
        assert_eq!(bad(b"tru"), "unknown literal");
        assert_eq!(bad(b""), "unexpected end");
        assert_eq!(bad(b"\"\\x\""), "unknown escape");
        assert_eq!(bad(b"'a'"), "unexpected character");
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(bad(deep.as_bytes()), "nested too deeply");
        let fine = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        ok(&fine);
    }
}
