//! The producer: callers hand messages to a bounded queue ([`Producer::send`] never waits); a
//! thread of its own takes them into a buffer of bounded size, batches them per partition, and
//! sends each batch to its partition's leader, in order, one request in flight per broker.
//!
//! What the broker refuses for good (or after `retries` retriable refusals) is dropped and
//! counted as failed. While no broker can be reached, messages wait in the buffer; beyond its
//! size new ones are dropped and counted, and the others are sent once a broker answers again.
//! A message sent again after a broker went away mid-request may be written twice (at least
//! once, as any Kafka producer without idempotence).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::TryRecvError;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType};

use portcullis_http::arena::Arena;

use crate::handoff::{Inlet, Outlet, handoff};
use crate::wire::{Connection, Connector, code_name, retriable};
use crate::{Error, partition_of};

/// How a producer sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Names the producer in log lines (the logger's id).
    pub name: String,
    /// Brokers asked for the topic's partitions and leaders, in turn.
    pub bootstrap: Vec<(String, u16)>,
    pub topic: String,
    /// SASL PLAIN user name and password.
    pub sasl: Option<(String, String)>,
    /// How long a message may wait for others to join its batch.
    pub linger: Duration,
    /// Most bytes of messages in one partition's batch.
    pub max_batch: usize,
    pub compression: Compression,
    /// Retriable refusals of a batch before its messages are dropped as failed.
    pub retries: u32,
    /// First wait after a failure; it doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Most bytes of messages held for sending; beyond it new messages are dropped.
    pub buffer: usize,
    /// Messages the hand-off queue holds before the thread takes them.
    pub queue: usize,
    /// Connecting, and waiting for a broker's answer.
    pub timeout: Duration,
    /// `-1`: every in-sync replica has the batch; `1`: the leader has it.
    pub acks: i16,
    /// Longer messages are cut to this many bytes.
    pub max_message: usize,
    /// At stop, how long what is still buffered may take to send.
    pub drain: Duration,
}

impl Settings {
    /// Defaults for `topic` on `bootstrap`.
    pub fn new(name: &str, bootstrap: Vec<(String, u16)>, topic: &str) -> Settings {
        Settings {
            name: name.to_owned(),
            bootstrap,
            topic: topic.to_owned(),
            sasl: None,
            linger: Duration::from_millis(20),
            max_batch: 512 * 1024,
            compression: Compression::None,
            retries: 5,
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            buffer: 32 << 20,
            queue: 65_536,
            timeout: Duration::from_secs(10),
            acks: -1,
            max_message: 200 * 1024,
            drain: Duration::from_secs(2),
        }
    }
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Chooses the partition (Kafka's default partitioner) unless `partition` is given.
    pub key: Option<Bytes>,
    pub partition: Option<u32>,
    pub value: Bytes,
    pub timestamp_ms: i64,
}

impl Message {
    /// What it takes of a logger's `buffer`: its key and value.
    fn size(&self) -> usize {
        self.value.len() + self.key.as_ref().map_or(0, Bytes::len)
    }
}

/// What a producer counts (read at any time, from any thread).
#[derive(Debug, Default)]
pub struct Stats {
    /// Acknowledged by the broker.
    pub sent: AtomicU64,
    /// Never sent: the queue or the buffer was full, or the producer stopped with them unsent.
    pub dropped: AtomicU64,
    /// Refused by the broker for good, or after every retry.
    pub failed: AtomicU64,
    /// Cut to `max_message` bytes (and sent).
    pub truncated: AtomicU64,
    /// Produce requests answered.
    pub requests: AtomicU64,
    /// Attempts that failed: no connection, no answer, or a retriable refusal.
    pub errors: AtomicU64,
    /// Bytes of messages held now.
    pub buffered: AtomicU64,
    /// Whether the last attempt reached a broker.
    pub up: AtomicBool,
}

/// A producer and its thread. Dropping it stops the thread, which sends what it holds for at
/// most `drain`.
pub struct Producer {
    inlet: Inlet<Message>,
    /// The buffer turned a message away for want of room, and has not made room since.
    full: Arc<AtomicBool>,
    /// Whether a batch found the queue full (the thread held up by a broker that does not
    /// answer) after the thread last emptied it.
    room: Arc<QueueRoom>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
    settings: Settings,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").field("settings", &self.settings).field("stats", &self.stats).finish()
    }
}

impl Producer {
    /// Starts the producer's thread (named after `settings.name`).
    pub fn start(settings: Settings, connector: Arc<dyn Connector>) -> std::io::Result<Producer> {
        Producer::start_with(settings, connector, Arc::new(Stats::default()))
    }

    /// As [`Producer::start`], counting into `stats` (kept by the caller across producers that
    /// replace each other).
    pub fn start_with(
        settings: Settings,
        connector: Arc<dyn Connector>,
        stats: Arc<Stats>,
    ) -> std::io::Result<Producer> {
        let (inlet, rx) = handoff(settings.queue);
        let stop = Arc::new(AtomicBool::new(false));
        let mut worker = Sender::new(settings.clone(), connector, Arc::clone(&stats), Arc::clone(&stop));
        let (full, room) = (Arc::clone(&worker.full), Arc::clone(&worker.room));
        let thread = std::thread::Builder::new()
            .name(format!("kafka-{}", settings.name).chars().take(15).collect())
            .spawn(move || worker.run(&rx))?;
        Ok(Producer { inlet, full, room, stats, stop, thread: Mutex::new(Some(thread)), settings })
    }

    /// Whether a message handed over now would be dropped: the buffer is full, or the queue is
    /// (the thread is waiting on a broker). A worker may then count its message dropped
    /// ([`Producer::count_dropped`]) without making it.
    pub fn is_full(&self) -> bool {
        self.full.load(Ordering::Relaxed) || self.room.is_full()
    }

