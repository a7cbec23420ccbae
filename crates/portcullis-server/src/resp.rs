//! RESP2 commands and replies for the Redis connection, on the `redis-protocol` codec.
//!
//! Every byte from Redis is treated as untrusted: a reply is first delimited here, with its
//! nesting and sizes bounded (the codec's decoder recurses into nested arrays with no bound, so
//! a hostile server could otherwise exhaust the worker's stack), then decoded by the codec.

use bytes::{Buf, BytesMut};
use redis_protocol::resp2::decode::decode;
use redis_protocol::resp2::encode::encode_borrowed;
use redis_protocol::resp2::types::{BorrowedFrame, OwnedFrame};

/// Deepest nesting of arrays accepted in a reply (the script answers a flat array).
const MAX_DEPTH: usize = 2;
/// Most elements in one reply (three per key of a batch, and then some).
const MAX_ELEMENTS: i64 = 1 << 20;
/// Largest bulk string accepted in a reply.
const MAX_BULK: i64 = 1 << 20;

/// Appends a command (an array of bulk strings) to `out`.
pub fn encode_command(out: &mut BytesMut, args: &[&[u8]]) {
    let frames: Vec<BorrowedFrame<'_>> = args.iter().map(|a| BorrowedFrame::BulkString(a)).collect();
    let frame = BorrowedFrame::Array(&frames);
    let start = out.len();
    out.resize(start + frame.encode_len(false), 0);
    // The buffer was sized by the codec itself: encoding cannot run out of room.
    let n = encode_borrowed(&mut out[start..], &frame, false).unwrap_or(0);
    out.truncate(start + n);
}

/// A reply, as far as the proxy cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK` and other simple strings.
    Simple(String),
    /// An error reply (`-NOSCRIPT …`).
    Error(String),
    Integer(i64),
    /// A flat array of integers (the script's answer).
    Integers(Vec<i64>),
    /// Anything else: bulk strings, nil, arrays of other things.
    Other,
}

/// Why the bytes from Redis cannot be a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

/// The line at `buf[at..]` without its CRLF, and where the next one starts; `None` while
/// incomplete.
fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, Malformed> {
    let rest = &buf[at.min(buf.len())..];
    match memchr_crlf(rest) {
        Some(end) => Ok(Some((&rest[..end], at + end + 2))),
        None if rest.len() > 64 * 1024 => Err(Malformed("a line longer than 64 KiB".to_owned())),
        None => Ok(None),
    }
}

fn memchr_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

fn number(text: &[u8], what: &str) -> Result<i64, Malformed> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse::<i64>().ok())
        .ok_or_else(|| Malformed(format!("{what} \"{}\" is not a number", String::from_utf8_lossy(text))))
}

/// The length of the first whole reply in `buf`, once it is all there; an error when it breaks
/// RESP2 or the bounds above.
pub fn reply_len(buf: &[u8]) -> Result<Option<usize>, Malformed> {
    // Elements still to read at each open level of arrays (the outer level: one reply).
    let mut open: Vec<i64> = vec![1];
    let mut at = 0;
    let mut elements = 0i64;
    while let Some(left) = open.last_mut() {
        if *left == 0 {
            open.pop();
            continue;
        }
        *left -= 1;
        let Some((l, next)) = line(buf, at)? else { return Ok(None) };
        at = next;
        let (&kind, rest) = l.split_first().ok_or_else(|| Malformed("an empty line".to_owned()))?;
        match kind {
            b'+' | b'-' => {}
            b':' => {
                number(rest, "an integer")?;
            }
            b'$' => {
                let n = number(rest, "a bulk string's length")?;
                if !(-1..=MAX_BULK).contains(&n) {
                    return Err(Malformed(format!("a bulk string of length {n}")));
                }
                if n >= 0 {
                    let end = at + n as usize;
                    if buf.len() < end + 2 {
                        return Ok(None);
                    }
                    if &buf[end..end + 2] != b"\r\n" {
                        return Err(Malformed("a bulk string longer than its length".to_owned()));
                    }
                    at = end + 2;
                }
            }
            b'*' => {
                let n = number(rest, "an array's length")?;
                if !(-1..=MAX_ELEMENTS).contains(&n) {
                    return Err(Malformed(format!("an array of {n} elements")));
                }
                elements += n.max(0);
                if elements > MAX_ELEMENTS {
                    return Err(Malformed(format!("more than {MAX_ELEMENTS} elements in one reply")));
                }
                if n > 0 {
                    if open.len() >= MAX_DEPTH {
                        return Err(Malformed("arrays nested too deep".to_owned()));
                    }
                    open.push(n);
                }
            }
            other => return Err(Malformed(format!("a reply of type {:?}", char::from(other)))),
        }
    }
    Ok(Some(at))
}

