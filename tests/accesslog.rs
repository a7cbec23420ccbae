//! The access log as data: every request once, with its fields, written by the log thread (JSON
//! lines or nginx's combined format) to a file that `SIGUSR1` opens again; what a client sends is
//! escaped; a log that cannot keep up drops records and counts them, and requests never wait.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use portcullis_testkit::ProxyProcess;

use crate::common::{Env, access_line, admin, admin_of, binary, metric};

fn config(env: &Env, access: &str) -> String {
    env.config(
        "request",
        &format!("[server]\nworkers = 2\nadmin = \"127.0.0.1:0\"\naccess_log = {access}\n[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n"),
    )
}

#[test]
fn every_request_once_with_its_fields_and_escaped() {
    let env = Env::new();
    let file = env.dir().join("access.log");
    let access = format!("{{ path = \"{}\", format = \"json\" }}", file.display());
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, &access)));
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    for i in 0..20 {
        assert_eq!(c.request("GET", &format!("/item/{i}?key=secret"), &[], b"").unwrap().status, 200);
    }
    let agent = "evil \"agent\" \\ \u{e9}";
    assert_eq!(c.request("GET", "/agent", &[("User-Agent", agent)], b"").unwrap().status, 200);
    let line = access_line(env.dir(), &["\"path\":\"/agent\""]).expect("the request's line");
    let record: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(record["user_agent"], agent, "{line}");
    assert_eq!(record["status"], 200);
    assert_eq!(record["api"], "a");
    assert_eq!(record["method"], "GET");
    assert_eq!(record["tls"], "TLSv1.3");
    assert_eq!(record["client_cert"], env.pki.client.thumbprint());
    assert_eq!(record["client_cert_subject"], "CN=client1, OU=Clients, O=Portcullis Test, C=XX");
    assert_eq!(record["refused"], "-");
    assert_eq!(record["id"].as_str().map(str::len), Some(16));
    assert_eq!(record["sni"], "localhost");
    assert_eq!(record["backend"], env.backend.addr().to_string().as_str());
    assert_eq!(record["upstream_status"], 200);
    assert!(record["upstream_micros"].is_u64());
    assert_eq!(record["bytes_in"], 0);
    assert_eq!(record["subscription"], "-");
    // Bytes in and out apart: a 5-byte body up, the backend's answer down.
    let answer = c.request("POST", "/upload", &[], b"hello").unwrap();
    assert_eq!(answer.status, 200);
    let line = access_line(env.dir(), &["\"path\":\"/upload\""]).expect("the upload's line");
    let record: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(record["bytes_in"], 5, "{line}");
    assert_eq!(record["bytes_out"], answer.body.len() as u64, "{line}");
    assert_eq!(record["bytes"], 5 + answer.body.len() as u64, "{line}");
    let text = std::fs::read_to_string(&file).unwrap();
    for i in 0..20 {
        let path = format!("\"path\":\"/item/{i}\"");
        assert_eq!(text.lines().filter(|l| l.contains(&path)).count(), 1, "/item/{i} once:\n{text}");
    }
    assert!(!text.contains("secret"), "the query is not logged");
    assert!(text.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()), "{text}");
    // Disk space is reserved past the lines, the file's size left as it is (where the file
    // system reserves at all).
    let meta = std::fs::metadata(&file).unwrap();
    assert_eq!(meta.len(), text.len() as u64);
    if reserves_ahead(env.dir()) {
        assert!(meta.blocks() * 512 >= meta.len() + (512 << 10), "{} bytes allocated", meta.blocks() * 512);
    } else {
        eprintln!("this file system does not reserve space past a file's end: not checked");
    }
}

/// Whether the file system of `dir` reserves space past a file's end (`fallocate` with
/// `FALLOC_FL_KEEP_SIZE`); not every one does (NFS, for one).
fn reserves_ahead(dir: &std::path::Path) -> bool {
    use std::os::fd::AsRawFd;
    let probe = dir.join("probe");
    let file = std::fs::File::create(&probe).unwrap();
    // SAFETY: a descriptor of a file this function holds open for the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 1 << 20) };
    drop(file);
    std::fs::remove_file(&probe).unwrap();
    rc == 0
}

#[test]
fn the_combined_format_escapes_quotes_and_sigusr1_opens_the_file_again() {
    let env = Env::new();
    let file = env.dir().join("access.log");
    let access = format!("{{ path = \"{}\", format = \"combined\" }}", file.display());
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, &access)));
    let get = |path: &str| {
        let mut c = env.client(None).connect(proxy.addr).unwrap();
        c.request("GET", path, &[("User-Agent", "say \"hi\"")], b"").unwrap().status
    };
    assert_eq!(get("/before"), 200);
    let line = access_line(env.dir(), &["/before"]).expect("a line");
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains("\"GET /before HTTP/1.1\" 200 ") && line.ends_with("\"say \\x22hi\\x22\""),
        "{line}"
    );
    // logrotate moves the file, then signals.
    std::fs::rename(&file, env.dir().join("access.log.1")).unwrap();
    // SAFETY: signalling the child process this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGUSR1) };
    assert!(proxy.wait_for_log("opening the access log again", Duration::from_secs(10)).is_some());
    assert_eq!(get("/after"), 200);
    assert!(access_line(env.dir(), &["/after"]).is_some(), "the new file has the new line");
    let old = std::fs::read_to_string(env.dir().join("access.log.1")).unwrap();
    assert!(old.contains("/before") && !old.contains("/after"), "{old}");
    // The moved file gave back the space reserved past its end.
    let meta = std::fs::metadata(env.dir().join("access.log.1")).unwrap();
    if reserves_ahead(env.dir()) {
        let allocated = meta.blocks() * 512;
        assert!(allocated < meta.len() + (64 << 10), "{allocated} bytes allocated for {}", meta.len());
    }
}

