//! What a Kafka broker sends back: any bytes, read as each answer the producer reads (at every
//! version it may have agreed on), as a fetch's answer, and as the record batches a fetch
//! returns, are decoded or refused — never a panic, never an allocation the input does not pay
//! for (a compressed batch inflates up to `records::MOST_INFLATED`, and no further).
#![no_main]

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, FetchResponse, MetadataResponse, ProduceResponse, SaslAuthenticateResponse,
    SaslHandshakeResponse,
};
use libfuzzer_sys::fuzz_target;
use portcullis_kafka::records::decode_batches;
use portcullis_kafka::wire::decode_answer;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let body = Bytes::copy_from_slice(rest);
    let version = i16::from(selector >> 4);
    let id = 1;
    match selector & 0x0f {
        0 => drop(decode_answer::<ApiVersionsResponse>(body, ApiKey::ApiVersions, 0, id)),
        1 => {
            if let Ok(answer) = decode_answer::<MetadataResponse>(body, ApiKey::Metadata, 1 + version % 8, id)
            {
                // The producer's reading of it: partitions 0 to n-1, each once, or an error.
                if let Ok(leaders) = portcullis_kafka::leaders_of(&answer, "t") {
                    assert!(!leaders.is_empty());
                }
            }
        }
        2 => drop(decode_answer::<ProduceResponse>(body, ApiKey::Produce, 3 + version % 6, id)),
        3 => drop(decode_answer::<SaslHandshakeResponse>(body, ApiKey::SaslHandshake, 1, id)),
        4 => drop(decode_answer::<SaslAuthenticateResponse>(body, ApiKey::SaslAuthenticate, version % 2, id)),
        5 => {
            if let Ok(answer) = decode_answer::<FetchResponse>(body, ApiKey::Fetch, 4 + version % 8, id) {
                for p in answer.responses.into_iter().flat_map(|t| t.partitions) {
                    if let Some(records) = p.records {
                        drop(decode_batches(records, p.partition_index));
                    }
                }
            }
        }
        _ => drop(decode_batches(body, 0)),
    }
});
