//! One connection to a broker: requests framed and numbered, answers read back and checked,
//! over any byte stream (plain TCP, or TLS that the caller sets up). Blocking, with the stream's
//! own timeouts bounding each read and write.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
    SaslAuthenticateResponse, SaslHandshakeRequest, SaslHandshakeResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use crate::Error;

/// A byte stream to a broker.
pub trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// Opens streams to brokers: plain TCP ([`TcpConnector`]), or TLS set up by the caller.
pub trait Connector: Send + Sync {
    /// A stream to `host:port`, connected within `timeout`, whose reads and writes time out after
    /// `timeout` too.
    fn connect(&self, host: &str, port: u16, timeout: Duration) -> Result<Box<dyn Stream>, Error>;
}

/// Plain TCP.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(&self, host: &str, port: u16, timeout: Duration) -> Result<Box<dyn Stream>, Error> {
        Ok(Box::new(tcp(host, port, timeout)?))
    }
}

/// A TCP connection to the first address of `host:port` that answers within `timeout`, with
/// `timeout` on its reads and writes and Nagle off.
pub fn tcp(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Error> {
    let addrs = (host, port).to_socket_addrs().map_err(|e| Error::Io(format!("{host}:{port}: {e}")))?;
    let mut last = Error::Io(format!("{host}:{port}: no address"));
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                s.set_read_timeout(Some(timeout)).map_err(|e| Error::Io(e.to_string()))?;
                s.set_write_timeout(Some(timeout)).map_err(|e| Error::Io(e.to_string()))?;
                return Ok(s);
            }
            Err(e) => last = Error::Io(format!("{addr}: {e}")),
        }
    }
    Err(last)
}

/// Longest answer read from a broker; a length beyond it ends the connection.
pub const MAX_RESPONSE: usize = 64 << 20;
/// Longest answer to what the producer sends (metadata, produce, SASL): they are small.
pub const MAX_PRODUCER_RESPONSE: usize = 1 << 20;

/// The versions of the requests this client sends that both it and the broker speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Versions {
    pub produce: i16,
    pub metadata: i16,
    pub fetch: i16,
    pub create_topics: i16,
    pub sasl_authenticate: i16,
}

/// The ranges this client speaks: versions whose fields it fills, and (for what the producer
/// reads) whose answers [`check_shape`] walks: the versions before compact encodings.
const PRODUCE: (i16, i16) = (3, 8);
const METADATA: (i16, i16) = (1, 8);
const FETCH: (i16, i16) = (4, 11);
const CREATE_TOPICS: (i16, i16) = (2, 4);
const SASL_AUTHENTICATE: (i16, i16) = (0, 1);

/// A broker connection.
pub struct Connection {
    stream: Box<dyn Stream>,
    correlation: i32,
    client_id: StrBytes,
    pub versions: Versions,
    /// `host:port`, for messages.
    pub peer: String,
    out: BytesMut,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").field("peer", &self.peer).field("versions", &self.versions).finish()
    }
}

impl Connection {
    /// Opens a connection and learns which versions the broker speaks (`ApiVersions`); with
    /// `sasl`, authenticates with SASL PLAIN (`username`, `password`).
    pub fn open(
        connector: &dyn Connector,
        host: &str,
        port: u16,
        timeout: Duration,
        client_id: &str,
        sasl: Option<(&str, &str)>,
    ) -> Result<Connection, Error> {
        let stream = connector.connect(host, port, timeout)?;
        let mut conn = Connection {
            stream,
            correlation: 0,
            client_id: StrBytes::from_string(client_id.to_owned()),
            versions: Versions::default(),
            peer: format!("{host}:{port}"),
            out: BytesMut::with_capacity(64 * 1024),
        };
        conn.negotiate()?;
        if let Some((user, password)) = sasl {
            conn.sasl_plain(user, password)?;
        }
        Ok(conn)
    }

