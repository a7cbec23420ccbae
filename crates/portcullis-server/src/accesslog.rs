//! The access log as data: a worker fills a fixed record per request (copies of a few fields,
//! no formatting, no lock, no write) and hands it to the log thread through a bounded queue;
//! when the queue is full the record is dropped and counted, and the worker goes on. The log
//! thread formats (JSON lines, or nginx's "combined") and writes to stdout or a file, which it
//! opens again on `SIGUSR1` (after logrotate moved it) or when a reload names another one.

use std::cell::RefCell;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::BufMut;
use portcullis_config::AccessFormat;
use portcullis_http::arena::Arena;
use portcullis_http::write::{decimal as number, decimal_padded as digits};
use portcullis_kafka::handoff::{Inlet, Outlet, handoff};
use portcullis_kafka::{Message, Producer};

use crate::worker::Shared;

/// The text fields of a record, in the order they sit in its buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Text {
    Method,
    /// Without its query (it may carry a subscription key or a token).
    Path,
    UserAgent,
    Api,
    Operation,
    /// The client certificate's SHA-1 thumbprint.
    ClientCert,
    /// The client certificate's subject (`CN=…, O=…`).
    ClientSubject,
    /// Why the proxy answered itself (`-` when the backend answered).
    Refused,
    /// The server name the client asked for in its TLS handshake.
    Sni,
    Subscription,
    JwtSub,
    JwtAppid,
    /// The backend server that answered (`host:port` as configured).
    Backend,
}

const TEXTS: usize = 13;

/// One request (or refused connection) as the access log records it: numbers, and the text
/// fields copied one after another into the record itself (inline up to [`INLINE`] bytes, which
/// a request's fields mostly fit in). A worker fills a record in place, in a batch the log thread
/// gave back a moment ago (see [`Outbox::record_with`]): its bytes land in memory still in the
/// core's cache, and share no reference count with other records.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) at_ms: u64,
    /// The request id; `None` before there was a request (a refused handshake, a bad head).
    pub(crate) id: Option<[u8; 16]>,
    pub(crate) peer: SocketAddr,
    /// 0: no response (the connection was refused before one).
    pub(crate) status: u16,
    pub(crate) micros: u64,
    /// Body bytes relayed from the client, and to it.
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
    /// From sending the request to the backend's response head; 0 when none was asked.
    pub(crate) upstream_micros: u64,
    /// The backend's status (0: no backend answered).
    pub(crate) upstream_status: u16,
    pub(crate) tls: &'static str,
    pub(crate) resumed: bool,
    /// What the connection's records share, when it is said there rather than in the record's
    /// own `peer`, `tls`, `resumed` and text (see [`ConnFields`]).
    pub(crate) conn: Option<Arc<ConnFields>>,
    /// Where each field's text ends, in [`Text`] order.
    ends: [u32; TEXTS],
    /// Fields set so far (the others are empty).
    set: usize,
    /// The text, while it fits: `ends[set - 1]` bytes of it are written.
    inline: [u8; INLINE],
    /// The whole text once it did not (a long path, agent or subject); empty until then.
    spilled: Vec<u8>,
}

/// Text bytes a record holds without an allocation of its own.
pub(crate) const INLINE: usize = 320;

impl Record {
    /// A record with its numbers zero and no text (fields are then [`Record::put`] in order).
    pub(crate) fn new(at_ms: u64, id: Option<[u8; 16]>, peer: SocketAddr) -> Record {
        Record {
            at_ms,
            id,
            peer,
            status: 0,
            micros: 0,
            bytes_in: 0,
            bytes_out: 0,
            upstream_micros: 0,
            upstream_status: 0,
            tls: "-",
            resumed: false,
            conn: None,
            ends: [0; TEXTS],
            set: 0,
            inline: [0; INLINE],
            spilled: Vec::new(),
        }
    }

    /// This record made over as a [`Record::new`] one, in place: its buffer is left as it is
    /// (bytes past the text written are never read), and text spilled to the heap let go.
    fn reset(&mut self, at_ms: u64, id: Option<[u8; 16]>, peer: SocketAddr) {
        self.at_ms = at_ms;
        self.id = id;
        self.peer = peer;
        self.status = 0;
        self.micros = 0;
        self.bytes_in = 0;
        self.bytes_out = 0;
        self.upstream_micros = 0;
        self.upstream_status = 0;
        self.tls = "-";
        self.resumed = false;
        self.set = 0;
        self.release();
    }

    /// Lets go of text spilled to the heap and of the connection's fields (the record is then
    /// read as if empty of text until it is made over). On the log thread, as it gives a batch
    /// back: the worker's next use of the record finds nothing to drop.
    fn release(&mut self) {
        self.conn = None;
        if self.spilled.capacity() > 0 {
            self.spilled = Vec::new();
            self.set = 0;
        }
    }

    /// Bytes of text written so far.
    fn len(&self) -> usize {
        if self.set == 0 { 0 } else { self.ends[self.set - 1] as usize }
    }

    /// Sets field `f`; fields are set in [`Text`] order, and those skipped stay empty (a field
    /// set out of order is ignored). The common case, a field that fits in what is left of
    /// [`INLINE`], is inlined: a request sets a dozen fields, and a call's own cost (registers
    /// saved and restored) was a third of each.
    #[inline(always)]
    pub(crate) fn put(&mut self, f: Text, v: &[u8]) {
        let i = f as usize;
        let len = self.len();
        let end = len.saturating_add(v.len());
        if i >= self.set && end <= INLINE && self.spilled.is_empty() {
            self.inline[len..end].copy_from_slice(v);
            self.close(i, len, end);
        } else {
            self.put_spilled(f, v);
        }
    }

    /// [`Record::put`] of a field out of order (ignored), or one that does not fit inline.
    #[cold]
    #[inline(never)]
    fn put_spilled(&mut self, f: Text, v: &[u8]) {
        let i = f as usize;
        if i < self.set {
            return;
        }
        let len = self.len();
        // Fields hold at most what a head can (far under 4 GiB), so the ends fit in a u32.
        let end = len.saturating_add(v.len()).min(u32::MAX as usize);
        let v = &v[..end - len];
        if self.spilled.is_empty() {
            self.spilled.reserve(end.max(2 * INLINE));
            self.spilled.extend_from_slice(&self.inline[..len]);
        }
        self.spilled.extend_from_slice(v);
        self.close(i, len, end);
    }

    /// Field `i` ends at `end`; those skipped before it end where the text did, at `len`.
    #[inline(always)]
    fn close(&mut self, i: usize, len: usize, end: usize) {
        self.ends[self.set..i].fill(len as u32);
        self.ends[i] = end as u32;
        self.set = i + 1;
    }

    /// Every text field, one after another.
    fn text(&self) -> &[u8] {
        &self.buf()[..self.len()]
    }

    pub(crate) fn get(&self, f: Text) -> &[u8] {
        let (start, end) = self.span(f);
        &self.buf()[start..end]
    }

    /// Where field `f` lies in [`Record::buf`].
    #[inline(always)]
    fn span(&self, f: Text) -> (usize, usize) {
        let i = f as usize;
        if i >= self.set {
            return (0, 0);
        }
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        (start, self.ends[i] as usize)
    }

    /// The buffer the text is in, with whatever lies past it.
    #[inline(always)]
    fn buf(&self) -> &[u8] {
        if self.spilled.is_empty() { &self.inline[..] } else { &self.spilled[..] }
    }
}

/// What every record of one connection shares: its peer, TLS version and resumption, the server
/// name it asked for and its client certificate. A request's record points at it
/// ([`Record::conn`]) rather than carrying copies: of a record's text, these are most of the bytes
/// (a thumbprint and a subject DN), and on keep-alive connections they are the same for every
/// request. The log thread formats them for the JSON line once, at the first line that has them
/// (the worker never formats).
#[derive(Debug)]
pub(crate) struct ConnFields {
    peer: SocketAddr,
    tls: &'static str,
    resumed: bool,
    sni: Option<Box<str>>,
    cert: Option<Arc<portcullis_facts::ClientCert>>,
    json: std::sync::OnceLock<ConnJson>,
}