    /// Counts `n` messages dropped before they were handed over (the buffer was full).
    pub fn count_dropped(&self, n: u64) {
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Hands `message` to the thread; never waits. `false`: the queue was full and the message
    /// is dropped (and counted).
    pub fn send(&self, message: Message) -> bool {
        let mut batch = self.inlet.batch();
        batch.push(message);
        self.send_all(&mut batch) == 1
    }

    /// An empty batch, for [`Producer::send_all`].
    pub fn batch(&self) -> Vec<Message> {
        self.inlet.batch()
    }

    /// Messages a batch holds before it should be handed over.
    pub fn per_batch(&self) -> usize {
        self.inlet.per_batch()
    }

    /// Hands the messages of `batch` to the thread together (it is left empty); never waits.
    /// Returns how many were taken: all, or none when the queue was full (those are dropped
    /// and counted).
    pub fn send_all(&self, batch: &mut Vec<Message>) -> usize {
        for message in batch.iter_mut() {
            if message.value.len() > self.settings.max_message {
                message.value.truncate(self.settings.max_message);
                self.stats.truncated.fetch_add(1, Ordering::Relaxed);
            }
        }
        let n = batch.len();
        let emptied = self.room.before_send();
        match self.inlet.send(batch) {
            Ok(()) => n,
            Err(lost) => {
                self.stats.dropped.fetch_add(lost as u64, Ordering::Relaxed);
                self.room.refused(emptied);
                0
            }
        }
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Stops the thread and waits for it: what it holds is sent for at most `drain`, the rest
    /// dropped and counted. A broker that does not answer can hold a send for up to `timeout`.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// Threads of producers that were dropped (replaced by a reload) and are sending what they
/// held: [`wait_for_draining`] waits for them before the process goes.
static DRAINING: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());

/// Waits, until `deadline` at most, for the producers dropped earlier to send what they held.
/// Returns how many were still at it.
pub fn wait_for_draining(deadline: Instant) -> usize {
    let threads: Vec<JoinHandle<()>> =
        DRAINING.lock().map(|mut d| std::mem::take(&mut *d)).unwrap_or_default();
    let mut left = 0;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.is_finished() {
            let _ = t.join();
        } else {
            left += 1;
        }
    }
    left
}

impl Drop for Producer {
    /// The thread finishes on its own (within `drain`); [`wait_for_draining`] waits for it.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let (Some(t), Ok(mut draining)) = (thread, DRAINING.lock()) {
            draining.retain(|t| !t.is_finished());
            draining.push(t);
        }
    }
}

/// Whether the queue turned a batch away since the thread last emptied it. A flag that senders
/// set and the thread cleared could be set just after the thread emptied the queue (by a sender
/// turned away just before), and stay set while the thread waits on a broker, the queue empty.
/// So a sender records the count of emptyings it saw before it tried, and the queue counts as
/// full only while no emptying came after that.
#[derive(Debug, Default)]
struct QueueRoom {
    /// Times the thread found the queue empty (written by the thread alone).
    emptied: AtomicU64,
    /// One more than the `emptied` a turned-away sender saw before it tried (0: none).
    refused: AtomicU64,
}

impl QueueRoom {
    /// Read before a send, for [`QueueRoom::refused`].
    fn before_send(&self) -> u64 {
        self.emptied.load(Ordering::Acquire)
    }

    fn refused(&self, emptied_before: u64) {
        self.refused.fetch_max(emptied_before + 1, Ordering::Relaxed);
    }

    fn emptied(&self) {
        self.emptied.fetch_add(1, Ordering::Release);
    }

    fn is_full(&self) -> bool {
        self.refused.load(Ordering::Relaxed) > self.emptied.load(Ordering::Relaxed)
    }
}

/// A message waiting in the buffer: 56 bytes besides its own (a [`Message`] with the time it
/// came would take 96). A buffer of small messages holds hundreds of thousands of these, and
/// the queues' memory, grown while the broker is away, is written to for the first time then.
struct Held {
    /// The key, then the value, copied into the arena of the partition it waits for.
    data: Bytes,
    timestamp_ms: i64,
    /// When the thread took it, in nanoseconds from the thread's `epoch` (linger counts from it).
    since: u64,
    /// `NO_KEY` when it has none.
    key_len: u32,
    /// `NO_PARTITION` unless the sender chose one.
    partition: u32,
}

// What the doc of `Held` says, and what config/README.md tells operators a message costs.
const _: () = assert!(std::mem::size_of::<Held>() == 56);

const NO_KEY: u32 = u32::MAX;
const NO_PARTITION: u32 = u32::MAX;

impl Held {
    /// `message` with its bytes copied into `arena`: a message handed over shares its memory
    /// with whatever else its sender wrote next to it (a worker writes messages and access-log
    /// records into one arena). Held as it came, one message would keep all of that alive for as
    /// long as the broker is away, and the buffer would hold more memory than `buffer` says.
    /// Each partition copies into an arena of its own, so a partition that cannot be sent keeps
    /// only its own blocks.
    fn copy(arena: &mut Arena, message: &Message, since: u64) -> Held {
        let key = message.key.as_deref().unwrap_or_default();
        let mut block = arena.take(key.len() + message.value.len());
        block.extend_from_slice(key);
        block.extend_from_slice(&message.value);
        let data = block.split().freeze();
        arena.put_back(block);
        Held {
            data,
            timestamp_ms: message.timestamp_ms,
            since,
            // A key (a rendered template) is far shorter than 4 GiB.
            key_len: message.key.as_ref().map_or(NO_KEY, |k| k.len().min(NO_KEY as usize - 1) as u32),
            // u32::MAX is no partition a topic has (Kafka's are i32): it stays one.
            partition: message.partition.map_or(NO_PARTITION, |p| p.min(NO_PARTITION - 1)),
        }
    }

    /// The same message, copied into another arena (a new partition).
    fn moved(&self, arena: &mut Arena) -> Held {
        Held { data: arena.copy(&self.data), ..*self }
    }

    fn key_len(&self) -> usize {
        if self.key_len == NO_KEY { 0 } else { self.key_len as usize }
    }

    fn key(&self) -> Option<Bytes> {
        (self.key_len != NO_KEY).then(|| self.data.slice(..self.key_len()))
    }

    fn value(&self) -> Bytes {
        self.data.slice(self.key_len()..)
    }

    fn partition(&self) -> Option<u32> {
        (self.partition != NO_PARTITION).then_some(self.partition)
    }

    fn size(&self) -> usize {
        self.data.len()
    }
}

