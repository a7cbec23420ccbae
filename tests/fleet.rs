//! Rate limits and quotas shared across hosts through a real Redis (`[server.redis]`): two
//! proxy processes, one `redis-server` started by the test, stopped and started again.

use std::time::{Duration, Instant};

use portcullis_policy::FLEET_SCRIPT;
use portcullis_testkit::{ProxyProcess, RedisServer, RedisTls, TestProxy};

use crate::common::{Env, binary, hammer, most_admitted_within, most_within};

/// A configuration whose API runs `step`, sharing counts through the Redis at `url` with
/// `redis` fields added.
fn config(env: &Env, url: &str, redis: &str, step: &str, workers: usize) -> String {
    env.config(
        "request",
        &format!(
            "[server]\nworkers = {workers}\n[server.redis]\nurl = \"{url}\"\nsync_interval = \"50ms\"\n{redis}\n\
             [[api]]\nname = \"app\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  {step}\n"
        ),
    )
}

fn spawn(env: &Env, name: &str, text: &str) -> ProxyProcess {
    ProxyProcess::spawn(&binary(), &env.write_config(name, text))
}

/// Statuses of `n` requests on one keep-alive connection.
fn statuses(env: &Env, addr: std::net::SocketAddr, n: usize) -> Vec<u16> {
    let mut c = env.client(None).connect(addr).unwrap();
    (0..n).map(|_| c.request("GET", "/", &[], b"").map_or(0, |r| r.status)).collect()
}

