//! Request logs to Kafka (`[[logger]]` of kind `kafka`, the `log_to_eventhub` step, the access
//! log on a logger) against a real Kafka-protocol broker, Tansu: what was sent is read back from
//! the broker and compared; the broker is stopped and started again mid-run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use portcullis_kafka::{Compression, Message, Producer, Settings, TcpConnector, partition_of};
use portcullis_testkit::{KafkaBroker, ProxyProcess};

use crate::common::{Env, admin, admin_of, binary, metric, says};

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
fn while_a_broker_that_does_not_answer_holds_the_thread_up_a_full_queue_says_so_until_it_is_emptied() {
    // A broker that takes connections and never answers: the thread waits on it for `timeout`.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let (accepted, connected) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            match conn {
                Ok(c) => held.push(c),
                Err(_) => return,
            }
            let _ = accepted.send(());
        }
    });
    let mut s = Settings::new("test", vec![("127.0.0.1".to_owned(), port)], "t");
    s.linger = Duration::from_millis(1);
    s.timeout = Duration::from_secs(2);
    // One batch of one message at a time.
    s.queue = 1;
    let producer = Producer::start(s, Arc::new(TcpConnector)).unwrap();
    let stats = Arc::clone(producer.stats());
    assert!(!producer.is_full());
    // The first message sets the thread asking the broker for the topic's partitions.
    assert!(producer.send(message(None, "first".to_owned())));
    connected.recv_timeout(Duration::from_secs(10)).expect("the producer connects");
    let mut refused = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused == 0 {
        assert!(Instant::now() < deadline, "the queue never filled");
        if !producer.send(message(None, "m".to_owned())) {
            refused += 1;
        }
    }
    assert!(producer.is_full(), "a worker may now count its messages dropped without making them");
    assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
    // The thread gives up on the broker, empties the queue, and says there is room again.
    wait_until("the queue emptied", Duration::from_secs(10), || !producer.is_full());
    assert!(producer.send(message(None, "n".to_owned())), "taken again");
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
    assert!(!producer.is_full());

    broker.stop();
    for i in 50..350 {
        producer.send(hundred(i));
    }
    wait_until("the buffer full", Duration::from_secs(10), || stats.dropped.load(Ordering::Relaxed) == 200);
    assert_eq!(stats.buffered.load(Ordering::Relaxed), 10_000);
    // Workers may now count their messages dropped without making them.
    assert!(producer.is_full());
    wait_until("a failed attempt", Duration::from_secs(10), || stats.errors.load(Ordering::Relaxed) > 0);
    assert!(!stats.up.load(Ordering::Relaxed));

    // Back, empty (its storage is memory): the topic is made again and the buffer goes out.
    broker.restart();
    broker.create_topic("t", 1);
    wait_until("the buffer sent", Duration::from_secs(20), || stats.sent.load(Ordering::Relaxed) == 150);
    assert!(!producer.is_full(), "room again");
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
fn messages_held_while_the_broker_is_gone_keep_none_of_the_senders_memory() {
    let mut broker = KafkaBroker::start();
    broker.create_topic("t", 1);
    broker.stop();
    let producer = Producer::start(settings(&broker, "t"), Arc::new(TcpConnector)).unwrap();
    let stats = Arc::clone(producer.stats());
    // As a worker writes them: key and value split off an arena it goes on writing into.
    let mut arena = bytes::BytesMut::with_capacity(64 * 1024);
    arena.extend_from_slice(b"tenant-7");
    let key = arena.split().freeze();
    arena.extend_from_slice(b"{\"id\":1}");
    let value = arena.split().freeze();
    assert!(producer.send(Message { key: Some(key), partition: None, value, timestamp_ms: 0 }));
    wait_until("the message held", Duration::from_secs(10), || stats.buffered.load(Ordering::Relaxed) == 16);
    // The producer holds a copy: the arena is the sender's alone again, to be written over.
    assert!(arena.try_reclaim(64 * 1024), "a held message keeps its sender's arena alive");
    // And the copy is what the broker gets once it is back.
    broker.restart();
    broker.create_topic("t", 1);
    let records = broker.read_at_least("t", 1, Duration::from_secs(10));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].key.as_deref(), Some(&b"tenant-7"[..]));
    assert_eq!(records[0].value.as_deref(), Some(&b"{\"id\":1}"[..]));
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

