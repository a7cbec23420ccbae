//! What a Kafka broker sends back: any bytes, read as each answer the producer reads (at every
//! version it may have agreed on), and as record batches, are decoded or refused — never a
//! panic, never an allocation the input does not pay for.
#![no_main]

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, MetadataResponse, ProduceResponse, SaslAuthenticateResponse, SaslHandshakeResponse,
};
use libfuzzer_sys::fuzz_target;
use portcullis_kafka::wire::decode_answer;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let body = Bytes::copy_from_slice(rest);
    let version = i16::from(selector >> 4);
    let id = 1;
    match selector & 0x0f {
        0 => drop(decode_answer::<ApiVersionsResponse>(body, ApiKey::ApiVersions, 0, id)),
        1 => drop(decode_answer::<MetadataResponse>(body, ApiKey::Metadata, 1 + version % 9, id)),
        2 => drop(decode_answer::<ProduceResponse>(body, ApiKey::Produce, 3 + version % 7, id)),
        3 => drop(decode_answer::<SaslHandshakeResponse>(body, ApiKey::SaslHandshake, 1, id)),
        4 => drop(decode_answer::<SaslAuthenticateResponse>(body, ApiKey::SaslAuthenticate, version % 2, id)),
        _ => {
            let mut b = body;
            let _ = kafka_protocol::records::RecordBatchDecoder::decode_all(&mut b);
        }
    }
});
