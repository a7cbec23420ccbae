//! Start, stop and drain: the real binary and signals.

use std::time::{Duration, Instant};

use portcullis_testkit::ProxyProcess;

use crate::common::{Env, binary, says};

#[test]
fn sigterm_lets_an_in_flight_request_finish() {
    let env = Env::new();
    let config = env.write_config("p.toml", &env.config("require", "[server]\nworkers = 2\n"));
    let mut proxy = ProxyProcess::spawn(&binary(), &config);
    let client = env.client(Some(&env.pki.client));
    let addr = proxy.addr;
    let slow = std::thread::spawn(move || client.get(addr, "/slow/1500"));
    // Wait until the backend has the request, then ask the proxy to stop.
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.backend.connections() == 0 {
        assert!(Instant::now() < deadline, "the request never reached the backend");
        std::thread::sleep(Duration::from_millis(10));
    }
    proxy.signal(libc::SIGTERM);
    let response = slow.join().unwrap().expect("the in-flight request completes");
    assert_eq!(response.status, 200);
    assert_eq!(response.header("Connection"), Some("close"), "a draining proxy closes after the response");
    assert_eq!(proxy.wait_exit(Duration::from_secs(30)), Some(0));
    assert!(proxy.wait_for_log("shutting down", Duration::ZERO).is_some());
}

#[test]
fn shutdown_closes_idle_keep_alive_connections() {
    let env = Env::new();
    // A drain timeout far longer than the test may take: shutdown must not wait for idle
    // connections, it closes them.
    let proxy = env.proxy("require", "[server]\ndrain_timeout = \"1h\"\n");
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        proxy.shutdown();
        let _ = done.send(());
    });
    finished.recv_timeout(Duration::from_secs(30)).expect("shutdown waited for an idle connection");
    // The idle connection was closed by the proxy: reading gives the end of the stream.
    assert!(c.read_to_close().unwrap().is_empty());
}

#[test]
fn pid_file_is_written_and_removed() {
    let env = Env::new();
    let config = env.write_config("p.toml", &env.config("require", ""));
    let pid_file = env.dir().join("portcullis.pid");
    let mut child = std::process::Command::new(binary())
        .args(["run", "-c"])
        .arg(&config)
        .arg("--pid-file")
        .arg(&pid_file)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !pid_file.exists() {
        assert!(Instant::now() < deadline, "no pid file");
        std::thread::sleep(Duration::from_millis(10));
    }
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().trim().parse().unwrap();
    assert_eq!(pid, child.id());
    // SAFETY: signalling our own child.
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    assert!(!pid_file.exists());
}