/// A proxy whose API logs through `[[logger]]` "audit" (`logger` is the rest of its table).
fn proxy_config(env: &Env, broker: &KafkaBroker, server: &str, logger: &str, steps: &str) -> String {
    env.config(
        "request",
        &format!(
            "[server]\nworkers = 2\nadmin = \"127.0.0.1:0\"\n{server}\n\
             [[logger]]\nname = \"audit\"\nkind = \"kafka\"\nbootstrap = [\"{}\"]\nlinger = \"5ms\"\n\
             retry_backoff = \"50ms\"\nretry_backoff_max = \"200ms\"\ntimeout = \"2s\"\n{logger}\n\
             [[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n{steps}\n",
            broker.bootstrap()
        ),
    )
}

fn value_of(r: &portcullis_testkit::kafka::Fetched) -> serde_json::Value {
    let text = std::str::from_utf8(r.value.as_ref().unwrap()).unwrap();
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[test]
fn log_to_eventhub_and_the_access_log_reach_the_broker_all_of_them_in_order() {
    let env = Env::new();
    let broker = KafkaBroker::start();
    broker.create_topic("requests", 2);
    broker.create_topic("access", 1);
    let steps = r#"
[[api.inbound]]
log_to_eventhub = { logger_id = "audit", partition_key = "{header.x-tenant}", message = '{"id":"{request.id}","method":"{request.method}","path":"{request.path}","tenant":"{header.x-tenant}","n":{header.x-n},"sub":"{subscription.id}"}' }
[[api.outbound]]
log_to_eventhub = { logger_id = "audit", partition_id = 0, message = '{"status":{response.status},"path":"{request.path}","server":"{header.server}"}' }
"#;
    // Outbound, `{header.NAME}` reads the response's headers.
    let text = proxy_config(&env, &broker, "", "topic = \"requests\"", steps)
        .replace("[[api]]", "[[logger]]\nname = \"access\"\nkind = \"kafka\"\ntopic = \"access\"\nlinger = \"5ms\"\nbootstrap = [\"BOOT\"]\n[[api]]")
        .replace("BOOT", &broker.bootstrap())
        .replace("admin = ", "access_log = { logger = \"access\" }\nadmin = ");
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    for i in 0..40 {
        let tenant = if i == 7 { "evil\"}\\".to_owned() } else { format!("t{}", i % 3) };
        let n = i.to_string();
        let r = c
            .request("GET", &format!("/item/{i}?key=secret"), &[("X-Tenant", &tenant), ("X-N", &n)], b"")
            .unwrap();
        assert_eq!(r.status, 200);
    }
    let admin_addr = admin_of(&proxy);
    let sent = |logger: &str| {
        metric(
            &admin(admin_addr, "GET", "/metrics").1,
            &format!("portcullis_logger_messages_total{{logger=\"{logger}\",result=\"sent\"}}"),
        )
    };
    wait_until("80 messages acknowledged", Duration::from_secs(20), || sent("audit") == 80);
    wait_until("40 access records acknowledged", Duration::from_secs(20), || sent("access") == 40);

    let records = broker.read_at_least("requests", 80, Duration::from_secs(5));
    assert_eq!(records.len(), 80);
    let (inbound, outbound): (Vec<_>, Vec<_>) =
        records.iter().partition(|r| value_of(r).get("method").is_some());
    assert_eq!(inbound.len(), 40);
    let mut last = [-1i64; 2];
    let mut seen = [false; 40];
    for r in &inbound {
        let v = value_of(r);
        let n = v["n"].as_i64().unwrap();
        let tenant = if n == 7 { "evil\"}\\".to_owned() } else { format!("t{}", n % 3) };
        assert_eq!(v["tenant"], tenant.as_str(), "a client's bytes cannot end the JSON string");
        assert_eq!(v["path"], format!("/item/{n}"), "no query");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["sub"], "", "no subscription: empty, and the message still sent");
        assert_eq!(v["id"].as_str().map(str::len), Some(16));
        assert_eq!(r.key.as_deref(), Some(tenant.as_bytes()), "the step's partition_key");
        assert_eq!(r.partition as usize, partition_of(tenant.as_bytes(), 2));
        let p = r.partition as usize;
        assert!(n > last[p], "in order within partition {p}");
        last[p] = n;
        seen[n as usize] = true;
    }
    assert!(seen.iter().all(|&s| s), "every request once");
    // The outbound messages, to partition 0 as the step says, in the order of the requests.
    let paths: Vec<String> = outbound
        .iter()
        .map(|r| {
            assert_eq!(r.partition, 0);
            let v = value_of(r);
            assert_eq!(v["status"], 200);
            v["path"].as_str().unwrap().to_owned()
        })
        .collect();
    let expected: Vec<String> = (0..40).map(|i| format!("/item/{i}")).collect();
    assert_eq!(paths, expected);

    let access = broker.read_at_least("access", 40, Duration::from_secs(5));
    let paths: Vec<String> =
        access.iter().map(|r| value_of(r)["path"].as_str().unwrap().to_owned()).collect();
    assert_eq!(paths, expected, "the access log's records, in order");
    assert!(access.iter().all(|r| value_of(r)["status"] == 200));
}

