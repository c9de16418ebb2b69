//! Prometheus for real: Debian's `prometheus` scrapes the daemon with the rules we ship loaded
//! and sees a counter move; `promtool` accepts the rules and the live exposition; every
//! metric the rules and the Grafana dashboard name is one the daemon exports.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::blk::*;
use crate::common::control::{free_port, scrape};
use crate::common::daemon::Daemon;

fn packaging(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("packaging")
        .join(file)
}

/// The body of an HTTP response.
fn body(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}

/// Percent-encodes a PromQL query for a URL.
fn encode(query: &str) -> String {
    query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

struct Prometheus {
    child: Child,
    port: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second with our rules; waits until ready.
    fn start(dir: &Path, target: &str) -> Prometheus {
        let rules = packaging("prometheus/novacron-rules.yml");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: novacron\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run prometheus (apt install prometheus; scripts/install-deps.sh does)");
        let prometheus = Prometheus { child, port };
        prometheus.until("/-/ready", |b| b.contains("Ready"));
        prometheus
    }

    /// Polls `path` until `done(body)` (Prometheus works on its own clock: there is no event
    /// to wait for but its answers); 120 s at most (a recording group evaluates every 30 s).
    fn until(&self, path: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let port: u16 = self.port.parse().unwrap();
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let response = scrape(&self.port, path);
                if done(body(&response)) {
                    return body(&response).to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "prometheus: {path} never satisfied"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The value of an instant query's first sample, once there is one that `ok` accepts.
    fn query_until(&self, query: &str, ok: impl Fn(f64) -> bool) -> f64 {
        let path = format!("/api/v1/query?query={}", encode(query));
        let answer = self.until(&path, |b| sample(b).is_some_and(&ok));
        sample(&answer).unwrap()
    }
}

/// The first sample's value in a Prometheus API answer.
fn sample(body: &str) -> Option<f64> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_the_daemon_and_sees_a_counter_move() {
    let port = free_port();
    let daemon = Daemon::start(&[
        "--metrics",
        &port,
        "--blk",
        "socket={dir}/d0.sock,path=null,size=1M",
    ]);
    let prometheus = Prometheus::start(daemon.dir.path(), &format!("127.0.0.1:{port}"));
    assert_eq!(
        prometheus.query_until("up{job=\"novacron\"}", |v| v == 1.0),
        1.0
    );
    let mut c = BlkClient::connect(&daemon.path("d0.sock"));
    for i in 0..10 {
        c.write(0, i * 8, &pattern(i, 4096));
    }
    let writes = prometheus.query_until(
        "sum(novacron_blk_requests_total{device=\"d0\",op=\"write\"})",
        |v| v >= 10.0,
    );
    assert_eq!(writes, 10.0);
    // Our rules are loaded and, once evaluated, healthy.
    let rules = prometheus.until("/api/v1/rules", |b| {
        b.contains("NovacronFlushFailed") && !b.contains("\"health\":\"unknown\"")
    });
    assert!(!rules.contains("\"health\":\"err\""), "{rules}");
    let iops = prometheus.query_until("sum(novacron:blk_iops:rate1m{device=\"d0\"})", |v| v > 0.0);
    assert!(iops > 0.0);
}

/// Metric names in `text` (`novacron_...`), histogram suffixes removed; recording-rule names
/// (`novacron:...`) are not metrics the daemon exports and are skipped.
fn named_metrics(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("novacron_") {
        let start = i + at;
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b':');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |e| start + e);
        // A name ending in `_` is a regex fragment (`novacron_(blk|net)_connected`).
        if !preceded && !text[start..end].ends_with('_') {
            let name = &text[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(base.to_string());
        }
        i = end;
    }
    names
}

#[test]
fn rules_and_dashboard_name_only_metrics_the_daemon_exports() {
    let rules = packaging("prometheus/novacron-rules.yml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&rules)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Every family present: a rate-limited disk, a tiered disk, a NIC on a switch.
    let port = free_port();
    let daemon = Daemon::start(&[
        "--metrics",
        &port,
        "--blk",
        "socket={dir}/d0.sock,path=null,size=1M,iops=1000",
        "--blk",
        "socket={dir}/t0.sock,size=64M,tier-hot={dir}/hot.img,tier-cold={dir}/cold.img",
        "--net",
        "socket={dir}/n0.sock,switch=s0",
    ]);
    let exposition = body(&scrape(&port, "/metrics")).to_string();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert!(exported.contains("novacron_device_failed"), "{exported:?}");
    let dashboard = std::fs::read_to_string(packaging("grafana/novacron-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    for (what, text) in [
        ("rules", std::fs::read_to_string(&rules).unwrap()),
        ("dashboard", dashboard),
    ] {
        let named = named_metrics(&text);
        assert!(named.len() >= 10, "{what}: {named:?}");
        for name in named {
            assert!(
                exported.contains(&name),
                "{what} names {name}, which the daemon does not export"
            );
        }
    }
    drop(daemon);
}
