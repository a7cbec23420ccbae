//! Record batches (message format v2, the only one a broker has written since Kafka 0.11).
//!
//! - [`decode_batches`]: as a fetch returns them, read with checked arithmetic: a broker's bytes
//!   are refused with an error, never a panic, and what is kept is paid for by bytes of the
//!   input. A compressed batch is inflated through a bound ([`MOST_INFLATED`]), snappy's blocks
//!   no further than snappy can inflate: no length a broker claims is allocated up front.
//! - [`encode_batch`]: the producer's uncompressed batch, written straight from the messages it
//!   holds (the codec's encoder wants a record struct, two reference counts and a size pass per
//!   message). Compressed batches are the codec's.

use std::io::Read;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::Error;

/// Base offset and batch length: what tells where a batch ends.
const PREFIX: usize = 12;
/// A batch's length counts from the leader epoch to its last record: a header of 49 bytes.
const HEADER: usize = 49;
/// The most a compressed batch may inflate to.
pub const MOST_INFLATED: usize = 64 << 20;
/// The most a snappy block inflates: a 3-byte copy of 64 bytes, and its length's varint.
const SNAPPY_RATIO: usize = 22;
/// The head of a snappy stream in xerial's framing (the Java client's): magic, version, and the
/// version it is compatible with; then blocks, each after its length (u32).
const XERIAL: &[u8; 8] = b"\x82SNAPPY\x00";

/// The smallest record: seven one-byte fields (length, attributes, the two deltas, the key's and
/// value's lengths, the header count).
const SMALLEST_RECORD: usize = 7;

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub value: Option<Bytes>,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::Protocol(format!("record batch: {what}"))
}

/// A cursor over bytes that refuses to read past their end.
struct Reader(Bytes);

impl Reader {
    fn need(&self, n: usize, what: &str) -> Result<(), Error> {
        if self.0.len() < n {
            return Err(bad(format_args!("{what} cut short ({n} bytes needed, {} left)", self.0.len())));
        }
        Ok(())
    }

    fn take(&mut self, n: usize, what: &str) -> Result<Bytes, Error> {
        self.need(n, what)?;
        Ok(self.0.split_to(n))
    }

    fn i8(&mut self, what: &str) -> Result<i8, Error> {
        self.need(1, what)?;
        Ok(self.0.get_i8())
    }

    fn i16(&mut self, what: &str) -> Result<i16, Error> {
        self.need(2, what)?;
        Ok(self.0.get_i16())
    }

    fn i32(&mut self, what: &str) -> Result<i32, Error> {
        self.need(4, what)?;
        Ok(self.0.get_i32())
    }

    fn u32(&mut self, what: &str) -> Result<u32, Error> {
        self.need(4, what)?;
        Ok(self.0.get_u32())
    }

    fn i64(&mut self, what: &str) -> Result<i64, Error> {
        self.need(8, what)?;
        Ok(self.0.get_i64())
    }

    /// A zig-zag varint of at most `max_bytes` bytes (5 for an int, 10 for a long).
    fn zigzag(&mut self, max_bytes: u32, what: &str) -> Result<i64, Error> {
        let mut value = 0u64;
        for i in 0..max_bytes {
            self.need(1, what)?;
            let byte = self.0.get_u8();
            let bits = u64::from(byte & 0x7f);
            let shift = 7 * i;
            // The last byte may only carry what is left of the 64 bits.
            if shift == 63 && bits > 1 {
                return Err(bad(format_args!("{what} overflows a long")));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(((value >> 1) as i64) ^ -((value & 1) as i64));
            }
        }
        Err(bad(format_args!("{what} runs past {max_bytes} bytes")))
    }

    fn varint(&mut self, what: &str) -> Result<i32, Error> {
        let v = self.zigzag(5, what)?;
        i32::try_from(v).map_err(|_| bad(format_args!("{what} overflows an int")))
    }

    fn varlong(&mut self, what: &str) -> Result<i64, Error> {
        self.zigzag(10, what)
    }

