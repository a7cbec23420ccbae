//! The chunked transfer coding (RFC 9112 §7.1), decoded strictly and re-emitted canonically.
//!
//! The proxy never forwards a chunked body byte for byte: it validates every chunk line and
//! writes `{size:x}\r\n{data}\r\n` itself, dropping chunk extensions and trailer fields. A body
//! that two parsers could read two ways therefore never leaves the proxy.

use std::fmt;

use bytes::{BufMut, BytesMut};

/// Longest chunk-size line accepted, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted (it is read and dropped).
const MAX_TRAILERS: usize = 16 * 1024;

/// What the decoder writes to its output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedOutput {
    /// Canonical chunked coding: for a peer that speaks HTTP/1.1.
    Reencode,
    /// The payload alone: for an HTTP/1.0 peer, with the end of the body marked by closing.
    DataOnly,
}

/// Progress after a call to [`ChunkedDecoder::decode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// All input was consumed; the body goes on.
    NeedMore,
    /// The last chunk and trailer section were read; input after them was left in place.
    Done,
}

/// A chunked body that breaks RFC 9112 §7.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedError(pub &'static str);

impl fmt::Display for ChunkedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid chunked body: {}", self.0)
    }
}

impl std::error::Error for ChunkedError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading hex digits of the chunk size.
    Size,
    /// Whitespace after the size: only `;` may follow (BWS before a chunk-ext).
    SizeWs,
    /// After `;`: optional whitespace, then an extension name.
    ExtNameStart,
    ExtName,
    /// After a name or a value: whitespace, then `;`, `=` (after a name only) or CR.
    ExtAfterName,
    ExtAfterValue,
    /// After `=`: optional whitespace, then a token or a quoted string.
    ExtValueStart,
    ExtValueToken,
    ExtValueQuoted,
    ExtValueEscape,
    /// CR seen at the end of a chunk line.
    SizeLf,
    Data,
    DataCr,
    DataLf,
    /// Start of a trailer line (an empty one ends the body).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// Sans-IO decoder of one chunked body.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    output: ChunkedOutput,
    size: u64,
    digits: u32,
    line_len: usize,
    trailer_len: usize,
    /// Data bytes the chunk sizes read so far announce (saturating).
    announced: u64,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_qdtext(b: u8) -> bool {
    b == b'\t'
        || b == b' '
        || b == 0x21
        || (0x23..=0x5b).contains(&b)
        || (0x5d..=0x7e).contains(&b)
        || b >= 0x80
}

