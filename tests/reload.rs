//! SIGHUP reloads of the real binary: new rules apply to open connections, broken
//! configurations change nothing, and reloading under load loses no request.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use portcullis_testkit::ProxyProcess;

use crate::common::{Env, binary};

const WAIT: Duration = Duration::from_secs(20);

/// A configuration whose API admits the thumbprints listed in `<dir>/allowed.sha1`.
fn list_config(env: &Env) -> String {
    let list = env.dir().join("allowed.sha1");
    if !list.exists() {
        std::fs::write(&list, "# allowed\n").unwrap();
    }
    env.config(
        "request",
        &format!(
            r#"
[server]
workers = 2

[thumbprints]
allowed = "{}"

[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_client_certificate = {{ identities = [ {{ thumbprint_in = "allowed" }} ] }}
"#,
            list.display()
        ),
    )
}

/// Two workers; the API validates client certificates with APIM's defaults (trust, revocation,
/// validity), so that a reloaded CRL decides.
const VALIDATING: &str = r#"
[server]
workers = 2

[[api]]
name = "app"
path = "/"
backend = "app"
  [[api.inbound]]
  validate_client_certificate = {}
"#;

/// Sends SIGHUP and waits for the reload that makes `generation` current.
fn reload(proxy: &ProxyProcess, generation: u64) {
    proxy.signal(libc::SIGHUP);
    let line = proxy.wait_for_log(&format!("generation={generation}"), WAIT);
    assert!(line.is_some(), "no reload to generation {generation}:\n{}", proxy.log().join("\n"));
}

#[test]
fn a_thumbprint_added_to_the_list_applies_to_the_open_connection() {
    let env = Env::new();
    let config = env.write_config("p.toml", &list_config(&env));
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let mut c = env.client(Some(&env.pki.client)).connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 403);

    std::fs::write(env.dir().join("allowed.sha1"), format!("{}\n", env.pki.client.thumbprint())).unwrap();
    reload(&proxy, 2);
    // The same keep-alive connection (and TLS session) now passes.
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
    assert!(proxy.count_log("reload=1") >= 1);
}

#[test]
fn a_crl_revoking_a_connected_client_applies_to_its_connection() {
    let env = Env::new();
    let config = env.write_config("p.toml", &env.config("request", VALIDATING));
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let client = env.client(Some(&env.pki.client));
    let mut c = client.connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);

    let crl = env.pki.intermediate.crl(&[&env.pki.revoked, &env.pki.client]);
    std::fs::write(&env.paths.crl, crl).unwrap();
    reload(&proxy, 2);
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 403, "revoked on the open connection");
    // And on a resumed session.
    c.close();
    let mut again = client.connect(proxy.addr).unwrap();
    assert!(again.resumed(), "the second connection resumes the first one's session");
    assert_eq!(again.request("GET", "/", &[], b"").unwrap().status, 403);
}

/// Under `require` without any policy step, the handshake's verdict is not the last word: a CRL
/// loaded since ends the open connection at its next request, and a resumed session with it.
#[test]
fn under_require_without_a_step_a_reloaded_crl_ends_open_connections() {
    let env = Env::new();
    let config = env.write_config("p.toml", &env.config("require", "[server]\nworkers = 2\n"));
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let client = env.client(Some(&env.pki.client));
    let mut c = client.connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);
    let mut other = env.client(Some(&env.pki.client2)).connect(proxy.addr).unwrap();
    assert_eq!(other.request("GET", "/", &[], b"").unwrap().status, 200);

    std::fs::write(&env.paths.crl, env.pki.intermediate.crl(&[&env.pki.revoked, &env.pki.client])).unwrap();
    reload(&proxy, 2);
    let r = c.request("GET", "/", &[], b"").unwrap();
    assert_eq!(r.status, 403, "revoked on the open connection");
    assert_eq!(r.text(), r#"{"statusCode":403,"message":"Invalid client certificate"}"#);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.request("GET", "/", &[], b"").is_err(), "the connection was closed");
    assert!(proxy.wait_for_log("client certificate revoked", WAIT).is_some());
    // A certificate the CRL does not name carries on, on its open connection.
    assert_eq!(other.request("GET", "/", &[], b"").unwrap().status, 200);
    // A session of the revoked certificate resumed from its ticket (no certificate is sent)
    // is checked against today's CRLs at the end of the handshake, and closed there.
    let mut again = client.connect(proxy.addr).unwrap();
    assert!(again.resumed(), "the client resumed its session");
    assert!(again.request("GET", "/", &[], b"").is_err(), "a resumed revoked session was served");
    let line = proxy.wait_for_log("on a resumed session", WAIT);
    assert!(line.is_some_and(|l| l.contains("certificate revoked")), "{:#?}", proxy.log());
}

