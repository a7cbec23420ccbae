//! Kafka for Portcullis's request loggers: a producer that runs on a thread of its own, fed by a
//! bounded queue that never makes its callers wait, over plain TCP or a TLS stream that the
//! caller provides (the proxy's BoringSSL), with SASL PLAIN for Azure Event Hubs' Kafka endpoint.
//!
//! - [`Producer`]: batches per partition (linger, batch size), compresses, sends with
//!   `acks = all` (or `1`), retries with backoff, keeps what it cannot send yet in a buffer of
//!   bounded size and counts what it drops.
//! - [`wire::Connection`]: one broker connection, framing and version negotiation (the protocol
//!   itself is the `kafka-protocol` crate's codec).
//! - [`admin`]: what tests and tools need beside producing: creating a topic and reading a
//!   topic back ([`records`] reads the record batches a fetch returns).

pub mod admin;
pub mod handoff;
mod producer;
pub mod records;
pub mod wire;

pub use kafka_protocol::records::Compression;
pub use producer::{Message, Producer, Settings, Stats, leaders_of, probe, wait_for_draining};
pub use wire::{Connector, Stream, TcpConnector};

/// What went wrong talking to a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Connecting, reading or writing (the broker is gone, or too slow).
    Io(String),
    /// The broker's bytes make no sense.
    Protocol(String),
    /// A request could not be encoded.
    Encode(String),
    /// SASL refused.
    Auth(String),
    /// The broker answered with an error.
    Broker(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Io(m) | Error::Protocol(m) | Error::Encode(m) | Error::Auth(m) | Error::Broker(m) => {
                f.write_str(m)
            }
        }
    }
}

impl std::error::Error for Error {}

/// Kafka's default partitioner's hash (murmur2 as the Java client computes it), so that a key
/// lands on the partition any other client would put it on.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, &b) in rest.iter().enumerate().rev() {
            h ^= u32::from(b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of `partitions` that Kafka's default partitioner gives `key`.
pub fn partition_of(key: &[u8], partitions: usize) -> usize {
    // One partition (or none known): nothing to hash for.
    if partitions <= 1 {
        return 0;
    }
    ((murmur2(key) & 0x7fff_ffff) as usize) % partitions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_is_the_java_clients() {
        // The cases of Kafka's own UtilsTest.
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), -58_897_971);
        assert_eq!(murmur2(b"abc"), 479_470_107);
    }
}
