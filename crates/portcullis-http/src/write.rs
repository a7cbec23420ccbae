//! Serialising heads, and the proxy's own responses.

use bytes::{BufMut, BytesMut};

use crate::head::Version;

pub use crate::chunked::write_chunk_header as chunk_header;

/// `METHOD target HTTP/1.1\r\n`.
pub fn request_line(out: &mut BytesMut, method: &[u8], target: &[u8]) {
    out.reserve(method.len() + target.len() + 12);
    out.put_slice(method);
    out.put_u8(b' ');
    out.put_slice(target);
    out.put_slice(b" HTTP/1.1\r\n");
}

/// `HTTP/1.x status reason\r\n`.
pub fn status_line(out: &mut BytesMut, version: Version, status: u16, reason: &[u8]) {
    out.reserve(reason.len() + 15);
    out.put_slice(version.as_bytes());
    out.put_u8(b' ');
    decimal(out, u64::from(status));
    out.put_u8(b' ');
    out.put_slice(reason);
    out.put_slice(b"\r\n");
}

/// `name: value\r\n`.
pub fn header(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.reserve(name.len() + value.len() + 4);
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// `Content-Length: n\r\n`.
pub fn content_length(out: &mut BytesMut, n: u64) {
    out.put_slice(b"Content-Length: ");
    decimal(out, n);
    out.put_slice(b"\r\n");
}

/// The empty line that ends a head.
pub fn end_head(out: &mut BytesMut) {
    out.put_slice(b"\r\n");
}

/// The decimal digits of `n`: they are `digits[at..]` of the answer `(digits, at)`, with
/// zeros before them.
pub fn decimal_digits(mut n: u64) -> ([u8; 20], usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    // Two digits per division.
    while n >= 100 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if n >= 10 {
        let pair = n as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + n as u8;
    }
    (digits, at)
}

/// `00`, `01`, … `99`: the two digits of `n < 100` are `DIGIT_PAIRS[2 * n..2 * n + 2]`.
pub static DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        pairs[2 * i] = b'0' + (i / 10) as u8;
        pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    pairs
};

/// Appends `n` in decimal.
#[inline(always)]
pub fn decimal(out: &mut impl BufMut, n: u64) {
    decimal_padded(out, n, 1);
}

/// Appends `n` in decimal, at least `width` digits (zero-padded; at most 20). Most numbers
/// written (a status, an octet, a port, milliseconds, a length) are small: they come straight
/// from the pairs table, without the general loop and its buffer; inlined, the match then comes
/// down to a branch or two.
#[inline(always)]
pub fn decimal_padded(out: &mut impl BufMut, n: u64, width: usize) {
    let pair = |n: usize| &DIGIT_PAIRS[2 * n..2 * n + 2];
    match n {
        0..10 if width <= 1 => out.put_u8(b'0' + n as u8),
        0..100 if width <= 2 => {
            if n >= 10 || width == 2 {
                out.put_slice(pair(n as usize));
            } else {
                out.put_u8(b'0' + n as u8);
            }
        }
        // From here on, n has at least `width` digits, or is zero-padded to exactly 3.
        0..1000 if width <= 3 => {
            out.put_u8(b'0' + (n / 100) as u8);
            out.put_slice(pair((n % 100) as usize));
        }
        1000..10_000 if width <= 4 => {
            out.put_slice(pair((n / 100) as usize));
            out.put_slice(pair((n % 100) as usize));
        }
        10_000..100_000 if width <= 5 => {
            out.put_u8(b'0' + (n / 10_000) as u8);
            out.put_slice(pair((n % 10_000 / 100) as usize));
            out.put_slice(pair((n % 100) as usize));
        }
        _ => {
            let (digits, at) = decimal_digits(n);
            out.put_slice(&digits[at.min(digits.len() - width.min(digits.len()))..]);
        }
    }
}

/// The canonical reason phrase of a status code (the IANA HTTP Status Code Registry, RFC 9110
/// §15); a code without a registered phrase gets the phrase of its class.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        102 => "Processing",
        103 => "Early Hints",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        207 => "Multi-Status",
        208 => "Already Reported",
        226 => "IM Used",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        305 => "Use Proxy",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        407 => "Proxy Authentication Required",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        423 => "Locked",
        424 => "Failed Dependency",
        425 => "Too Early",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        451 => "Unavailable For Legal Reasons",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        506 => "Variant Also Negotiates",
        507 => "Insufficient Storage",
        508 => "Loop Detected",
        511 => "Network Authentication Required",
        _ => match status / 100 {
            1 => "Informational",
            2 => "Success",
            3 => "Redirection",
            4 => "Client Error",
            _ => "Server Error",
        },
    }
}