/// [`ConnFields`] as a JSON line has them.
#[derive(Debug)]
struct ConnJson {
    /// The peer inside its JSON string (`192.0.2.7:5000`).
    peer: Box<[u8]>,
    /// From the TLS version to the certificate's subject, both inside their JSON strings:
    /// `TLSv1.3","resumed":false,"sni":"…","client_cert":"…","client_cert_subject":"CN=…`.
    tls_to_subject: Box<[u8]>,
}

impl ConnFields {
    pub(crate) fn new(
        peer: SocketAddr,
        (tls, resumed): (&'static str, bool),
        sni: Option<&str>,
        cert: Option<Arc<portcullis_facts::ClientCert>>,
    ) -> ConnFields {
        ConnFields { peer, tls, resumed, sni: sni.map(Box::from), cert, json: std::sync::OnceLock::new() }
    }

    /// The fields formatted, on the log thread (the first call formats them).
    fn json(&self) -> &ConnJson {
        self.json.get_or_init(|| {
            // Formatted as a record holding them, by the same code as such a record's line.
            let mut r = Record::new(0, None, self.peer);
            (r.tls, r.resumed) = (self.tls, self.resumed);
            if let Some(c) = &self.cert {
                r.put(Text::ClientCert, c.thumbprint.as_bytes());
                r.put(Text::ClientSubject, c.subject.as_bytes());
            }
            if let Some(sni) = &self.sni {
                r.put(Text::Sni, sni.as_bytes());
            }
            let plain = portcullis_http::write::json_plain(r.text());
            let mut buf = vec![0u8; most(&r)];
            let size = buf.len();
            let mut out = &mut buf[..];
            peer(&mut out, r.peer);
            let at = size - out.len();
            tls_to_subject(&mut out, &r, plain);
            let end = size - out.len();
            ConnJson { peer: buf[..at].into(), tls_to_subject: buf[at..end].into() }
        })
    }
}

/// The workers' end of the queue, and what it counts.
#[derive(Debug)]
pub(crate) struct Sink {
    inlet: Inlet<Record>,
    rx: Mutex<Option<Outlet<Record>>>,
    pub(crate) written: AtomicU64,
    pub(crate) dropped: AtomicU64,
    reopen: AtomicBool,
}

impl Sink {
    /// A queue of `capacity` records (handed over in batches: see [`Outbox`]).
    pub(crate) fn new(capacity: usize) -> Sink {
        let (inlet, rx) = handoff(capacity);
        Sink {
            inlet,
            rx: Mutex::new(Some(rx)),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
        }
    }

    /// Hands `batch`'s records to the log thread (`batch` is then one to fill again); never
    /// waits.
    fn send_all(&self, batch: &mut Vec<Record>) {
        if let Err(lost) = self.inlet.send(batch) {
            self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
        }
    }

    /// The file is opened again before the next record (`SIGUSR1`).
    pub(crate) fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }
}

/// How long a worker keeps what it logged before it hands it over, when its batch is not full.
/// The queues count batches, not records: a worker hands over at most one part-filled batch per
/// [`FLUSH_AFTER`], so that between two looks of the log thread ([`POLL`]) it fills at most five
/// places with them whatever its load, and a logger's thread, taking every 25 ms, three.
const FLUSH_AFTER: Duration = Duration::from_millis(10);

/// What a worker logged and has not handed over yet: access-log records, and messages per
/// logger. A batch goes once it is full, and what is left within [`FLUSH_AFTER`] (the worker's
/// [`flush_task`]): records and messages cross to the log and logger threads a batch at a time.
#[derive(Default)]
pub(crate) struct Outbox {
    records: RefCell<Records>,
    /// Per logger, what waits for it.
    messages: RefCell<Vec<ForLogger>>,
    /// Something is waiting: the flush task's wake-up call.
    waiting: crate::event::Nudge,
}

/// A batch of access-log records being filled. The log thread gives batches back with their
/// records in them ([`Outlet::recycle_filled`]), and a record is filled again in place: built
/// and then moved into its batch, each record's 520 bytes would be written twice, the second
/// time to memory the log thread last read.
#[derive(Default)]
struct Records {
    /// The records, the first `filled` of them this batch's.
    slots: Vec<Record>,
    filled: usize,
}

impl Records {
    /// The next record of the batch, made over as a new one ([`Record::new`]).
    #[inline(always)]
    fn next(&mut self, at_ms: u64, id: Option<[u8; 16]>, peer: SocketAddr) -> &mut Record {
        let i = self.filled;
        if i < self.slots.len() {
            self.slots[i].reset(at_ms, id, peer);
        } else {
            self.slots.push(Record::new(at_ms, id, peer));
        }
        self.filled += 1;
        &mut self.slots[i]
    }

    /// Hands the records filled to the log thread.
    fn send(&mut self, sink: &Sink) {
        if self.filled == 0 {
            return;
        }
        self.slots.truncate(self.filled);
        self.filled = 0;
        sink.send_all(&mut self.slots);
    }
}

impl Outbox {
    /// Adds an access-log record for the log thread: `fill` fills it in place, made over as
    /// `Record::new(at_ms, id, peer)`.
    #[inline(always)]
    pub(crate) fn record_with(
        &self,
        sink: &Sink,
        (at_ms, id, peer): (u64, Option<[u8; 16]>, SocketAddr),
        fill: impl FnOnce(&mut Record),
    ) {
        let mut records = self.records.borrow_mut();
        if records.filled == 0 {
            self.waiting.wake();
        }
        fill(records.next(at_ms, id, peer));
        if records.filled >= sink.inlet.per_batch() {
            records.send(sink);
        }
    }

    /// Adds an access-log record, for the log thread.
    pub(crate) fn record(&self, sink: &Sink, record: Record) {
        self.record_with(sink, (record.at_ms, record.id, record.peer), |slot| *slot = record);
    }

    /// Adds a message for `producer`.
    pub(crate) fn message(&self, producer: &Arc<Producer>, message: Message) {
        let mut all = self.messages.borrow_mut();
        let ForLogger { batch, .. } = ForLogger::of(&mut all, producer);
        if batch.is_empty() {
            self.waiting.wake();
        }
        batch.push(message);
        if batch.len() >= producer.per_batch() {
            producer.send_all(batch);
        }
    }

    /// Counts a message for `producer` that was not made (its buffer was full).
    pub(crate) fn dropped(&self, producer: &Arc<Producer>) {
        let mut all = self.messages.borrow_mut();
        let ForLogger { dropped, .. } = ForLogger::of(&mut all, producer);
        if *dropped == 0 {
            self.waiting.wake();
        }
        *dropped += 1;
    }

    /// Hands over everything waiting; returns whether anything was.
    pub(crate) fn flush(&self, sink: &Sink) -> bool {
        let mut records = self.records.borrow_mut();
        let any = records.filled > 0 || !self.messages.borrow().is_empty();
        records.send(sink);
        // The loggers are let go with their batches: one that a reload replaced stops (and sends
        // what it holds) once the last snapshot naming it is gone, not at this worker's next
        // flush, which may never come.
        for ForLogger { producer, mut batch, dropped } in self.messages.borrow_mut().drain(..) {
            producer.send_all(&mut batch);
            if dropped > 0 {
                producer.count_dropped(dropped);
            }
        }
        any
    }
}

/// What waits in a worker's outbox for one logger.
struct ForLogger {
    producer: Arc<Producer>,
    /// Messages to hand over.
    batch: Vec<Message>,
    /// Messages not made because the logger's buffer was full, to count as dropped.
    dropped: u64,
}

