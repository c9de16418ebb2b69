//! Prometheus / OpenMetrics-compatible text exposition at `GET /metrics` (`--metrics ADDR:PORT`).
//!
//! The numbers are the per-queue counters the data path already keeps (relaxed atomics owned
//! by each worker), read at scrape time: scraping takes the registry lock briefly and never
//! touches a queue. Series, all labelled `device` (and `queue` where per queue):
//!
//! - `novacron_blk_requests_total{op}`, `novacron_blk_bytes_total{direction}`,
//!   `novacron_blk_io_errors_total`, `novacron_blk_rejected_total{reason}`,
//!   `novacron_blk_in_flight`, `novacron_blk_request_latency_seconds` (histogram),
//!   `novacron_blk_connected`.
//!
//! The text is written here rather than through a metrics crate because the histogram
//! buckets already exist as our own counters; the crates we looked at want to own the
//! observations. The format is small and the label values are escaped per the spec.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::devices::blk::stats::QueueSnapshot;
use crate::registry::Registry;

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The address could not be bound.
    #[error("cannot serve metrics on {addr}: {reason}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The server thread could not start.
    #[error("cannot start the metrics thread")]
    Thread(#[source] std::io::Error),
}

/// A running metrics endpoint.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `/metrics` on `addr` from `registry`.
    pub fn start(addr: SocketAddr, registry: Arc<Mutex<Registry>>) -> Result<Self, MetricsError> {
        let server = Arc::new(
            tiny_http::Server::http(addr).map_err(|e| MetricsError::Bind {
                addr,
                reason: e.to_string(),
            })?,
        );
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let response = if request.url() == "/metrics" {
                        let mut response =
                            tiny_http::Response::from_string(render(&snapshot(&registry)));
                        if let Ok(header) = tiny_http::Header::from_bytes(
                            &b"Content-Type"[..],
                            &b"text/plain; version=0.0.4; charset=utf-8"[..],
                        ) {
                            response = response.with_header(header);
                        }
                        response
                    } else {
                        tiny_http::Response::from_string("try /metrics\n").with_status_code(404)
                    };
                    if let Err(e) = request.respond(response) {
                        log::debug!("metrics: cannot respond: {e}");
                    }
                }
            })
            .map_err(MetricsError::Thread)?;
        log::info!("metrics on http://{addr}/metrics");
        Ok(Self {
            server,
            thread: Some(thread),
        })
    }

    /// Stops serving.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.server.unblock();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

/// Per device: (id, connected, per-queue snapshots).
pub type Snapshot = Vec<(String, bool, Vec<QueueSnapshot>)>;

fn snapshot(registry: &Mutex<Registry>) -> Snapshot {
    crate::lock::lock(registry).metrics_snapshot()
}