/// The topic as the last metadata described it.
struct Layout {
    /// Leader of each partition (by index); `None` while it has none.
    leaders: Vec<Option<i32>>,
    brokers: HashMap<i32, (String, u16)>,
}

/// The layout a metadata answer gives `topic_name`: partitions 0 to n-1, each described once,
/// with their leaders (a broker's bytes are checked, not trusted).
fn layout_of(answer: &MetadataResponse, topic_name: &str) -> Result<Layout, Error> {
    let topic = answer
        .topics
        .iter()
        .find(|t| t.name.as_ref().is_some_and(|n| n.0.as_str() == topic_name))
        .ok_or_else(|| Error::Broker(format!("the broker did not describe topic {}", topic_name)))?;
    if topic.error_code != 0 {
        return Err(Error::Broker(format!("topic {}: {}", topic_name, code_name(topic.error_code))));
    }
    let n = topic.partitions.len();
    if n == 0 || n > 100_000 {
        return Err(Error::Protocol(format!("topic {}: {n} partitions", topic_name)));
    }
    let mut leaders: Vec<Option<i32>> = vec![None; n];
    let mut seen = vec![false; n];
    for p in &topic.partitions {
        let i = usize::try_from(p.partition_index).ok().filter(|&i| i < n && !seen[i]).ok_or_else(|| {
            Error::Protocol(format!("topic {}: partition {} described oddly", topic_name, p.partition_index))
        })?;
        seen[i] = true;
        if p.error_code == 0 && p.leader_id.0 >= 0 {
            leaders[i] = Some(p.leader_id.0);
        }
    }
    let brokers = answer
        .brokers
        .iter()
        .filter_map(|b| Some((b.node_id.0, (b.host.as_str().to_owned(), u16::try_from(b.port).ok()?))))
        .collect();
    Ok(Layout { leaders, brokers })
}

/// A connection to broker `host:port` as `settings` have it made (its timeout, SASL).
fn connect(
    settings: &Settings,
    connector: &dyn Connector,
    (host, port): (&str, u16),
    client_id: &str,
) -> Result<Connection, Error> {
    let sasl = settings.sasl.as_ref().map(|(u, p)| (u.as_str(), p.as_str()));
    Connection::open(connector, host, port, settings.timeout, client_id, sasl)
}

/// What the broker on `conn` says of `topic`: its partitions, their leaders and the brokers.
/// Asks that the topic not be made for the asking (a field from version 4 on; earlier brokers
/// follow their own setting).
pub(crate) fn ask_metadata(conn: &mut Connection, topic: &str) -> Result<MetadataResponse, Error> {
    let version = conn.versions.metadata;
    let request = MetadataRequest::default()
        .with_topics(Some(vec![
            MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_string(topic.to_owned())))),
        ]))
        .with_allow_auto_topic_creation(version < 4);
    conn.call(ApiKey::Metadata, version, &request)
}

/// What `portcullis check` asks of a logger's brokers: each bootstrap broker in turn, until one
/// answers, connected and authenticated as the producer would be, for the topic's partitions.
/// Returns how many partitions the topic has and how many of them have no leader now; else what
/// each broker tried said, in turn. Nothing is created or sent.
pub fn probe(settings: &Settings, connector: &dyn Connector) -> Result<(usize, usize), String> {
    let mut said = Vec::with_capacity(settings.bootstrap.len());
    for (host, port) in &settings.bootstrap {
        let asked = connect(settings, connector, (host, *port), "portcullis-check")
            .and_then(|mut conn| layout_of(&ask_metadata(&mut conn, &settings.topic)?, &settings.topic));
        match asked {
            Ok(layout) => {
                let leaderless = layout.leaders.iter().filter(|l| l.is_none()).count();
                return Ok((layout.leaders.len(), leaderless));
            }
            // Connection errors name the broker already.
            Err(e) => said.push(match e.to_string() {
                m if m.starts_with(&format!("{host}:{port}")) => m,
                m => format!("{host}:{port}: {m}"),
            }),
        }
    }
    Err(if said.is_empty() { "no bootstrap broker".to_owned() } else { said.join("; ") })
}

/// The leader of each partition of `topic` in a metadata answer, as the producer takes it (for
/// the fuzz target: whatever a broker sends is refused or described, never a panic).
#[doc(hidden)]
pub fn leaders_of(answer: &MetadataResponse, topic: &str) -> Result<Vec<Option<i32>>, Error> {
    layout_of(answer, topic).map(|l| l.leaders)
}

/// One partition's queue, and how often its head batch was refused.
struct Queue {
    held: VecDeque<Held>,
    bytes: usize,
    attempts: u32,
    /// Where this partition's messages are copied.
    arena: Arena,
}

/// While the thread holds messages, how often at least it moves new ones from the hand-off
/// queue into its buffer (the queue fills in about a second at a hundred thousand messages a
/// second; the buffer is what lasts while the broker is away).
const TAKE_EVERY: Duration = Duration::from_millis(25);
/// Holding none, how long the thread sleeps on the queue before it looks at whether it should
/// stop (a batch handed over wakes it at once).
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// A Produce request sent and not answered yet. Its answer is read at the thread's next turn,
/// by when it has come: the thread wakes once per batch it sends, not once more for the answer
/// (on a busy core a wake-up costs tens of microseconds). Until then its messages stay at the
/// heads of their partitions' queues, and no other batch of those partitions goes.
struct InFlight {
    leader: i32,
    conn: Connection,
    id: i32,
    version: i16,
    /// Per partition the request carries: the partition, and the messages and bytes it has in
    /// the request, from the head of its queue.
    counts: Vec<(usize, usize, usize)>,
}