impl ForLogger {
    fn of<'a>(all: &'a mut Vec<ForLogger>, producer: &Arc<Producer>) -> &'a mut ForLogger {
        let i = match all.iter().position(|l| Arc::ptr_eq(&l.producer, producer)) {
            Some(i) => i,
            None => {
                all.push(ForLogger { producer: Arc::clone(producer), batch: producer.batch(), dropped: 0 });
                all.len() - 1
            }
        };
        &mut all[i]
    }
}

/// The worker's task that hands over what waited [`FLUSH_AFTER`] in its outbox.
///
/// While the worker keeps logging, it ticks every [`FLUSH_AFTER`]; once a tick finds nothing,
/// it waits for the outbox's next wake-up call. (Waking it for each batch begun would cost a
/// wake-up and a timer per batch, every millisecond or so under load.)
pub(crate) async fn flush_task(worker: std::rc::Rc<crate::worker::Worker>) {
    loop {
        worker.outbox.waiting.wait().await;
        loop {
            monoio::time::sleep(FLUSH_AFTER).await;
            if !worker.outbox.flush(&worker.shared.access) {
                break;
            }
        }
    }
}

/// Starts the log thread; it ends once the process stops serving and the queue is empty.
pub(crate) fn start(shared: Arc<Shared>) -> std::io::Result<JoinHandle<()>> {
    let rx = shared.access.rx.lock().ok().and_then(|mut r| r.take());
    std::thread::Builder::new().name("portcullis-log".to_owned()).spawn(move || {
        if let Some(rx) = rx {
            run(&shared, &rx);
        }
    })
}

/// Where records go now. Unbuffered: each batch is formatted into one buffer and written with
/// one call (a buffered writer would copy every record once more).
struct Output {
    path: Option<PathBuf>,
    out: Box<dyn Write + Send>,
    /// The file written to, when it is one (for [`Output::release_if_moved`]).
    file: Option<std::fs::File>,
}

impl Output {
    /// Gives back the space reserved past the end of a file that logrotate moved away (the
    /// path now names another file, or none): a rotated log takes the disk its lines take.
    /// Only then: the file at the path may have other writers, or be cut short by logrotate's
    /// `copytruncate`, and setting its length could cut or pad what they did. (A process still
    /// appending to the moved file, between the length read and set here, would lose what it
    /// wrote in that moment: no other writer of a rotated file is expected.)
    fn release_if_moved(&self) {
        use std::os::unix::fs::MetadataExt;
        let (Some(path), Some(file)) = (&self.path, &self.file) else { return };
        let Ok(ours) = file.metadata() else { return };
        // Moved: the path names another file, or none. One that cannot be looked at for
        // another reason (no permission, an I/O error) may still be ours.
        let moved = match std::fs::metadata(path) {
            Ok(m) => (m.dev(), m.ino()) != (ours.dev(), ours.ino()),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        };
        if moved && ours.is_file() && ours.blocks() * 512 > ours.len() {
            let _ = file.set_len(ours.len());
        }
    }
}

/// Disk space the log thread reserves past the end of a log file, a step at a time.
///
/// A buffered write into space the file system has not allocated yet does, for every page, the
/// work of a delayed allocation (reserving the block, noting it for the writeback); into space
/// allocated ahead, it only copies. On ext4 that is about a third of the write's system time,
/// spent on the workers' core. The space is reserved without changing the file's size (what
/// `ls` shows is the lines written; `du` shows up to this much more), as journald does for its
/// journal files; it is freed with the file, or when logrotate truncates it, or given back when
/// `SIGUSR1` finds the file moved away ([`Output::release_if_moved`]). A file closed while still
/// at its path (a reload naming another, the stop) keeps what it had left: giving it back could
/// not tell it from lines another process has just appended. Hence a small step: 1 MiB saves as
/// much as 8 (a reservation a second at 33 MB/s of lines).
const AHEAD: u64 = 1 << 20;

/// A regular file the log is appended to, with space reserved past its end ([`AHEAD`]).
struct LogFile {
    file: std::fs::File,
    /// Bytes still to write into the space reserved; `None`: the file system does not reserve
    /// (or the file is not a regular one), and nothing is tried again until the file is opened
    /// again.
    room: Option<u64>,
}

impl LogFile {
    fn new(file: std::fs::File) -> LogFile {
        let regular = file.metadata().is_ok_and(|m| m.is_file());
        LogFile { file, room: regular.then_some(0) }
    }

    /// Reserves the next [`AHEAD`] bytes past the file's end (wherever that is now: another
    /// process may write to the file too, or logrotate may have truncated it).
    fn reserve(&mut self) {
        use rustix::fs::{FallocateFlags, fallocate};
        let reserved = self
            .file
            .metadata()
            .and_then(|m| Ok(fallocate(&self.file, FallocateFlags::KEEP_SIZE, m.len(), AHEAD)?));
        self.room = reserved.is_ok().then_some(AHEAD);
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.room.is_some_and(|room| room < buf.len() as u64) {
            self.reserve();
        }
        let n = self.file.write(buf)?;
        if let Some(room) = &mut self.room {
            *room = room.saturating_sub(n as u64);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

fn open(path: &Option<PathBuf>) -> std::io::Result<Output> {
    let (out, file): (Box<dyn Write + Send>, _) = match path {
        None => (Box::new(std::io::stdout()), None),
        Some(p) => {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(p)?;
            // A line cut short (a write that failed part way, a process killed mid-write) is
            // ended, so that the next record starts a line of its own.
            if ends_mid_line(p, &file) {
                file.write_all(b"\n")?;
            }
            let kept = file.try_clone().ok();
            (Box::new(LogFile::new(file)), kept)
        }
    };
    Ok(Output { path: path.clone(), out, file })
}

/// What `portcullis check` says about the access log's file: a warning when this process could
/// not open it for appending, or make it in its directory (the proxy would start, and drop the
/// records, counted, until it can). Nothing is created or written.
pub(crate) fn check_path(config: &portcullis_config::Config) -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let log = config.server.access_log.as_ref().filter(|a| a.logger.is_none())?;
    let (path, loc) = (log.path.as_ref()?, log.path_loc.as_ref()?);
    let problem = if path.as_os_str().as_bytes().ends_with(b"/") {
        "it names a directory".to_owned()
    } else {
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => "it is a directory".to_owned(),
            // Whether it may be written, without opening it: a pipe would wait for a reader, and
            // a watcher would see the file opened and closed.
            Ok(meta) if meta.is_file() => writable(path, false)?,
            // A pipe or a device: what it does when the log opens it is its own.
            Ok(_) => return None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // To be made where the path leads: through a symbolic link that points nowhere
                // yet, next to what it names.
                let target = match std::fs::read_link(path) {
                    Ok(t) => path.parent().map_or(t.clone(), |d| d.join(&t)),
                    Err(_) => path.clone(),
                };
                let dir = target
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(std::path::Path::new("."))
                    .to_path_buf();
                match std::fs::metadata(&dir) {
                    Ok(meta) if meta.is_dir() => {
                        format!("it cannot be made in {}: {}", dir.display(), writable(&dir, true)?)
                    }
                    Ok(_) => format!("{} is not a directory", dir.display()),
                    Err(e) => format!("{}: {e}", dir.display()),
                }
            }
            Err(e) => e.to_string(),
        }
    };
    Some(format!(
        "{loc}: warning: cannot open \"{}\" for appending ({problem}); the proxy would start, and drop access-log records (counted) until it can",
        path.display()
    ))
}

/// Why this process may not write to `path` (and, for a directory, make files in it), or `None`
/// when it may.
fn writable(path: &std::path::Path, dir: bool) -> Option<String> {
    use rustix::fs::{Access, access};
    let mode = if dir { Access::WRITE_OK | Access::EXEC_OK } else { Access::WRITE_OK };
    access(path, mode).err().map(|e| std::io::Error::from(e).to_string())
}