    fn negotiate(&mut self) -> Result<(), Error> {
        // Version 0: every broker answers it (a newer request to an older broker gets a version 0
        // answer with an error, which would need a second round trip).
        let answer: ApiVersionsResponse =
            self.call(ApiKey::ApiVersions, 0, &ApiVersionsRequest::default())?;
        if answer.error_code != 0 {
            return Err(Error::Broker(format!("ApiVersions refused: {}", code_name(answer.error_code))));
        }
        let pick = |key: ApiKey, (lo, hi): (i16, i16)| -> Option<i16> {
            let theirs = answer.api_keys.iter().find(|k| k.api_key == key as i16)?;
            let top = hi.min(theirs.max_version);
            (top >= lo.max(theirs.min_version)).then_some(top)
        };
        let produce = pick(ApiKey::Produce, PRODUCE)
            .ok_or_else(|| Error::Broker(format!("the broker speaks no Produce version in {PRODUCE:?}")))?;
        let metadata = pick(ApiKey::Metadata, METADATA)
            .ok_or_else(|| Error::Broker(format!("the broker speaks no Metadata version in {METADATA:?}")))?;
        self.versions = Versions {
            produce,
            metadata,
            fetch: pick(ApiKey::Fetch, FETCH).unwrap_or(-1),
            create_topics: pick(ApiKey::CreateTopics, CREATE_TOPICS).unwrap_or(-1),
            sasl_authenticate: pick(ApiKey::SaslAuthenticate, SASL_AUTHENTICATE).unwrap_or(-1),
        };
        Ok(())
    }

    /// SASL PLAIN (RFC 4616) through `SaslHandshake` v1 and `SaslAuthenticate`: what Azure Event
    /// Hubs' Kafka endpoint takes (user `$ConnectionString`, the connection string as password).
    fn sasl_plain(&mut self, user: &str, password: &str) -> Result<(), Error> {
        let handshake = SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN"));
        let answer: SaslHandshakeResponse = self
            .call(ApiKey::SaslHandshake, 1, &handshake)
            .map_err(|e| Error::Auth(format!("SASL PLAIN refused: {e}")))?;
        if answer.error_code != 0 {
            let offered: Vec<&str> = answer.mechanisms.iter().map(|m| m.as_str()).collect();
            return Err(Error::Auth(format!(
                "the broker does not take SASL PLAIN ({}); it offers {}",
                code_name(answer.error_code),
                if offered.is_empty() { "nothing".to_owned() } else { offered.join(", ") }
            )));
        }
        if self.versions.sasl_authenticate < 0 {
            return Err(Error::Auth("the broker speaks no SaslAuthenticate version".to_owned()));
        }
        let mut token = Vec::with_capacity(user.len() + password.len() + 2);
        token.push(0);
        token.extend_from_slice(user.as_bytes());
        token.push(0);
        token.extend_from_slice(password.as_bytes());
        let request = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token));
        let answer: SaslAuthenticateResponse =
            self.call(ApiKey::SaslAuthenticate, self.versions.sasl_authenticate, &request)?;
        if answer.error_code != 0 {
            return Err(Error::Auth(format!(
                "SASL PLAIN refused: {}{}",
                code_name(answer.error_code),
                answer.error_message.map(|m| format!(" ({})", m.as_str())).unwrap_or_default()
            )));
        }
        Ok(())
    }

    /// Sends `request` as `key` at `version` and reads its answer.
    pub fn call<Q, P>(&mut self, key: ApiKey, version: i16, request: &Q) -> Result<P, Error>
    where
        Q: Encodable + HeaderVersion,
        P: Decodable + HeaderVersion,
    {
        let id = self.send(key, version, request)?;
        self.receive(key, version, id)
    }

    /// Sends a request that gets no answer (`Produce` with `acks = 0`), or whose answer
    /// [`Connection::receive`] reads later.
    pub fn send<Q: Encodable + HeaderVersion>(
        &mut self,
        key: ApiKey,
        version: i16,
        request: &Q,
    ) -> Result<i32, Error> {
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(self.client_id.clone()));
        self.out.clear();
        self.out.put_i32(0);
        let encoded = header
            .encode(&mut self.out, Q::header_version(version))
            .and_then(|()| request.encode(&mut self.out, version));
        encoded.map_err(|e| Error::Encode(format!("{key:?} v{version}: {e}")))?;
        let length =
            i32::try_from(self.out.len() - 4).map_err(|_| Error::Encode("request too large".to_owned()))?;
        self.out[..4].copy_from_slice(&length.to_be_bytes());
        self.stream.write_all(&self.out).map_err(|e| Error::Io(format!("{}: {e}", self.peer)))?;
        self.stream.flush().map_err(|e| Error::Io(format!("{}: {e}", self.peer)))?;
        Ok(self.correlation)
    }

    /// Reads the answer to request `id`.
    pub fn receive<P: Decodable + HeaderVersion>(
        &mut self,
        key: ApiKey,
        version: i16,
        id: i32,
    ) -> Result<P, Error> {
        let mut length = [0u8; 4];
        let failed = |e: std::io::Error| {
            let what = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the broker closed the connection".to_owned()
            } else {
                e.to_string()
            };
            Error::Io(format!("{}: waiting for the answer to {key:?}: {what}", self.peer))
        };
        self.stream.read_exact(&mut length).map_err(failed)?;
        let length = i32::from_be_bytes(length);
        let length = usize::try_from(length)
            .ok()
            .filter(|&l| {
                (4..=if key == ApiKey::Fetch { MAX_RESPONSE } else { MAX_PRODUCER_RESPONSE }).contains(&l)
            })
            .ok_or_else(|| Error::Protocol(format!("{}: an answer of {length} bytes", self.peer)))?;
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).map_err(failed)?;
        decode_answer(Bytes::from(body), key, version, id)
            .map_err(|e| Error::Protocol(format!("{}: {e}", self.peer)))
    }
}