/// The producer's thread.
struct Sender {
    s: Settings,
    connector: Arc<dyn Connector>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    /// Set when a message found no room in the buffer, cleared when room is made (the
    /// producer's [`Producer::is_full`]); written only when it changes.
    full: Arc<AtomicBool>,
    /// Told each time the thread has emptied the queue (so that senders which stopped sending
    /// because it was full start again).
    room: Arc<QueueRoom>,
    /// Taken from the queue, partition not chosen yet (no metadata).
    unassigned: VecDeque<Held>,
    queues: Vec<Queue>,
    bytes: usize,
    layout: Option<Layout>,
    /// Broker connections by node id (`-1`: the bootstrap broker that gave the metadata).
    conns: HashMap<i32, Connection>,
    /// Produce requests sent and not answered yet (their connections out of `conns`).
    in_flight: Vec<InFlight>,
    /// The partition that takes messages without key or partition, until a batch is sent.
    sticky: usize,
    next_try: Instant,
    backoff: Duration,
    /// The last failure, reported once until a success.
    failing: Option<String>,
    next_bootstrap: usize,
    /// Held bytes last added to the shared gauge.
    reported: u64,
    /// Where messages are copied while the partitions are not known.
    arena: Arena,
    /// What [`Held::since`] counts from.
    epoch: Instant,
    /// Records of the compressed batch being encoded by the codec (emptied after each: their
    /// bytes are the held ones).
    records: Vec<Record>,
    /// Where batches are encoded: each is split off, and the space is used again once the
    /// request that carried it is gone. A fresh buffer per batch (hundreds of KiB) would cost
    /// page faults and zeroed pages whenever the allocator had given the last one back.
    encoded: BytesMut,
}

/// Message `offset` of a batch as the codec's encoder takes it: create time, no producer id, no
/// headers.
pub(crate) fn codec_record(offset: i64, timestamp_ms: i64, key: Option<Bytes>, value: Bytes) -> Record {
    Record {
        transactional: false,
        control: false,
        delete_horizon: false,
        partition_leader_epoch: -1,
        producer_id: -1,
        producer_epoch: -1,
        timestamp_type: TimestampType::Creation,
        offset,
        // The codec starts a new batch wherever offset less sequence changes: one that rises
        // with the offset keeps every record in one batch (a broker takes exactly one per
        // partition in a produce request), and -1 at offset 0, the batch's base sequence, says
        // "no sequence" (no idempotence).
        sequence: offset as i32 - 1,
        timestamp: timestamp_ms,
        key,
        value: Some(value),
        headers: Default::default(),
    }
}

/// The bytes an arena of held messages grows by.
const ARENA: usize = 64 * 1024;
/// Free blocks an arena keeps for reuse at least (and as many as are in use; see [`Arena`]).
const KEPT_BLOCKS: usize = 8;

fn arena() -> Arena {
    Arena::new(ARENA, KEPT_BLOCKS)
}

impl Sender {
    fn new(s: Settings, connector: Arc<dyn Connector>, stats: Arc<Stats>, stop: Arc<AtomicBool>) -> Sender {
        Sender {
            backoff: s.backoff,
            s,
            connector,
            stats,
            stop,
            full: Arc::new(AtomicBool::new(false)),
            room: Arc::new(QueueRoom::default()),
            unassigned: VecDeque::new(),
            queues: Vec::new(),
            bytes: 0,
            layout: None,
            conns: HashMap::new(),
            in_flight: Vec::new(),
            sticky: 0,
            next_try: Instant::now(),
            failing: None,
            next_bootstrap: 0,
            reported: 0,
            arena: arena(),
            epoch: Instant::now(),
            records: Vec::new(),
            encoded: BytesMut::new(),
        }
    }

    fn run(&mut self, rx: &Outlet<Message>) {
        let mut stop_by: Option<Instant> = None;
        loop {
            let open = self.take(rx);
            if stop_by.is_none() && (self.stop.load(Ordering::Acquire) || !open) {
                stop_by = Some(Instant::now() + self.s.drain);
            }
            // What was sent last turn is settled before anything else looks at the queues.
            if !self.in_flight.is_empty() {
                match self.finish() {
                    Ok(()) => self.succeeded(),
                    Err(e) => self.failed(e),
                }
            }
            let now = Instant::now();
            if let Some(deadline) = stop_by {
                // Whatever is still in the queue joins the buffer first.
                self.take(rx);
                if self.held() == 0 || now >= deadline {
                    self.drop_all();
                    return;
                }
            }
            let due = self.due(now, stop_by.is_some());
            if due && now >= self.next_try {
                match self.flush(now, stop_by.is_some()) {
                    // Requests in flight: settled at the next turn.
                    Ok(()) if !self.in_flight.is_empty() => {}
                    Ok(()) => self.succeeded(),
                    Err(e) => self.failed(e),
                }
                // A partition that already holds a full batch more sends it as soon as the
                // answer to this one is read.
                if self.in_flight.is_empty() || self.full_behind() {
                    continue;
                }
            }
            let now = Instant::now();
            // Holding messages: sleep until the next batch is due, or a retry may go (a batch
            // that is due waits for the end of a backoff, never less), or it is time to take
            // what came (and read the answers to what was sent). Holding none: sleep until
            // messages come.
            match self.oldest_waiting().map(|t| self.instant(t)) {
                Some(oldest) => {
                    let wake = (now + TAKE_EVERY).min((oldest + self.s.linger).max(self.next_try));
                    std::thread::sleep(wake.saturating_duration_since(now).max(Duration::from_millis(1)));
                }
                None if !self.in_flight.is_empty() => std::thread::sleep(TAKE_EVERY),
                None => {
                    rx.wait(IDLE_WAIT);
                }
            }
        }
    }

    /// Moves what the queue holds into the buffer (dropping what does not fit); `false` once
    /// every sender is gone.
    fn take(&mut self, rx: &Outlet<Message>) -> bool {
        // One reading of the clock for what waited together (linger is counted from it).
        let now = self.since_epoch(Instant::now());
        loop {
            match rx.try_recv() {
                Ok(mut batch) => {
                    for message in batch.drain(..) {
                        let size = message.size();
                        if self.bytes + size > self.s.buffer {
                            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                            // Full, until what it holds goes. (A message larger than the whole
                            // buffer, the buffer empty, says nothing of the next one.)
                            if self.bytes > 0 && !self.full.load(Ordering::Relaxed) {
                                self.full.store(true, Ordering::Relaxed);
                            }
                            continue;
                        }
                        self.bytes += size;
                        self.place(message.partition, message.key.as_deref(), size, |arena| {
                            Held::copy(arena, &message, now)
                        });
                    }
                    rx.recycle(batch);
                }
                Err(TryRecvError::Empty) => {
                    self.room.emptied();
                    break;
                }
                Err(TryRecvError::Disconnected) => {
                    self.report_buffered();
                    return false;
                }
            }
        }
        self.report_buffered();
        true
    }