/// Whether the regular file `file` (opened at `path`) has bytes after its last newline.
fn ends_mid_line(path: &std::path::Path, file: &std::fs::File) -> bool {
    use std::os::unix::fs::FileExt;
    let Ok(meta) = file.metadata() else { return false };
    if !meta.is_file() || meta.len() == 0 {
        return false;
    }
    // Read through a handle of its own: the log's is opened for appending only.
    let mut last = [0u8; 1];
    std::fs::File::open(path)
        .and_then(|f| f.read_exact_at(&mut last, meta.len() - 1))
        .is_ok_and(|()| last[0] != b'\n')
}

fn run(shared: &Shared, rx: &Outlet<Record>) {
    let mut output: Option<Output> = None;
    let mut lines = Lines::default();
    let mut clock = Clock::new();
    // Where records sent to a `[[logger]]` are written, each message sharing a block.
    let mut messages = Arena::new(64 * 1024, 4);
    // The file could not be opened, and that was said.
    let mut warned = false;
    // Rounds in a row that took nothing.
    let mut idle = 0u32;
    loop {
        // The configuration and the reopen flag are looked at once per round, not per record.
        let snapshot = shared.snapshot.load_full();
        let config = snapshot.server.access_log.as_ref();
        let (path, format) = config.map_or((None, AccessFormat::Json), |c| (c.path.as_ref(), c.format));
        let reopen = shared.access.reopen.swap(false, Ordering::AcqRel);
        if reopen || output.as_ref().is_some_and(|o| o.path.as_ref() != path) {
            if let Some(mut o) = output.take() {
                let _ = o.out.flush();
                o.release_if_moved();
            }
        }
        let logger = config.and_then(|c| c.logger.as_ref());
        // The file is opened before records are taken: while it cannot be, they wait in the
        // queue (and once it is full, the workers drop them and count them).
        if logger.is_none() && output.is_none() {
            match open(&path.cloned()) {
                Ok(o) => {
                    output = Some(o);
                    warned = false;
                }
                Err(e) => {
                    let lost = discard(rx);
                    shared.access.dropped.fetch_add(lost, Ordering::Relaxed);
                    if !warned {
                        tracing::warn!(error = %e, path = ?path, "cannot open the access log; records are dropped until it can be");
                        warned = true;
                    }
                    if rest(shared, rx, false) {
                        return;
                    }
                    continue;
                }
            }
        }
        // Polled while records come (a worker's hand-over then never has a sleeping thread to
        // wake: on a busy core a wake-up per batch would cost more than the records); waited on
        // only after a quiet spell (see `rest`).
        let taken = match (logger, output.as_mut()) {
            // To a `[[logger]]`: one JSON message per record.
            (Some(name), _) => match snapshot.loggers.iter().find(|p| p.settings().name == name.value) {
                Some(producer) => to_logger(shared, rx, producer, &mut clock, &mut lines, &mut messages),
                None => {
                    let lost = discard(rx);
                    shared.access.dropped.fetch_add(lost, Ordering::Relaxed);
                    lost
                }
            },
            (None, Some(o)) => {
                // What waits (up to `BATCH` records), formatted into one buffer and written
                // once it holds `CHUNK` bytes, and at the end. After a failed write, what is
                // formatted is dropped and counted, and the rest waits in the queue for the file
                // opened again.
                let mut count = 0u64;
                let mut taken = 0;
                let mut ok = true;
                let mut write = |lines: &mut Lines, count: &mut u64| {
                    if *count > 0 {
                        ok = o.out.write_all(lines.written()).is_ok();
                        let counter = if ok { &shared.access.written } else { &shared.access.dropped };
                        counter.fetch_add(*count, Ordering::Relaxed);
                        *count = 0;
                        lines.clear();
                    }
                    ok
                };
                lines.clear();
                while taken < BATCH {
                    let Ok(batch) = rx.try_recv() else { break };
                    taken += batch.len();
                    for r in &batch {
                        match format {
                            AccessFormat::Json => json(r, &mut clock, &mut lines),
                            AccessFormat::Combined => combined(r, &mut lines),
                        }
                        count += 1;
                    }
                    give_back(rx, batch);
                    if lines.written().len() >= CHUNK && !write(&mut lines, &mut count) {
                        break;
                    }
                }
                if !write(&mut lines, &mut count) {
                    output = None;
                }
                // Every record taken was written, or dropped and counted.
                taken as u64
            }
            (None, None) => 0,
        };
        if taken == 0 {
            if let Some(o) = output.as_mut() {
                let _ = o.out.flush();
            }
            idle = idle.saturating_add(1);
            if rest(shared, rx, idle > IDLE_ROUNDS) {
                return;
            }
        } else {
            idle = 0;
        }
    }
}

/// With nothing taken this round: whether the thread is done (the process stops serving and
/// nothing waits), else a pause before the next look: [`POLL`], or, when nothing came for a
/// while (`idle`), until records come.
fn rest(shared: &Shared, rx: &Outlet<Record>, idle: bool) -> bool {
    if shared.stopped.load(Ordering::Acquire) {
        // The workers' last batches may have come after this round looked: one more round
        // takes them.
        return !rx.ready();
    }
    if idle {
        rx.wait(IDLE_WAIT);
    } else {
        std::thread::sleep(POLL);
    }
    false
}

/// Gives a batch back to the workers with its records in it, to be filled again in place, less
/// any text spilled to the heap: a burst of long heads would otherwise stay allocated in the
/// batches kept for the workers until each of those records happened to be filled again.
fn give_back(rx: &Outlet<Record>, mut batch: Vec<Record>) {
    for r in &mut batch {
        r.release();
    }
    rx.recycle_filled(batch);
}

/// Takes what waits and drops it; returns how many records that was.
fn discard(rx: &Outlet<Record>) -> u64 {
    let mut lost = 0;
    while let Ok(batch) = rx.try_recv() {
        lost += batch.len() as u64;
        give_back(rx, batch);
    }
    lost
}

/// Sends what waits (up to a batch) to `producer`, one JSON message per record; returns how
/// many records were taken.
fn to_logger(
    shared: &Shared,
    rx: &Outlet<Record>,
    producer: &Producer,
    clock: &mut Clock,
    lines: &mut Lines,
    arena: &mut Arena,
) -> u64 {
    let mut out = producer.batch();
    let mut taken = 0;
    let hand_over = |out: &mut Vec<Message>| {
        let n = out.len() as u64;
        let counter =
            if producer.send_all(out) > 0 { &shared.access.written } else { &shared.access.dropped };
        counter.fetch_add(n, Ordering::Relaxed);
    };
    while taken < BATCH as u64 {
        let Ok(batch) = rx.try_recv() else { break };
        taken += batch.len() as u64;
        for r in &batch {
            lines.clear();
            json(r, clock, lines);
            // Without its newline: a message is one record.
            let line = lines.written();
            // No allocation per message: the producer's thread copies what it holds, and the
            // block is filled again once it has taken these.
            let value = arena.copy(&line[..line.len() - 1]);
            out.push(Message { key: None, partition: None, value, timestamp_ms: r.at_ms as i64 });
            if out.len() >= producer.per_batch() {
                hand_over(&mut out);
            }
        }
        give_back(rx, batch);
    }
    if !out.is_empty() {
        hand_over(&mut out);
    }
    taken
}