/// Requests on one connection until `want` answers (or `within` passes); the last answer.
fn until_status(
    env: &Env,
    addr: std::net::SocketAddr,
    want: u16,
    within: Duration,
) -> portcullis_testkit::Response {
    let deadline = Instant::now() + within;
    loop {
        let r = env.client(None).connect(addr).unwrap().request("GET", "/", &[], b"").unwrap();
        if r.status == want || Instant::now() >= deadline {
            return r;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Keys of the shared counts in Redis (not the hosts' heartbeats).
fn stored_keys(redis: &RedisServer) -> Vec<String> {
    let all = redis.cli(&["--scan", "--pattern", "portcullis:*"]);
    all.lines().filter(|k| *k != "portcullis:hosts").map(str::to_owned).collect()
}

/// The fleet: two processes of two workers each, one key hammered through both from eight
/// connections for several windows; the fleet admits no more than 5 % over the limit, over the
/// whole run and in any stretch of a period, and not far under it.
#[test]
fn two_hosts_share_one_limit() {
    let env = Env::new();
    let redis = RedisServer::start(env.dir());
    let step = r#"rate_limit_by_key = { calls = 200, renewal_period = "2s", counter_key = "hot" }"#;
    let text = config(&env, &redis.url(), "", step, 2);
    let a = spawn(&env, "a.toml", &text);
    let b = spawn(&env, "b.toml", &text);
    let answers = hammer(&env, &[a.addr, b.addr], 4, Duration::from_secs(5));
    assert!(answers.iter().all(|x| x.2 == 200 || x.2 == 429), "only 200 and 429");
    let admitted = |addr| answers.iter().filter(|x| x.1 == addr && x.2 == 200).count();
    // The proxy's window is at least a period long: any stretch shorter, seen from here, lies
    // within one, but for how late answers are seen (a loaded machine delays some by hundreds of
    // milliseconds; a whole test suite on two cores, by more than 500): the stretch is 1 s for
    // the 2 s period. Two hosts each spending the whole limit would still show 400 in it.
    let most = most_admitted_within(&answers, Duration::from_millis(1000));
    // Over the whole run, timing aside: no 2 s of it may hold more than 200 admissions, so the
    // run (decisions between the first answer, less the time an answer takes, and the last one)
    // holds at most 200 per 2 s it spans.
    let span = answers[answers.len() - 1].0 - answers[0].0 + Duration::from_millis(500);
    let periods = span.as_millis().div_ceil(2000) as usize;
    let total = answers.iter().filter(|x| x.2 == 200).count();
    eprintln!(
        "{} requests in 5 s; admitted {} on a, {} on b ({total} over {periods} periods); at most {most} in any 1 s, under a fleet limit of 200 per 2 s",
        answers.len(),
        admitted(a.addr),
        admitted(b.addr)
    );
    let t0 = answers[0].0;
    let mut hist = std::collections::BTreeMap::new();
    for (t, addr, st) in &answers {
        if *st == 200 {
            let e = hist.entry((*t - t0).as_millis() / 250).or_insert((0, 0));
            if *addr == a.addr { e.0 += 1 } else { e.1 += 1 }
        }
    }
    eprintln!("admitted per 250 ms (host a, host b): {hist:?}");
    let redis_lines: Vec<String> =
        a.log().into_iter().chain(b.log()).filter(|l| l.contains("Redis")).collect();
    assert!(
        total <= periods * 210,
        "{total} admitted over {periods} periods: more than 5 % over the limit of 200; {redis_lines:#?}"
    );
    assert!(
        most <= 210,
        "{most} admitted within one period: more than 5 % over the limit of 200; {redis_lines:#?}"
    );
    // Nor far under it. Offered more than the limit over the run, the fleet refused some; and in
    // the best second it admitted three quarters of the limit, or of what the hammer offered in
    // any second when a loaded machine offered less.
    if answers.len() > periods * 200 {
        assert!(answers.iter().any(|x| x.2 == 429), "nothing refused: the limit was never reached");
    }
    let offered = most_within(&answers, Duration::from_millis(1000), |_| true);
    assert!(
        most * 4 >= 200.min(offered) * 3,
        "{most} admitted in the best second, of {offered} offered in any: far under the limit of 200"
    );
    assert!(admitted(a.addr) > 0 && admitted(b.addr) > 0, "both hosts served");
    assert!(redis.calls_of("evalsha") + redis.calls_of("eval") > 0);
    assert!(stored_keys(&redis).iter().any(|k| k.contains(":hot:")), "{:?}", stored_keys(&redis));
}

/// The store's script, driven as two workers of host a and one of host b sync a key: a claim
/// granted to a host never falls below what the host has admitted, though the worker syncing
/// did not count those calls itself (each worker syncs its own), so the other host is granted
/// none of them.
#[test]
fn a_claim_covers_what_the_host_admitted_on_its_other_workers() {
    let env = Env::new();
    let redis = RedisServer::start(env.dir());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // One key of a rate limit of 200 calls per 2 s (slots of 200 ms, 11 in a window); a worker
    // adds `calls` and reports that its host has counted `own`. The answer: hosts, the number of
    // this host's sync, the others' calls and bytes, this host's claim.
    let sync = |host: &str, calls: u64, own: u64| -> [i64; 5] {
        let (now, calls, own) = (now.to_string(), calls.to_string(), own.to_string());
        let args = [
            "EVAL",
            FLEET_SCRIPT,
            "0",
            host,
            &now,
            "portcullis:r0:2000:hot",
            "r",
            "1000",
            "11",
            "2400",
            &calls,
            "0",
            "1",
            "200",
            &own,
        ];
        let out = redis.cli(&args);
        let answer: Vec<i64> =
            out.lines().map(|l| l.trim().parse().unwrap_or_else(|_| panic!("{out}"))).collect();
        answer.try_into().unwrap_or_else(|_| panic!("five integers: {out}"))
    };
    assert_eq!(sync("a", 0, 0)[4], 200, "a alone asked for the key: all of it is a's to claim");
    assert_eq!(sync("b", 0, 0)[4], 0, "a's claim holds the whole limit");
    // a's first worker has since admitted 200 calls and not synced them; its second syncs.
    assert_eq!(sync("a", 0, 200)[4], 200, "a's claim covers the calls it admitted");
    assert_eq!(sync("b", 0, 0)[4], 0, "nothing is left for b");
    // a's first worker syncs its calls: the store now counts them as a's. Each host's syncs are
    // numbered as the store ran them.
    assert_eq!(sync("a", 200, 200), [1, 3, 0, 0, 200]);
    assert_eq!(sync("b", 0, 0)[1..], [3, 200, 0, 0]);
    // A host last heard of over a minute ago leaves both the live hosts and their sync counts
    // at the next sync (a heartbeat: no keys).
    let long_ago = (now - 100).to_string();
    redis.cli(&["EVAL", FLEET_SCRIPT, "0", "gone", &long_ago]);
    let held = |hash: &str| redis.cli(&["HEXISTS", hash, "gone"]).trim().to_owned();
    assert_eq!((held("portcullis:hosts"), held("portcullis:syncs")), ("1".to_owned(), "1".to_owned()));
    redis.cli(&["EVAL", FLEET_SCRIPT, "0", "a", &now.to_string()]);
    assert_eq!((held("portcullis:hosts"), held("portcullis:syncs")), ("0".to_owned(), "0".to_owned()));
}

/// A quota shared by two hosts: what one counted, the other refuses.
#[test]
fn a_quota_counted_on_one_host_is_refused_on_the_other() {
    let env = Env::new();
    let redis = RedisServer::start(env.dir());
    let step = r#"quota_by_key = { calls = 10, renewal_period = "3600s", counter_key = "q" }"#;
    let text = config(&env, &redis.url(), "", step, 1);
    let a = spawn(&env, "a.toml", &text);
    let b = spawn(&env, "b.toml", &text);
    assert!(statuses(&env, a.addr, 7).iter().all(|&s| s == 200));
    // Once a's counts are in Redis, b learns them at its first sync of the key.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !redis.cli(&["--scan", "--pattern", "portcullis:q*"]).contains("portcullis:q") {
        assert!(Instant::now() < deadline, "a's quota never reached Redis");
        std::thread::sleep(Duration::from_millis(20));
    }
    // a has gone quiet (its last calls are over two seconds old): what is left is b's to use.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(statuses(&env, b.addr, 1), [200], "b's first call, before b knows of the key");
    std::thread::sleep(Duration::from_millis(500));
    let on_b = statuses(&env, b.addr, 4);
    assert_eq!(on_b, [200, 200, 403, 403], "7 on a, 3 on b: the quota of 10 is used up");
    // a last synced the key before b's calls: its next call is let through on what it knew
    // (the lag of one sync), and that sync tells it of b's.
    let first = statuses(&env, a.addr, 1);
    std::thread::sleep(Duration::from_millis(500));
    let r = env.client(None).connect(a.addr).unwrap().request("GET", "/", &[], b"").unwrap();
    assert_eq!((first[0], r.status), (200, 403), "a learns b's calls");
    assert!(r.text().contains("Out of call volume quota"), "{}", r.text());
}

/// `redis_failure = "local"` (the default): with Redis gone, requests go on being served and
/// counted on each host; once it is back, counts are shared again.
#[test]
fn without_redis_limits_count_locally_and_sharing_resumes() {
    let env = Env::new();
    let mut redis = RedisServer::start(env.dir());
    let step = r#"rate_limit_by_key = { calls = 1000, renewal_period = "60s", counter_key = "k" }"#;
    let text =
        config(&env, &redis.url(), "", step, 2).replace("[server]\n", "[server]\nadmin = \"127.0.0.1:0\"\n");
    let p = spawn(&env, "p.toml", &text);
    assert!(statuses(&env, p.addr, 20).iter().all(|&s| s == 200));
    // The syncs so far were answered, and timed.
    let (_, metrics) = crate::common::admin(crate::common::admin_of(&p), "GET", "/metrics");
    assert!(crate::common::metric(&metrics, "portcullis_redis_sync_duration_seconds_count") > 0, "{metrics}");
    redis.stop();
    // No request fails because Redis is gone.
    for _ in 0..4 {
        assert!(statuses(&env, p.addr, 25).iter().all(|&s| s == 200));
        std::thread::sleep(Duration::from_millis(100));
    }
    let line = p.wait_for_log("Redis unreachable", Duration::from_secs(10)).expect("the outage is logged");
    assert!(line.contains("this host alone"), "{line}");
    redis.restart();
    // Counting resumes: new calls reach the new Redis (whose script cache is empty: EVAL first).
    // The key's count is its hash for the current slot (`…:k:<slot>`).
    let counts = |redis: &RedisServer| -> Vec<String> {
        let slot =
            |k: &String| k.rsplit_once(":k:").is_some_and(|(_, s)| s.bytes().all(|b| b.is_ascii_digit()));
        stored_keys(redis).into_iter().filter(slot).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while counts(&redis).is_empty() {
        assert!(Instant::now() < deadline, "counts never reached the restarted Redis: {:?}", p.log());
        assert!(statuses(&env, p.addr, 5).iter().all(|&s| s == 200));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(p.wait_for_log("Redis reachable again", Duration::from_secs(10)).is_some(), "{:?}", p.log());
    assert!(redis.calls_of("eval") > 0, "the script was sent whole to the new Redis");
    // The count in Redis is this host's: one field, the calls made since it came back.
    let key = counts(&redis).into_iter().next().expect("the key");
    let fields = redis.cli(&["HGETALL", &key]);
    assert_eq!(fields.lines().count(), 2, "{fields}");
    assert!(fields.lines().nth(1).is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0)), "{fields}");
}

/// `redis_failure = "deny"`: with Redis gone, limited calls are refused with 503; once it is
/// back, they are served again.
#[test]
fn without_redis_deny_refuses_until_it_is_back() {
    let env = Env::new();
    let mut redis = RedisServer::start(env.dir());
    let step = r#"rate_limit_by_key = { calls = 1000, renewal_period = "60s", counter_key = "k" }"#;
    let p = spawn(&env, "p.toml", &config(&env, &redis.url(), "redis_failure = \"deny\"", step, 1));
    assert!(statuses(&env, p.addr, 5).iter().all(|&s| s == 200));
    redis.stop();
    let r = until_status(&env, p.addr, 503, Duration::from_secs(10));
    assert_eq!(r.status, 503, "{:?}", p.log());
    assert_eq!(
        r.text(),
        r#"{"statusCode":503,"message":"Service unavailable: the rate limit store cannot be reached."}"#
    );
    let line = p.wait_for_log("Redis unreachable", Duration::from_secs(5)).expect("logged");
    assert!(line.contains("refused (503)"), "{line}");
    redis.restart();
    let r = until_status(&env, p.addr, 200, Duration::from_secs(15));
    assert_eq!(r.status, 200, "served again once Redis is back: {:?}", p.log());
}

/// A password from a file, and a wrong one: the proxy says why it cannot share.
#[test]
fn a_password_from_a_file_and_a_wrong_one() {
    let env = Env::new();
    let redis = RedisServer::start_with(env.dir(), Some("s3cret pass"));
    std::fs::write(env.dir().join("redis.pw"), "s3cret pass\n").unwrap();
    std::fs::write(env.dir().join("wrong.pw"), "nope\n").unwrap();
    let step = r#"rate_limit_by_key = { calls = 100, renewal_period = "60s", counter_key = "pw" }"#;
    let good = spawn(&env, "good.toml", &config(&env, &redis.url(), "password_file = \"redis.pw\"", step, 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_keys(&redis).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", good.log());
        assert!(statuses(&env, good.addr, 3).iter().all(|&s| s == 200));
        std::thread::sleep(Duration::from_millis(50));
    }
    let bad = spawn(&env, "bad.toml", &config(&env, &redis.url(), "password_file = \"wrong.pw\"", step, 1));
    assert!(statuses(&env, bad.addr, 3).iter().all(|&s| s == 200), "local counting goes on");
    let line = bad.wait_for_log("Redis unreachable", Duration::from_secs(10)).expect("logged");
    assert!(line.contains("AUTH refused"), "{line}");
    assert!(!bad.log().iter().any(|l| l.contains("nope")), "the password is not logged");
}

/// `rediss://`: TLS to Redis, verified against the configured CA.
#[test]
fn tls_to_redis_with_its_ca() {
    let env = Env::new();
    let tls = RedisTls {
        chain: env.paths.server_chain.clone(),
        key: env.paths.server_key.clone(),
        ca: env.paths.root.clone(),
    };
    let redis = RedisServer::start_tls(env.dir(), tls);
    let step = r#"rate_limit_by_key = { calls = 100, renewal_period = "60s", counter_key = "tls" }"#;
    let ca = format!("ca = [\"{}\"]", env.paths.root.display());
    let p = spawn(&env, "p.toml", &config(&env, &redis.url(), &ca, step, 1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_keys(&redis).is_empty() {
        assert!(Instant::now() < deadline, "{:?}", p.log());
        assert!(statuses(&env, p.addr, 3).iter().all(|&s| s == 200));
        std::thread::sleep(Duration::from_millis(50));
    }
    // A CA that did not sign Redis's certificate: no connection, and the log says why.
    let other = portcullis_testkit::Pki::generate();
    let other_dir = env.dir().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other_paths = other.write(&other_dir).unwrap();
    let ca = format!("ca = [\"{}\"]", other_paths.root.display());
    let q = spawn(&env, "q.toml", &config(&env, &redis.url(), &ca, step, 1));
    assert!(statuses(&env, q.addr, 3).iter().all(|&s| s == 200));
    let line = q.wait_for_log("Redis unreachable", Duration::from_secs(10)).expect("logged");
    assert!(line.contains("certificate"), "{line}");
}

/// A reload that adds, changes or removes `[server.redis]` takes effect without a restart.
#[test]
fn sharing_follows_a_reload() {
    let env = Env::new();
    let redis = RedisServer::start(env.dir());
    let step = r#"rate_limit_by_key = { calls = 100, renewal_period = "60s", counter_key = "re" }"#;
    let alone = env.config(
        "request",
        &format!(
            "[server]\nworkers = 1\n[[api]]\nname = \"app\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  {step}\n"
        ),
    );
    let mut p = TestProxy::start(env.dir(), &alone);
    assert!(statuses(&env, p.addr, 3).iter().all(|&s| s == 200));
    assert!(stored_keys(&redis).is_empty());
    p.reload(&config(&env, &redis.url(), "", step, 1)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_keys(&redis).is_empty() {
        assert!(Instant::now() < deadline, "counts never reached Redis after the reload");
        assert!(statuses(&env, p.addr, 3).iter().all(|&s| s == 200));
        std::thread::sleep(Duration::from_millis(50));
    }
    p.reload(&alone).unwrap();
    // A sync already under way when the reload landed may still write: let it end.
    std::thread::sleep(Duration::from_millis(300));
    redis.cli(&["FLUSHALL"]);
    assert!(statuses(&env, p.addr, 5).iter().all(|&s| s == 200));
    std::thread::sleep(Duration::from_millis(300));
    assert!(stored_keys(&redis).is_empty(), "no longer shared");
}

/// Under `"deny"`, a quota refuses with the same 503 as a rate limit while Redis is gone.
#[test]
fn without_redis_deny_refuses_quotas_too() {
    let env = Env::new();
    let mut redis = RedisServer::start(env.dir());
    let step = r#"quota_by_key = { calls = 1000, renewal_period = "3600s", counter_key = "q" }"#;
    let p = spawn(&env, "p.toml", &config(&env, &redis.url(), "redis_failure = \"deny\"", step, 1));
    assert_eq!(statuses(&env, p.addr, 3), [200, 200, 200]);
    redis.stop();
    let r = until_status(&env, p.addr, 503, Duration::from_secs(10));
    assert_eq!(
        (r.status, r.text().as_str()),
        (
            503,
            r#"{"statusCode":503,"message":"Service unavailable: the rate limit store cannot be reached."}"#
        )
    );
    redis.restart();
    assert_eq!(until_status(&env, p.addr, 200, Duration::from_secs(15)).status, 200);
}

/// A database other than 0 (`/2` in the URL): counts go there (`SELECT`), not to database 0.
#[test]
fn counts_go_to_the_database_the_url_names() {
    let env = Env::new();
    let redis = RedisServer::start(env.dir());
    let step = r#"rate_limit_by_key = { calls = 100, renewal_period = "60s", counter_key = "db" }"#;
    let p = spawn(&env, "p.toml", &config(&env, &format!("{}/2", redis.url()), "", step, 1));
    let in_db2 = || redis.cli(&["-n", "2", "--scan", "--pattern", "portcullis:r*"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_db2().is_empty() {
        assert!(Instant::now() < deadline, "{:?}", p.log());
        assert!(statuses(&env, p.addr, 3).iter().all(|&s| s == 200));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(stored_keys(&redis).is_empty(), "nothing in database 0");
}

/// What `[server.redis]` names but cannot be loaded stops the start, located: a password file
/// that is missing or empty, a host that does not resolve.
#[test]
fn redis_settings_that_cannot_load_are_refused_at_start() {
    let env = Env::new();
    std::fs::write(env.dir().join("empty.pw"), "\n").unwrap();
    let step = r#"rate_limit_by_key = { calls = 1, renewal_period = "60s", counter_key = "x" }"#;
    for (url, extra, expect) in [
        ("redis://127.0.0.1:1", "password_file = \"missing.pw\"", "missing.pw: No such file"),
        ("redis://127.0.0.1:1", "password_file = \"empty.pw\"", "empty.pw: the file is empty"),
        ("redis://no-such-host.invalid:6379", "", "cannot resolve \"no-such-host.invalid\""),
    ] {
        let errors = TestProxy::try_start(env.dir(), &config(&env, url, extra, step, 1)).expect_err(expect);
        let text = errors.to_string();
        assert!(text.contains(expect) && text.contains("server.redis"), "{text}");
    }
}

/// A "Redis" that answers with something other than RESP, with arrays nested without end, or
/// not at all, is not believed: the sync fails with the reason logged, and requests are served
/// on (a key's first call waits for its sync no longer than `timeout`).
#[test]
fn a_peer_that_does_not_speak_resp_is_not_believed() {
    use std::io::{Read, Write};
    let env = Env::new();
    let step = r#"rate_limit_by_key = { calls = 1000, renewal_period = "60s", counter_key = "k" }"#;
    for (answer, reason) in [
        (Some(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()), "not RESP"),
        (Some(b"*1\r\n".repeat(100_000)), "nested too deep"),
        (None, "no answer within"),
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            let mut silent = Vec::new();
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 4096];
                if conn.read(&mut buf).is_ok_and(|n| n > 0) {
                    match &answer {
                        Some(answer) => drop(conn.write_all(answer)),
                        None => silent.push(conn),
                    }
                }
            }
        });
        let p = spawn(&env, "p.toml", &config(&env, &url, "timeout = \"300ms\"", step, 1));
        assert!(statuses(&env, p.addr, 5).iter().all(|&s| s == 200), "served on");
        let line = p
            .wait_for_log("Redis unreachable", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{:?}", p.log()));
        assert!(line.contains(reason), "{line}");
    }
}