/// Appends `s` as the inside of a JSON string.
pub fn json_escaped(out: &mut BytesMut, s: &str) {
    json_escaped_bytes(out, s.as_bytes());
}

/// Whether `v` is printable ASCII without `"` or `\`: what a JSON string holds as it is. Eight
/// bytes at a time (most values that go into logs are, and are checked on every request).
#[inline]
pub fn json_plain(v: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // A byte of `x` is zero (exact as a whole: whether any byte is).
    let zero_in = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    // Bytes from 0x80 up, bytes under 0x20 (with none from 0x80 up, `w - 0x20..` borrows into
    // the high bit of exactly those), and `"`, `\`, DEL.
    let plain = |w: u64| {
        w & HIGH == 0
            && w.wrapping_sub(ONES * 0x20) & !w & HIGH == 0
            && !zero_in(w ^ (ONES * u64::from(b'"')))
            && !zero_in(w ^ (ONES * u64::from(b'\\')))
            && !zero_in(w ^ (ONES * 0x7f))
    };
    let Some(last) = v.last_chunk::<8>() else {
        return v.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
    };
    // Whole words, then the last eight bytes (overlapping the last whole word) for the rest.
    v.chunks_exact(8).all(|chunk| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        plain(u64::from_ne_bytes(word))
    }) && plain(u64::from_ne_bytes(*last))
}

/// Appends bytes from anywhere (a client's) as the inside of a JSON string: `"`, `\` and
/// control characters escaped, and what is not UTF-8 replaced by U+FFFD, so that the result is
/// always JSON and a value can never end the string it is in.
pub fn json_escaped_bytes(out: &mut impl BufMut, v: &[u8]) {
    for c in String::from_utf8_lossy(v).chars() {
        match c {
            '"' => out.put_slice(b"\\\""),
            '\\' => out.put_slice(b"\\\\"),
            '\n' => out.put_slice(b"\\n"),
            '\r' => out.put_slice(b"\\r"),
            '\t' => out.put_slice(b"\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                let v = c as usize;
                out.put_slice(b"\\u00");
                out.put_u8(HEX[v >> 4]);
                out.put_u8(HEX[v & 15]);
            }
            c => {
                let mut tmp = [0u8; 4];
                out.put_slice(c.encode_utf8(&mut tmp).as_bytes());
            }
        }
    }
}

/// A complete response generated by the proxy:
/// `{"statusCode":403,"message":"Invalid client certificate"}` with its head.
///
/// `close` adds `Connection: close`; the caller then closes after writing. `head_only` leaves
/// the body out (the answer to a HEAD request), `Content-Length` still saying what it would be.
pub fn json_response(
    out: &mut BytesMut,
    status: u16,
    message: &str,
    connection: Connection,
    head_only: bool,
) {
    let mut body = BytesMut::with_capacity(48 + message.len());
    body.put_slice(b"{\"statusCode\":");
    decimal(&mut body, u64::from(status));
    body.put_slice(b",\"message\":\"");
    json_escaped(&mut body, message);
    body.put_slice(b"\"}");
    status_line(out, Version::Http11, status, reason_phrase(status).as_bytes());
    date(out);
    out.put_slice(b"Content-Type: application/json\r\n");
    content_length(out, body.len() as u64);
    connection.write(out);
    end_head(out);
    if !head_only {
        out.put_slice(&body);
    }
}

/// What a response says of the connection after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// HTTP/1.1 and staying open: nothing to say.
    Default,
    /// `Connection: close`.
    Close,
    /// `Connection: keep-alive`, which an HTTP/1.0 client needs to hear to keep the connection.
    KeepAlive,
}

impl Connection {
    /// For a response to a client of `http10` that the proxy will (`keep`) or will not keep.
    pub fn for_client(keep: bool, http10: bool) -> Connection {
        match (keep, http10) {
            (false, _) => Connection::Close,
            (true, true) => Connection::KeepAlive,
            (true, false) => Connection::Default,
        }
    }

