//! `load report FILE`: the `label key value` lines of every run, as one table of medians (lost
//! signals and error frames: the worst run) and the targets of the issue with their ratios.
//! Sizes for the row titles come from the script's options (`--pairs` …).

use std::collections::BTreeMap;

use crate::Args;

/// Columns: the label each figure line carries, and its heading (a column without figures,
/// a server the run left out, is not printed).
const COLUMNS: [(&str, &str); 6] = [
    ("inproc", "in-process"),
    ("redis1", "Redis 1 inst"),
    ("redis2", "2 instances"),
    ("cluster1", "2 inst 1 shard"),
    ("cluster3", "2 inst 3 shards"),
    ("matchbox", "matchbox"),
];

#[derive(Clone, Copy)]
enum Agg {
    Median,
    Max,
    Min,
}

type Results = BTreeMap<(String, String), Vec<f64>>;

fn read(path: &str) -> Results {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Results::new();
    for line in text.lines() {
        let mut w = line.split_whitespace();
        if let (Some(label), Some(key), Some(v)) = (w.next(), w.next(), w.next()) {
            if let Ok(v) = v.parse::<f64>() {
                out.entry((label.into(), key.into())).or_default().push(v);
            }
        }
    }
    out
}

fn aggregate(values: &[f64], agg: Agg) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    Some(match agg {
        Agg::Max => v[v.len() - 1],
        Agg::Min => v[0],
        Agg::Median if v.len() % 2 == 1 => v[v.len() / 2],
        Agg::Median => (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0,
    })
}

struct Table {
    results: Results,
}

impl Table {
    fn get(&self, label: &str, key: &str) -> Option<f64> {
        let agg = if key.ends_with("_lost") || key.ends_with("_errors") || key == "foreign_cores" {
            Agg::Max
        } else if key.ends_with("_kept") {
            Agg::Min
        } else {
            Agg::Median
        };
        aggregate(self.results.get(&(label.into(), key.into()))?, agg)
    }

    /// Runs seen: each run gives each server one burst figure.
    fn runs(&self) -> usize {
        COLUMNS
            .iter()
            .filter_map(|(label, _)| self.results.get(&((*label).into(), "burst_rate".into())))
            .map(Vec::len)
            .max()
            .unwrap_or(0)
    }
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "—".into(),
    }
}