/// Records formatted in one round at most.
const BATCH: usize = 2048;
/// Formatted bytes written at a time. A round's records formatted whole (a megabyte) would pass
/// through the core's cache once more, evicting the worker's; a buffer of this size stays in it.
const CHUNK: usize = 128 * 1024;
/// How often the log thread looks for records when there were none. Each look costs a wake-up
/// on the workers' core (tens of microseconds of CPU on a virtual machine, and the worker's
/// cache): one every 50 ms takes a round's records in fewer, larger writes. The queue holds
/// far more than that of records (its default, about a second at 60,000 a second).
const POLL: Duration = Duration::from_millis(50);
/// Rounds without a record after which the thread sleeps until records come (polled, an idle
/// queue would wake it twenty times a second).
const IDLE_ROUNDS: u32 = 2;
/// How long it then sleeps at most before it looks at the configuration, the reopen flag and
/// whether the process stops.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// Formatted lines waiting to be written: `buf[..used]`. A record is formatted straight into the
/// room after them, made once for the most its fields can come to: no capacity check, growth
/// or call per piece of a line (a line is some forty of them).
#[derive(Default)]
struct Lines {
    /// Zeroed once as it grows, then written over again and again.
    buf: Vec<u8>,
    used: usize,
}

impl Lines {
    fn written(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    fn clear(&mut self) {
        self.used = 0;
    }

    /// Appends one line (`write` and a newline) that is at most `most` bytes long without its
    /// newline. `write` writes to the room given, which holds `most` bytes or more; it takes no
    /// more than it writes.
    fn line(&mut self, most: usize, write: impl FnOnce(&mut &mut [u8])) {
        let need = self.used + most + 1;
        if self.buf.len() < need {
            self.buf.resize(need.max(2 * self.buf.len()), 0);
        }
        let mut room = &mut self.buf[self.used..];
        let before = room.len();
        write(&mut room);
        room.put_u8(b'\n');
        self.used += before - room.len();
    }
}

/// The most bytes a JSON string of `v` takes, quotes included: each byte at most six (a control
/// character as `\u00XX`; a byte that is not UTF-8 becomes three, U+FFFD).
const fn json_most(v: usize) -> usize {
    v * 6 + 2
}

/// The most bytes a line of `r` takes, in JSON or in the combined format (whose bytes are each
/// at most four, `\xHH`), without its newline: the field names and punctuation, and every
/// field at its longest.
fn most(r: &Record) -> usize {
    // Names, quotes and separators (under 400 bytes), nine numbers of at most 20 digits, the
    // time, the peer (`[` an IPv6 address of at most 45 characters `]:65535`) and the id.
    const FIXED: usize = 400 + 9 * 20 + 24 + 53 + json_most(16);
    // Every text field is `-` at least.
    FIXED + json_most(r.len().saturating_add(TEXTS)) + r.tls.len()
}

/// The date and time to the second of the last record written: the records of a batch mostly
/// share it, and only their milliseconds are then formatted.
struct Clock {
    secs: u64,
    /// `2026-12-05T18:04:22.`
    prefix: Vec<u8>,
}

impl Clock {
    fn new() -> Clock {
        Clock { secs: u64::MAX, prefix: Vec::with_capacity(24) }
    }

    /// `2026-12-05T18:04:22.123Z`.
    fn rfc3339(&mut self, out: &mut impl BufMut, ms: u64) {
        let secs = ms / 1000;
        if secs != self.secs {
            self.secs = secs;
            let p = &mut self.prefix;
            p.clear();
            let (y, m, d) = portcullis_http::write::civil_date((secs / 86_400) as i64);
            let t = secs % 86_400;
            digits(p, y.max(0) as u64, 4);
            p.push(b'-');
            digits(p, u64::from(m), 2);
            p.push(b'-');
            digits(p, u64::from(d), 2);
            p.push(b'T');
            time_of_day(p, t);
            p.push(b'.');
        }
        out.put_slice(&self.prefix);
        digits(out, ms % 1000, 3);
        out.put_u8(b'Z');
    }
}

/// `18:04:22`: `t` seconds into a day.
fn time_of_day(out: &mut impl BufMut, t: u64) {
    digits(out, t / 3600, 2);
    out.put_u8(b':');
    digits(out, t % 3600 / 60, 2);
    out.put_u8(b':');
    digits(out, t % 60, 2);
}

/// A status, or `null` for none (0).
fn status_or_null(out: &mut impl BufMut, status: u16) {
    if status == 0 {
        out.put_slice(b"null");
    } else {
        number(out, u64::from(status));
    }
}

/// A socket address as `1.2.3.4:5` or `[::1]:5`.
fn peer(out: &mut impl BufMut, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(a) => {
            let [a, b, c, d] = a.ip().octets();
            number(out, u64::from(a));
            out.put_u8(b'.');
            number(out, u64::from(b));
            out.put_u8(b'.');
            number(out, u64::from(c));
            out.put_u8(b'.');
            number(out, u64::from(d));
        }
        SocketAddr::V6(a) => {
            out.put_u8(b'[');
            let _ = write!(out.writer(), "{}", a.ip());
            out.put_u8(b']');
        }
    }
    out.put_u8(b':');
    number(out, u64::from(addr.port()));
}

/// The inside of a JSON string (its quotes are the caller's).
#[inline(always)]
fn json_inside(out: &mut impl BufMut, v: &[u8], plain: bool) {
    if plain {
        out.put_slice(v);
    } else {
        portcullis_http::write::json_escaped_bytes(out, v);
    }
}

/// A JSON string of bytes from anywhere (a client's): most are printable ASCII with nothing to
/// escape, and are copied whole.
#[inline(always)]
fn json_bytes(out: &mut impl BufMut, v: &[u8]) {
    out.put_u8(b'"');
    json_inside(out, v, portcullis_http::write::json_plain(v));
    out.put_u8(b'"');
}

/// [`json_bytes`] onto text (for the admin endpoint's `/config`).
pub(crate) fn json_str(out: &mut String, v: &[u8]) {
    let mut bytes = Vec::with_capacity(v.len() + 2);
    json_bytes(&mut bytes, v);
    out.push_str(&String::from_utf8_lossy(&bytes));
}

/// A text field inside its JSON string, `-` when empty, then `next`: the string's closing
/// quote and what follows (the next name, and its opening quote when it is a string). `plain`:
/// the record's whole text needs no escaping (looked at once for all its fields). Inlined, so
/// that `next` is copied as the constant it is: a field costs two copies, not four.
#[inline(always)]
fn json_text(out: &mut &mut [u8], r: &Record, f: Text, plain: bool, next: &[u8]) {
    let (start, end) = r.span(f);
    if start == end {
        out.put_u8(b'-');
    } else if plain {
        put_short(out, r.buf(), start, end);
    } else {
        let v = &r.buf()[start..end];
        json_inside(out, v, portcullis_http::write::json_plain(v));
    }
    out.put_slice(next);
}

/// Fields of up to this many bytes are copied as this many (see [`put_short`]).
const SHORT: usize = 32;

/// Copies `buf[start..end]` onto `out`. A field of up to [`SHORT`] bytes (most are) goes as
/// [`SHORT`] bytes, those after it in `buf` along with it, which what follows then writes over:
/// a copy of a constant size is a couple of moves, where one of the field's own size is a call
/// to `memcpy`. Only where both `buf` and `out` have the room for it; else the field alone.
#[inline(always)]
fn put_short(out: &mut &mut [u8], buf: &[u8], start: usize, end: usize) {
    match buf.get(start..start + SHORT) {
        Some(wide) if end - start <= SHORT && out.len() >= SHORT => {
            out[..SHORT].copy_from_slice(wide);
            let room = std::mem::take(out);
            *out = &mut room[end - start..];
        }
        _ => out.put_slice(&buf[start..end]),
    }
}

/// `name` and a number.
#[inline(always)]
fn json_number(out: &mut &mut [u8], name: &[u8], n: u64) {
    out.put_slice(name);
    number(out, n);
}

