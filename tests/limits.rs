//! Rate limits and quotas, with API Management's semantics and messages, counted for the whole
//! host.

use std::time::{Duration, Instant};

use portcullis_testkit::idp::now;
use portcullis_testkit::{Response, TestProxy};

use crate::common::{Env, hammer, most_admitted_within};

/// A proxy whose API runs `steps` (inline step tables, one a line), with `extra` configuration.
fn proxy(env: &Env, steps: &[&str], extra: &str) -> TestProxy {
    let steps: String = steps.iter().map(|s| format!("  [[api.inbound]]\n  {s}\n")).collect();
    env.proxy(
        "request",
        &format!("{extra}\n[[api]]\nname = \"app\"\npath = \"/\"\nbackend = \"app\"\n{steps}"),
    )
}

fn get(env: &Env, p: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Response {
    env.client(None).connect(p.addr).unwrap().request("GET", path, headers, b"").unwrap()
}

/// Waits as long as a refusal's `Retry-After` says (plus a little).
fn wait_retry_after(r: &Response) {
    let secs: u64 = r.header("Retry-After").expect("Retry-After").parse().expect("seconds");
    std::thread::sleep(Duration::from_secs(secs) + Duration::from_millis(200));
}

fn rate_message(r: &Response) -> u64 {
    let text = r.text();
    let n = text
        .strip_prefix(r#"{"statusCode":429,"message":"Rate limit is exceeded. Try again in "#)
        .and_then(|t| t.strip_suffix(r#" seconds."}"#))
        .unwrap_or_else(|| panic!("{text}"));
    n.parse().expect("seconds")
}

#[test]
fn rate_limit_by_key_refuses_past_its_calls_and_frees_up() {
    let env = Env::new();
    let p = proxy(
        &env,
        &[
            r#"rate_limit_by_key = { calls = 3, renewal_period = "2s", counter_key = "{header.x-caller}", remaining_calls_header_name = "X-Remaining", total_calls_header_name = "X-Total" }"#,
        ],
        "",
    );
    let caller = |who: &str| get(&env, &p, "/", &[("X-Caller", who)]);
    for left in ["2", "1", "0"] {
        let r = caller("a");
        assert_eq!(r.status, 200);
        assert_eq!((r.header("X-Remaining"), r.header("X-Total")), (Some(left), Some("3")));
    }
    let r = caller("a");
    assert_eq!(r.status, 429);
    let n = rate_message(&r);
    assert!((1..=3).contains(&n), "{n}");
    assert_eq!(r.header("Retry-After"), Some(n.to_string().as_str()));
    assert_eq!((r.header("X-Remaining"), r.header("X-Total")), (Some("0"), Some("3")));
    // Another key has its own count; a request without the key is not limited.
    assert_eq!(caller("b").status, 200);
    assert_eq!(get(&env, &p, "/", &[]).status, 200);
    wait_retry_after(&r);
    assert_eq!(caller("a").status, 200, "the window moved on");
    assert_eq!(env.backend.requests(), 6);
}

#[test]
fn calls_spread_across_the_window_boundary_stay_within_the_limit() {
    let env = Env::new();
    let p = proxy(
        &env,
        &[r#"rate_limit_by_key = { calls = 4, renewal_period = "3s", counter_key = "{request.ip}" }"#],
        "",
    );
    let start = Instant::now();
    assert!((0..2).all(|_| get(&env, &p, "/", &[]).status == 200));
    std::thread::sleep(Duration::from_millis(1500));
    assert!((0..2).all(|_| get(&env, &p, "/", &[]).status == 200));
    // Four calls within the last 3 s: the fifth waits for the first two to leave the window.
    let r = get(&env, &p, "/", &[]);
    assert_eq!(r.status, 429);
    assert!(start.elapsed() < Duration::from_secs(3), "the machine was too slow for this test's timing");
    wait_retry_after(&r);
    // The first two left; the two later ones are still counted.
    let admitted = (0..4).filter(|_| get(&env, &p, "/", &[]).status == 200).count();
    assert_eq!(admitted, 2);
}

#[test]
fn an_increment_condition_counts_only_the_responses_it_names() {
    let env = Env::new();
    let p = proxy(
        &env,
        &[
            r#"rate_limit_by_key = { calls = 2, renewal_period = "60s", counter_key = "x", increment_condition = "status >= 500" }"#,
        ],
        "",
    );
    assert!((0..6).all(|_| get(&env, &p, "/status/200", &[]).status == 200), "2xx do not count");
    assert_eq!(get(&env, &p, "/status/503", &[]).status, 503);
    assert_eq!(get(&env, &p, "/status/500", &[]).status, 500);
    let r = get(&env, &p, "/status/200", &[]);
    assert_eq!(r.status, 429, "two 5xx in the window: refused");
    let list = proxy(
        &env,
        &[
            r#"rate_limit_by_key = { calls = 1, renewal_period = "60s", counter_key = "y", increment_condition = ["404", "500-599"] }"#,
        ],
        "",
    );
    assert_eq!(get(&env, &list, "/status/201", &[]).status, 201);
    assert_eq!(get(&env, &list, "/status/404", &[]).status, 404);
    assert_eq!(get(&env, &list, "/", &[]).status, 429);
}

#[test]
fn rate_limit_counts_per_subscription_and_shares_a_key_across_scopes() {
    let env = Env::new();
    let extra = r#"
[[product]]
name = "starter"
apis = ["app"]
  [[product.inbound]]
  rate_limit = { calls = 2, renewal_period = "60s" }

[[subscription]]
id = "s1"
product = "starter"
primary_key = "key-one"

[[subscription]]
id = "s2"
product = "starter"
primary_key = "key-two"
"#;
    let p = proxy(&env, &[], extra);
    let with = |key: &str| get(&env, &p, "/", &[("Ocp-Apim-Subscription-Key", key)]).status;
    assert_eq!([with("key-one"), with("key-one"), with("key-one")], [200, 200, 429]);
    assert_eq!([with("key-two"), with("key-two"), with("key-two")], [200, 200, 429]);
    // One counter per key value across scopes: two steps with the same key and period count
    // the same calls.
    let shared = proxy(
        &env,
        &[
            r#"rate_limit_by_key = { calls = 10, renewal_period = "60s", counter_key = "same" }"#,
            r#"rate_limit_by_key = { calls = 3, renewal_period = "60s", counter_key = "same" }"#,
        ],
        "",
    );
    let admitted = (0..6).filter(|_| get(&env, &shared, "/", &[]).status == 200).count();
    assert_eq!(admitted, 1, "each call counts twice on the one counter: 2, then 4 > 3");
}

#[test]
fn quotas_count_calls_per_period_and_replenish() {
    let env = Env::new();
    // A 300 s period that ends in about 3 s.
    let start = time_string(now() - 297);
    let p = proxy(
        &env,
        &[&format!(
            r#"quota_by_key = {{ calls = 2, renewal_period = "300s", counter_key = "q", first_period_start = "{start}" }}"#
        )],
        "",
    );
    assert!((0..2).all(|_| get(&env, &p, "/", &[]).status == 200));
    let r = get(&env, &p, "/", &[]);
    assert_eq!(r.status, 403);
    let text = r.text();
    let hms = text
        .strip_prefix(
            r#"{"statusCode":403,"message":"Out of call volume quota. Quota will be replenished in "#,
        )
        .and_then(|t| t.strip_suffix(r#"."}"#))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(hms.starts_with("00:00:0") && hms.len() == 8, "{hms}");
    wait_retry_after(&r);
    assert_eq!(get(&env, &p, "/", &[]).status, 200, "a new period");
}

#[test]
fn bandwidth_quotas_count_request_and_response_bodies() {
    let env = Env::new();
    let p = proxy(
        &env,
        &[r#"quota_by_key = { bandwidth_kb = 2, renewal_period = "3600s", counter_key = "b" }"#],
        "",
    );
    // 1500 bytes of response, then 600 of request: 2100 ≥ 2048, the next call is refused.
    assert_eq!(get(&env, &p, "/bytes/1500", &[]).status, 200);
    let mut c = env.client(None).connect(p.addr).unwrap();
    assert_eq!(c.request("POST", "/upload", &[], &[7u8; 600]).unwrap().status, 200);
    let r = get(&env, &p, "/", &[]);
    assert_eq!(r.status, 403);
    assert!(
        r.text().starts_with(
            r#"{"statusCode":403,"message":"Out of bandwidth quota. Quota will be replenished in "#
        ),
        "{}",
        r.text()
    );
    assert!(r.header("Retry-After").is_some());
}

#[test]
fn a_lifetime_quota_is_never_replenished() {
    let env = Env::new();
    let p = proxy(&env, &[r#"quota_by_key = { calls = 1, renewal_period = 0, counter_key = "l" }"#], "");
    assert_eq!(get(&env, &p, "/", &[]).status, 200);
    let r = get(&env, &p, "/", &[]);
    assert_eq!(
        (r.status, r.text().as_str()),
        (403, r#"{"statusCode":403,"message":"Out of call volume quota."}"#)
    );
    assert_eq!(r.header("Retry-After"), None);
}

#[test]
fn counts_survive_a_reload() {
    let env = Env::new();
    let mut p =
        proxy(&env, &[r#"rate_limit_by_key = { calls = 2, renewal_period = "60s", counter_key = "r" }"#], "");
    assert_eq!(get(&env, &p, "/", &[]).status, 200);
    assert_eq!(get(&env, &p, "/", &[]).status, 200);
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    p.reload(&text).unwrap();
    assert_eq!(get(&env, &p, "/", &[]).status, 429);
}

/// Host-wide: two workers, one key hammered from many connections at once; the limit holds for
/// the host, not per worker.
#[test]
fn a_limit_holds_for_the_whole_host() {
    let env = Env::new();
    let p = proxy(
        &env,
        &[r#"rate_limit_by_key = { calls = 100, renewal_period = "60s", counter_key = "hot" }"#],
        "[server]\nworkers = 2\n",
    );
    let admitted: usize = std::thread::scope(|s| {
        let threads: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    let mut c = env.client(None).connect(p.addr).unwrap();
                    (0..40).filter(|_| c.request("GET", "/", &[], b"").unwrap().status == 200).count()
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    assert_eq!(admitted, 100, "320 calls from 8 connections over 2 workers");
}

/// Host-wide over several windows: two workers, eight connections on one key for four periods;
/// no stretch of one period admits more than the limit (plus one per worker).
#[test]
fn a_limit_holds_for_the_whole_host_window_after_window() {
    let env = Env::new();
    let p = proxy(
        &env,
        &[r#"rate_limit_by_key = { calls = 100, renewal_period = "1s", counter_key = "hot" }"#],
        "[server]\nworkers = 2\n",
    );
    let answers = hammer(&env, &[p.addr], 8, Duration::from_secs(4));
    assert!(answers.iter().all(|a| a.2 == 200 || a.2 == 429));
    let admitted = answers.iter().filter(|a| a.2 == 200).count();
    let most = most_admitted_within(&answers, Duration::from_millis(950));
    eprintln!(
        "{} requests in 4 s, {admitted} admitted, at most {most} in any 0.95 s (limit 100 per 1 s)",
        answers.len()
    );
    assert!(most <= 102, "{most} admitted within one period");
    assert!(admitted >= 300, "{admitted}: the window moved on at least three times");
}

/// A limit after a wait (here a slow callout) judges the time it runs at: the call is counted
/// in the window or period it falls in then, not in the one the request arrived in.
#[test]
fn a_limit_after_a_slow_callout_counts_when_it_runs() {
    let env = Env::new();
    // Waits as long as the request's X-Wait says (the backend's `/slow/<ms>`; none: no wait).
    let wait = format!(
        r#"send_request = {{ name = "w", method = "GET", url = "http://{}/slow/{{header.x-wait}}", timeout = "10s" }}"#,
        env.backend.addr()
    );
    let rate = proxy(
        &env,
        &[&wait, r#"rate_limit_by_key = { calls = 1, renewal_period = "2s", counter_key = "r" }"#],
        "",
    );
    assert_eq!(get(&env, &rate, "/", &[]).status, 200);
    assert_eq!(get(&env, &rate, "/", &[]).status, 429, "the second call of the window");
    // Arrived within the first call's window; by the time the limit is checked that call left its
    // window.
    let r = get(&env, &rate, "/", &[("X-Wait", "3000")]);
    assert_eq!(r.status, 200, "{}", r.text());
    // That call counted in the window it was checked in.
    assert_eq!(get(&env, &rate, "/", &[]).status, 429);
    // So does one counted once its response is known.
    let settled = proxy(
        &env,
        &[
            &wait,
            r#"rate_limit_by_key = { calls = 1, renewal_period = "2s", counter_key = "s", increment_condition = "status < 300" }"#,
        ],
        "",
    );
    assert_eq!(get(&env, &settled, "/", &[]).status, 200);
    assert_eq!(get(&env, &settled, "/", &[("X-Wait", "3000")]).status, 200);
    assert_eq!(get(&env, &settled, "/", &[]).status, 429);
    // A period of 300 s that ends 5 to 6 s from now.
    let start = now() - 294;
    let ends_ms = (start + 300) as u128 * 1000;
    let quota = proxy(
        &env,
        &[
            &wait,
            &format!(
                r#"quota_by_key = {{ calls = 1, renewal_period = "300s", counter_key = "q", first_period_start = "{}" }}"#,
                time_string(start)
            ),
        ],
        "",
    );
    let (first, second) = (get(&env, &quota, "/", &[]).status, get(&env, &quota, "/", &[]).status);
    let now_ms = std::time::SystemTime::UNIX_EPOCH.elapsed().unwrap().as_millis();
    assert!(now_ms + 500 < ends_ms, "the machine was too slow for this test's timing");
    assert_eq!((first, second), (200, 403), "the period's one call is spent");
    // Until 0.7 s past the period's end.
    let r = get(&env, &quota, "/", &[("X-Wait", &(ends_ms - now_ms + 700).to_string())]);
    assert_eq!(r.status, 200, "checked in the next period: {}", r.text());
    assert_eq!(get(&env, &quota, "/", &[]).status, 403, "and counted there");
}

/// `YYYY-MM-DDTHH:MM:SSZ` of Unix seconds.
fn time_string(t: i64) -> String {
    let days = t.div_euclid(86_400);
    let secs = t.rem_euclid(86_400);
    let (y, m, d) = portcullis_http::write::civil_date(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}