/// The validating configuration with the root's CRL (revoking nothing) listed before the
/// intermediate's: its text, and the root CRL's path.
fn with_root_crl(env: &Env) -> (String, std::path::PathBuf) {
    let root_crl = env.dir().join("root.crl");
    std::fs::write(&root_crl, env.pki.root.crl_of(&[])).unwrap();
    let text = env.config("request", VALIDATING).replacen(
        "crl = [\"",
        &format!("crl = [\"{}\", \"", root_crl.display()),
        1,
    );
    (text, root_crl)
}

#[test]
fn a_crl_revoking_the_intermediate_applies_to_open_connections() {
    let env = Env::new();
    let (text, root_crl) = with_root_crl(&env);
    let config = env.write_config("p.toml", &text);
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let client = env.client(Some(&env.pki.client));
    let mut c = client.connect(proxy.addr).unwrap();
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 200);

    // The root revokes the intermediate that issued the client's certificate.
    std::fs::write(&root_crl, env.pki.root.crl_of(&[env.pki.intermediate.serial()])).unwrap();
    reload(&proxy, 2);
    assert_eq!(c.request("GET", "/", &[], b"").unwrap().status, 403, "revoked on the open connection");
    c.close();
    let mut again = client.connect(proxy.addr).unwrap();
    assert!(again.resumed());
    assert_eq!(again.request("GET", "/", &[], b"").unwrap().status, 403, "and on a resumed session");
}

#[test]
fn a_broken_reload_keeps_the_old_rules_and_says_where() {
    let env = Env::new();
    let text = list_config(&env);
    std::fs::write(env.dir().join("allowed.sha1"), format!("{}\n", env.pki.client.thumbprint())).unwrap();
    let config = env.write_config("p.toml", &text);
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let client = env.client(Some(&env.pki.client));
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);

    // A typo on a known line, and a thumbprint list with a bad line.
    let broken = text.replacen("workers = 2", "workers = 2\nidle_timeout = \"forever\"", 1);
    std::fs::write(&config, &broken).unwrap();
    let bad_line = broken.lines().position(|l| l.contains("forever")).unwrap() + 1;
    proxy.signal(libc::SIGHUP);
    let failed = proxy.wait_for_log("reload failed", WAIT);
    assert!(failed.is_some(), "{}", proxy.log().join("\n"));
    let log = proxy.log().join("\n");
    assert!(log.contains(&format!("p.toml:{bad_line}:")), "the log names file and line:\n{log}");
    assert!(log.contains("server.idle_timeout"), "{log}");
    // Still serving, with the old rules.
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
    assert_eq!(env.client(Some(&env.pki.client2)).get(proxy.addr, "/").unwrap().status, 403);

    // A broken thumbprint list is reported with its own file and line.
    std::fs::write(&config, &text).unwrap();
    std::fs::write(env.dir().join("allowed.sha1"), "# list\nnot-a-thumbprint\n").unwrap();
    proxy.signal(libc::SIGHUP);
    let deadline = Instant::now() + WAIT;
    while !proxy.log().iter().any(|l| l.contains("allowed.sha1:2:")) {
        assert!(Instant::now() < deadline, "{}", proxy.log().join("\n"));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
}