    /// Adds this producer's change of held bytes to the gauge, which a producer replaced by a
    /// reload and still draining shares with its successor.
    fn report_buffered(&mut self) {
        let now = self.bytes as u64;
        // Room was made: messages may come again.
        if now < self.reported && self.full.load(Ordering::Relaxed) {
            self.full.store(false, Ordering::Relaxed);
        }
        if now >= self.reported {
            self.stats.buffered.fetch_add(now - self.reported, Ordering::Relaxed);
        } else {
            self.stats.buffered.fetch_sub(self.reported - now, Ordering::Relaxed);
        }
        self.reported = now;
    }

    /// Nanoseconds from the thread's epoch to `t`.
    fn since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos().min(u64::MAX as u128) as u64
    }

    fn instant(&self, since: u64) -> Instant {
        self.epoch + Duration::from_nanos(since)
    }

    /// Puts a message in its partition's queue, or aside until the partitions are known;
    /// `hold` copies it into the arena of where it goes.
    fn place(
        &mut self,
        partition: Option<u32>,
        key: Option<&[u8]>,
        size: usize,
        hold: impl FnOnce(&mut Arena) -> Held,
    ) {
        let count = self.queues.len();
        if count == 0 {
            let held = hold(&mut self.arena);
            self.unassigned.push_back(held);
            return;
        }
        let partition = match (partition, key) {
            (Some(p), _) => p as usize,
            (None, Some(key)) => partition_of(key, count),
            (None, None) => self.sticky % count,
        };
        if partition >= count {
            self.bytes -= size;
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(logger = %self.s.name, partition, partitions = count, topic = %self.s.topic, "a message for a partition the topic does not have was dropped");
            return;
        }
        let q = &mut self.queues[partition];
        let held = hold(&mut q.arena);
        q.bytes += held.size();
        q.held.push_back(held);
    }

    fn held(&self) -> usize {
        self.unassigned.len() + self.queues.iter().map(|q| q.held.len()).sum::<usize>()
    }

    /// When the oldest message held came (see [`Held::since`]).
    fn oldest(&self) -> Option<u64> {
        let unassigned = self.unassigned.front().map(|h| h.since);
        let queued = self.queues.iter().filter_map(|q| q.held.front().map(|h| h.since)).min();
        match (unassigned, queued) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The messages and bytes partition `p` has in requests in flight.
    fn in_flight_of(&self, p: usize) -> (usize, usize) {
        let mut sent = (0, 0);
        for &(_, n, bytes) in self.in_flight.iter().flat_map(|r| &r.counts).filter(|c| c.0 == p) {
            sent = (sent.0 + n, sent.1 + bytes);
        }
        sent
    }

    /// Whether a partition holds a full batch besides what it has in flight.
    fn full_behind(&self) -> bool {
        self.queues
            .iter()
            .enumerate()
            .any(|(p, q)| q.bytes.saturating_sub(self.in_flight_of(p).1) >= self.s.max_batch)
    }

    /// When the oldest message held and not in a request in flight came.
    fn oldest_waiting(&self) -> Option<u64> {
        if self.in_flight.is_empty() {
            return self.oldest();
        }
        let unassigned = self.unassigned.front().map(|h| h.since);
        let queued = self
            .queues
            .iter()
            .enumerate()
            .filter_map(|(p, q)| q.held.get(self.in_flight_of(p).0).map(|h| h.since))
            .min();
        match (unassigned, queued) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether a batch should go now: one is full, or has waited `linger`, or the producer is
    /// stopping.
    fn due(&self, now: Instant, stopping: bool) -> bool {
        if self.held() == 0 {
            return false;
        }
        stopping
            || self.oldest().is_some_and(|t| now.duration_since(self.instant(t)) >= self.s.linger)
            || self.queues.iter().any(|q| q.bytes >= self.s.max_batch)
            || self.unassigned.iter().map(Held::size).sum::<usize>() >= self.s.max_batch
    }

    fn drop_all(&mut self) {
        let left = self.held() as u64;
        if left > 0 {
            self.stats.dropped.fetch_add(left, Ordering::Relaxed);
            tracing::warn!(logger = %self.s.name, messages = left, "stopping with messages the broker did not take; dropped");
        }
        self.unassigned.clear();
        self.queues.clear();
        self.bytes = 0;
        self.report_buffered();
    }

    fn succeeded(&mut self) {
        // What was sent freed its blocks: beyond the few kept, they go.
        self.arena.trim();
        self.queues.iter_mut().for_each(|q| q.arena.trim());
        self.backoff = self.s.backoff;
        self.stats.up.store(true, Ordering::Relaxed);
        if let Some(was) = self.failing.take() {
            tracing::info!(logger = %self.s.name, after = %was, "the broker takes messages again");
        }
    }

    fn failed(&mut self, e: Error) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        self.stats.up.store(false, Ordering::Relaxed);
        if !matches!(e, Error::Broker(_)) {
            // A connection that failed may be in the middle of an answer: start over.
            self.conns.clear();
            self.layout = None;
        }
        let message = e.to_string();
        if self.failing.as_deref() != Some(message.as_str()) {
            tracing::warn!(logger = %self.s.name, error = %message, held = self.held(), "cannot send to the broker; messages wait in the buffer");
            self.failing = Some(message);
        }
        self.next_try = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(self.s.max_backoff);
    }

    /// Sends every due batch: metadata first when the layout is unknown.
    fn flush(&mut self, now: Instant, stopping: bool) -> Result<(), Error> {
        if self.layout.is_none() {
            self.refresh()?;
        }
        let Some(leaders) = self.layout.as_ref().map(|l| l.leaders.clone()) else { return Ok(()) };
        // Batches per leader.
        let mut by_leader: HashMap<i32, Vec<usize>> = HashMap::new();
        let mut leaderless = None;
        for (p, q) in self.queues.iter().enumerate() {
            let ready = q.bytes >= self.s.max_batch
                || stopping
                || q.held.front().is_some_and(|h| now.duration_since(self.instant(h.since)) >= self.s.linger);
            if q.held.is_empty() || !ready {
                continue;
            }
            match leaders.get(p).copied().flatten() {
                Some(leader) => by_leader.entry(leader).or_default().push(p),
                // Its messages wait (the others go): the layout is asked for again.
                None => leaderless = Some(p),
            }
        }
        let mut result = Ok(());
        for (leader, partitions) in by_leader {
            if let Err(e) = self.produce(leader, &partitions) {
                result = Err(e);
            }
        }
        self.sticky = self.next_sticky(&leaders);
        if let Some(p) = leaderless {
            self.layout = None;
            result =
                result.and(Err(Error::Broker(format!("partition {p} of {} has no leader", self.s.topic))));
        }
        result
    }

    /// The partition after the current sticky one that has a leader (messages without key or
    /// partition go there until the next batch).
    fn next_sticky(&self, leaders: &[Option<i32>]) -> usize {
        let n = leaders.len().max(1);
        (1..=n)
            .map(|step| (self.sticky + step) % n)
            .find(|&p| leaders.get(p).is_some_and(Option::is_some))
            .unwrap_or(0)
    }

    /// Asks a bootstrap broker (each in turn, from where the last attempt left off) for the
    /// topic's partitions and their leaders.
    fn refresh(&mut self) -> Result<(), Error> {
        let mut last = Error::Io("no bootstrap broker".to_owned());
        for _ in 0..self.s.bootstrap.len() {
            let (host, port) = self.s.bootstrap[self.next_bootstrap % self.s.bootstrap.len()].clone();
            self.next_bootstrap += 1;
            match self.metadata(&host, port) {
                Ok(layout) => {
                    self.adopt(layout);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn metadata(&mut self, host: &str, port: u16) -> Result<Layout, Error> {
        let mut conn = match self.conns.remove(&-1) {
            Some(c) => c,
            None => self.open(host, port)?,
        };
        let answer = ask_metadata(&mut conn, &self.s.topic)?;
        self.conns.insert(-1, conn);
        layout_of(&answer, &self.s.topic)
    }

    /// Takes a new layout: the partition queues follow the partition count (a changed count
    /// places every held message again).
    fn adopt(&mut self, layout: Layout) {
        let count = layout.leaders.len();
        if count != self.queues.len() {
            let mut all: Vec<Held> = self.queues.drain(..).flat_map(|q| q.held).collect();
            all.sort_by_key(|h| h.since);
            self.unassigned.extend(all);
            self.queues = (0..count)
                .map(|_| Queue { held: VecDeque::new(), bytes: 0, attempts: 0, arena: arena() })
                .collect();
        }
        // Connections to brokers the layout no longer names are closed.
        self.conns.retain(|id, _| *id == -1 || layout.brokers.contains_key(id));
        self.layout = Some(layout);
        while let Some(held) = self.unassigned.pop_front() {
            self.place(held.partition(), held.key().as_deref(), held.size(), |arena| held.moved(arena));
        }
    }

    fn open(&self, host: &str, port: u16) -> Result<Connection, Error> {
        connect(&self.s, &*self.connector, (host, port), "portcullis")
    }

    /// One Produce request to `leader` with a batch of each of `partitions`.
    fn produce(&mut self, leader: i32, partitions: &[usize]) -> Result<(), Error> {
        let (host, port) = self
            .layout
            .as_ref()
            .and_then(|l| l.brokers.get(&leader).cloned())
            .ok_or_else(|| Error::Protocol(format!("leader {leader} is not among the brokers")))?;
        let mut conn = match self.conns.remove(&leader) {
            Some(c) => c,
            None => self.open(&host, port)?,
        };
        let mut counts = Vec::with_capacity(partitions.len());
        let mut data = Vec::with_capacity(partitions.len());
        for &p in partitions {
            let (records, n) = self.batch(p)?;
            counts.push((p, n));
            data.push(PartitionProduceData::default().with_index(p as i32).with_records(Some(records)));
        }
        // The broker gives up (and says so) before the socket's read does.
        let broker_timeout = self.s.timeout.mul_f64(0.75);
        let request = ProduceRequest::default()
            .with_acks(self.s.acks)
            .with_timeout_ms(broker_timeout.as_millis().min(i32::MAX as u128) as i32)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(self.s.topic.clone())))
                    .with_partition_data(data),
            ]);
        let version = conn.versions.produce;
        if self.s.acks == 0 {
            conn.send(ApiKey::Produce, version, &request)?;
            self.conns.insert(leader, conn);
            for (p, n) in counts {
                self.settle(p, n, 0);
            }
            return Ok(());
        }
        match conn.send(ApiKey::Produce, version, &request) {
            Ok(id) => {
                let counts = counts
                    .into_iter()
                    .map(|(p, n)| (p, n, self.queues[p].held.iter().take(n).map(Held::size).sum()))
                    .collect();
                self.in_flight.push(InFlight { leader, conn, id, version, counts });
                Ok(())
            }
            Err(e) => {
                // Sent again, the batches count as attempts (see `finish`).
                for (p, n) in counts {
                    self.settle(p, n, kafka_protocol::ResponseError::NetworkException.code());
                }
                Err(e)
            }
        }
    }

    /// Reads the answers to the Produce requests in flight, and settles their batches.
    fn finish(&mut self) -> Result<(), Error> {
        let mut result = Ok(());
        for InFlight { leader, mut conn, id, version, counts } in std::mem::take(&mut self.in_flight) {
            let answer: ProduceResponse = match conn.receive(ApiKey::Produce, version, id) {
                Ok(a) => a,
                Err(e) => {
                    // The request went out and no answer came back: the broker may have written
                    // the batches. Sent again, they count as attempts, so that a broker that
                    // writes and then hangs up cannot make them go round for ever.
                    for (p, n, _) in counts {
                        self.settle(p, n, kafka_protocol::ResponseError::NetworkException.code());
                    }
                    result = Err(e);
                    continue;
                }
            };
            self.conns.insert(leader, conn);
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let mut refused = None;
            for (p, n, _) in counts {
                let code = answer
                    .responses
                    .iter()
                    .filter(|t| t.name.0.as_str() == self.s.topic)
                    .flat_map(|t| &t.partition_responses)
                    .find(|r| r.index == p as i32)
                    .map(|r| r.error_code);
                // A partition the answer leaves out is treated as a retriable refusal.
                let code = code.unwrap_or(kafka_protocol::ResponseError::NetworkException.code());
                if code != 0 && refused.is_none() {
                    refused = Some(format!("partition {p}: {}", code_name(code)));
                }
                self.settle(p, n, code);
            }
            if let Some(why) = refused
                && result.is_ok()
            {
                result = Err(Error::Broker(why));
            }
        }
        result
    }

    /// The head of partition `p`'s queue as one record batch: up to `max_batch` bytes (at least
    /// one message).
    fn batch(&mut self, p: usize) -> Result<(Bytes, usize), Error> {
        let q = &self.queues[p];
        // How many go (sized first: the records and the encoding are allocated once).
        let mut size = 0;
        let mut count = 0;
        for (i, h) in q.held.iter().enumerate() {
            if i > 0 && size + h.size() > self.s.max_batch {
                break;
            }
            size += h.size();
            count += 1;
        }
        // The batch's head, and at most 32 bytes of each record's own (lengths, deltas,
        // attributes) before compression. The space of batches let go is used again (a
        // request's batches are let go together, once it is answered).
        self.encoded.reserve(size + 128 + 32 * count);
        if self.s.compression == Compression::None {
            let messages = q.held.iter().take(count).map(|h| {
                let key = (h.key_len != NO_KEY).then(|| &h.data[..h.key_len()]);
                (h.timestamp_ms, key, &h.data[h.key_len()..])
            });
            crate::records::encode_batch(&mut self.encoded, messages);
            return Ok((self.encoded.split().freeze(), count));
        }
        let records = &mut self.records;
        records.clear();
        records.reserve(count);
        for (i, h) in q.held.iter().take(count).enumerate() {
            records.push(codec_record(i as i64, h.timestamp_ms, h.key(), h.value()));
        }
        let options = RecordEncodeOptions { version: 2, compression: self.s.compression };
        let encoded = RecordBatchEncoder::encode(&mut self.encoded, &*records, &options);
        records.clear();
        if let Err(e) = encoded {
            self.encoded.clear();
            return Err(Error::Encode(format!("a record batch: {e}")));
        }
        Ok((self.encoded.split().freeze(), count))
    }

    /// What the broker said of partition `p`'s batch of `n` messages.
    fn settle(&mut self, p: usize, n: usize, code: i16) {
        let q = &mut self.queues[p];
        let give_up = code != 0 && (!retriable(code) || q.attempts >= self.s.retries);
        if code != 0 && !give_up {
            q.attempts += 1;
            // The leader may have moved.
            self.layout = None;
            return;
        }
        let mut bytes = 0;
        for h in q.held.drain(..n.min(q.held.len())) {
            bytes += h.size();
        }
        q.bytes -= bytes;
        q.attempts = 0;
        self.bytes -= bytes;
        self.report_buffered();
        if code == 0 {
            self.stats.sent.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            self.stats.failed.fetch_add(n as u64, Ordering::Relaxed);
            tracing::warn!(logger = %self.s.name, partition = p, messages = n, error = %code_name(code), "the broker refused a batch; dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use kafka_protocol::messages::BrokerId;
    use kafka_protocol::messages::metadata_response::{MetadataResponsePartition, MetadataResponseTopic};

    use super::*;

    fn answer(partitions: &[(i32, i32)]) -> MetadataResponse {
        MetadataResponse::default().with_topics(vec![
            MetadataResponseTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str("t"))))
                .with_partitions(
                    partitions
                        .iter()
                        .map(|&(index, leader)| {
                            MetadataResponsePartition::default()
                                .with_partition_index(index)
                                .with_leader_id(BrokerId(leader))
                        })
                        .collect(),
                ),
        ])
    }

    #[test]
    fn a_layout_is_partitions_0_to_n_each_once() {
        let layout = layout_of(&answer(&[(1, 7), (0, -1)]), "t").expect("a layout");
        assert_eq!(layout.leaders, vec![None, Some(7)], "a partition without a leader stays in the layout");
        // What a broker could send that would index out of bounds or overflow.
        for odd in [&[(-1, 0), (1, 0)][..], &[(0, 0), (0, 0)], &[(i32::MAX, 0)], &[(2, 0), (0, 0)], &[]] {
            assert!(layout_of(&answer(odd), "t").is_err(), "{odd:?}");
        }
        assert!(layout_of(&answer(&[(0, 1)]), "other").is_err());
    }

    #[test]
    fn the_sticky_partition_skips_those_without_a_leader() {
        let s = Settings::new("t", vec![("h".to_owned(), 1)], "t");
        let stop = Arc::new(AtomicBool::new(false));
        let mut sender = Sender::new(s, Arc::new(crate::TcpConnector), Arc::new(Stats::default()), stop);
        let leaders = [Some(1), None, None, Some(2)];
        sender.sticky = 0;
        assert_eq!(sender.next_sticky(&leaders), 3);
        sender.sticky = 3;
        assert_eq!(sender.next_sticky(&leaders), 0);
    }

    #[test]
    fn a_sender_turned_away_just_before_the_queue_was_emptied_does_not_leave_it_full() {
        let room = QueueRoom::default();
        assert!(!room.is_full());
        // Turned away, nothing emptied since: full.
        let seen = room.before_send();
        room.refused(seen);
        assert!(room.is_full());
        room.emptied();
        assert!(!room.is_full());
        // Turned away; the thread empties the queue before the sender says so.
        let seen = room.before_send();
        room.emptied();
        room.refused(seen);
        assert!(!room.is_full(), "the queue was emptied after the send that failed");
        // Two senders, the later one's word kept.
        let (a, b) = (room.before_send(), room.before_send());
        room.refused(b);
        room.refused(a);
        assert!(room.is_full());
    }

    #[test]
    fn a_message_larger_than_the_whole_buffer_is_dropped_without_marking_it_full() {
        let mut s = Settings::new("t", vec![("h".to_owned(), 1)], "t");
        s.buffer = 10;
        let stats = Arc::new(Stats::default());
        let mut sender = Sender::new(
            s,
            Arc::new(crate::TcpConnector),
            Arc::clone(&stats),
            Arc::new(AtomicBool::new(false)),
        );
        let (inlet, outlet) = handoff::<Message>(4);
        let message = |n: usize| Message {
            key: None,
            partition: None,
            value: Bytes::from(vec![b'x'; n]),
            timestamp_ms: 0,
        };
        inlet.send(&mut vec![message(11)]).unwrap();
        assert!(sender.take(&outlet));
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 1);
        assert!(!sender.full.load(Ordering::Relaxed), "nothing held: the next message may fit");
        // Held 6, then 6 more do not fit: full until room is made.
        inlet.send(&mut vec![message(6), message(6)]).unwrap();
        assert!(sender.take(&outlet));
        assert_eq!(stats.dropped.load(Ordering::Relaxed), 2);
        assert!(sender.full.load(Ordering::Relaxed));
        sender.drop_all();
        assert!(!sender.full.load(Ordering::Relaxed), "room made");
    }

    #[test]
    fn held_messages_keep_key_value_and_partition_through_a_new_partition_count() {
        let s = Settings::new("t", vec![("h".to_owned(), 1)], "t");
        let mut sender = Sender::new(
            s,
            Arc::new(crate::TcpConnector),
            Arc::new(Stats::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let layout = |n: usize| Layout { leaders: vec![Some(1); n], brokers: HashMap::new() };
        let sent = [
            Message {
                key: Some(Bytes::from_static(b"tenant-7")),
                partition: None,
                value: Bytes::from_static(b"a"),
                timestamp_ms: 1,
            },
            Message { key: None, partition: Some(2), value: Bytes::from_static(b"bb"), timestamp_ms: 2 },
            Message { key: Some(Bytes::new()), partition: None, value: Bytes::new(), timestamp_ms: 3 },
            Message { key: None, partition: None, value: Bytes::from_static(b"dddd"), timestamp_ms: 4 },
        ];
        // Before any metadata: set aside; then one partition; then three.
        for (i, m) in sent.iter().enumerate() {
            let size = m.size();
            sender.bytes += size;
            sender.place(m.partition, m.key.as_deref(), size, |arena| Held::copy(arena, m, i as u64));
        }
        assert_eq!(sender.unassigned.len(), 4);
        sender.adopt(layout(3));
        sender.adopt(layout(4));
        sender.adopt(layout(3));
        assert_eq!(sender.bytes, 15);
        let mut found: Vec<(usize, Message)> = Vec::new();
        for (p, q) in sender.queues.iter().enumerate() {
            assert_eq!(q.bytes, q.held.iter().map(Held::size).sum::<usize>());
            for h in &q.held {
                let m = Message {
                    key: h.key(),
                    partition: h.partition(),
                    value: h.value(),
                    timestamp_ms: h.timestamp_ms,
                };
                found.push((p, m));
            }
        }
        found.sort_by_key(|(_, m)| m.timestamp_ms);
        let messages: Vec<&Message> = found.iter().map(|(_, m)| m).collect();
        assert_eq!(
            messages,
            sent.iter().collect::<Vec<_>>(),
            "key (none and empty apart), value, partition, time"
        );
        assert_eq!(found[0].0, partition_of(b"tenant-7", 3));
        assert_eq!(found[1].0, 2, "the partition the sender chose");
        assert_eq!(found[2].0, partition_of(b"", 3), "an empty key is a key");
    }

    #[test]
    fn a_partitions_messages_go_in_one_batch_without_a_sequence() {
        // Uncompressed, the batch is written by the producer itself; compressed, by the codec.
        for compression in [Compression::None, Compression::Zstd] {
            let mut s = Settings::new("t", vec![("h".to_owned(), 1)], "t");
            s.compression = compression;
            let mut sender = Sender::new(
                s,
                Arc::new(crate::TcpConnector),
                Arc::new(Stats::default()),
                Arc::new(AtomicBool::new(false)),
            );
            sender.adopt(Layout { leaders: vec![Some(1); 2], brokers: HashMap::new() });
            for (partition, i) in (0..5u8).map(|i| (0, i)).chain((0..3u8).map(|i| (1, 100 + i))) {
                let m = Message {
                    key: (i != 2).then(|| Bytes::from(vec![b'k', i])),
                    partition: Some(partition),
                    value: Bytes::from(vec![i; 3]),
                    timestamp_ms: 1000 + i64::from(i),
                };
                let size = m.size();
                sender.bytes += size;
                sender.place(m.partition, m.key.as_deref(), size, |arena| Held::copy(arena, &m, 0));
            }
            let (bytes, n) = sender.batch(0).expect("a batch");
            assert_eq!(n, 5);
            // The next batch is encoded while this one is held (a request with both): it is
            // left as it was.
            let kept = bytes.to_vec();
            let (other, n) = sender.batch(1).expect("a batch");
            assert_eq!((n, &bytes[..]), (3, &kept[..]));
            assert_ne!(other, bytes);
            // Both let go, the space is used again: partition 0 encodes as before.
            drop((bytes, other));
            let (bytes, _) = sender.batch(0).expect("a batch");
            assert_eq!(&bytes[..], &kept[..]);
            let heads =
                kafka_protocol::records::RecordBatchDecoder::decode_batch_info(&mut bytes.clone()).unwrap();
            assert_eq!(heads.len(), 1, "one batch for the partition: {heads:?}");
            let head = &heads[0];
            assert_eq!((head.record_count, head.producer_id, head.base_sequence), (5, -1, -1));
            assert_eq!(head.compression, compression);
            let (read, _) = crate::records::decode_batches(bytes, 0).unwrap();
            let got: Vec<(i64, i64, Option<Bytes>, Option<Bytes>)> =
                read.into_iter().map(|r| (r.offset, r.timestamp_ms, r.key, r.value)).collect();
            let want: Vec<(i64, i64, Option<Bytes>, Option<Bytes>)> = (0..5u8)
                .map(|i| {
                    let key = (i != 2).then(|| Bytes::from(vec![b'k', i]));
                    (i64::from(i), 1000 + i64::from(i), key, Some(Bytes::from(vec![i; 3])))
                })
                .collect();
            assert_eq!(got, want, "{compression:?}");
        }
    }
}