#[test]
fn a_broker_gone_mid_run_costs_no_request_drops_beyond_the_buffer_and_delivery_resumes() {
    let env = Env::new();
    let mut broker = KafkaBroker::start();
    broker.create_topic("requests", 1);
    // Messages of 4 bytes; the buffer holds 10.
    let logger = "topic = \"requests\"\nbuffer = 40";
    let steps = "[[api.inbound]]\nlog_to_eventhub = { logger_id = \"audit\", message = \"m{header.x-n}\" }\n";
    let proxy = ProxyProcess::spawn(
        &binary(),
        &env.write_config("p.toml", &proxy_config(&env, &broker, "", logger, steps)),
    );
    let admin_addr = admin_of(&proxy);
    let count = |result: &str| {
        metric(
            &admin(admin_addr, "GET", "/metrics").1,
            &format!("portcullis_logger_messages_total{{logger=\"audit\",result=\"{result}\"}}"),
        )
    };
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let mut get = |n: usize| c.request("GET", "/", &[("X-N", &format!("{n:03}"))], b"").unwrap().status;
    for n in 0..10 {
        assert_eq!(get(n), 200);
    }
    wait_until("10 sent", Duration::from_secs(20), || count("sent") == 10);

    broker.stop();
    for n in 10..60 {
        assert_eq!(get(n), 200, "requests go on without the broker");
    }
    wait_until("40 dropped", Duration::from_secs(20), || count("dropped") == 40);
    let metrics = admin(admin_addr, "GET", "/metrics").1;
    assert_eq!(metric(&metrics, "portcullis_logger_buffered_bytes{logger=\"audit\"}"), 40);
    wait_until("the logger down", Duration::from_secs(20), || {
        metric(&admin(admin_addr, "GET", "/metrics").1, "portcullis_logger_up{logger=\"audit\"}") == 0
    });
    assert!(proxy.wait_for_log("cannot send to the broker", Duration::from_secs(10)).is_some());

    broker.restart();
    broker.create_topic("requests", 1);
    wait_until("the buffer sent", Duration::from_secs(20), || count("sent") == 20);
    for n in 60..65 {
        assert_eq!(get(n), 200);
    }
    wait_until("5 more", Duration::from_secs(20), || count("sent") == 25);
    let values: Vec<String> = broker
        .read_at_least("requests", 15, Duration::from_secs(5))
        .iter()
        .map(|r| String::from_utf8(r.value.as_ref().unwrap().to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = (10..20).chain(60..65).map(|n| format!("m{n:03}")).collect();
    assert_eq!(values, expected, "the ten the buffer held, then the new ones");
    assert!(proxy.wait_for_log("the broker takes messages again", Duration::from_secs(10)).is_some());
    assert_eq!(count("failed"), 0);
}

#[test]
fn loggers_that_cannot_work_are_configuration_errors_naming_the_line() {
    let env = Env::new();
    let broker = KafkaBroker::start();
    std::fs::write(env.dir().join("empty.key"), "\n").unwrap();
    for (logger, steps, expected) in [
        (
            "topic = \"t\"",
            "[[api.inbound]]\nlog_to_eventhub = { logger_id = \"nope\", message = \"x\" }",
            "no logger named \"nope\" (known: \"audit\")",
        ),
        (
            "topic = \"t\"\nsasl = { mechanism = \"SCRAM-SHA-256\", username = \"u\", password_file = \"pw\" }",
            "",
            "sasl.mechanism: unknown value \"SCRAM-SHA-256\"",
        ),
        (
            "topic = \"t\"\nsasl = { username = \"$ConnectionString\", password_file = \"missing.key\" }",
            "",
            "cannot read the password file",
        ),
        (
            "topic = \"t\"\nsasl = { username = \"$ConnectionString\", password_file = \"empty.key\" }",
            "",
            "the password file is empty",
        ),
        ("topic = \"t\"\nacks = \"some\"", "", "acks: unknown value \"some\""),
        ("topic = \"t\"\nqueue = 2000000", "", "queue: must be an integer from 1 to 1048576"),
        ("topic = \"a topic\"", "", "a topic name is 1 to 249"),
        ("topic = \"t\"\ncompression = \"brotli\"", "", "compression: unknown value \"brotli\""),
        (
            "topic = \"t\"",
            "[[api.inbound]]\nlog_to_eventhub = { logger_id = \"audit\", message = \"{nothing}\" }",
            "unknown variable {nothing}",
        ),
    ] {
        let path = env.write_config("bad.toml", &proxy_config(&env, &broker, "", logger, steps));
        let out = std::process::Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
        let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{logger} {steps}: {text}");
        assert!(text.contains(expected), "{expected} in:\n{text}");
        assert!(text.contains("bad.toml:"), "the file and line: {text}");
    }
    let server = "access_log = { logger = \"audit\", format = \"combined\" }";
    let path = env.write_config("bad.toml", &proxy_config(&env, &broker, server, "topic = \"t\"", ""));
    let out = std::process::Command::new(binary()).args(["check", "-c"]).arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && text.contains("a logger takes the access log as JSON"), "{text}");
}

#[test]
fn nothing_held_is_lost_on_reload_or_shutdown() {
    let env = Env::new();
    let broker = KafkaBroker::start();
    broker.create_topic("requests", 1);
    // Messages wait 10 s for their batch: whatever a reload or a stop finds, it must send.
    let logger = |linger: &str| format!("topic = \"requests\"\ndrain = \"5s\"\nlinger = \"{linger}\"");
    let steps = "[[api.inbound]]\nlog_to_eventhub = { logger_id = \"audit\", message = \"m{header.x-n}\" }\n";
    let config = |linger: &str| {
        proxy_config(&env, &broker, "", &logger(linger), steps).replace("linger = \"5ms\"\n", "")
    };
    let path = env.write_config("p.toml", &config("10s"));
    let mut proxy = ProxyProcess::spawn(&binary(), &path);
    let admin_addr = admin_of(&proxy);
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let mut get = |n: usize| c.request("GET", "/", &[("X-N", &format!("{n:03}"))], b"").unwrap().status;
    for n in 0..10 {
        assert_eq!(get(n), 200);
    }
    // A reload that changes the logger: a new producer; the old one sends what it holds.
    std::fs::write(&path, config("9s")).unwrap();
    proxy.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !admin(admin_addr, "GET", "/config").1.starts_with("{\"generation\":2,") {
        assert!(Instant::now() < deadline, "the reload never took");
        std::thread::sleep(Duration::from_millis(50));
    }
    for n in 10..20 {
        assert_eq!(get(n), 200);
    }
    wait_until("the old producer's 10", Duration::from_secs(10), || broker.read("requests").len() == 10);
    // A stop with 10 more held: sent before the process goes.
    proxy.signal(libc::SIGTERM);
    assert_eq!(proxy.wait_exit(Duration::from_secs(20)), Some(0));
    let values: Vec<String> = broker
        .read_at_least("requests", 20, Duration::from_secs(5))
        .iter()
        .map(|r| String::from_utf8(r.value.as_ref().unwrap().to_vec()).unwrap())
        .collect();
    let expected: Vec<String> = (0..20).map(|n| format!("m{n:03}")).collect();
    assert_eq!(values, expected);
}

/// A logger's `topic` and `sasl` as Event Hubs takes them (`mechanism` is put before the user
/// name as given), with a connection string whose key is `secret` in the password file.
fn event_hubs_sasl(env: &Env, mechanism: &str) -> String {
    let key = env.dir().join("eventhub.key");
    std::fs::write(&key, "Endpoint=sb://example/;SharedAccessKey=secret\n").unwrap();
    format!(
        "topic = \"requests\"\nsasl = {{ {mechanism}username = \"$ConnectionString\", password_file = \"{}\" }}",
        key.display()
    )
}

#[test]
fn a_broker_that_does_not_take_sasl_plain_is_reported_and_requests_go_on() {
    let env = Env::new();
    let broker = KafkaBroker::start_authenticating();
    let logger = event_hubs_sasl(&env, "mechanism = \"PLAIN\", ");
    let steps = "[[api.inbound]]\nlog_to_eventhub = { logger_id = \"audit\", message = \"m\" }\n";
    let proxy = ProxyProcess::spawn(
        &binary(),
        &env.write_config("p.toml", &proxy_config(&env, &broker, "", &logger, steps)),
    );
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200, "the request does not wait");
    let line = proxy.wait_for_log("cannot send to the broker", Duration::from_secs(10)).expect("a warning");
    // Tansu offers SCRAM only, and closes the connection on a PLAIN handshake (a broker that
    // answers is named with the mechanisms it offers).
    assert!(line.contains("SASL PLAIN refused") && line.contains("SaslHandshake"), "{line}");
    assert!(!proxy.log().iter().any(|l| l.contains("secret")), "the password is never logged");
    let admin_addr = admin_of(&proxy);
    let m = admin(admin_addr, "GET", "/metrics").1;
    assert_eq!(metric(&m, "portcullis_logger_up{logger=\"audit\"}"), 0);
    assert_eq!(metric(&m, "portcullis_logger_messages_total{logger=\"audit\",result=\"sent\"}"), 0);
}