/// Takes the first whole reply off `buf`, if it is all there.
pub fn next_reply(buf: &mut BytesMut) -> Result<Option<Reply>, Malformed> {
    let Some(len) = reply_len(buf)? else { return Ok(None) };
    let frame = match decode(&buf[..len]) {
        Ok(Some((frame, used))) if used == len => frame,
        Ok(_) => return Err(Malformed("the reply's length is not what the codec read".to_owned())),
        Err(e) => return Err(Malformed(e.to_string())),
    };
    buf.advance(len);
    Ok(Some(match frame {
        OwnedFrame::SimpleString(s) => Reply::Simple(String::from_utf8_lossy(&s).into_owned()),
        OwnedFrame::Error(e) => Reply::Error(e),
        OwnedFrame::Integer(i) => Reply::Integer(i),
        OwnedFrame::Array(items) => {
            let ints: Option<Vec<i64>> =
                items.iter().map(|f| if let OwnedFrame::Integer(i) = f { Some(*i) } else { None }).collect();
            ints.map_or(Reply::Other, Reply::Integers)
        }
        _ => Reply::Other,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = BytesMut::new();
        encode_command(&mut out, &[b"EVALSHA", b"abc", b"0", b""]);
        assert_eq!(&out[..], b"*4\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n0\r\n$0\r\n\r\n");
    }

    #[test]
    fn replies_whole_partial_and_pipelined() {
        let mut buf = BytesMut::from(
            &b"+OK\r\n-NOSCRIPT No matching script\r\n*3\r\n:1\r\n:-2\r\n:3\r\n:7\r\n$3\r\nab"[..],
        );
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Simple("OK".into()))));
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Error("NOSCRIPT No matching script".into()))));
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Integers(vec![1, -2, 3]))));
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Integer(7))));
        assert_eq!(next_reply(&mut buf), Ok(None), "a bulk string still coming");
        buf.extend_from_slice(b"c\r\n*0\r\n$-1\r\n*-1\r\n*2\r\n$1\r\nx\r\n:1\r\n");
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Other)));
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Integers(vec![]))));
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Other)));
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Other)));
        assert_eq!(next_reply(&mut buf), Ok(Some(Reply::Other)), "a mixed array");
        assert!(buf.is_empty());
    }

    #[test]
    fn hostile_replies_are_refused_not_followed() {
        let deep = b"*1\r\n".repeat(100_000);
        for bad in [
            &deep[..],
            b"*1\r\n*1\r\n*1\r\n:1\r\n",
            b"$99999999999\r\n",
            b"$-2\r\n",
            b"*-5\r\n",
            b"*2000000\r\n",
            // Found by fuzzing: an array length that overflowed the count of elements.
            b"*8\r\n:7\r\n*9223372036854775807\r\n",
            b"*2\r\n*1048576\r\n",
            b":12x\r\n",
            b"$3\r\nabcd\r\n",
            b"%2\r\n",
            b"\r\n",
            b"_\r\n",
        ] {
            let mut buf = BytesMut::from(bad);
            assert!(
                next_reply(&mut buf).is_err(),
                "{:?}",
                String::from_utf8_lossy(&bad[..bad.len().min(40)])
            );
        }
        let mut long = BytesMut::from(&b"+"[..]);
        long.extend_from_slice(&[b'a'; 70 * 1024]);
        assert!(next_reply(&mut long).is_err(), "an endless line");
    }
}