/// Escapes a label value (backslash, double quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders the text exposition.
pub fn render(devices: &Snapshot) -> String {
    let mut out = String::new();
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    header(
        &mut out,
        "novacron_blk_connected",
        "gauge",
        "1 while a vhost-user front-end is connected.",
    );
    for (id, connected, _) in devices {
        let _ = writeln!(
            out,
            "novacron_blk_connected{{device=\"{}\"}} {}",
            escape(id),
            u8::from(*connected)
        );
    }
    header(
        &mut out,
        "novacron_blk_requests_total",
        "counter",
        "Completed requests by type.",
    );
    for (id, _, queues) in devices {
        for (q, snap) in queues.iter().enumerate() {
            for (op, n) in &snap.requests {
                let _ = writeln!(
                    out,
                    "novacron_blk_requests_total{{device=\"{}\",queue=\"{q}\",op=\"{op}\"}} {n}",
                    escape(id)
                );
            }
        }
    }
    header(
        &mut out,
        "novacron_blk_bytes_total",
        "counter",
        "Bytes transferred by the guest.",
    );
    for (id, _, queues) in devices {
        for (q, snap) in queues.iter().enumerate() {
            let _ = writeln!(
                out,
                "novacron_blk_bytes_total{{device=\"{}\",queue=\"{q}\",direction=\"read\"}} {}",
                escape(id),
                snap.bytes_read
            );
            let _ = writeln!(
                out,
                "novacron_blk_bytes_total{{device=\"{}\",queue=\"{q}\",direction=\"write\"}} {}",
                escape(id),
                snap.bytes_written
            );
        }
    }
    header(
        &mut out,
        "novacron_blk_io_errors_total",
        "counter",
        "Requests failed by the backing (guest saw IOERR).",
    );
    header(
        &mut out,
        "novacron_blk_in_flight",
        "gauge",
        "Requests submitted and not yet completed.",
    );
    for (id, _, queues) in devices {
        for (q, snap) in queues.iter().enumerate() {
            let _ = writeln!(
                out,
                "novacron_blk_io_errors_total{{device=\"{}\",queue=\"{q}\"}} {}",
                escape(id),
                snap.io_errors
            );
            let _ = writeln!(
                out,
                "novacron_blk_in_flight{{device=\"{}\",queue=\"{q}\"}} {}",
                escape(id),
                snap.in_flight
            );
        }
    }
    header(
        &mut out,
        "novacron_blk_rejected_total",
        "counter",
        "Requests refused by validation, by reason.",
    );
    for (id, _, queues) in devices {
        for (q, snap) in queues.iter().enumerate() {
            for (reason, n) in &snap.rejected {
                let _ = writeln!(out, "novacron_blk_rejected_total{{device=\"{}\",queue=\"{q}\",reason=\"{reason}\"}} {n}", escape(id));
            }
        }
    }
    header(
        &mut out,
        "novacron_blk_request_latency_seconds",
        "histogram",
        "Request latency from submission to completion.",
    );
    for (id, _, queues) in devices {
        for (q, snap) in queues.iter().enumerate() {
            let mut cumulative = 0u64;
            for (bound_us, n) in &snap.latency_us {
                cumulative += n;
                let le = if *bound_us == u64::MAX {
                    "+Inf".to_string()
                } else {
                    format!("{}", *bound_us as f64 / 1e6)
                };
                let _ = writeln!(out, "novacron_blk_request_latency_seconds_bucket{{device=\"{}\",queue=\"{q}\",le=\"{le}\"}} {cumulative}", escape(id));
            }
            let _ = writeln!(
                out,
                "novacron_blk_request_latency_seconds_sum{{device=\"{}\",queue=\"{q}\"}} {}",
                escape(id),
                snap.latency_ns_total as f64 / 1e9
            );
            let _ = writeln!(out, "novacron_blk_request_latency_seconds_count{{device=\"{}\",queue=\"{q}\"}} {cumulative}", escape(id));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::blk::stats::QueueStats;
    use std::time::Duration;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let stats = QueueStats::default();
        stats.started();
        stats.completed(
            crate::devices::blk::stats::OpClass::Read,
            4096,
            true,
            Duration::from_micros(3),
        );
        stats.started();
        stats.completed(
            crate::devices::blk::stats::OpClass::Read,
            4096,
            true,
            Duration::from_micros(300),
        );
        let text = render(&vec![("vd\"a".to_string(), true, vec![stats.snapshot()])]);
        assert!(
            text.contains("novacron_blk_connected{device=\"vd\\\"a\"} 1"),
            "{text}"
        );
        assert!(text
            .contains("novacron_blk_requests_total{device=\"vd\\\"a\",queue=\"0\",op=\"read\"} 2"));
        assert!(text.contains("direction=\"read\"} 8192"));
        assert!(text.contains("le=\"0.000004\"} 1"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 2"));
        assert!(
            text.contains(
                "novacron_blk_request_latency_seconds_sum{device=\"vd\\\"a\",queue=\"0\"} 0.000303"
            ),
            "{text}"
        );
        assert!(text.contains(
            "novacron_blk_request_latency_seconds_count{device=\"vd\\\"a\",queue=\"0\"} 2"
        ));
    }
}
