//! Beside producing: creating a topic, and reading a whole topic back (what tests compare with
//! what was sent, and what an operator's smoke test reads).

use std::time::Duration;

use kafka_protocol::messages::create_topics_request::CreatableTopic;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::{
    ApiKey, BrokerId, CreateTopicsRequest, CreateTopicsResponse, FetchRequest, FetchResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use crate::Error;
pub use crate::records::Fetched;
use crate::records::decode_batches;
use crate::wire::{Connection, Connector, code_name};

fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_owned()))
}

/// Creates `topic` with `partitions` partitions on the broker at `host:port` (one replica).
pub fn create_topic(
    connector: &dyn Connector,
    (host, port): (&str, u16),
    topic: &str,
    partitions: i32,
    timeout: Duration,
) -> Result<(), Error> {
    let mut conn = Connection::open(connector, host, port, timeout, "portcullis-admin", None)?;
    let version = conn.versions.create_topics;
    if version < 0 {
        return Err(Error::Broker("the broker speaks no CreateTopics version this client does".to_owned()));
    }
    let request = CreateTopicsRequest::default()
        .with_topics(vec![
            CreatableTopic::default()
                .with_name(topic_name(topic))
                .with_num_partitions(partitions)
                .with_replication_factor(1),
        ])
        .with_timeout_ms(timeout.as_millis().min(i32::MAX as u128) as i32);
    let answer: CreateTopicsResponse = conn.call(ApiKey::CreateTopics, version, &request)?;
    for t in &answer.topics {
        if t.error_code != 0 {
            return Err(Error::Broker(format!("creating {topic}: {}", code_name(t.error_code))));
        }
    }
    Ok(())
}

/// Every record of `topic`, partition by partition in offset order, read from the broker at
/// `host:port` (which must lead every partition, as a single broker does).
pub fn read_topic(
    connector: &dyn Connector,
    (host, port): (&str, u16),
    topic: &str,
    timeout: Duration,
) -> Result<Vec<Fetched>, Error> {
    let mut conn = Connection::open(connector, host, port, timeout, "portcullis-admin", None)?;
    let answer = crate::producer::ask_metadata(&mut conn, topic)?;
    let described = answer
        .topics
        .iter()
        .find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == topic))
        .ok_or_else(|| Error::Broker(format!("no topic {topic}")))?;
    if described.error_code != 0 {
        return Err(Error::Broker(format!("topic {topic}: {}", code_name(described.error_code))));
    }
    let mut partitions: Vec<i32> = described.partitions.iter().map(|p| p.partition_index).collect();
    partitions.sort_unstable();
    let mut out = Vec::new();
    for p in partitions {
        let mut offset = 0i64;
        loop {
            let (records, next, high_watermark) = fetch(&mut conn, topic, p, offset)?;
            let before = offset;
            for r in records {
                if r.offset >= offset {
                    offset = r.offset.saturating_add(1);
                    out.push(r);
                }
            }
            // Past batches without records of the topic (transaction markers) too.
            offset = next.map_or(offset, |n| n.max(offset));
            if offset >= high_watermark || offset == before {
                break;
            }
        }
    }
    Ok(out)
}

fn fetch(
    conn: &mut Connection,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<(Vec<Fetched>, Option<i64>, i64), Error> {
    let version = conn.versions.fetch;
    if version < 0 {
        return Err(Error::Broker("the broker speaks no Fetch version this client does".to_owned()));
    }
    let request = FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(200)
        .with_min_bytes(1)
        .with_max_bytes(16 << 20)
        .with_session_epoch(-1)
        .with_topics(vec![FetchTopic::default().with_topic(topic_name(topic)).with_partitions(vec![
            FetchPartition::default()
                .with_partition(partition)
                .with_fetch_offset(offset)
                .with_current_leader_epoch(-1)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(8 << 20),
        ])]);
    let answer: FetchResponse = conn.call(ApiKey::Fetch, version, &request)?;
    if answer.error_code != 0 {
        return Err(Error::Broker(format!("fetch: {}", code_name(answer.error_code))));
    }
    // A broker with nothing to say of the partition (within the wait) may leave it out.
    let Some(data) =
        answer.responses.into_iter().flat_map(|t| t.partitions).find(|d| d.partition_index == partition)
    else {
        return Ok((Vec::new(), None, offset));
    };
    if data.error_code != 0 {
        return Err(Error::Broker(format!("fetch of partition {partition}: {}", code_name(data.error_code))));
    }
    let (records, next) = match data.records {
        Some(bytes) => decode_batches(bytes, partition)?,
        None => (Vec::new(), None),
    };
    Ok((records, next, data.high_watermark))
}