/// Decodes a framed answer's body (header and message) as `key`'s answer at `version`, checking
/// that it answers request `id` and that nothing trails it.
pub fn decode_answer<P: Decodable + HeaderVersion>(
    mut body: Bytes,
    key: ApiKey,
    version: i16,
    id: i32,
) -> Result<P, String> {
    let header = ResponseHeader::decode(&mut body, P::header_version(version))
        .map_err(|e| format!("{key:?} answer header: {e}"))?;
    if header.correlation_id != id {
        return Err(format!("answer {} to request {id}", header.correlation_id));
    }
    // The codec sizes each array from the count the broker wrote before reading its elements:
    // the answers the producer (and a fetch) reads are walked first, so that no count claims
    // more elements than the bytes could hold.
    if matches!(
        key,
        ApiKey::ApiVersions
            | ApiKey::Metadata
            | ApiKey::Produce
            | ApiKey::SaslHandshake
            | ApiKey::SaslAuthenticate
            | ApiKey::Fetch
    ) {
        if key != ApiKey::Fetch && body.len() > MAX_PRODUCER_RESPONSE {
            return Err(format!("a {key:?} answer of {} bytes", body.len()));
        }
        check_shape(key, version, &body).map_err(|e| format!("{key:?} v{version} answer: {e}"))?;
    }
    let answer = P::decode(&mut body, version).map_err(|e| format!("{key:?} v{version} answer: {e}"))?;
    if body.has_remaining() {
        return Err(format!("{} bytes after a {key:?} answer", body.remaining()));
    }
    Ok(answer)
}

/// A Kafka error code's name, as brokers' logs and Event Hubs' documentation write it.
pub fn code_name(code: i16) -> String {
    match kafka_protocol::ResponseError::try_from_code(code) {
        Some(e) => format!("{e:?} ({code})"),
        None => format!("error {code}"),
    }
}

/// Whether a produce to a partition that failed with `code` may succeed if sent again (perhaps
/// to another leader, after new metadata).
pub fn retriable(code: i16) -> bool {
    kafka_protocol::ResponseError::try_from_code(code).is_some_and(|e| e.is_retriable())
}