    /// Writes the field, if any.
    pub fn write(self, out: &mut BytesMut) {
        match self {
            Connection::Default => {}
            Connection::Close => header(out, b"Connection", b"close"),
            Connection::KeepAlive => header(out, b"Connection", b"keep-alive"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_error_response() {
        let mut out = BytesMut::new();
        json_response(&mut out, 403, "Invalid \"client\" certificate", Connection::Close, false);
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        assert!(text.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"));
        assert!(
            text.ends_with("\r\n\r\n{\"statusCode\":403,\"message\":\"Invalid \\\"client\\\" certificate\"}")
        );
        let body_len = text.split("\r\n\r\n").nth(1).map(str::len).unwrap_or(0);
        assert!(text.contains(&format!("Content-Length: {body_len}\r\n")));
    }

    #[test]
    fn head_only_responses_have_no_body() {
        let mut out = BytesMut::new();
        json_response(&mut out, 404, "Resource not found", Connection::Default, true);
        let text = String::from_utf8(out.to_vec()).expect("utf8");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        assert!(text.contains("Content-Length: 49\r\n"), "{text}");
    }

    #[test]
    fn plain_json_bytes_eight_at_a_time() {
        let slow = |v: &[u8]| v.iter().all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
        let base = b"GET /items/42?x=1 HTTP".to_vec();
        assert!(json_plain(&base) && json_plain(b"") && json_plain(b"~ 0123456789abcdef"));
        // Every byte value at every position of values of every length up to three words: in
        // whole words, in the tail, and in values shorter than a word.
        for len in 0..=base.len() {
            for at in 0..len {
                for b in 0..=255u8 {
                    let mut v = base[..len].to_vec();
                    v[at] = b;
                    assert_eq!(json_plain(&v), slow(&v), "byte {b:#04x} at {at} of {len}");
                }
            }
        }
    }

    #[test]
    fn zero_padded_decimals_as_the_formatter_writes_them() {
        let mut out: Vec<u8> = Vec::new();
        // Every width, across the shortcuts' edges.
        for n in (0..=1200).chain([9999, 10_000, 65_535, 99_999, 100_000, 1 << 40, u64::MAX]) {
            for width in 1..=6 {
                out.clear();
                decimal_padded(&mut out, n, width);
                assert_eq!(String::from_utf8_lossy(&out), format!("{n:0width$}"), "{n} width {width}");
            }
        }
    }

    #[test]
    fn decimals() {
        for n in [0u64, 7, 9, 10, 99, 100, 101, 999, 1000, 12345, 1234567890, u64::MAX] {
            let mut out = BytesMut::new();
            decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
        }
    }
}

/// The civil (proleptic Gregorian) date of a day count since 1970-01-01: (year, month 1-12,
/// day 1-31), by Howard Hinnant's era-based algorithm.
pub fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month as u32, day as u32)
}

/// An IMF-fixdate (RFC 9110 §5.6.7) for a time in seconds since the Unix epoch:
/// `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(unix: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] =
        [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
    let days = unix / 86_400;
    let secs = unix % 86_400;
    let (year, month, day) = civil_date(days as i64);
    let year = year.clamp(0, 9999) as u64;
    let mut d = [0u8; 29];
    let two = |v: u64| [b'0' + (v / 10 % 10) as u8, b'0' + (v % 10) as u8];
    d[..3].copy_from_slice(DAYS[(days % 7) as usize]);
    d[3..5].copy_from_slice(b", ");
    d[5..7].copy_from_slice(&two(day as u64));
    d[7] = b' ';
    d[8..11].copy_from_slice(MONTHS[(month - 1) as usize]);
    d[11] = b' ';
    d[12..14].copy_from_slice(&two(year / 100));
    d[14..16].copy_from_slice(&two(year % 100));
    d[16] = b' ';
    d[17..19].copy_from_slice(&two(secs / 3600));
    d[19] = b':';
    d[20..22].copy_from_slice(&two(secs / 60 % 60));
    d[22] = b':';
    d[23..25].copy_from_slice(&two(secs % 60));
    d[25..29].copy_from_slice(b" GMT");
    d
}

/// `Date: <now>\r\n`, formatted at most once a second per thread.
pub fn date(out: &mut BytesMut) {
    use std::cell::Cell;
    thread_local! {
        static CACHE: Cell<(u64, [u8; 29])> = const { Cell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let text = CACHE.with(|c| {
        let (at, text) = c.get();
        if at == now {
            return text;
        }
        let text = http_date(now);
        c.set((now, text));
        text
    });
    out.put_slice(b"Date: ");
    out.put_slice(&text);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod date_tests {
    use super::http_date;

    #[test]
    fn imf_fixdates() {
        assert_eq!(&http_date(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http_date(951_782_400), b"Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(&http_date(1_798_761_599), b"Thu, 31 Dec 2026 23:59:59 GMT");
    }
}