/// A reload naming another file: the lines go there, and the first file, still at its path
/// (another process may append to it), is left whole, its reserved space with it.
#[test]
fn a_reload_naming_another_file_leaves_the_first_one_as_it_is() {
    let env = Env::new();
    let first = env.dir().join("first.log");
    let access = |f: &std::path::Path| format!("{{ path = \"{}\", format = \"json\" }}", f.display());
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, &access(&first))));
    let get =
        |path: &str| env.client(None).connect(proxy.addr).unwrap().request("GET", path, &[], b"").unwrap();
    assert_eq!(get("/before").status, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&first).unwrap_or_default().contains("/before") {
        assert!(Instant::now() < deadline, "the first line never came");
        std::thread::sleep(Duration::from_millis(20));
    }
    env.write_config("p.toml", &config(&env, &access(&env.dir().join("access.log"))));
    proxy.signal(libc::SIGHUP);
    assert!(
        proxy.wait_for_log("configuration reloaded", Duration::from_secs(10)).is_some(),
        "{:?}",
        proxy.log()
    );
    assert_eq!(get("/after").status, 200);
    assert!(access_line(env.dir(), &["/after"]).is_some(), "the new file has the new line");
    let text = std::fs::read_to_string(&first).unwrap();
    assert!(text.contains("/before") && !text.contains("/after"), "{text}");
    let meta = std::fs::metadata(&first).unwrap();
    assert_eq!(meta.len(), text.len() as u64);
    if reserves_ahead(env.dir()) {
        assert!(meta.blocks() * 512 >= meta.len() + (512 << 10), "{} bytes allocated", meta.blocks() * 512);
    }
}

#[test]
fn a_line_left_cut_short_in_the_file_is_ended_before_the_next_record() {
    let env = Env::new();
    let file = env.dir().join("access.log");
    // A write that failed part way (a full disk), or a process killed in the middle of one.
    std::fs::write(&file, "{\"time\":\"2026-12-06T00:00:00.000Z\",\"pa").unwrap();
    let access = format!("{{ path = \"{}\" }}", file.display());
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, &access)));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/after", &[], b"").unwrap().status, 200);
    let line = access_line(env.dir(), &["\"path\":\"/after\""]).expect("the request's line");
    let record: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(record["path"], "/after");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("{\"time\":\"2026-12-06T00:00:00.000Z\",\"pa\n{"), "{text}");
}

#[test]
fn records_a_failed_write_lost_are_counted_dropped_never_written() {
    let env = Env::new();
    // Opens, and every write fails (no space left on the device).
    let access = "{ path = \"/dev/full\" }";
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, access)));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    for _ in 0..10 {
        assert_eq!(c.request("GET", "/x", &[], b"").unwrap().status, 200);
    }
    drop(c);
    let counts = || {
        let (_, metrics) = admin(admin_of(&proxy), "GET", "/metrics");
        let count = |result: &str| {
            metric(&metrics, &format!("portcullis_access_log_records_total{{result=\"{result}\"}}"))
        };
        (count("written"), count("dropped"))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while counts().1 < 10 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (written, dropped) = counts();
    assert!(dropped >= 10, "{dropped} dropped of 10 requests' records");
    assert_eq!(written, 0);
}

#[test]
fn a_log_that_cannot_keep_up_drops_and_counts_and_requests_never_wait() {
    let env = Env::new();
    // A FIFO nobody reads: the log thread cannot even open it.
    let fifo = env.dir().join("stuck.log");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path the test owns.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    let access = format!("{{ path = \"{}\", queue = 8 }}", fifo.display());
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &config(&env, &access)));
    let mut c = env.client(None).connect(proxy.addr).unwrap();
    let started = Instant::now();
    for _ in 0..100 {
        assert_eq!(c.request("GET", "/x", &[], b"").unwrap().status, 200);
    }
    let elapsed = started.elapsed();
    // The queue's 8 wait, and the log thread holds none (it opens the file before it takes
    // any): the other 92 are dropped (the last few once the worker hands its batch over), and
    // the records of connections that ended before a request, such as the test kit's probes for
    // the port, with them.
    let dropped = || {
        let (_, metrics) = admin(admin_of(&proxy), "GET", "/metrics");
        metric(&metrics, "portcullis_access_log_records_total{result=\"dropped\"}")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while dropped() < 92 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let dropped = dropped();
    assert!(dropped >= 92, "the queue's 8 wait, and the rest is dropped: {dropped} dropped");
    eprintln!("100 requests with the log stuck: {elapsed:?}, {dropped} records dropped");
    // SIGTERM with the log thread still waiting for a reader: the process stops all the same.
    // SAFETY: signalling the child process this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    assert!(
        proxy.wait_for_log("stopping without it", Duration::from_secs(10)).is_some(),
        "{:#?}",
        proxy.log()
    );
    assert!(proxy.wait_for_log("stopped", Duration::from_secs(10)).is_some(), "{:#?}", proxy.log());
}