/// The record's own TLS version, resumption, server name, certificate thumbprint and subject, in
/// a JSON line from inside the version's string to inside the subject's.
#[inline(always)]
fn tls_to_subject(out: &mut &mut [u8], r: &Record, plain: bool) {
    out.put_slice(r.tls.as_bytes());
    out.put_slice(if r.resumed {
        b"\",\"resumed\":true,\"sni\":\""
    } else {
        b"\",\"resumed\":false,\"sni\":\""
    });
    json_text(out, r, Text::Sni, plain, b"\",\"client_cert\":\"");
    json_text(out, r, Text::ClientCert, plain, b"\",\"client_cert_subject\":\"");
    json_text(out, r, Text::ClientSubject, plain, b"");
}

fn json(r: &Record, clock: &mut Clock, lines: &mut Lines) {
    // Most records' text is printable ASCII with nothing to escape: one look at all of it.
    let plain = portcullis_http::write::json_plain(r.text());
    let conn = r.conn.as_deref().map(ConnFields::json);
    let most = most(r) + conn.map_or(0, |c| c.peer.len() + c.tls_to_subject.len());
    lines.line(most, |out| {
        out.put_slice(b"{\"time\":\"");
        clock.rfc3339(out, r.at_ms);
        out.put_slice(b"\",\"id\":\"");
        let id = r.id.as_ref().map_or(&b"-"[..], |i| &i[..]);
        json_inside(out, id, portcullis_http::write::json_plain(id));
        out.put_slice(b"\",\"peer\":\"");
        match conn {
            Some(c) => out.put_slice(&c.peer),
            None => peer(out, r.peer),
        }
        out.put_slice(b"\",\"method\":\"");
        json_text(out, r, Text::Method, plain, b"\",\"path\":\"");
        json_text(out, r, Text::Path, plain, b"\",\"status\":");
        status_or_null(out, r.status);
        out.put_slice(b",\"api\":\"");
        json_text(out, r, Text::Api, plain, b"\",\"operation\":\"");
        json_text(out, r, Text::Operation, plain, b"\"");
        json_number(out, b",\"micros\":", r.micros);
        json_number(out, b",\"bytes\":", r.bytes_in.saturating_add(r.bytes_out));
        json_number(out, b",\"bytes_in\":", r.bytes_in);
        json_number(out, b",\"bytes_out\":", r.bytes_out);
        out.put_slice(b",\"tls\":\"");
        match conn {
            Some(c) => out.put_slice(&c.tls_to_subject),
            None => tls_to_subject(out, r, plain),
        }
        out.put_slice(b"\",\"subscription\":\"");
        json_text(out, r, Text::Subscription, plain, b"\",\"jwt_sub\":\"");
        json_text(out, r, Text::JwtSub, plain, b"\",\"jwt_appid\":\"");
        json_text(out, r, Text::JwtAppid, plain, b"\",\"user_agent\":\"");
        json_text(out, r, Text::UserAgent, plain, b"\",\"refused\":\"");
        json_text(out, r, Text::Refused, plain, b"\",\"backend\":\"");
        json_text(out, r, Text::Backend, plain, b"\",\"upstream_status\":");
        status_or_null(out, r.upstream_status);
        json_number(out, b",\"upstream_micros\":", r.upstream_micros);
        out.put_u8(b'}');
    });
}