#[test]
fn check_asks_each_loggers_brokers_for_its_topic() {
    let env = Env::new();
    let mut broker = KafkaBroker::start();
    broker.create_topic("requests", 2);
    // Warnings, not errors: the proxy would start, and hold the messages.
    let run = |name: &str, text: String| crate::common::check_passes(&env, name, &text);
    let check = |name: &str, broker: &KafkaBroker, logger: &str| {
        run(name, proxy_config(&env, broker, "", logger, ""))
    };
    let stderr = check("good.toml", &broker, "topic = \"requests\"");
    assert!(!stderr.contains("logger"), "{stderr}");
    let stderr = check("missing.toml", &broker, "topic = \"nothing-here\"");
    assert!(
        says(
            &stderr,
            &["missing.toml:", "warning: logger \"audit\"", "nothing-here", "hold messages in its buffer"]
        ),
        "{stderr}"
    );
    // The look made no topic.
    let made = portcullis_kafka::admin::read_topic(
        &portcullis_kafka::TcpConnector,
        ("127.0.0.1", broker.addr().port()),
        "nothing-here",
        Duration::from_secs(5),
    );
    assert!(made.is_err(), "the check made the topic: {made:?}");
    // A broker that takes the connection and never answers: the check ends all the same.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let held: Vec<_> = silent.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(30));
        drop(held);
    });
    let text = proxy_config(&env, &broker, "", "topic = \"requests\"", "")
        .replace(&broker.bootstrap(), &silent_addr);
    let stderr = run("silent.toml", text);
    assert!(stderr.contains("warning: logger \"audit\"") && stderr.contains(&silent_addr), "{stderr}");
    // A broker that asks for SASL SCRAM, given PLAIN: said, and the password is not.
    let authenticating = KafkaBroker::start_authenticating();
    // The mechanism left out: PLAIN.
    let sasl = event_hubs_sasl(&env, "");
    let stderr = check("sasl.toml", &authenticating, &sasl);
    assert!(says(&stderr, &["warning: logger \"audit\"", "SASL PLAIN refused"]), "{stderr}");
    assert!(!stderr.contains("secret"), "the password is never written: {stderr}");
    // No broker at all.
    broker.stop();
    let stderr = check("gone.toml", &broker, "topic = \"requests\"");
    assert!(stderr.contains("gone.toml:") && stderr.contains("warning: logger \"audit\""), "{stderr}");
}