    /// A length-prefixed field: -1 is null, below that is an error.
    fn nullable(&mut self, what: &str) -> Result<Option<Bytes>, Error> {
        match self.varint(what)? {
            -1 => Ok(None),
            n if n < -1 => Err(bad(format_args!("{what} has length {n}"))),
            n => self.take(n as usize, what).map(Some),
        }
    }
}

/// The records of the batches in `bytes`, the records of one partition's fetch, and the offset
/// after the last whole batch (none without one). A batch the broker cut at the size asked for
/// ends the list: it comes whole in the next fetch. Control batches (transaction markers) hold
/// no records of the topic and are skipped, but for the offset after them.
pub fn decode_batches(mut bytes: Bytes, partition: i32) -> Result<(Vec<Fetched>, Option<i64>), Error> {
    let mut out = Vec::new();
    let mut next = None;
    while bytes.len() >= PREFIX {
        let length = i32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let length = usize::try_from(length).map_err(|_| bad(format_args!("length {length}")))?;
        if length < HEADER {
            return Err(bad(format_args!("length {length} is shorter than a batch's header")));
        }
        if bytes.len() - PREFIX < length {
            break;
        }
        let mut batch = Reader(bytes.split_to(PREFIX + length));
        let base_offset = batch.i64("base offset")?;
        batch.i32("length")?;
        batch.i32("leader epoch")?;
        let magic = batch.i8("magic")?;
        if magic != 2 {
            return Err(bad(format_args!("message format v{magic} (only v2 is read)")));
        }
        let crc = batch.u32("crc")?;
        // The CRC-32C covers everything after it. (Fuzzing skips the check, to reach what
        // follows with bytes no checksum holds together.)
        let actual = crc32c::crc32c(&batch.0);
        if crc != actual && !cfg!(fuzzing) {
            return Err(bad(format_args!("crc {crc:#010x} where the bytes give {actual:#010x}")));
        }
        let attributes = batch.i16("attributes")?;
        let last_delta = batch.i32("last offset delta")?;
        let after =
            base_offset.checked_add(i64::from(last_delta) + 1).ok_or_else(|| bad("offset overflows"))?;
        next = Some(next.map_or(after, |n: i64| n.max(after)));
        let base_timestamp = batch.i64("base timestamp")?;
        let max_timestamp = batch.i64("max timestamp")?;
        batch.i64("producer id")?;
        batch.i16("producer epoch")?;
        batch.i32("base sequence")?;
        let count = batch.i32("record count")?;
        let count = usize::try_from(count).map_err(|_| bad(format_args!("record count {count}")))?;
        if attributes & (1 << 5) != 0 {
            continue;
        }
        // With log-append time the broker's time stamps every record of the batch.
        let log_append = attributes & (1 << 3) != 0;
        let batch_info = Batch { partition, base_offset, base_timestamp, max_timestamp, log_append, count };
        let body = match attributes & 0x7 {
            0 => batch.0,
            codec => inflate(codec, &batch.0, MOST_INFLATED)?,
        };
        batch_info.records(body, &mut out)?;
    }
    Ok((out, next))
}

/// A message as [`encode_batch`] takes it: time stamp (ms), key, value.
pub(crate) type Entry<'a> = (i64, Option<&'a [u8]>, &'a [u8]);