/// Walks an answer's body as `key`'s answer at `version` (non-flexible versions only), checking
/// that every string fits in the bytes that follow its length, and that no array claims more
/// elements than those bytes could hold at their smallest.
pub fn check_shape(key: ApiKey, version: i16, body: &[u8]) -> Result<(), String> {
    let mut w = Walk { rest: body };
    match key {
        ApiKey::ApiVersions => {
            w.skip(2)?;
            w.array(6, |w| w.skip(6))?;
            if version >= 1 {
                w.skip(4)?;
            }
        }
        ApiKey::SaslHandshake => {
            w.skip(2)?;
            w.array(2, Walk::string)?;
        }
        ApiKey::SaslAuthenticate => {
            w.skip(2)?;
            w.string()?;
            w.bytes()?;
            if version >= 1 {
                w.skip(8)?;
            }
        }
        ApiKey::Metadata if (1..=8).contains(&version) => {
            if version >= 3 {
                w.skip(4)?;
            }
            // Node id, host, port, rack.
            w.array(12, |w| {
                w.skip(4)?;
                w.string()?;
                w.skip(4)?;
                w.string()
            })?;
            if version >= 2 {
                w.string()?;
            }
            w.skip(4)?;
            // Error, name, internal, partitions (and authorized operations).
            w.array(if version >= 8 { 13 } else { 9 }, |w| {
                w.skip(2)?;
                w.string()?;
                w.skip(1)?;
                // Error, index, leader (and its epoch), replicas, in sync (and offline).
                let least = 18 + if version >= 7 { 4 } else { 0 } + if version >= 5 { 4 } else { 0 };
                w.array(least, |w| {
                    w.skip(10)?;
                    if version >= 7 {
                        w.skip(4)?;
                    }
                    w.array(4, |w| w.skip(4))?;
                    w.array(4, |w| w.skip(4))?;
                    if version >= 5 {
                        w.array(4, |w| w.skip(4))?;
                    }
                    Ok(())
                })?;
                if version >= 8 {
                    w.skip(4)?;
                }
                Ok(())
            })?;
            if version >= 8 {
                w.skip(4)?;
            }
        }
        ApiKey::Produce if (3..=8).contains(&version) => {
            w.array(6, |w| {
                w.string()?;
                let least = 22 + if version >= 5 { 8 } else { 0 } + if version >= 8 { 6 } else { 0 };
                w.array(least, |w| {
                    w.skip(4 + 2 + 8 + 8)?;
                    if version >= 5 {
                        w.skip(8)?;
                    }
                    if version >= 8 {
                        w.array(6, |w| {
                            w.skip(4)?;
                            w.string()
                        })?;
                        w.string()?;
                    }
                    Ok(())
                })
            })?;
            w.skip(4)?;
        }
        ApiKey::Fetch if (4..=11).contains(&version) => {
            w.skip(4)?;
            if version >= 7 {
                w.skip(2 + 4)?;
            }
            w.array(6, |w| {
                w.string()?;
                let least = 30 + if version >= 5 { 8 } else { 0 } + if version >= 11 { 4 } else { 0 };
                w.array(least, |w| {
                    // Index, error, high watermark, last stable offset.
                    w.skip(4 + 2 + 8 + 8)?;
                    if version >= 5 {
                        w.skip(8)?;
                    }
                    // Aborted transactions: producer id and first offset.
                    w.array(16, |w| w.skip(16))?;
                    if version >= 11 {
                        w.skip(4)?;
                    }
                    w.bytes()
                })
            })?;
        }
        other => return Err(format!("no shape for {other:?} v{version}")),
    }
    if !w.rest.is_empty() {
        return Err(format!("{} bytes after the answer", w.rest.len()));
    }
    Ok(())
}

/// A cursor over an answer's bytes.
struct Walk<'a> {
    rest: &'a [u8],
}

