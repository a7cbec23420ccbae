//! Traffic policy on the data path: an address in 10,000 ranges, and a rate limit and a quota
//! checked through a whole compiled step (key rendered, hashed, counted on the host's atomics),
//! alone and with counts shared through Redis (the worker notes the call for its next sync).
#![allow(missing_docs, clippy::unwrap_used, reason = "bench harness")]

mod support;

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use portcullis_config::IpRange;
use portcullis_policy::{Counters, Facts, HeaderEdits, Inputs, IpSet, PolicySet, RequestState};
use support::{Fields, LISTENER};

/// 10,000 disjoint /28-sized ranges spread over the IPv4 space; lookups of addresses inside
/// and between them.
fn ip_filter(c: &mut Criterion) {
    let ranges: Vec<IpRange> = (0..10_000u32)
        .map(|i| {
            let from = i.wrapping_mul(429_467) & !0xF;
            IpRange { from: IpAddr::V4(Ipv4Addr::from(from)), to: IpAddr::V4(Ipv4Addr::from(from + 15)) }
        })
        .collect();
    let set = IpSet::new(ranges.clone());
    let probes: Vec<IpAddr> = (0..1024u32)
        .map(|i| {
            let r = &ranges[(i as usize * 7919) % ranges.len()];
            let IpAddr::V4(from) = r.from else { unreachable!() };
            // Half inside a range, half just past one.
            IpAddr::V4(Ipv4Addr::from(u32::from(from) + if i % 2 == 0 { 3 } else { 16 }))
        })
        .collect();
    assert!(set.contains(probes[0]) && !set.contains(probes[1]));
    let mut i = 0;
    c.bench_function("ip_filter_lookup_10k_ranges", |b| {
        b.iter(|| {
            i = (i + 1) & 1023;
            black_box(set.contains(black_box(probes[i])))
        })
    });
}

/// One API running `step`.
fn compile(step: &str, counters: Arc<Counters>) -> PolicySet {
    let text = format!(
        "{LISTENER}[[api]]\nname = \"app\"\npath = \"/\"\nbackend = \"app\"\n  [[api.inbound]]\n  {step}\n"
    );
    support::compile(&text, &Inputs { counters: Some(counters), ..Inputs::default() })
}

/// One limit step through `PolicySet::inbound`, keyed by the client's address (a limit that is
/// never reached), on this host alone and shared through Redis.
fn limits(c: &mut Criterion) {
    let now_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let fields = Fields(vec![(Bytes::from_static(b"Host"), Bytes::from_static(b"api.example.com"))]);
    let addrs: Vec<String> = (0..256).map(|i| format!("10.0.{i}.7")).collect();
    for (name, step) in [
        (
            "rate_limit_check",
            r#"rate_limit_by_key = { calls = 1000000000, renewal_period = "60s", counter_key = "{request.ip}" }"#,
        ),
        (
            "quota_check",
            r#"quota_by_key = { calls = 1000000000, renewal_period = "3600s", counter_key = "{request.ip}" }"#,
        ),
        ("no_step", r#"set_header = { name = "X-A", action = "delete" }"#),
    ] {
        for shared in [false, true] {
            if name == "no_step" && shared {
                continue;
            }
            let counters = Arc::new(Counters::with_capacity(4096));
            counters.set_fleet(shared, false);
            let set = compile(step, counters);
            let policy = set.apis[0].select(b"GET", b"/").unwrap();
            let mut state = RequestState::default();
            let mut edits = HeaderEdits::default();
            let mut i = 0usize;
            let label = if shared { format!("{name}_shared") } else { name.to_owned() };
            c.bench_function(&label, |b| {
                b.iter(|| {
                    i = (i + 1) & 255;
                    let facts = Facts {
                        client_cert: None,
                        client_addr: "10.0.0.7:50000".parse().unwrap(),
                        client_ip: &addrs[i],
                        request_id: "0123456789abcdef",
                        now: (now_ms / 1000) as i64,
                        now_ms,
                        query: b"",
                        route: Default::default(),
                        method: b"GET",
                        path: b"/",
                    };
                    let go_on =
                        support::inbound(&set, policy, black_box(&facts), &fields, &mut state, &mut edits);
                    set.complete(&mut state, 200, 0);
                    black_box(go_on)
                })
            });
        }
    }
}

criterion_group! {
    name = traffic;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = ip_filter, limits
}
criterion_main!(traffic);