#[test]
fn a_logger_over_tls_verifies_the_broker_and_one_that_does_not_trust_it_sends_nothing() {
    let env = Env::new();
    let broker = KafkaBroker::start_tls(&env.pki.server);
    broker.create_topic("requests", 1);
    broker.create_topic("untrusted", 1);
    let other = portcullis_testkit::pki::Ca::root("Some Other Root");
    let other_ca = env.write_config("other-root.pem", &other.cert_pem);
    let logger = |name: &str, topic: &str, ca: &std::path::Path| {
        format!(
            "[[logger]]\nname = \"{name}\"\nkind = \"kafka\"\nbootstrap = [\"{}\"]\ntopic = \"{topic}\"\n\
             tls = {{ ca = \"{}\" }}\nlinger = \"5ms\"\nretry_backoff = \"50ms\"\n\
             retry_backoff_max = \"200ms\"\ntimeout = \"2s\"\n",
            broker.tls_bootstrap(),
            ca.display()
        )
    };
    let text = env.config(
        "request",
        &format!(
            "[server]\nworkers = 2\nadmin = \"127.0.0.1:0\"\n{}{}\
             [[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n\
             [[api.inbound]]\nlog_to_eventhub = {{ logger_id = \"audit\", message = \"{{request.path}}\" }}\n\
             [[api.inbound]]\nlog_to_eventhub = {{ logger_id = \"elsewhere\", message = \"{{request.path}}\" }}\n",
            logger("audit", "requests", &env.paths.root),
            logger("elsewhere", "untrusted", &other_ca),
        ),
    );
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let paths: Vec<String> = (0..10).map(|i| format!("/r{i}")).collect();
    for path in &paths {
        let r = c.request("GET", path, &[], b"").unwrap();
        assert_eq!(r.status, 200, "a logger that cannot send costs no request");
    }
    // Through the TLS front, verified against the root that issued the broker's certificate.
    let records = broker.read_at_least("requests", 10, Duration::from_secs(10));
    let got: Vec<String> =
        records.iter().map(|r| String::from_utf8(r.value.clone().unwrap().to_vec()).unwrap()).collect();
    assert_eq!(got, paths, "every request once, in order");
    // A logger that does not trust the broker's certificate never gets past the handshake.
    let warned = |l: &String| l.contains("cannot send to the broker") && l.contains("elsewhere");
    wait_until("the warning", Duration::from_secs(10), || proxy.log().iter().any(warned));
    let line = proxy.log().into_iter().find(warned).expect("a warning");
    assert!(line.contains("TLS handshake"), "{line}");
    assert!(
        !proxy.log().iter().any(|l| l.contains("cannot send") && l.contains("audit")),
        "audit never failed"
    );
    // The broker acknowledges after it stores: the counts follow the records by a moment.
    let admin_addr = admin_of(&proxy);
    let sent = |name: &str| {
        let m = admin(admin_addr, "GET", "/metrics").1;
        metric(&m, &format!("portcullis_logger_messages_total{{logger=\"{name}\",result=\"sent\"}}"))
    };
    wait_until("10 acknowledged", Duration::from_secs(10), || sent("audit") == 10);
    let m = admin(admin_addr, "GET", "/metrics").1;
    assert_eq!(metric(&m, "portcullis_logger_up{logger=\"audit\"}"), 1);
    assert_eq!(metric(&m, "portcullis_logger_messages_total{logger=\"audit\",result=\"sent\"}"), 10);
    assert_eq!(metric(&m, "portcullis_logger_up{logger=\"elsewhere\"}"), 0);
    assert_eq!(metric(&m, "portcullis_logger_messages_total{logger=\"elsewhere\",result=\"sent\"}"), 0);
    assert!(broker.read("untrusted").is_empty());
}