impl Walk<'_> {
    fn skip(&mut self, n: usize) -> Result<(), String> {
        if self.rest.len() < n {
            return Err("cut short".to_owned());
        }
        self.rest = &self.rest[n..];
        Ok(())
    }

    /// A big-endian signed integer of `n` (2 or 4) bytes.
    fn int(&mut self, n: usize) -> Result<i64, String> {
        let bytes = self.rest.get(..n).ok_or("cut short")?;
        let v = match *bytes {
            [a, b] => i64::from(i16::from_be_bytes([a, b])),
            [a, b, c, d] => i64::from(i32::from_be_bytes([a, b, c, d])),
            _ => return Err("an integer of odd size".to_owned()),
        };
        self.rest = &self.rest[n..];
        Ok(v)
    }

    /// A (nullable) string: i16 length, -1 for null.
    fn string(&mut self) -> Result<(), String> {
        match self.int(2)? {
            -1 => Ok(()),
            n if n >= 0 => self.skip(n as usize),
            n => Err(format!("a string of length {n}")),
        }
    }

    /// (Nullable) bytes: i32 length, -1 for null.
    fn bytes(&mut self) -> Result<(), String> {
        match self.int(4)? {
            -1 => Ok(()),
            n if n >= 0 => self.skip(n as usize),
            n => Err(format!("bytes of length {n}")),
        }
    }

    /// An array (i32 count, -1 for null) of elements each walked by `element`, which takes at
    /// least `least` bytes: a count the bytes left cannot hold is refused before any element is
    /// read (the codec makes room for every element it is told of, each many times its least).
    fn array(
        &mut self,
        least: usize,
        mut element: impl FnMut(&mut Self) -> Result<(), String>,
    ) -> Result<(), String> {
        let n = self.int(4)?;
        if n == -1 {
            return Ok(());
        }
        if n < 0 || (n as usize).saturating_mul(least) > self.rest.len() {
            return Err(format!("an array of {n} elements in {} bytes", self.rest.len()));
        }
        for _ in 0..n {
            element(self)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_that_claims_more_than_it_holds_is_refused_before_decoding() {
        // Found by the fuzzer: a metadata answer whose broker count asked the codec for 100 GB.
        let crash = [0x00, 0x00, 0x00, 0x01, 0x41, 0x00, 0x00, 0x00, 0xce];
        let e = decode_answer::<kafka_protocol::messages::MetadataResponse>(
            Bytes::copy_from_slice(&crash),
            ApiKey::Metadata,
            1,
            1,
        )
        .unwrap_err();
        assert!(e.contains("elements in"), "{e}");
    }

    #[test]
    fn answers_the_codec_writes_pass_the_walk() {
        use kafka_protocol::messages::metadata_response::{
            MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
        };
        use kafka_protocol::messages::{BrokerId, MetadataResponse, TopicName};
        let answer = MetadataResponse::default()
            .with_brokers(vec![
                MetadataResponseBroker::default().with_host(StrBytes::from_static_str("h")).with_port(9092),
            ])
            .with_topics(vec![
                MetadataResponseTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("t"))))
                    .with_partitions(vec![
                        MetadataResponsePartition::default()
                            .with_leader_id(BrokerId(1))
                            .with_replica_nodes(vec![BrokerId(1)]),
                    ]),
            ]);
        for version in 1..=8 {
            let mut out = BytesMut::new();
            answer.encode(&mut out, version).unwrap();
            assert_eq!(check_shape(ApiKey::Metadata, version, &out), Ok(()), "v{version}");
            out.put_u8(0);
            assert!(check_shape(ApiKey::Metadata, version, &out).is_err(), "v{version} with a byte more");
        }
    }

    #[test]
    fn fetch_answers_the_codec_writes_pass_the_walk() {
        use kafka_protocol::messages::FetchResponse;
        use kafka_protocol::messages::fetch_response::{
            AbortedTransaction, FetchableTopicResponse, PartitionData,
        };
        use kafka_protocol::messages::{ProducerId, TopicName};
        let answer = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(vec![
                    PartitionData::default()
                        .with_partition_index(1)
                        .with_high_watermark(7)
                        .with_aborted_transactions(Some(vec![
                            AbortedTransaction::default()
                                .with_producer_id(ProducerId(3))
                                .with_first_offset(4),
                        ]))
                        .with_records(Some(Bytes::from_static(b"some records"))),
                    PartitionData::default().with_partition_index(2),
                ]),
        ]);
        for version in 4..=11 {
            let mut out = BytesMut::new();
            answer.encode(&mut out, version).unwrap();
            assert_eq!(check_shape(ApiKey::Fetch, version, &out), Ok(()), "v{version}");
            out.put_u8(0);
            assert!(check_shape(ApiKey::Fetch, version, &out).is_err(), "v{version} with a byte more");
        }
        // A partition count the bytes cannot hold is refused before the codec reserves room.
        let mut claims = BytesMut::new();
        claims.put_i32(0);
        claims.put_i32(1);
        claims.put_i16(1);
        claims.put_u8(b't');
        claims.put_i32(0x7fff_ffff);
        assert!(check_shape(ApiKey::Fetch, 4, &claims).unwrap_err().contains("elements in"));
        // Three partitions in 60 bytes: each takes at least 30 (the codec would make room for
        // three of its own, some 230 bytes each, before reading one).
        let mut three = claims.clone();
        three.truncate(claims.len() - 4);
        three.put_i32(3);
        three.put_bytes(0, 60);
        let e = check_shape(ApiKey::Fetch, 4, &three).unwrap_err();
        assert!(e.contains("an array of 3 elements in 60 bytes"), "{e}");
    }
}
