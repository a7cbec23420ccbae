//! Medians, ranges and ratios from the benchmark's JSON lines (one per run, each with `proxy`
//! and `mode` tags added by the benchmark script).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// The smallest and the largest of `v` (infinities when it is empty).
fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)))
}

fn fmt_num(x: f64) -> String {
    if x.is_nan() {
        "–".to_owned()
    } else if x >= 100.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.1}")
    }
}

/// Builds the Markdown table from JSON lines.
pub fn summarize(lines: &str) -> anyhow::Result<String> {
    // (mode, proxy) → runs
    let mut runs: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
    let mut proxies: Vec<String> = Vec::new();
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)?;
        let proxy = v["proxy"].as_str().unwrap_or("?").to_owned();
        let mode = v["label"].as_str().or(v["mode"].as_str()).unwrap_or("?").to_owned();
        if !proxies.contains(&proxy) {
            proxies.push(proxy.clone());
        }
        runs.entry((mode, proxy)).or_default().push(v);
    }
    let mut modes: Vec<String> = runs.keys().map(|(m, _)| m.clone()).collect();
    modes.dedup();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| mode | proxy | runs | req/s median | min – max | p99 µs median | proxy CPU µs/req | req/s per proxy core | errors |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    // (req/s, proxy CPU µs per request) medians
    let mut medians: BTreeMap<(String, String), (f64, f64)> = BTreeMap::new();
    // Proxy CPU µs per request of each run, with its round, in the order of the runs.
    let mut per_round: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
    for mode in &modes {
        for proxy in &proxies {
            let Some(rs) = runs.get(&(mode.clone(), proxy.clone())) else { continue };
            let rps: Vec<f64> = rs.iter().filter_map(|r| r["rps"].as_f64()).collect();
            let p99: Vec<f64> = rs.iter().filter_map(|r| r["latency_us"]["p99"].as_f64()).collect();
            let timed: Vec<Run> = rs
                .iter()
                .filter_map(|r| {
                    let secs = r["proxy_cpu_seconds"].as_f64()?;
                    let ok = r["ok"].as_f64()?;
                    let round = r["round"].as_str().map(str::to_owned);
                    (ok > 0.0).then(|| Run { round, cpu: secs * 1e6 / ok })
                })
                .collect();
            let cpu: Vec<f64> = timed.iter().map(|r| r.cpu).collect();
            let errors: u64 = rs.iter().filter_map(|r| r["error_count"].as_u64()).sum();
            let (min, max) = min_max(&rps);
            let m = median(rps.clone());
            per_round.insert((mode.clone(), proxy.clone()), timed);
            let cpu = median(cpu);
            medians.insert((mode.clone(), proxy.clone()), (m, cpu));
            let _ = writeln!(
                out,
                "| {mode} | {proxy} | {} | {} | {} – {} | {} | {} | {} | {errors} |",
                rs.len(),
                fmt_num(m),
                fmt_num(min),
                fmt_num(max),
                fmt_num(median(p99)),
                fmt_num(cpu),
                fmt_num(1e6 / cpu),
            );
        }
    }
    // A mode that adds work to keep-alive (the access log, the operator's view, a TLS backend, a
    // policy step) against keep-alive of the same proxy, round by round: the two ran seconds
    // apart, so their ratio is what the added work costs rather than how the machine drifted.
    let mut against_keepalive = String::new();
    for proxy in &proxies {
        let Some(base) = per_round.get(&("keepalive".to_owned(), proxy.clone())) else { continue };
        for mode in modes.iter().filter(|m| m.as_str() != "keepalive") {
            let Some(cpu) = per_round.get(&(mode.clone(), proxy.clone())) else { continue };
            let r = paired(base, cpu, |k, m| k / m);
            if r.is_empty() {
                continue;
            }
            let (min, max) = min_max(&r);
            let _ = writeln!(
                against_keepalive,
                "| {mode} | {proxy} | {:.3}× | {min:.3} – {max:.3} | {} |",
                median(r.clone()),
                r.len()
            );
        }
    }
    if !against_keepalive.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| mode | proxy | per proxy core against its keep-alive, round by round (median) | min – max | rounds |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|");
        out.push_str(&against_keepalive);
    }
    let ours = "portcullis";
    let others: Vec<&String> = proxies.iter().filter(|p| p.as_str() != ours).collect();
    if proxies.iter().any(|p| p == ours) && !others.is_empty() {
        // Two ratios: of the req/s measured, and of req/s per proxy core (the inverse ratio of
        // proxy CPU per request), which is what a proxy that is not the bottleneck would do.
        let _ = writeln!(out);
        let mut header: Vec<String> = others.iter().map(|p| format!("req/s: portcullis / {p}")).collect();
        header.extend(others.iter().map(|p| format!("per proxy core: portcullis / {p}")));
        let _ = writeln!(out, "| mode | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(2 * others.len()));
        let ratio = |x: f64| if x.is_finite() && x > 0.0 { format!("{x:.2}×") } else { "–".to_owned() };
        for mode in &modes {
            let Some(&(us_rps, us_cpu)) = medians.get(&(mode.clone(), ours.to_owned())) else { continue };
            let theirs = |p: &String| medians.get(&(mode.clone(), p.clone())).copied();
            let mut cells: Vec<String> = others
                .iter()
                .map(|p| theirs(p).map_or("–".to_owned(), |(rps, _)| ratio(us_rps / rps)))
                .collect();
            cells.extend(
                others.iter().map(|p| theirs(p).map_or("–".to_owned(), |(_, cpu)| ratio(cpu / us_cpu))),
            );
            let _ = writeln!(out, "| {mode} | {} |", cells.join(" | "));
        }

        // Round by round: the runs of one round ran minutes apart at most, so their ratio is
        // less at the mercy of a noisy machine than a ratio of medians taken over all rounds.
        let _ = writeln!(out);
        let header: Vec<String> =
            others.iter().map(|p| format!("per proxy core, round by round: portcullis / {p}")).collect();
        let _ = writeln!(out, "| mode | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(others.len()));
        for mode in &modes {
            let Some(ours_cpu) = per_round.get(&(mode.clone(), ours.to_owned())) else { continue };
            let cells: Vec<String> = others
                .iter()
                .map(|p| {
                    let Some(theirs) = per_round.get(&(mode.clone(), (*p).clone())) else {
                        return "–".to_owned();
                    };
                    let r = paired(ours_cpu, theirs, |us, them| them / us);
                    if r.is_empty() {
                        return "–".to_owned();
                    }
                    let (min, max) = min_max(&r);
                    format!("{:.2}× ({min:.2} – {max:.2}, {} rounds)", median(r.clone()), r.len())
                })
                .collect();
            let _ = writeln!(out, "| {mode} | {} |", cells.join(" | "));
        }
    }
    Ok(out)
}

/// A run's proxy CPU µs per request, and the round it belongs to when `bench.sh` said.
struct Run {
    round: Option<String>,
    cpu: f64,
}

/// `f(a, b)` for the runs of `a` and `b` that belong to the same round: by their `round` tags
/// when every run has one (a run that failed in one of them leaves its round out), else by
/// position when both have as many runs (files written before the tags), else none.
fn paired(a: &[Run], b: &[Run], f: impl Fn(f64, f64) -> f64) -> Vec<f64> {
    if a.iter().chain(b).all(|r| r.round.is_some()) {
        a.iter().filter_map(|x| b.iter().find(|y| y.round == x.round).map(|y| f(x.cpu, y.cpu))).collect()
    } else if a.len() == b.len() {
        a.iter().zip(b).map(|(x, y)| f(x.cpu, y.cpu)).collect()
    } else {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One run as `portcullis-load run --json` writes it.
    fn run(proxy: &str, label: &str, rps: f64, ok: u64, cpu_seconds: f64, p99: u64, errors: u64) -> String {
        format!(
            r#"{{"proxy":"{proxy}","label":"{label}","rps":{rps:?},"ok":{ok},"proxy_cpu_seconds":{cpu_seconds:?},"latency_us":{{"p99":{p99}}},"error_count":{errors}}}"#
        )
    }

    #[test]
    fn table_and_ratios() {
        let lines = [
            run("haproxy", "keepalive", 100.0, 1000, 0.02, 900, 0),
            run("portcullis", "keepalive", 250.0, 2500, 0.02, 400, 0),
            run("portcullis", "keepalive", 150.0, 1500, 0.02, 500, 1),
            run("haproxy", "keepalive", 120.0, 1200, 0.02, 800, 0),
        ]
        .join("\n");
        let t = summarize(&lines).unwrap();
        // CPU per request: 8 and 13.3 µs (median 10.7) against 20 and 16.7 (median 18.3).
        assert!(
            t.contains("| keepalive | portcullis | 2 | 200 | 150 – 250 | 450 | 10.7 | 93750 | 1 |"),
            "{t}"
        );
        assert!(t.contains("| keepalive | 1.82× | 1.72× |"), "{t}");
        // Round 1: 20 / 8 = 2.5; round 2: 16.7 / 13.3 = 1.25.
        assert!(t.contains("| keepalive | 1.88× (1.25 – 2.50, 2 rounds) |"), "{t}");
        assert!(!t.contains("against its keep-alive"), "no other mode: {t}");
    }

    #[test]
    fn a_mode_against_keepalive_of_the_same_proxy_round_by_round() {
        // Keep-alive 10 and 20 µs per request, the access log 11 and 21: 0.909 and 0.952.
        let lines = [
            run("portcullis", "keepalive", 100.0, 1000, 0.01, 900, 0),
            run("portcullis", "accesslog", 100.0, 1000, 0.011, 900, 0),
            run("portcullis", "keepalive", 100.0, 1000, 0.02, 900, 0),
            run("portcullis", "accesslog", 100.0, 1000, 0.021, 900, 0),
        ]
        .join("\n");
        let t = summarize(&lines).unwrap();
        assert!(t.contains("| accesslog | portcullis | 0.931× | 0.909 – 0.952 | 2 |"), "{t}");
        assert!(!t.contains("| keepalive | portcullis | 1.000×"), "{t}");
    }

    #[test]
    fn runs_are_paired_by_their_round() {
        // Round 1's access-log run failed (no line): rounds 2 and 3 pair, not 1 with 2.
        let tagged = |line: String, round: u32| line.replacen('{', &format!("{{\"round\":\"{round}\","), 1);
        let lines = [
            tagged(run("portcullis", "keepalive", 100.0, 1000, 0.01, 900, 0), 1),
            tagged(run("portcullis", "keepalive", 100.0, 1000, 0.02, 900, 0), 2),
            tagged(run("portcullis", "accesslog", 100.0, 1000, 0.025, 900, 0), 2),
            tagged(run("portcullis", "keepalive", 100.0, 1000, 0.03, 900, 0), 3),
            tagged(run("portcullis", "accesslog", 100.0, 1000, 0.0375, 900, 0), 3),
        ]
        .join("\n");
        let t = summarize(&lines).unwrap();
        assert!(t.contains("| accesslog | portcullis | 0.800× | 0.800 – 0.800 | 2 |"), "{t}");
    }
}