/// A field of the combined format: `"`, `\` and bytes outside printable ASCII as `\xHH`.
fn combined_str(out: &mut impl BufMut, v: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if v.is_empty() {
        out.put_u8(b'-');
    }
    for &b in v {
        if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
            out.put_slice(&[b'\\', b'x', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        } else {
            out.put_u8(b);
        }
    }
}

/// nginx's and HAProxy's "combined": `peer - - [05/Dec/2026:18:04:22 +0000] "GET /x HTTP/1.1"
/// 200 512 "-" "agent"`.
fn combined(r: &Record, lines: &mut Lines) {
    const MONTHS: [&str; 12] =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = (r.at_ms / 1000) as i64;
    let (y, m, d) = portcullis_http::write::civil_date(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400) as u64;
    let month = MONTHS[(m as usize).clamp(1, 12) - 1];
    lines.line(most(r), |out| {
        let _ = write!(out.writer(), "{}", r.peer.ip());
        out.put_slice(b" - - [");
        digits(out, u64::from(d), 2);
        out.put_u8(b'/');
        out.put_slice(month.as_bytes());
        out.put_u8(b'/');
        digits(out, y.max(0) as u64, 4);
        out.put_u8(b':');
        time_of_day(out, t);
        out.put_slice(b" +0000] \"");
        combined_str(out, r.get(Text::Method));
        out.put_u8(b' ');
        combined_str(out, r.get(Text::Path));
        out.put_slice(b" HTTP/1.1\" ");
        if r.status == 0 {
            out.put_u8(b'-');
        } else {
            number(out, u64::from(r.status));
        }
        // As nginx's `$body_bytes_sent`: the response body.
        out.put_u8(b' ');
        number(out, r.bytes_out);
        out.put_slice(b" \"-\" \"");
        combined_str(out, r.get(Text::UserAgent));
        out.put_u8(b'"');
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every text field, in [`Text`] order, with its name in a JSON line.
    const FIELDS: [(Text, &str); TEXTS] = [
        (Text::Method, "method"),
        (Text::Path, "path"),
        (Text::UserAgent, "user_agent"),
        (Text::Api, "api"),
        (Text::Operation, "operation"),
        (Text::ClientCert, "client_cert"),
        (Text::ClientSubject, "client_cert_subject"),
        (Text::Refused, "refused"),
        (Text::Sni, "sni"),
        (Text::Subscription, "subscription"),
        (Text::JwtSub, "jwt_sub"),
        (Text::JwtAppid, "jwt_appid"),
        (Text::Backend, "backend"),
    ];

    fn record() -> Record {
        let mut r = Record::new(
            1_764_957_862_123,
            Some(*b"0123456789abcdef"),
            "192.0.2.7:5000".parse().expect("addr"),
        );
        r.status = 200;
        r.micros = 1234;
        r.bytes_in = 12;
        r.bytes_out = 500;
        r.tls = "TLSv1.3";
        r.resumed = true;
        r.put(Text::Method, b"GET");
        r.put(Text::Path, b"/items/\"x\"");
        r.put(Text::UserAgent, b"evil\"agent\\\x01\xff");
        r.put(Text::Api, b"todo");
        r.put(Text::Operation, b"getItem");
        r.put(Text::Refused, b"-");
        r.put(Text::Subscription, b"sub-1");
        r.put(Text::Backend, b"10.0.0.1:8080");
        r.upstream_status = 200;
        r.upstream_micros = 900;
        r
    }

    #[test]
    fn fields_longer_than_the_record_holds_inline_come_back_whole() {
        let long_path = vec![b'p'; INLINE];
        let mut r = Record::new(0, None, "192.0.2.7:5000".parse().expect("addr"));
        r.put(Text::Method, b"GET");
        r.put(Text::UserAgent, b"agent");
        // Spills: what was inline moves along with it.
        r.put(Text::Api, &long_path);
        r.put(Text::ClientSubject, b"CN=x");
        r.put(Text::Method, b"set out of order: ignored");
        assert_eq!(r.get(Text::Method), b"GET");
        assert_eq!(r.get(Text::Path), b"");
        assert_eq!(r.get(Text::UserAgent), b"agent");
        assert_eq!(r.get(Text::Api), &long_path[..]);
        assert_eq!(r.get(Text::Operation), b"");
        assert_eq!(r.get(Text::ClientSubject), b"CN=x");
        assert_eq!(r.get(Text::Backend), b"");
        // Exactly full, inline.
        let mut r = Record::new(0, None, "192.0.2.7:5000".parse().expect("addr"));
        r.put(Text::Method, &long_path[..INLINE - 1]);
        r.put(Text::Path, b"/");
        assert!(r.spilled.is_empty());
        assert_eq!((r.get(Text::Method).len(), r.get(Text::Path)), (INLINE - 1, &b"/"[..]));
        // Out of order while inline: ignored too.
        r.put(Text::Method, b"x");
        assert_eq!((r.get(Text::Method).len(), r.get(Text::Path)), (INLINE - 1, &b"/"[..]));
        // Past the end: spills, the fields before it kept.
        r.put(Text::UserAgent, b"ab");
        assert!(!r.spilled.is_empty());
        assert_eq!(
            (r.get(Text::Method).len(), r.get(Text::Path), r.get(Text::UserAgent)),
            (INLINE - 1, &b"/"[..], &b"ab"[..])
        );
    }

    /// The JSON line of `r`.
    fn line_of(r: &Record) -> String {
        let mut lines = Lines::default();
        json(r, &mut Clock::new(), &mut lines);
        String::from_utf8_lossy(lines.written()).into_owned()
    }

    /// A client certificate with `subject` (its thumbprint from a fixed digest).
    fn cert(subject: &str) -> Arc<portcullis_facts::ClientCert> {
        Arc::new(portcullis_facts::ClientCert::new(portcullis_facts::CertFields {
            sha1: [0xd8; 20],
            sha256: [0; 32],
            subject: subject.to_owned(),
            issuer: "CN=ca".to_owned(),
            common_name: None,
            serial_bytes: Box::new([1]),
            issuer_der: Box::new([]),
            issuer_sha1: None,
            ca_ids: Vec::new(),
            dns_names: Vec::new(),
            not_before: 0,
            not_after: 0,
            verify_errors: Vec::new(),
            der: Box::new([]),
            uris: Vec::new(),
            subject_rfc2253: String::new(),
        }))
    }

    #[test]
    fn fields_said_once_per_connection_come_out_as_the_record_s_own() {
        let hostile = "CN=\"x\\y\u{1}\u{7f}é, O=Contoso";
        for (peer, tls, resumed, sni, subject) in [
            ("192.0.2.7:5000", "TLSv1.3", true, Some("api.example"), Some(hostile)),
            ("[2001:db8::1]:443", "TLSv1.2", false, None, None),
            ("10.0.0.1:1", "-", false, Some("a"), Some("")),
        ] {
            let peer: SocketAddr = peer.parse().expect("addr");
            let cert = subject.map(cert);
            let thumbprint = cert.as_ref().map_or("", |c| &c.thumbprint).to_owned();
            let subject = subject.unwrap_or_default();
            let mut own = record();
            own.peer = peer;
            (own.tls, own.resumed) = (tls, resumed);
            let mut shared = record();
            // What the record itself says is not read once it points at its connection's.
            shared.peer = "203.0.113.1:9".parse().expect("addr");
            shared.conn = Some(Arc::new(ConnFields::new(peer, (tls, resumed), sni, cert)));
            // Set in order: the record's own are rebuilt with them where they go.
            let mut rebuilt = Record::new(own.at_ms, own.id, peer);
            (rebuilt.status, rebuilt.micros, rebuilt.bytes_in, rebuilt.bytes_out) = (200, 1234, 12, 500);
            (rebuilt.upstream_status, rebuilt.upstream_micros) = (200, 900);
            (rebuilt.tls, rebuilt.resumed) = (tls, resumed);
            for (f, _) in FIELDS {
                let v: &[u8] = match f {
                    Text::ClientCert => thumbprint.as_bytes(),
                    Text::ClientSubject => subject.as_bytes(),
                    Text::Sni => sni.unwrap_or_default().as_bytes(),
                    _ => own.get(f),
                };
                if !v.is_empty() {
                    let v = v.to_vec();
                    rebuilt.put(f, &v);
                }
            }
            let line = line_of(&rebuilt);
            assert_eq!(line_of(&shared), line);
            let json = portcullis_jose::Json::parse(line.trim_end().as_bytes()).expect("JSON");
            let text = |name: &str| json.get(name).and_then(|v| v.as_str()).map(str::to_owned);
            assert_eq!(text("peer"), Some(peer.to_string()));
            assert_eq!(
                text("client_cert_subject").as_deref(),
                Some(if subject.is_empty() { "-" } else { hostile })
            );
            assert_eq!(text("sni").as_deref(), Some(sni.unwrap_or("-")));
            // Given back by the log thread: the connection's fields are let go.
            shared.release();
            assert!(shared.conn.is_none());
        }
    }

    #[test]
    fn a_record_filled_again_in_place_reads_as_a_new_one() {
        let peer = "[2001:db8::1]:443".parse().expect("addr");
        let fill = |r: &mut Record| {
            r.status = 404;
            r.put(Text::Path, b"/b");
            r.put(Text::Sni, b"api.example");
        };
        let mut fresh = Record::new(7, None, peer);
        fill(&mut fresh);
        // Records with every number set and fields past `Sni`, one of them spilled, made over.
        let mut spilled = Record::new(1, Some([b'3'; 16]), "192.0.2.9:1".parse().expect("addr"));
        (spilled.status, spilled.micros, spilled.bytes_in, spilled.bytes_out) = (500, 9, 1, 2);
        (spilled.upstream_status, spilled.upstream_micros) = (502, 3);
        (spilled.tls, spilled.resumed) = ("TLSv1.2", true);
        spilled.put(Text::Method, b"PUT");
        spilled.put(Text::Backend, &[b'x'; 2 * INLINE]);
        assert!(!spilled.spilled.is_empty());
        let mut used = record();
        used.upstream_micros = 1;
        for mut r in [used, spilled] {
            r.reset(7, None, peer);
            fill(&mut r);
            assert!(r.spilled.is_empty());
            assert_eq!(line_of(&r), line_of(&fresh));
            assert_eq!(r.get(Text::Backend), b"");
        }
    }

    #[test]
    fn records_cross_in_batches_filled_again_in_place() {
        let sink = Sink::new(4);
        let rx = sink.rx.lock().expect("lock").take().expect("outlet");
        let outbox = Outbox::default();
        let peer = "192.0.2.7:5000".parse().expect("addr");
        let put = |n: u64| {
            outbox.record_with(&sink, (n, None, peer), |r| {
                r.micros = n;
                r.put(Text::Path, format!("/{n}").as_bytes());
            })
        };
        let paths = |batch: &[Record]| -> Vec<(u64, String)> {
            batch
                .iter()
                .map(|r| (r.micros, String::from_utf8_lossy(r.get(Text::Path)).into_owned()))
                .collect()
        };
        // A full batch (four) goes at once; the rest when flushed.
        (0..6).for_each(put);
        let first = rx.try_recv().expect("a full batch");
        assert_eq!(paths(&first), (0..4).map(|n| (n, format!("/{n}"))).collect::<Vec<_>>());
        assert!(rx.try_recv().is_err());
        // Given back with its records, and filled again over them.
        let at = first.as_ptr();
        rx.recycle_filled(first);
        assert!(outbox.flush(&sink));
        assert_eq!(paths(&rx.try_recv().expect("the rest")), vec![(4, "/4".into()), (5, "/5".into())]);
        put(6);
        assert!(outbox.flush(&sink));
        let again = rx.try_recv().expect("the next");
        assert_eq!(again.as_ptr(), at, "the batch given back");
        assert_eq!(paths(&again), vec![(6, "/6".to_owned())], "its other records are not this batch's");
        assert_eq!(line_of(&again[0]).matches("\"path\":\"/6\"").count(), 1);
        // Nothing filled: nothing to hand over.
        assert!(!outbox.flush(&sink));
        assert!(rx.try_recv().is_err());
        assert_eq!(sink.dropped.load(Ordering::Relaxed), 0);
        // Given back by the log thread, a batch keeps no text spilled to the heap.
        outbox.record_with(&sink, (7, None, peer), |r| r.put(Text::Path, &[b'/'; 2 * INLINE]));
        assert!(outbox.flush(&sink));
        let long = rx.try_recv().expect("the long one");
        assert_eq!(long[0].get(Text::Path).len(), 2 * INLINE);
        give_back(&rx, long);
        let kept = sink.inlet.batch();
        assert!(kept.iter().all(|r| r.spilled.capacity() == 0 && r.get(Text::Path).is_empty()));
    }

    #[test]
    fn numbers_times_and_addresses_without_the_formatter() {
        let mut out: Vec<u8> = Vec::new();
        for (n, width, text) in [
            (0, 1, "0"),
            (7, 2, "07"),
            (2026, 4, "2026"),
            (5, 3, "005"),
            (u64::MAX, 1, "18446744073709551615"),
        ] {
            out.clear();
            digits(&mut out, n, width);
            assert_eq!(out, text.as_bytes());
        }
        let mut clock = Clock::new();
        for (ms, text) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (999, "1970-01-01T00:00:00.999Z"),
            (1_000, "1970-01-01T00:00:01.000Z"),
            (951_782_400_007, "2000-02-29T00:00:00.007Z"),
            (1_798_761_599_999, "2026-12-31T23:59:59.999Z"),
            (1_798_761_600_000, "2027-01-01T00:00:00.000Z"),
            (1_798_761_599_010, "2026-12-31T23:59:59.010Z"),
        ] {
            out.clear();
            clock.rfc3339(&mut out, ms);
            assert_eq!(String::from_utf8_lossy(&out), text);
        }
        for addr in ["192.0.2.7:5000", "[::1]:8443", "[2001:db8::1]:1"] {
            out.clear();
            peer(&mut out, addr.parse().expect("addr"));
            assert_eq!(out, addr.as_bytes());
        }
    }

    #[test]
    fn no_line_is_longer_than_the_room_made_for_it() {
        let fields = FIELDS.map(|(f, _)| f);
        let widest: SocketAddr = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".parse().expect("addr");
        let mapped: SocketAddr = "[::ffff:255.255.255.255]:65535".parse().expect("addr");
        // Each byte at its widest: a control character (`\u0001`), a byte that is not UTF-8
        // (U+FFFD), `"` (`\"`), and nothing at all (`"-"`).
        for text in [&b"\x01"[..], b"\xff", b"\"", b""] {
            for (n, addr) in [(1, widest), (40, mapped), (INLINE, widest)] {
                let mut r = Record::new(u64::MAX, Some([1; 16]), addr);
                (r.status, r.upstream_status) = (u16::MAX, u16::MAX);
                (r.micros, r.bytes_in, r.bytes_out, r.upstream_micros) =
                    (u64::MAX, u64::MAX, u64::MAX, u64::MAX);
                r.tls = "TLSv1.3";
                for f in fields {
                    r.put(f, &text.repeat(n));
                }
                for format in [json as fn(&Record, &mut Clock, &mut Lines), |r, _, l| combined(r, l)] {
                    let mut lines = Lines::default();
                    format(&r, &mut Clock::new(), &mut lines);
                    let line = lines.written();
                    assert!(
                        line.len() - 1 <= most(&r),
                        "{} > {}: {}",
                        line.len() - 1,
                        most(&r),
                        String::from_utf8_lossy(line)
                    );
                    assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
                }
            }
        }
    }

    #[test]
    fn fields_copied_wide_come_out_whole_and_nothing_after_them() {
        let fields = FIELDS;
        let peer = "192.0.2.7:5000".parse().expect("addr");
        // Around `SHORT`; a first field that leaves fewer than `SHORT` bytes of the buffer
        // after the others' starts; and enough to spill.
        for (first, len) in [(1, 1), (23, 23), (24, 24), (31, 31), (32, 32), (33, 33), (290, 1), (300, 2)] {
            // Filled over a record whose buffer holds other bytes.
            let mut r = Record::new(0, None, peer);
            r.put(Text::Method, &[b'~'; INLINE]);
            r.reset(0, None, peer);
            let values: Vec<String> = (0..fields.len())
                .map(|k| {
                    let n = if k == 0 { first } else { len };
                    (0..n).map(|i| char::from(b'a' + ((k + i) % 26) as u8)).collect()
                })
                .collect();
            for ((f, _), v) in fields.iter().zip(&values) {
                r.put(*f, v.as_bytes());
            }
            let line = line_of(&r);
            assert!(!line.contains('~'), "{line}");
            for ((_, name), v) in fields.iter().zip(&values) {
                assert!(line.contains(&format!("\"{name}\":\"{v}\"")), "{name} ({first}, {len}): {line}");
            }
            assert!(line.ends_with(",\"upstream_status\":null,\"upstream_micros\":0}\n"), "{line}");
        }
    }

    #[test]
    fn a_record_with_nothing_to_escape_is_written_as_it_is() {
        let mut r = Record::new(0, Some(*b"0123456789abcdef"), "192.0.2.7:5000".parse().expect("addr"));
        r.put(Text::Method, b"GET");
        r.put(Text::Path, b"/a b");
        r.put(Text::UserAgent, b"agent/1.0");
        let mut lines = Lines::default();
        json(&r, &mut Clock::new(), &mut lines);
        let line = String::from_utf8(lines.written().to_vec()).expect("UTF-8");
        assert!(
            line.contains(r#""method":"GET","path":"/a b","status":null,"api":"-","operation":"-""#),
            "{line}"
        );
        assert!(
            line.contains(r#""jwt_appid":"-","user_agent":"agent/1.0","refused":"-","backend":"-""#),
            "{line}"
        );
        // No request id, not resumed, no status from anyone: each field still whole.
        let mut r = Record::new(0, None, "192.0.2.7:5000".parse().expect("addr"));
        r.tls = "TLSv1.2";
        let mut lines = Lines::default();
        json(&r, &mut Clock::new(), &mut lines);
        let line = String::from_utf8(lines.written().to_vec()).expect("UTF-8");
        assert_eq!(
            line,
            concat!(
                r#"{"time":"1970-01-01T00:00:00.000Z","id":"-","peer":"192.0.2.7:5000","method":"-","path":"-","#,
                r#""status":null,"api":"-","operation":"-","micros":0,"bytes":0,"bytes_in":0,"bytes_out":0,"#,
                r#""tls":"TLSv1.2","resumed":false,"sni":"-","client_cert":"-","client_cert_subject":"-","#,
                r#""subscription":"-","jwt_sub":"-","jwt_appid":"-","user_agent":"-","refused":"-","backend":"-","#,
                r#""upstream_status":null,"upstream_micros":0}"#,
                "\n"
            )
        );
    }

    #[test]
    fn both_formats_escape_what_clients_send() {
        let mut lines = Lines::default();
        json(&record(), &mut Clock::new(), &mut lines);
        assert_eq!(
            String::from_utf8(lines.written().to_vec()).expect("UTF-8"),
            r#"{"time":"2025-12-05T18:04:22.123Z","id":"0123456789abcdef","peer":"192.0.2.7:5000","method":"GET","path":"/items/\"x\"","status":200,"api":"todo","operation":"getItem","micros":1234,"bytes":512,"bytes_in":12,"bytes_out":500,"tls":"TLSv1.3","resumed":true,"sni":"-","client_cert":"-","client_cert_subject":"-","subscription":"sub-1","jwt_sub":"-","jwt_appid":"-","user_agent":"evil\"agent\\\u0001�","refused":"-","backend":"10.0.0.1:8080","upstream_status":200,"upstream_micros":900}
"#
        );
        lines.clear();
        combined(&record(), &mut lines);
        assert_eq!(
            String::from_utf8(lines.written().to_vec()).expect("UTF-8"),
            "192.0.2.7 - - [05/Dec/2025:18:04:22 +0000] \"GET /items/\\x22x\\x22 HTTP/1.1\" 200 500 \"-\" \"evil\\x22agent\\x5C\\x01\\xFF\"\n"
        );
    }
}