/// Writes `messages` (at least one) as one uncompressed batch at the end of `out`: offsets 0 to
/// n-1, no producer id and no sequence (no idempotence), create time.
pub(crate) fn encode_batch<'a, I>(out: &mut BytesMut, messages: I)
where
    I: Iterator<Item = Entry<'a>> + Clone,
{
    let (mut first, mut last, mut count) = (i64::MAX, i64::MIN, 0usize);
    for (t, _, _) in messages.clone() {
        (first, last, count) = (first.min(t), last.max(t), count + 1);
    }
    let start = out.len();
    out.put_i64(0);
    // The length and the CRC are written once the records are.
    out.put_i32(0);
    out.put_i32(-1);
    out.put_i8(2);
    out.put_u32(0);
    let covered = out.len();
    out.put_i16(0);
    out.put_i32(count as i32 - 1);
    out.put_i64(first);
    out.put_i64(last);
    out.put_i64(-1);
    out.put_i16(-1);
    out.put_i32(-1);
    out.put_i32(count as i32);
    for (offset, (t, key, value)) in messages.enumerate() {
        // Differences from the batch's earliest time stamp: the deltas are never negative.
        let delta = t.wrapping_sub(first);
        let key_len = key.map_or(-1, |k| k.len() as i64);
        let body = 1
            + zigzag_len(delta)
            + zigzag_len(offset as i64)
            + zigzag_len(key_len)
            + key.map_or(0, <[u8]>::len)
            + zigzag_len(value.len() as i64)
            + value.len()
            + 1;
        put_zigzag(out, body as i64);
        out.put_i8(0);
        put_zigzag(out, delta);
        put_zigzag(out, offset as i64);
        put_zigzag(out, key_len);
        if let Some(k) = key {
            out.put_slice(k);
        }
        put_zigzag(out, value.len() as i64);
        out.put_slice(value);
        // No headers.
        out.put_u8(0);
    }
    let length = (out.len() - start - PREFIX) as i32;
    out[start + 8..start + 12].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&out[covered..]);
    out[covered - 4..covered].copy_from_slice(&crc.to_be_bytes());
}