#[test]
fn a_broken_configuration_does_not_start() {
    let env = Env::new();
    let config = env.write_config("p.toml", "[[listener]]\nbind = \"nowhere\"\n");
    let out = std::process::Command::new(binary()).args(["run", "-c"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("p.toml:2:8: listener[0].bind"), "{stderr}");
}

/// `portcullis demo` starts, and the `curl` commands it prints do what it says: for client
/// certificates 200 with the identity headers, 403 without a certificate, 403 with the revoked
/// one; for subscription keys 200, 401 missing, 401 invalid; for tokens 200 with appidacr 2, 401
/// with 1; for devices 200 with the device service's answer and 403 for another device; for
/// the rate limit five 200s then a 429. The commands are replayed with the test
/// client (same files, headers and URL), so the test needs no curl.
#[test]
fn the_demo_prints_commands_that_work() {
    use std::io::{BufRead as _, BufReader};
    use std::process::{Command, Stdio};

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    /// The demo is stopped even when an assertion fails.
    struct Demo(std::process::Child);
    impl Drop for Demo {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut demo = Demo(
        Command::new(binary())
            .args(["demo", "--port", &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut commands = Vec::new();
    let mut repeated = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut metrics = None;
    let mut consume = None;
    while commands.len() < 10 || repeated.is_none() || metrics.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).expect("the demo prints ten curl commands, a loop and the metrics");
        if line.starts_with("curl -s http://") {
            metrics = Some(line);
        } else if line.starts_with("tansu cat consume --broker tcp://") {
            consume = Some(line);
        } else if line.starts_with("curl ") {
            commands.push(line);
        } else if line.starts_with("for i in 1 2 3 4 5 6; do curl ") {
            repeated = Some(line);
        }
    }
    let arg = |cmd: &str, flag: &str| {
        let mut words = cmd.split_whitespace();
        words.by_ref().find(|w| *w == flag)?;
        words.next().map(str::to_owned)
    };
    let mut statuses = Vec::new();
    for cmd in &commands {
        let url = cmd.split_whitespace().last().unwrap();
        let rest = url.strip_prefix("https://").unwrap();
        let (authority, path) = rest.split_at(rest.find('/').unwrap());
        let addr: std::net::SocketAddr = authority.parse().unwrap();
        assert_eq!(addr.port(), port);
        let root = std::fs::read_to_string(arg(cmd, "--cacert").unwrap()).unwrap();
        let identity = arg(cmd, "--cert").map(|cert| {
            (
                std::fs::read_to_string(cert).unwrap(),
                std::fs::read_to_string(arg(cmd, "--key").unwrap()).unwrap(),
            )
        });
        let client = portcullis_testkit::TlsClient::from_pem(
            &root,
            identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
            portcullis_testkit::Versions::Both,
            &addr.ip().to_string(),
        );
        // -H "Name: value"
        let headers: Vec<(String, String)> = cmd
            .split("-H \"")
            .skip(1)
            .filter_map(|h| h.split('"').next()?.split_once(": ").map(|(n, v)| (n.to_owned(), v.to_owned())))
            .collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let r = client.connect(addr).unwrap().request("GET", path, &headers, b"").unwrap();
        match (path, r.status) {
            ("/hello", 200) => assert!(
                r.echoed_header("X-Client-Cert-Subject").is_some_and(|s| s.contains("CN=")),
                "{}",
                r.text()
            ),
            ("/hello", _) => {
                assert_eq!(r.text(), r#"{"statusCode":403,"message":"Invalid client certificate"}"#)
            }
            ("/todo/items", 200) => {
                assert_eq!(r.echoed_header("X-Subscription-Id").as_deref(), Some("demo-subscription"));
                assert_eq!(r.echoed_header("Ocp-Apim-Subscription-Key"), None);
            }
            ("/todo/items", _) => assert!(r.text().contains("subscription key"), "{}", r.text()),
            ("/orders/1", 200) => assert_eq!(r.echoed_header("X-Token-Sub").as_deref(), Some("demo-client")),
            ("/devices/dev-1/telemetry", 200) => {
                let context = r.echoed_header("x-request-context-data").unwrap_or_default();
                assert!(context.starts_with("deviceId=dev-1;certificateThumbprint="), "{}", r.text());
                assert!(r.text().starts_with("tls-client: client2\n"), "over mutual TLS: {}", r.text());
            }
            ("/devices/dev-2/telemetry", _) => {
                assert_eq!(
                    r.text(),
                    r#"{"statusCode":403,"message":"Forbidden. Certificate was not recognized."}"#
                )
            }
            (_, _) => assert!(r.text().contains("appidacr"), "{}", r.text()),
        }
        statuses.push(r.status);
    }
    assert_eq!(
        statuses,
        [200, 403, 403, 200, 401, 401, 200, 401, 200, 403],
        "certificates: allowed, none, revoked; keys: valid, missing, wrong; tokens: appidacr 2, 1; devices: known, other"
    );
    // The loop: six calls to the rate-limited API.
    let repeated = repeated.unwrap();
    let url = repeated.split_whitespace().find(|w| w.starts_with("https://")).unwrap().trim_end_matches(';');
    assert_eq!(url, format!("https://127.0.0.1:{port}/limited/"));
    let root = std::fs::read_to_string(arg(&repeated, "--cacert").unwrap()).unwrap();
    let client =
        portcullis_testkit::TlsClient::from_pem(&root, None, portcullis_testkit::Versions::Both, "127.0.0.1");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let answers: Vec<_> = (0..6)
        .map(|_| client.connect(addr).unwrap().request("GET", "/limited/", &[], b"").unwrap())
        .collect();
    let codes: Vec<u16> = answers.iter().map(|r| r.status).collect();
    assert_eq!(codes, [200, 200, 200, 200, 200, 429]);
    assert_eq!(answers[4].header("X-RateLimit-Remaining"), Some("0"));
    assert!(
        answers[5]
            .text()
            .starts_with(r#"{"statusCode":429,"message":"Rate limit is exceeded. Try again in "#)
    );
    assert!(answers[5].header("Retry-After").is_some());
    // The metrics: what the requests above did.
    let url = metrics.unwrap();
    let admin = url.trim_start_matches("curl -s http://").trim_end_matches("/metrics").to_owned();
    let mut s = std::net::TcpStream::connect(admin.as_str()).unwrap();
    std::io::Write::write_all(&mut s, b"GET /metrics HTTP/1.1\r\nHost: admin\r\n\r\n").unwrap();
    let mut scrape = String::new();
    std::io::Read::read_to_string(&mut s, &mut scrape).unwrap();
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    assert!(scrape.contains("portcullis_refusals_total{step=\"rate_limit\"} 1"), "{scrape}");
    // With Tansu installed (as CI has it), the call to /hello that was let through is on the
    // demo's broker as a JSON message.
    let consume = consume.expect("the demo starts a broker when tansu is installed, and says how to read it");
    let bootstrap = consume.split_whitespace().find_map(|w| w.strip_prefix("tcp://")).unwrap().to_owned();
    let (host, port) = bootstrap.rsplit_once(':').unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = loop {
        let records = portcullis_kafka::admin::read_topic(
            &portcullis_kafka::TcpConnector,
            (host, port.parse().unwrap()),
            "requests",
            Duration::from_secs(5),
        )
        .unwrap();
        if !records.is_empty() || Instant::now() >= deadline {
            break records;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(logged.len(), 1, "one call to /hello was let through");
    let message: serde_json::Value = serde_json::from_slice(logged[0].value.as_ref().unwrap()).unwrap();
    assert_eq!(message["path"], "/hello");
    assert_eq!(message["method"], "GET");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(demo.0.id() as i32, libc::SIGTERM) };
    assert_eq!(demo.0.wait().unwrap().code(), Some(0), "Ctrl-C or SIGTERM ends the demo cleanly");
}

/// SO_REUSEPORT would let a second instance share the address and take requests at random:
/// it refuses to start instead, naming the address.
#[test]
fn a_second_instance_on_the_same_address_refuses_to_start() {
    let env = Env::new();
    let config = env.write_config("p.toml", &env.config("require", "[server]\nworkers = 2\n"));
    let first = ProxyProcess::spawn(&binary(), &config);
    let taken = first.addr;
    let text = env.config("require", "").replacen("127.0.0.1:0", &taken.to_string(), 1);
    let second_config = env.write_config("second.toml", &text);
    let out = std::process::Command::new(binary()).args(["run", "-c"]).arg(&second_config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {taken}")), "{stderr}");
    assert!(stderr.contains("another process already listens there"), "{stderr}");
    // The first instance is untouched.
    assert_eq!(env.client(Some(&env.pki.client)).get(taken, "/").unwrap().status, 200);
}

/// Under systemd (`Type=notify`): `READY=1` once serving, `RELOADING=1` with the monotonic time
/// and then `READY=1` again around a SIGHUP reload, `STOPPING=1` when draining begins.
#[test]
fn the_service_manager_hears_ready_reloading_and_stopping() {
    use std::os::unix::net::UnixDatagram;
    let env = crate::common::Env::new();
    let socket_path = env.dir().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let next = || {
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).expect("a message from the proxy");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let config = env.write_config("p.toml", &env.config("request", ""));
    let proxy = portcullis_testkit::ProxyProcess::spawn_with_env(
        &binary(),
        &config,
        &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())],
    );
    assert!(next().starts_with("READY=1\n"));
    // SAFETY: signalling the child process this test started.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGHUP) };
    let reloading = next();
    assert!(reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{reloading}");
    assert!(reloading["RELOADING=1\nMONOTONIC_USEC=".len()..].parse::<u64>().is_ok(), "{reloading}");
    assert_eq!(next(), "READY=1\nSTATUS=serving generation 2");
    // SAFETY: as above.
    unsafe { libc::kill(proxy.pid() as i32, libc::SIGTERM) };
    assert_eq!(next(), "STOPPING=1");
}

/// `Cpus_allowed_list` of the `status` file at `path` (a task's), e.g. `0-1`.
fn allowed_in(path: &str) -> String {
    let status = std::fs::read_to_string(path).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_owned()
}

/// The CPUs a task of process `pid` may run on.
fn cpus_of(pid: u32, tid: &str) -> String {
    allowed_in(&format!("/proc/{pid}/task/{tid}/status"))
}

/// The CPUs the calling thread may run on.
fn thread_cpus() -> String {
    allowed_in("/proc/thread-self/status")
}

/// The threads of process `pid` by name (`comm`: 15 bytes at most), with their CPUs.
fn threads_of(pid: u32) -> Vec<(String, String)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let tid = task.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_owned();
        threads.push((comm, cpus_of(pid, &tid)));
    }
    threads
}

/// `[server] background_cpus`: the log thread, the admin endpoint, health checks and the main
/// thread run on the CPUs named; the workers keep the CPUs the process had. A reload that
/// changes the setting is warned about and moves nothing; a CPU that cannot be used at all
/// fails the start, naming the field.
#[test]
fn threads_other_than_workers_run_on_the_background_cpus() {
    let env = crate::common::Env::new();
    // What this thread may use, and so the proxy it starts.
    let own = thread_cpus();
    let mine: Vec<usize> = (0..1024).filter(|&c| own_has(&own, c)).collect();
    let background = mine[0];
    let text = |cpus: &str| {
        env.config("request", "[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n").replace(
            "[[listener]]",
            &format!(
                "[server]\nworkers = 2\nadmin = \"127.0.0.1:0\"\naccess_log = {{ path = \"{}\" }}\nbackground_cpus = [{cpus}]\n\n[[listener]]",
                env.dir().join("access.log").display()
            ),
        )
    };
    let config = env.write_config("p.toml", &text(&background.to_string()));
    let proxy = ProxyProcess::spawn(&binary(), &config);
    assert_eq!(env.client(None).get(proxy.addr, "/x").unwrap().status, 200);
    let check = |proxy: &ProxyProcess| {
        let threads = threads_of(proxy.pid());
        let named = |prefix: &str| threads.iter().filter(|(c, _)| c.starts_with(prefix)).collect::<Vec<_>>();
        assert_eq!(named("portcullis-w").len(), 2, "{threads:?}");
        for (comm, cpus) in named("portcullis-w") {
            assert_eq!(cpus, &own, "worker {comm} keeps the process's CPUs: {threads:?}");
        }
        for prefix in ["portcullis-log", "portcullis-admi", "portcullis-heal"] {
            let found = named(prefix);
            assert_eq!(found.len(), 1, "{prefix}: {threads:?}");
            assert_eq!(found[0].1, background.to_string(), "{prefix}: {threads:?}");
        }
        assert_eq!(cpus_of(proxy.pid(), &proxy.pid().to_string()), background.to_string(), "the main thread");
    };
    check(&proxy);
    // A reload cannot move running threads: said, and the rest applies.
    let other = mine.last().copied().unwrap_or(background);
    std::fs::write(&config, text(&format!("{background}, {other}"))).unwrap();
    proxy.signal(libc::SIGHUP);
    let warned = proxy.wait_for_log("server.background_cpus changed", Duration::from_secs(20));
    if other != background {
        assert!(warned.is_some(), "{:#?}", proxy.log());
    }
    assert!(proxy.wait_for_log("generation=2", Duration::from_secs(20)).is_some(), "{:#?}", proxy.log());
    check(&proxy);
    drop(proxy);
    // No CPU the process may use: the start fails and says which field.
    let bad = env.write_config("bad.toml", &text("1023"));
    if !own_has(&own, 1023) {
        let out = std::process::Command::new(binary()).args(["run", "-c"]).arg(&bad).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(
            stderr.contains("bad.toml:")
                && stderr.contains("server.background_cpus[0]: cannot run on CPUs [1023]"),
            "{stderr}"
        );
    }
}

/// Whether `list` (`0-3,6`, as in `Cpus_allowed_list`) has CPU `cpu`.
fn own_has(list: &str, cpu: usize) -> bool {
    list.split(',').any(|part| match part.split_once('-') {
        Some((a, b)) => {
            a.trim().parse::<usize>().is_ok_and(|a| a <= cpu)
                && b.trim().parse::<usize>().is_ok_and(|b| cpu <= b)
        }
        None => part.trim().parse::<usize>() == Ok(cpu),
    })
}

/// A start that fails after the background CPUs were taken (here: the address is in use) gives
/// the thread that tried its CPUs back, and one that succeeds keeps it on them (in this process:
/// the server runs on the test's thread's side).
#[test]
fn a_start_that_fails_gives_the_thread_its_cpus_back() {
    let env = crate::common::Env::new();
    let own = thread_cpus();
    let background = (0..1024).find(|&c| own_has(&own, c)).expect("a CPU");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = with_background_cpus(&env, &background.to_string());
    let busy = text.replace("bind = \"127.0.0.1:0\"", &format!("bind = \"{}\"", taken.local_addr().unwrap()));
    let failed =
        portcullis_testkit::TestProxy::try_start(env.dir(), &busy).map(|_| ()).unwrap_err().to_string();
    assert!(
        failed.contains("cannot listen"),
        "the address is in use, found after the CPUs were taken: {failed}"
    );
    assert_eq!(thread_cpus(), own, "the thread's CPUs after a failed start");
    let proxy = portcullis_testkit::TestProxy::start(env.dir(), &text);
    assert_eq!(thread_cpus(), background.to_string(), "the thread that started the server");
    drop(proxy);
}

/// A CPU the process may not use, named with one it may: warned about, and the background
/// threads run on the other.
#[test]
fn a_cpu_that_cannot_be_used_is_warned_about_and_skipped() {
    let env = crate::common::Env::new();
    let Some(background) = one_usable_and_1023_not() else { return };
    let text = with_background_cpus(&env, &format!("{background}, 1023"));
    let proxy = ProxyProcess::spawn(&binary(), &env.write_config("p.toml", &text));
    let warned = proxy.wait_for_log("this CPU cannot be used", Duration::from_secs(10));
    assert!(warned.as_deref().is_some_and(|l| l.contains("1023")), "{:#?}", proxy.log());
    let pid = proxy.pid();
    assert_eq!(cpus_of(pid, &pid.to_string()), background.to_string(), "the main thread");
    assert_eq!(env.client(None).get(proxy.addr, "/x").unwrap().status, 200);
}

/// `portcullis check` tries `background_cpus` as a start would: none of them usable is an error
/// naming the field, one of several a warning.
#[test]
fn check_says_which_background_cpus_cannot_be_used() {
    let env = crate::common::Env::new();
    let Some(background) = one_usable_and_1023_not() else { return };
    let check = |name: &str, cpus: &str| {
        crate::common::check_config(&env.write_config(name, &with_background_cpus(&env, cpus)))
    };
    let (ok, stdout, stderr) = check("good.toml", &background.to_string());
    assert!(ok && stdout.trim() == "ok" && !stderr.contains("background_cpus"), "{stdout}{stderr}");
    let (ok, stdout, stderr) = check("some.toml", &format!("{background}, 1023"));
    assert!(ok && stdout.trim() == "ok", "{stdout}{stderr}");
    assert!(
        says(&stderr, &["some.toml:", "server.background_cpus[1]: warning: CPU 1023 cannot be used here"]),
        "{stderr}"
    );
    let (ok, stdout, stderr) = check("none.toml", "1023");
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        says(&stderr, &["none.toml:", "server.background_cpus[0]: cannot run on CPUs [1023]: "]),
        "{stderr}"
    );
    // A check started on other CPUs (`taskset`): as a start, it may still move its threads to
    // any CPU of its cgroup.
    let own = thread_cpus();
    if let Some(other) = (0..1024).find(|&c| c != background && own_has(&own, c)) {
        let path = env.write_config("moved.toml", &with_background_cpus(&env, &background.to_string()));
        let out = std::process::Command::new("taskset")
            .args(["-c", &other.to_string()])
            .arg(binary())
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .expect("taskset (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !stderr.contains("background_cpus"), "{stderr}");
    }
}

#[test]
fn check_warns_when_the_access_log_cannot_be_opened() {
    let env = crate::common::Env::new();
    let check = |name: &str, path: &str| {
        let text = env.config("request", "[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n").replace(
            "[[listener]]",
            &format!("[server]\naccess_log = {{ path = \"{path}\" }}\n\n[[listener]]"),
        );
        // A warning, not an error: the proxy would start (and count the records it drops).
        crate::common::check_passes(&env, name, &text)
    };
    let dir = env.dir();
    // A file that can be made, and one that is there: nothing to say, and nothing made.
    let fresh = dir.join("logs-fresh.log");
    assert!(!check("fresh.toml", &fresh.display().to_string()).contains("access_log"));
    assert!(!fresh.exists(), "the check made the file");
    let there = dir.join("logs-there.log");
    std::fs::write(&there, "a line\n").unwrap();
    assert!(!check("there.toml", &there.display().to_string()).contains("access_log"));
    assert_eq!(std::fs::read_to_string(&there).unwrap(), "a line\n", "the check wrote to it");
    // A directory that does not exist, and a path that is a directory.
    let missing = dir.join("no-such-dir").join("access.log");
    let stderr = check("missing.toml", &missing.display().to_string());
    assert!(
        says(
            &stderr,
            &[
                "missing.toml:",
                "server.access_log.path: warning: cannot open",
                "no-such-dir",
                "drop access-log records"
            ]
        ),
        "{stderr}"
    );
    let stderr = check("dir.toml", &dir.display().to_string());
    assert!(says(&stderr, &["server.access_log.path: warning:", "it is a directory"]), "{stderr}");
    // A directory the check's user may not make files in: by its mode, or, for root (whom modes
    // do not stop), by the immutable flag (ext4 and most local file systems have it).
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).unwrap();
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let lock = |on: bool| {
        if root {
            let flag = if on { "+i" } else { "-i" };
            std::process::Command::new("chattr").arg(flag).arg(&locked).status().is_ok_and(|s| s.success())
        } else {
            let mode = if on { 0o500 } else { 0o700 };
            std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(mode)).is_ok()
        }
    };
    if lock(true) {
        let stderr = check("locked.toml", &locked.join("access.log").display().to_string());
        lock(false);
        assert!(
            stderr.contains("server.access_log.path: warning:") && stderr.contains("it cannot be made in"),
            "{stderr}"
        );
    } else {
        eprintln!("no way to lock a directory here: the last case is not tried");
    }
}

/// A CPU this thread may use, when it may not use CPU 1023 (none on a machine with 1024 CPUs:
/// no CPU there to refuse).
fn one_usable_and_1023_not() -> Option<usize> {
    let own = thread_cpus();
    (!own_has(&own, 1023)).then(|| (0..1024).find(|&c| own_has(&own, c)).expect("a CPU"))
}

/// A one-worker proxy's configuration with `background_cpus = [cpus]`.
fn with_background_cpus(env: &crate::common::Env, cpus: &str) -> String {
    env.config("request", "[[api]]\nname = \"a\"\npath = \"/\"\nbackend = \"app\"\n").replace(
        "[[listener]]",
        &format!("[server]\nworkers = 1\nbackground_cpus = [{cpus}]\n\n[[listener]]"),
    )
}