fn is_field_vchar(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

impl ChunkedDecoder {
    pub fn new(output: ChunkedOutput) -> Self {
        ChunkedDecoder {
            state: State::Size,
            output,
            size: 0,
            digits: 0,
            line_len: 0,
            trailer_len: 0,
            announced: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The body's length as announced by the chunk sizes read so far: known as soon as a chunk's
    /// size line is, before its data arrives (for a body size limit).
    pub fn announced_len(&self) -> u64 {
        self.announced
    }

    /// Consumes what it can of `src`, appending the decoded (or re-encoded) body to `out`.
    ///
    /// On `Done`, bytes after the body stay in `src` (a pipelined request, say).
    pub fn decode(&mut self, src: &mut BytesMut, out: &mut BytesMut) -> Result<Decoded, ChunkedError> {
        let mut i = 0;
        let result = self.run(src, &mut i, out);
        let _ = src.split_to(i);
        result
    }

    fn run(
        &mut self,
        src: &mut BytesMut,
        i: &mut usize,
        out: &mut BytesMut,
    ) -> Result<Decoded, ChunkedError> {
        while *i < src.len() {
            if self.state == State::Data {
                let n = (src.len() - *i).min(usize::try_from(self.size).unwrap_or(usize::MAX));
                self.emit_data(&src[*i..*i + n], out);
                *i += n;
                self.size -= n as u64;
                if self.size == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            let b = src[*i];
            *i += 1;
            self.step(b, out)?;
            if self.state == State::Done {
                return Ok(Decoded::Done);
            }
        }
        Ok(if self.state == State::Done { Decoded::Done } else { Decoded::NeedMore })
    }

    fn emit_data(&self, data: &[u8], out: &mut BytesMut) {
        if self.output == ChunkedOutput::Reencode {
            write_chunk_header(out, data.len());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        } else {
            out.extend_from_slice(data);
        }
    }

    fn line_byte(&mut self) -> Result<(), ChunkedError> {
        self.line_len += 1;
        if self.line_len > MAX_CHUNK_LINE {
            return Err(ChunkedError("chunk line too long"));
        }
        Ok(())
    }

    fn step(&mut self, b: u8, out: &mut BytesMut) -> Result<(), ChunkedError> {
        use State::*;
        match self.state {
            Size | SizeWs | ExtNameStart | ExtName | ExtAfterName | ExtAfterValue | ExtValueStart
            | ExtValueToken | ExtValueQuoted | ExtValueEscape => self.line_byte()?,
            TrailerStart | TrailerName | TrailerValue | TrailerLf | EndLf => {
                self.trailer_len += 1;
                if self.trailer_len > MAX_TRAILERS {
                    return Err(ChunkedError("trailer section too large"));
                }
            }
            _ => {}
        }
        self.state = match (self.state, b) {
            (Size, b) if b.is_ascii_hexdigit() => {
                let digit = (b as char).to_digit(16).unwrap_or(0);
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(u64::from(digit)))
                    .ok_or(ChunkedError("chunk size overflow"))?;
                self.digits += 1;
                Size
            }
            (Size, b'\r') if self.digits > 0 => SizeLf,
            (Size, b';') if self.digits > 0 => ExtNameStart,
            (Size, b' ' | b'\t') if self.digits > 0 => SizeWs,
            (Size, _) => return Err(ChunkedError("invalid chunk size")),
            (SizeWs, b' ' | b'\t') => SizeWs,
            (SizeWs, b';') => ExtNameStart,
            (SizeWs, _) => return Err(ChunkedError("whitespace after chunk size")),
            (ExtNameStart, b' ' | b'\t') => ExtNameStart,
            (ExtNameStart | ExtName, b) if is_tchar(b) => ExtName,
            (ExtNameStart, _) => return Err(ChunkedError("missing chunk extension name")),
            (ExtName | ExtAfterName, b' ' | b'\t') => ExtAfterName,
            (ExtName | ExtAfterName | ExtValueToken | ExtAfterValue, b';') => ExtNameStart,
            (ExtName | ExtAfterName, b'=') => ExtValueStart,
            (ExtName | ExtAfterName | ExtValueToken | ExtAfterValue, b'\r') => SizeLf,
            (ExtName | ExtAfterName, _) => return Err(ChunkedError("invalid chunk extension")),
            (ExtValueStart, b' ' | b'\t') => ExtValueStart,
            (ExtValueStart, b'"') => ExtValueQuoted,
            (ExtValueStart | ExtValueToken, b) if is_tchar(b) => ExtValueToken,
            (ExtValueStart, _) => return Err(ChunkedError("missing chunk extension value")),
            (ExtValueToken | ExtAfterValue, b' ' | b'\t') => ExtAfterValue,
            (ExtValueToken | ExtAfterValue, _) => return Err(ChunkedError("invalid chunk extension value")),
            (ExtValueQuoted, b'"') => ExtAfterValue,
            (ExtValueQuoted, b'\\') => ExtValueEscape,
            (ExtValueQuoted, b) if is_qdtext(b) => ExtValueQuoted,
            (ExtValueQuoted, _) => return Err(ChunkedError("invalid quoted chunk extension")),
            (ExtValueEscape, b) if is_field_vchar(b) => ExtValueQuoted,
            (ExtValueEscape, _) => return Err(ChunkedError("invalid escape in chunk extension")),
            (SizeLf, b'\n') => {
                self.line_len = 0;
                self.digits = 0;
                self.announced = self.announced.saturating_add(self.size);
                if self.size == 0 { TrailerStart } else { Data }
            }
            (SizeLf, _) => return Err(ChunkedError("chunk line not ended by CRLF")),
            (DataCr, b'\r') => DataLf,
            (DataCr, _) => return Err(ChunkedError("chunk data not followed by CRLF")),
            (DataLf, b'\n') => Size,
            (DataLf, _) => return Err(ChunkedError("chunk data not followed by CRLF")),
            (TrailerStart, b'\r') => EndLf,
            (TrailerStart | TrailerName, b) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerStart | TrailerName, _) => return Err(ChunkedError("invalid trailer field name")),
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, b) if is_field_vchar(b) => TrailerValue,
            (TrailerValue, _) => return Err(ChunkedError("invalid trailer field value")),
            (TrailerLf, b'\n') => TrailerStart,
            (TrailerLf, _) => return Err(ChunkedError("trailer line not ended by CRLF")),
            (EndLf, b'\n') => {
                if self.output == ChunkedOutput::Reencode {
                    out.extend_from_slice(b"0\r\n\r\n");
                }
                Done
            }
            (EndLf, _) => return Err(ChunkedError("body not ended by CRLF")),
            (Data | Done, _) => return Err(ChunkedError("unexpected state")),
        };
        Ok(())
    }
}

/// Writes a chunk-size line for `len` bytes of data.
pub fn write_chunk_header(out: &mut BytesMut, len: usize) {
    let mut digits = [0u8; 16];
    let mut n = len;
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.reserve(digits.len() - at + 2);
    out.put_slice(&digits[at..]);
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], output: ChunkedOutput) -> Result<(Vec<u8>, Vec<u8>), ChunkedError> {
        let mut d = ChunkedDecoder::new(output);
        let mut src = BytesMut::from(input);
        let mut out = BytesMut::new();
        match d.decode(&mut src, &mut out)? {
            Decoded::Done => Ok((out.to_vec(), src.to_vec())),
            Decoded::NeedMore => Err(ChunkedError("incomplete")),
        }
    }

    #[test]
    fn decodes_and_reencodes() {
        let (out, rest) = decode_all(
            b"5;a=b;c=\"x\\\"y\"\r\nhello\r\n6\r\n world\r\n000\r\nX-T: 1\r\n\r\nNEXT",
            ChunkedOutput::Reencode,
        )
        .expect("valid");
        assert_eq!(out, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
        assert_eq!(rest, b"NEXT");
        let (out, _) = decode_all(b"A\r\n0123456789\r\n0\r\n\r\n", ChunkedOutput::DataOnly).expect("valid");
        assert_eq!(out, b"0123456789");
    }

    #[test]
    fn byte_at_a_time_matches_whole() {
        let input = b"1a\r\nabcdefghijklmnopqrstuvwxyz\r\n3 ;x\r\nabc\r\n0\r\n\r\n";
        let mut d = ChunkedDecoder::new(ChunkedOutput::Reencode);
        let mut out = BytesMut::new();
        let mut done = false;
        for &b in input.iter() {
            let mut src = BytesMut::from(&[b][..]);
            done = d.decode(&mut src, &mut out).expect("valid") == Decoded::Done;
        }
        assert!(done);
        let body: Vec<u8> = out.to_vec();
        let (whole, _) = decode_all(input, ChunkedOutput::Reencode).expect("valid");
        let strip = |v: &[u8]| decode_all(v, ChunkedOutput::DataOnly).expect("valid").0;
        assert_eq!(strip(&body), strip(&whole));
    }

    #[test]
    fn rejects_invalid_bodies() {
        let bad: [&[u8]; 14] = [
            b"x\r\n",
            b"\r\n",
            b"a \r\n0123456789\r\n0\r\n\r\n",
            b"2 erfrf\r\nab\r\n0\r\n\r\n",
            b"2;\r\nab\r\n0\r\n\r\n",
            b"5;a=\"abc\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\r;x\r\nhello\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"3\r\nfoo\r\n\r\n",
            b"ffffffffffffffffff\r\n",
            b"-1\r\n",
            b"0x5\r\n",
            b"0\r\nBad Trailer: x\r\n\r\n",
        ];
        for input in bad {
            assert!(
                decode_all(input, ChunkedOutput::Reencode).is_err(),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn oversized_chunk_lines_and_trailers_are_refused() {
        let mut long_line = b"5;".to_vec();
        long_line.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE));
        long_line.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(
            decode_all(&long_line, ChunkedOutput::Reencode).err(),
            Some(ChunkedError("chunk line too long"))
        );
        let mut trailers = b"0\r\n".to_vec();
        for i in 0..2000 {
            trailers.extend_from_slice(format!("X-T{i}: vvvvvvvvvv\r\n").as_bytes());
        }
        trailers.extend_from_slice(b"\r\n");
        assert_eq!(
            decode_all(&trailers, ChunkedOutput::Reencode).err(),
            Some(ChunkedError("trailer section too large"))
        );
    }

    #[test]
    fn chunk_header_hex() {
        let mut out = BytesMut::new();
        write_chunk_header(&mut out, 0x1f2e);
        assert_eq!(&out[..], b"1f2e\r\n");
    }
}