/// Bytes `n` takes as a zig-zag varint.
fn zigzag_len(n: i64) -> usize {
    let z = ((n << 1) ^ (n >> 63)) as u64;
    // 1 byte per 7 bits, at least one.
    (64 - (z | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_zigzag(out: &mut BytesMut, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.put_u8(z as u8 | 0x80);
        z >>= 7;
    }
    out.put_u8(z as u8);
}

/// A compressed batch's records, inflated by `codec` (gzip, snappy, lz4, zstd) up to `most`
/// bytes.
fn inflate(codec: i16, body: &[u8], most: usize) -> Result<Bytes, Error> {
    let bound = most as u64 + 1;
    let mut out = Vec::new();
    let read = |r: &mut dyn Read, out: &mut Vec<u8>| r.take(bound).read_to_end(out).map(drop);
    let (name, done) = match codec {
        1 => ("gzip", read(&mut flate2::read::GzDecoder::new(body), &mut out)),
        2 => return snappy(body, most),
        3 => ("lz4", lz4::Decoder::new(body).and_then(|mut d| read(&mut d, &mut out))),
        4 => {
            // Windows up to 8 MiB (a producer's default is 2 MiB at most): a frame cannot make
            // the decoder set aside the 128 MiB it would allow.
            let decoder = zstd::stream::read::Decoder::new(body).and_then(|mut d| {
                d.window_log_max(23)?;
                Ok(d)
            });
            ("zstd", decoder.and_then(|mut d| read(&mut d, &mut out)))
        }
        other => return Err(bad(format_args!("compression {other}"))),
    };
    done.map_err(|e| bad(format_args!("{name}: {e}")))?;
    if out.len() > most {
        return Err(bad(format_args!("{name}: inflates past {most} bytes")));
    }
    Ok(Bytes::from(out))
}

/// Snappy: raw, or in xerial's framing (as Kafka's clients write it). Each block's inflated
/// length is its own claim, believed only as far as snappy can inflate a block that long.
fn snappy(body: &[u8], most: usize) -> Result<Bytes, Error> {
    let block = |block: &[u8], out: &mut Vec<u8>| {
        let n = snap::raw::decompress_len(block).map_err(|e| bad(format_args!("snappy: {e}")))?;
        if n > block.len().saturating_mul(SNAPPY_RATIO) || out.len() + n > most {
            return Err(bad(format_args!("snappy: a block of {} bytes says it holds {n}", block.len())));
        }
        let start = out.len();
        out.resize(start + n, 0);
        snap::raw::Decoder::new()
            .decompress(block, &mut out[start..])
            .map_err(|e| bad(format_args!("snappy: {e}")))?;
        Ok(())
    };
    let mut out = Vec::new();
    if !body.starts_with(XERIAL) {
        block(body, &mut out)?;
        return Ok(Bytes::from(out));
    }
    let mut rest = body.get(16..).ok_or_else(|| bad("snappy: the stream's head cut short"))?;
    while let Some((length, after)) = rest.split_first_chunk::<4>() {
        let length = u32::from_be_bytes(*length) as usize;
        let (b, next) = after.split_at_checked(length).ok_or_else(|| bad("snappy: a block cut short"))?;
        block(b, &mut out)?;
        rest = next;
    }
    if !rest.is_empty() {
        return Err(bad("snappy: a block's length cut short"));
    }
    Ok(Bytes::from(out))
}

struct Batch {
    partition: i32,
    base_offset: i64,
    base_timestamp: i64,
    max_timestamp: i64,
    log_append: bool,
    count: usize,
}

impl Batch {
    fn records(&self, body: Bytes, out: &mut Vec<Fetched>) -> Result<(), Error> {
        // The count is the broker's word; only records whose bytes are there take room.
        out.reserve(self.count.min(body.len() / SMALLEST_RECORD));
        let mut body = Reader(body);
        for _ in 0..self.count {
            let length = body.varint("record length")?;
            let length = usize::try_from(length).map_err(|_| bad(format_args!("record length {length}")))?;
            let mut record = Reader(body.take(length, "record")?);
            record.i8("record attributes")?;
            let timestamp_delta = record.varlong("timestamp delta")?;
            let offset_delta = record.varint("offset delta")?;
            let key = record.nullable("key")?;
            let value = record.nullable("value")?;
            let headers = record.varint("header count")?;
            if headers < 0 {
                return Err(bad(format_args!("header count {headers}")));
            }
            for _ in 0..headers {
                match record.varint("header key")? {
                    n if n < 0 => return Err(bad(format_args!("header key has length {n}"))),
                    n => drop(record.take(n as usize, "header key")?),
                }
                record.nullable("header value")?;
            }
            if !record.0.is_empty() {
                return Err(bad(format_args!("{} bytes after a record's last header", record.0.len())));
            }
            let offset = self
                .base_offset
                .checked_add(i64::from(offset_delta))
                .ok_or_else(|| bad("offset overflows"))?;
            let timestamp_ms = if self.log_append {
                self.max_timestamp
            } else {
                self.base_timestamp.checked_add(timestamp_delta).ok_or_else(|| bad("timestamp overflows"))?
            };
            out.push(Fetched { partition: self.partition, offset, timestamp_ms, key, value });
        }
        if !body.0.is_empty() {
            return Err(bad(format_args!("{} bytes after the batch's {} records", body.0.len(), self.count)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions};

    use super::*;

    /// A record as the producer hands the codec its compressed batches, with two headers.
    fn record(offset: i64, key: Option<&'static [u8]>, value: &'static [u8]) -> Record {
        let mut headers = kafka_protocol::indexmap::IndexMap::new();
        headers.insert(StrBytes::from_static_str("h"), Some(Bytes::from_static(b"v")));
        headers.insert(StrBytes::from_static_str("empty"), None);
        let timestamp = 1_764_957_862_000 + offset;
        let value = Bytes::from_static(value);
        Record {
            headers,
            ..crate::producer::codec_record(offset, timestamp, key.map(Bytes::from_static), value)
        }
    }

    fn batch(compression: Compression, first: i64) -> BytesMut {
        let records = [
            record(first, Some(b"k"), b"one"),
            record(first + 1, None, b""),
            record(first + 2, None, b"three"),
        ];
        let mut out = BytesMut::new();
        RecordBatchEncoder::encode(&mut out, &records, &RecordEncodeOptions { version: 2, compression })
            .unwrap();
        out
    }

    #[test]
    fn batches_the_codec_writes_read_back_with_every_compression() {
        for compression in
            [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd]
        {
            let mut two = batch(compression, 40);
            two.extend_from_slice(&batch(compression, 43));
            let (read, next) = decode_batches(two.freeze(), 3).unwrap();
            assert_eq!(next, Some(46));
            let offsets: Vec<i64> = read.iter().map(|r| r.offset).collect();
            assert_eq!(offsets, [40, 41, 42, 43, 44, 45], "{compression:?}");
            assert!(read.iter().all(|r| r.partition == 3 && r.timestamp_ms == 1_764_957_862_000 + r.offset));
            assert_eq!(read[0].key.as_deref(), Some(&b"k"[..]));
            assert_eq!(read[1].key, None);
            assert_eq!(read[1].value.as_deref(), Some(&b""[..]));
            assert_eq!(read[5].value.as_deref(), Some(&b"three"[..]));
        }
    }

    #[test]
    fn the_producers_batches_are_the_codecs_byte_for_byte() {
        let messages: [Entry<'_>; 4] = [
            (1_764_957_862_005, Some(b"k"), b"one"),
            (1_764_957_862_000, None, b""),
            (1_764_957_862_009, Some(b""), &[b'x'; 300]),
            (1_764_957_862_001, Some(&[b'y'; 70]), b"four"),
        ];
        let records: Vec<Record> = messages
            .iter()
            .enumerate()
            .map(|(i, &(t, k, v))| {
                crate::producer::codec_record(
                    i as i64,
                    t,
                    k.map(Bytes::copy_from_slice),
                    Bytes::copy_from_slice(v),
                )
            })
            .collect();
        let mut codec = BytesMut::new();
        let options = RecordEncodeOptions { version: 2, compression: Compression::None };
        RecordBatchEncoder::encode(&mut codec, &records, &options).unwrap();
        let mut ours = BytesMut::from(&b"before"[..]);
        encode_batch(&mut ours, messages.iter().copied());
        assert_eq!(&ours[..6], b"before");
        assert_eq!(&ours[6..], &codec[..]);
        for n in [0, 1, -1, 63, 64, -64, -65, 8191, 8192, i64::MAX, i64::MIN] {
            let mut b = BytesMut::new();
            put_zigzag(&mut b, n);
            assert_eq!(b.len(), zigzag_len(n), "{n}");
            assert_eq!(Reader(b.freeze()).varlong("n").unwrap(), n);
        }
    }

    #[test]
    fn a_batch_cut_at_the_end_of_a_fetch_waits_for_the_next() {
        let mut bytes = batch(Compression::None, 0);
        let second = batch(Compression::None, 3);
        bytes.extend_from_slice(&second[..second.len() - 1]);
        assert_eq!(decode_batches(bytes.freeze(), 0).unwrap().0.len(), 3);
        assert_eq!(decode_batches(Bytes::from_static(&[0; 11]), 0).unwrap(), (Vec::new(), None));
        // A control batch (a transaction's marker): no records, but the offset moves past it.
        let control = edited(|b| b[22] |= 1 << 5);
        assert_eq!(decode_batches(control, 0).unwrap(), (Vec::new(), Some(3)));
    }

    /// Rewrites the CRC after `edit` changed the bytes it covers.
    fn edited(edit: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut b = batch(Compression::None, 0);
        edit(&mut b);
        let crc = crc32c::crc32c(&b[21..]);
        b[17..21].copy_from_slice(&crc.to_be_bytes());
        b.freeze()
    }

    fn refused(bytes: Bytes, why: &str) {
        match decode_batches(bytes, 0) {
            Err(Error::Protocol(e)) => assert!(e.contains(why), "{e} (wanted: {why})"),
            other => panic!("{other:?} (wanted: {why})"),
        }
    }

    #[test]
    fn what_a_broker_gets_wrong_is_refused() {
        let mut flipped = batch(Compression::None, 0);
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        refused(flipped.freeze(), "crc");
        let mut old = batch(Compression::None, 0);
        old[16] = 1;
        refused(old.freeze(), "message format v1");
        let mut short = BytesMut::from(&batch(Compression::None, 0)[..]);
        short[8..12].copy_from_slice(&48i32.to_be_bytes());
        refused(short.freeze(), "shorter than a batch's header");
        refused(edited(|b| b[57] = 0x80), "record count -");
        // More records counted than the batch holds, and fewer.
        refused(edited(|b| b[60] = 4), "cut short");
        refused(edited(|b| b[60] = 2), "bytes after the batch's 2 records");
        refused(edited(|b| b[22] = 7), "compression 7");
        // A base offset whose records' offsets overflow.
        refused(edited(|b| b[0..8].copy_from_slice(&i64::MAX.to_be_bytes())), "offset overflows");
        refused(edited(|b| b[27..35].copy_from_slice(&i64::MAX.to_be_bytes())), "timestamp overflows");
    }

    #[test]
    fn a_compressed_batch_inflates_no_further_than_the_bound() {
        let zeros = vec![0u8; 5000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, &zeros).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(inflate(1, &gz, 5000).unwrap().len(), 5000);
        assert!(inflate(1, &gz, 4999).unwrap_err().to_string().contains("inflates past 4999"));
        let zst = zstd::encode_all(&zeros[..], 3).unwrap();
        assert_eq!(inflate(4, &zst, 5000).unwrap().len(), 5000);
        assert!(inflate(4, &zst, 4999).is_err());
        let raw = snap::raw::Encoder::new().compress_vec(&zeros).unwrap();
        assert_eq!(inflate(2, &raw, 5000).unwrap().len(), 5000);
        assert!(inflate(2, &raw, 4999).is_err());
        // In xerial's framing, two blocks.
        let mut framed = b"\x82SNAPPY\x00\x00\x00\x00\x01\x00\x00\x00\x01".to_vec();
        for _ in 0..2 {
            framed.extend_from_slice(&(raw.len() as u32).to_be_bytes());
            framed.extend_from_slice(&raw);
        }
        assert_eq!(inflate(2, &framed, 10_000).unwrap().len(), 10_000);
        assert!(inflate(2, &framed[..framed.len() - 1], 10_000).is_err(), "a block cut short");
        // A block of a few bytes that says it holds 4 GiB: refused before any room is made.
        let claim = [0xff, 0xff, 0xff, 0xff, 0x0f, 0x00];
        let e = inflate(2, &claim, MOST_INFLATED).unwrap_err().to_string();
        assert!(e.contains("says it holds 4294967295"), "{e}");
        assert!(inflate(5, &raw, 5000).unwrap_err().to_string().contains("compression 5"));
    }

    #[test]
    fn log_append_time_stamps_every_record_with_the_brokers() {
        let read = decode_batches(
            edited(|b| {
                b[22] |= 1 << 3;
                b[35..43].copy_from_slice(&7i64.to_be_bytes());
            }),
            0,
        )
        .unwrap()
        .0;
        assert!(read.len() == 3 && read.iter().all(|r| r.timestamp_ms == 7));
    }

    #[test]
    fn varints_refuse_what_does_not_fit() {
        let mut r = Reader(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x1f]));
        assert!(r.varint("x").is_err(), "2^35 - 1 is no int");
        let mut r = Reader(Bytes::from_static(&[0xfe, 0xff, 0xff, 0xff, 0x0f]));
        assert_eq!(r.varint("x").unwrap(), i32::MAX);
        let mut r = Reader(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff, 0x0f]));
        assert_eq!(r.varint("x").unwrap(), i32::MIN);
        let mut r = Reader(Bytes::from_static(&[0xff; 9]));
        assert!(r.varlong("x").is_err(), "cut short");
        let mut long = [0xff; 10];
        long[9] = 0x01;
        assert_eq!(Reader(Bytes::copy_from_slice(&long)).varlong("x").unwrap(), i64::MIN);
        long[9] = 0x02;
        assert!(Reader(Bytes::copy_from_slice(&long)).varlong("x").is_err(), "past 64 bits");
        let mut r = Reader(Bytes::from_static(&[0x80; 11]));
        assert!(r.varlong("x").is_err(), "runs on");
        let mut b = BytesMut::new();
        b.put_u8(0x03);
        assert_eq!(Reader(b.freeze()).varint("x").unwrap(), -2);
    }

    #[test]
    fn a_batch_the_fuzzer_found_is_refused_without_a_panic() {
        // A batch whose CRC holds and whose record count is 2^31 - 1: the codec's own decoder
        // reserved room for that many records (281 GB) before reading one.
        let crash = include_bytes!("../tests/data/fuzz-kafka-record-count.bin");
        assert!(decode_batches(Bytes::from_static(&crash[1..]), 0).is_err());
    }
}
