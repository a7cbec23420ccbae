//! Request logs to Kafka (`[[logger]]` of kind `kafka`, the `log_to_eventhub` step, the access
//! log on a logger) against a real Kafka-protocol broker, Tansu: what was sent is read back from
//! the broker and compared; the broker is stopped and started again mid-run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portcullis_kafka::{Compression, Message, Producer, Settings, TcpConnector, partition_of};
use portcullis_testkit::KafkaBroker;

fn settings(broker: &KafkaBroker, topic: &str) -> Settings {
    let mut s = Settings::new("test", vec![("127.0.0.1".to_owned(), broker.addr().port())], topic);
    s.linger = Duration::from_millis(5);
    s.backoff = Duration::from_millis(50);
    s.max_backoff = Duration::from_millis(200);
    s.timeout = Duration::from_secs(2);
    s
}

fn wait_until(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn message(key: Option<String>, value: String) -> Message {
    Message {
        key: key.map(Bytes::from),
        partition: None,
        value: Bytes::from(value),
        timestamp_ms: 1_764_957_862_000,
    }
}

#[test]
fn a_producer_delivers_every_message_in_order_per_partition() {
    let broker = KafkaBroker::start();
    broker.create_topic("audit", 3);
    for compression in
        [Compression::None, Compression::Gzip, Compression::Snappy, Compression::Lz4, Compression::Zstd]
    {
        let topic = format!("audit-{compression:?}").to_lowercase();
        broker.create_topic(&topic, 3);
        let mut s = settings(&broker, &topic);
        s.compression = compression;
        let producer = Producer::start(s, Arc::new(TcpConnector)).unwrap();
        for i in 0..300 {
            assert!(producer.send(message(Some(format!("k{}", i % 7)), format!("m{i}"))));
        }
        let stats = Arc::clone(producer.stats());
        wait_until("300 acknowledged", Duration::from_secs(20), || stats.sent.load(Ordering::Relaxed) == 300);
        let records = broker.read_at_least(&topic, 300, Duration::from_secs(5));
        assert_eq!(records.len(), 300, "{compression:?}");
        let mut seen = vec![false; 300];
        let mut last_in_partition = [-1i64; 3];
        for r in &records {
            let value = String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap();
            let i: usize = value[1..].parse().unwrap();
            assert!(!seen[i], "{value} twice");
            seen[i] = true;
            let key = r.key.clone().unwrap();
            assert_eq!(key, Bytes::from(format!("k{}", i % 7)));
            // Where any Kafka client would put the key, and in the order sent.
            assert_eq!(r.partition as usize, partition_of(&key, 3), "{value}");
            let p = r.partition as usize;
            assert!(
                i as i64 > last_in_partition[p],
                "{value} after m{} in partition {p}",
                last_in_partition[p]
            );
            last_in_partition[p] = i as i64;
            assert_eq!(r.timestamp_ms, 1_764_957_862_000);
        }
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
        producer.stop();
    }
}

#[test]
fn a_broker_gone_keeps_messages_in_the_buffer_counts_what_it_cannot_hold_and_sends_the_rest_later() {
    let mut broker = KafkaBroker::start();
    broker.create_topic("t", 1);
    let mut s = settings(&broker, "t");
    // 100 messages of 100 bytes.
    s.buffer = 10_000;
    let producer = Producer::start(s, Arc::new(TcpConnector)).unwrap();
    let stats = Arc::clone(producer.stats());
    let hundred = |i: usize| message(None, format!("{i:0>100}"));
    for i in 0..50 {
        producer.send(hundred(i));
    }
    wait_until("50 acknowledged", Duration::from_secs(10), || stats.sent.load(Ordering::Relaxed) == 50);

    broker.stop();
    for i in 50..350 {
        producer.send(hundred(i));
    }
    wait_until("the buffer full", Duration::from_secs(10), || stats.dropped.load(Ordering::Relaxed) == 200);
    assert_eq!(stats.buffered.load(Ordering::Relaxed), 10_000);
    wait_until("a failed attempt", Duration::from_secs(10), || stats.errors.load(Ordering::Relaxed) > 0);
    assert!(!stats.up.load(Ordering::Relaxed));

    // Back, empty (its storage is memory): the topic is made again and the buffer goes out.
    broker.restart();
    broker.create_topic("t", 1);
    wait_until("the buffer sent", Duration::from_secs(20), || stats.sent.load(Ordering::Relaxed) == 150);
    for i in 350..360 {
        producer.send(hundred(i));
    }
    wait_until("10 more", Duration::from_secs(10), || stats.sent.load(Ordering::Relaxed) == 160);
    let values: Vec<usize> = broker
        .read_at_least("t", 110, Duration::from_secs(5))
        .iter()
        .map(|r| std::str::from_utf8(r.value.as_ref().unwrap()).unwrap().parse().unwrap())
        .collect();
    let expected: Vec<usize> = (50..150).chain(350..360).collect();
    assert_eq!(values, expected, "the buffered messages in order, then the new ones");
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 200);
    assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    assert!(stats.up.load(Ordering::Relaxed));
    producer.stop();
}

#[test]
fn messages_over_200_kb_are_cut_and_a_missing_topic_is_not_fatal() {
    let broker = KafkaBroker::start();
    let producer = Producer::start(settings(&broker, "late"), Arc::new(TcpConnector)).unwrap();
    let stats = Arc::clone(producer.stats());
    producer.send(message(None, "x".repeat(300 * 1024)));
    // The topic does not exist yet: the message waits.
    wait_until("a failed attempt", Duration::from_secs(10), || stats.errors.load(Ordering::Relaxed) > 0);
    broker.create_topic("late", 2);
    wait_until("sent", Duration::from_secs(10), || stats.sent.load(Ordering::Relaxed) == 1);
    let records = broker.read_at_least("late", 1, Duration::from_secs(5));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].value.as_ref().unwrap().len(), 200 * 1024);
    assert_eq!(stats.truncated.load(Ordering::Relaxed), 1);
    producer.stop();
}