#[test]
fn a_hundred_reloads_under_load_lose_no_request() {
    let env = Env::new();
    std::fs::write(env.dir().join("allowed.sha1"), format!("{}\n", env.pki.client.thumbprint())).unwrap();
    let config = env.write_config("p.toml", &list_config(&env));
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for n in 0..2 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let client = env.client(Some(&env.pki.client));
        let addr = proxy.addr;
        workers.push(std::thread::spawn(move || {
            // One client keeps its connection, the other reconnects (and resumes) every few requests.
            let mut conn = None;
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                if conn.is_none() || (n == 1 && i % 5 == 0) {
                    conn = Some(client.connect(addr));
                }
                let result = match conn.as_mut() {
                    Some(Ok(c)) => c.request("GET", &format!("/r/{i}"), &[], b"").map(|r| r.status),
                    Some(Err(e)) => Err(std::io::Error::new(e.kind(), e.to_string())),
                    None => unreachable!(),
                };
                match result {
                    Ok(200) => {
                        ok.fetch_add(1, Ordering::AcqRel);
                    }
                    other => {
                        failed.lock().unwrap().push(format!("{other:?}"));
                        conn = None;
                    }
                }
            }
        }));
    }
    // The whole run is bounded: each reload waits at most WAIT, all of them together at most this.
    let deadline = Instant::now() + Duration::from_secs(180);
    for generation in 2..=101 {
        assert!(Instant::now() < deadline, "100 reloads did not finish in time (at {generation})");
        reload(&proxy, generation);
    }
    stop.store(true, Ordering::Release);
    for w in workers {
        w.join().unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(failed.is_empty(), "{} failed requests: {:?}", failed.len(), &failed[..failed.len().min(10)]);
    assert!(ok.load(Ordering::Acquire) > 100, "the load kept going during the reloads");
    assert!(proxy.count_log("reload=100") >= 1);
}

/// A CRL with a lower CRL number than the loaded one would un-revoke certificates: the reload
/// is refused, says why, and the revocation stays.
#[test]
fn a_reload_with_an_older_crl_is_refused() {
    let env = Env::new();
    let revoked = vec![env.pki.client.serial.clone()];
    std::fs::write(&env.paths.crl, env.pki.intermediate.crl_numbered(&revoked, 20)).unwrap();
    // The root's CRL comes first in the list: the error must point at the intermediate's.
    let (text, _) = with_root_crl(&env);
    let config = env.write_config("p.toml", &text);
    let proxy = ProxyProcess::spawn(&binary(), &config);
    let client = env.client(Some(&env.pki.client));
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 403);

    std::fs::write(&env.paths.crl, env.pki.intermediate.crl_numbered(&[], 19)).unwrap();
    proxy.signal(libc::SIGHUP);
    let line = proxy.wait_for_log("CRL number 19, older than the loaded 20", WAIT);
    let line = line.unwrap_or_else(|| panic!("{}", proxy.log().join("\n")));
    let (row, text_line) = text.lines().enumerate().find(|(_, l)| l.contains("crl = [")).unwrap();
    let col = text_line.find(&format!("\"{}\"", env.paths.crl.display())).unwrap();
    let at = format!(
        "{}:{}:{}: listener[0].crl[1]: {}: ",
        config.display(),
        row + 1,
        col + 1,
        env.paths.crl.display()
    );
    assert!(line.contains(&at), "expected {at} in {line}");
    assert!(proxy.wait_for_log("reload failed", WAIT).is_some());
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 403, "the revocation holds");

    // A newer CRL is taken.
    std::fs::write(&env.paths.crl, env.pki.intermediate.crl_numbered(&[], 21)).unwrap();
    reload(&proxy, 2);
    assert_eq!(client.get(proxy.addr, "/").unwrap().status, 200);
}