pub fn run(a: &Args) {
    let Some(path) = a.rest.first() else {
        eprintln!("usage: load report <results-file> [--pairs N ...]");
        return;
    };
    let t = Table {
        results: read(path),
    };
    let pairs = a.get("pairs", 50usize);
    let signals = a.get("signals", 2000usize);
    let pair_signals = a.get("pair-signals", 50_000usize);
    let low = a.get("rate-low", 5000usize);
    let high = a.get("rate-high", 50_000usize);
    let idle = a.get("idle", 10_000usize);
    let joins = a.get("joins", 2000usize);
    let join_one = a.get("join-one", 300usize);
    let flood = a.get("flood", 20_000usize);

    // (title, key, decimals)
    let rows: Vec<(String, &str, usize)> = vec![
        (
            format!("burst {pairs}x{signals}: delivered/s"),
            "burst_rate",
            0,
        ),
        (
            "  lost = sent - received (worst run)".into(),
            "burst_lost",
            0,
        ),
        (
            "  error frames to senders (worst run)".into(),
            "burst_errors",
            0,
        ),
        ("  one-way p99 ms (queueing)".into(), "burst_p99_ms", 2),
        ("  server CPU µs per delivered".into(), "burst_cpu_us", 2),
        (
            "  Redis CPU µs per delivered".into(),
            "burst_redis_cpu_us",
            2,
        ),
        (
            format!("one pair 1x{pair_signals}: delivered/s"),
            "pair_rate",
            0,
        ),
        ("  lost (worst run)".into(), "pair_lost", 0),
        ("  error frames (worst run)".into(), "pair_errors", 0),
        ("  server CPU µs per delivered".into(), "pair_cpu_us", 2),
        (
            format!("paced {low}/s ({pairs} pairs): p50 ms"),
            "paced_low_p50_ms",
            2,
        ),
        ("  p99 ms".into(), "paced_low_p99_ms", 2),
        ("  max ms".into(), "paced_low_max_ms", 2),
        ("  lost (worst run)".into(), "paced_low_lost", 0),
        ("  sent/s achieved".into(), "paced_low_sent_rate", 0),
        (
            format!("paced {high}/s ({pairs} pairs): p50 ms"),
            "paced_high_p50_ms",
            2,
        ),
        ("  p99 ms".into(), "paced_high_p99_ms", 2),
        ("  max ms".into(), "paced_high_max_ms", 2),
        ("  lost (worst run)".into(), "paced_high_lost", 0),
        ("  sent/s achieved".into(), "paced_high_sent_rate", 0),
        (
            format!("idle: KiB RSS per joined peer ({idle})"),
            "idle_kib",
            2,
        ),
        (
            format!("join one at a time p50 ms ({join_one})"),
            "join_one_p50_ms",
            2,
        ),
        ("  p99 ms".into(), "join_one_p99_ms", 2),
        (format!("join p50 ms ({joins} peers)"), "join_p50_ms", 2),
        ("  p99 ms".into(), "join_p99_ms", 2),
        ("  max ms".into(), "join_max_ms", 2),
        (
            format!("flood {flood}x1KiB, reader stalled: RSS +KiB"),
            "flood_kib",
            0,
        ),
        (
            "  error frames to sender (worst run)".into(),
            "flood_errors",
            0,
        ),
        (
            "  reader kept (1 = every run)".into(),
            "flood_reader_kept",
            0,
        ),
        (
            "other processes' CPU, worst figure (cores)".into(),
            "foreign_cores",
            2,
        ),
    ];
    let width = 46;
    println!();
    println!(
        "beach-road bench: medians of {} run(s); load from examples/load, 256-byte signals",
        t.runs()
    );
    let columns: Vec<(&str, &str)> = COLUMNS
        .into_iter()
        .filter(|(label, _)| t.results.keys().any(|(l, _)| l == label))
        .collect();
    print!("{:width$}", "figure");
    for (_, head) in &columns {
        print!(" {head:>15}");
    }
    println!();
    for (title, key, decimals) in &rows {
        print!("{title:width$}");
        for (label, _) in &columns {
            print!(" {:>15}", fmt(t.get(label, key), *decimals));
        }
        println!();
    }
    let pub1 = t.get("redis", "publish_rps");
    let pub16 = t.get("redis", "publish_p16_rps");
    println!(
        "Redis yardstick, redis-benchmark -c 50 -n 200000 PUBLISH 256 B: {}/s unpipelined, {}/s with -P 16",
        fmt(pub1, 0),
        fmt(pub16, 0)
    );
    println!("(beach-road reports every relay it could not deliver to its sender: one error frame each; lost is exact)");
    let foreign: Vec<f64> = t
        .results
        .iter()
        .filter(|((_, key), _)| key == "foreign_cores")
        .flat_map(|(_, v)| v.iter().copied())
        .collect();
    if let Some(worst) = aggregate(&foreign, Agg::Max) {
        let median = aggregate(&foreign, Agg::Median).unwrap_or(0.0);
        println!(
            "CPU taken by other processes while figures ran: median {median:.2}, worst {worst:.2} cores{}",
            if worst > 0.15 {
                " — the machine was not quiet; figures are disturbed"
            } else {
                ""
            }
        );
    }

    println!();
    println!("{:62} {:>10} {:>10}", "target", "value", "target");
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let mb = |key| t.get("matchbox", key);
    let line = |title: String, v: Option<f64>, goal: f64, at_least: bool, unit: &str| {
        let verdict = match v {
            None => "n/a",
            Some(v) if (at_least && v >= goal) || (!at_least && v <= goal) => "ok",
            Some(_) => "MISS",
        };
        let decimals = if goal >= 100.0 || goal == 0.0 { 0 } else { 2 };
        let cmp = if at_least { "≥" } else { "≤" };
        println!(
            "{title:62} {:>10} {:>10} {verdict}",
            format!("{}{unit}", fmt(v, decimals)),
            format!("{cmp} {goal}{unit}")
        );
    };
    for (label, name) in [("inproc", "in-process"), ("redis1", "Redis 1 inst")] {
        line(
            format!("burst, one instance, {name} / matchbox"),
            ratio(t.get(label, "burst_rate"), mb("burst_rate")),
            1.2,
            true,
            "x",
        );
    }
    for (label, name) in [("inproc", "in-process"), ("redis1", "Redis 1 inst")] {
        line(
            format!("CPU per relayed signal, {name} / matchbox"),
            ratio(t.get(label, "burst_cpu_us"), mb("burst_cpu_us")),
            1.0,
            false,
            "x",
        );
    }
    // Issue 9's CPU target is one instance's; across two (two processes, Redis between) the
    // ratio is a figure to watch, not a target.
    let across = ratio(t.get("redis2", "burst_cpu_us"), mb("burst_cpu_us"));
    println!(
        "{:62} {:>10} {:>10}",
        "CPU per relayed signal, 2 instances, both / matchbox",
        format!("{}x", fmt(across, 2)),
        "(figure)"
    );
    line(
        "burst across 2 instances / PUBLISH unpipelined".into(),
        ratio(t.get("redis2", "burst_rate"), pub1),
        1.0,
        true,
        "x",
    );
    line(
        "burst across 2 instances, cluster 3 shards / 1 shard".into(),
        ratio(
            t.get("cluster3", "burst_rate"),
            t.get("cluster1", "burst_rate"),
        ),
        1.0,
        true,
        "x",
    );
    line(
        "one pair across 2 instances, delivered/s".into(),
        t.get("redis2", "pair_rate"),
        50_000.0,
        true,
        "",
    );
    let beach = [
        ("inproc", "in-process"),
        ("redis1", "Redis 1 inst"),
        ("redis2", "2 instances"),
    ];
    for (label, name) in beach {
        line(
            format!("paced {low}/s p99, {name}"),
            t.get(label, "paced_low_p99_ms"),
            1.5,
            false,
            " ms",
        );
    }
    for (label, name) in beach {
        line(
            format!("paced {high}/s p99, {name}"),
            t.get(label, "paced_high_p99_ms"),
            3.0,
            false,
            " ms",
        );
    }
    for (label, name) in beach {
        line(
            format!("idle RSS per joined peer at {idle}, {name}"),
            t.get(label, "idle_kib"),
            8.0,
            false,
            " KiB",
        );
    }
    for (label, name) in [("redis1", "Redis 1 inst"), ("redis2", "2 instances")] {
        line(
            format!("join p99 at {joins}, {name}"),
            t.get(label, "join_p99_ms"),
            15.0,
            false,
            " ms",
        );
    }
    for (label, name) in beach {
        line(
            format!("burst lost (worst run), {name}"),
            t.get(label, "burst_lost"),
            0.0,
            false,
            "",
        );
    }
}
