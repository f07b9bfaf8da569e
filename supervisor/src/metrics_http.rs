//! The broker's HTTP endpoint, served by the supervisor: `GET /metrics` (every worker's
//! metrics plus the supervisor's, Prometheus text format 0.0.4), `GET /health` (200 while
//! the supervisor runs) and `GET /ready` (200 when every worker slot has a ready process
//! and the broker is not draining, else 503).
//!
//! A scrape asks every live worker at once over its metrics channel (`metrics_link.rs`),
//! waits up to [`WORKER_TIMEOUT`] for each, and merges the answers: each family's HELP and
//! TYPE once, then the samples of every worker with a `worker="i"` label. A worker that
//! does not answer is left out and counted in `mqttd_scrape_errors_total`.
//!
//! The worker set publishes a [`View`] of its slots after every event (`spawn/view.rs`);
//! this module only reads it, so it never touches the supervisor's state.
//!
//! Hand-written HTTP/1.1 rather than hyper/axum: three GET routes with a `Connection:
//! close` reply are ~100 lines, and a server framework would be most of the supervisor's
//! build. Requests are bounded (head size, read time, concurrent connections).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{watch, Semaphore};

use crate::metrics_link::MetricsLink;

/// How long one worker may take to answer a scrape.
pub const WORKER_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a client gets to send its request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST_HEAD: usize = 8 * 1024;
const MAX_CONNECTIONS: usize = 32;
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// What the endpoint needs to know of the worker set.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub slots: Vec<SlotView>,
    /// SIGTERM/SIGINT (or a failed start): the broker is going away.
    pub draining: bool,
}

#[derive(Debug, Clone, Default)]
pub struct SlotView {
    /// Deaths of this slot's worker that were restarted.
    pub restarts: u64,
    /// Rolling-restart replacements killed for not getting ready in time.
    pub ready_timeouts: u64,
    /// The slot's serving process has reported ready.
    pub ready: bool,
    /// The serving process's metrics channel (whether or not it is ready yet).
    pub link: Option<MetricsLink>,
}

impl View {
    pub fn ready(&self) -> bool {
        !self.draining && !self.slots.is_empty() && self.slots.iter().all(|s| s.ready)
    }
}

struct State {
    view: watch::Receiver<View>,
    scrape_errors: AtomicU64,
}

/// Serves the endpoint on `listener` until the runtime stops.
pub fn spawn(listener: std::net::TcpListener, view: watch::Receiver<View>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let state = Arc::new(State {
        view,
        scrape_errors: AtomicU64::new(0),
    });
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let state = state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &state).await {
                            tracing::debug!("metrics endpoint: {e}");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: do not spin.
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn handle(mut stream: TcpStream, state: &State) -> io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let response = match parse_request_line(&head) {
        Some(("GET" | "HEAD", path)) => route(path, state).await,
        Some(_) => Response::text(405, "method not allowed\n"),
        None => Response::text(400, "bad request\n"),
    };
    let head_only = head.starts_with("HEAD ");
    stream.write_all(&response.encode(head_only)).await?;
    stream.shutdown().await
}

/// Reads up to the blank line ending the request head.
async fn read_head(stream: &mut TcpStream) -> io::Result<String> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() >= MAX_REQUEST_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// ("GET", "/metrics") from "GET /metrics?x HTTP/1.1"; the query is ignored.
fn parse_request_line(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    Some((method, target.split('?').next().unwrap_or(target)))
}

async fn route(path: &str, state: &State) -> Response {
    match path {
        "/metrics" => Response {
            status: 200,
            content_type: CONTENT_TYPE,
            body: scrape(state).await,
        },
        "/health" => Response::text(200, "ok\n"),
        "/ready" if state.view.borrow().ready() => Response::text(200, "ready\n"),
        "/ready" => Response::text(503, "not ready\n"),
        _ => Response::text(404, "not found\n"),
    }
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
        }
    }

    fn encode(&self, head_only: bool) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.content_type,
            self.body.len()
        );
        if self.status == 405 {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

/// Asks every ready worker at once and merges the answers with the supervisor's metrics.
async fn scrape(state: &State) -> String {
    let view = state.view.borrow().clone();
    let mut asks = tokio::task::JoinSet::new();
    for (index, slot) in view.slots.iter().enumerate() {
        if let (true, Some(link)) = (slot.ready, slot.link.clone()) {
            asks.spawn(async move { (index, link.scrape(WORKER_TIMEOUT).await) });
        }
    }
    let mut answers = Vec::new();
    while let Some(joined) = asks.join_next().await {
        match joined {
            Ok((index, Ok(text))) => answers.push((index, text)),
            Ok((index, Err(e))) => {
                tracing::warn!(worker = index, "metrics scrape failed: {e}");
                state.scrape_errors.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("metrics scrape task failed: {e}");
                state.scrape_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    answers.sort_by_key(|(index, _)| *index);
    let mut families = Families::default();
    for (index, text) in &answers {
        families.add_worker(*index, text);
    }
    supervisor_families(&view, &answers, &state.scrape_errors, &mut families);
    families.render()
}

fn supervisor_families(
    view: &View,
    answered: &[(usize, String)],
    scrape_errors: &AtomicU64,
    families: &mut Families,
) {
    let ready = view.slots.iter().filter(|s| s.ready).count();
    families.single(
        "mqttd_workers_configured",
        "gauge",
        "Worker slots (cluster.workers).",
        view.slots.len(),
    );
    families.single(
        "mqttd_workers_up",
        "gauge",
        "Worker slots whose process is running and ready.",
        ready,
    );
    let restarts = families.family(
        "mqttd_worker_restarts_total",
        "counter",
        "Times the supervisor restarted a worker slot after its process died.",
    );
    for (i, slot) in view.slots.iter().enumerate() {
        restarts.push(format!(
            "mqttd_worker_restarts_total{{worker=\"{i}\"}} {}",
            slot.restarts
        ));
    }
    let timeouts = families.family(
        "mqttd_worker_ready_timeouts_total",
        "counter",
        "Rolling-restart replacements killed for not getting ready within cluster.ready_timeout_secs.",
    );
    for (i, slot) in view.slots.iter().enumerate() {
        timeouts.push(format!(
            "mqttd_worker_ready_timeouts_total{{worker=\"{i}\"}} {}",
            slot.ready_timeouts
        ));
    }
    let up = families.family(
        "mqttd_worker_up",
        "gauge",
        "1 if the worker answered this scrape, else 0.",
    );
    for i in 0..view.slots.len() {
        let answered = answered.iter().any(|(index, _)| *index == i);
        up.push(format!(
            "mqttd_worker_up{{worker=\"{i}\"}} {}",
            u8::from(answered)
        ));
    }
    families.single(
        "mqttd_scrape_errors_total",
        "counter",
        "Worker scrapes that failed or timed out (the worker was left out).",
        scrape_errors.load(Ordering::Relaxed),
    );
    families
        .family(
            "mqttd_build_info",
            "gauge",
            "Always 1; the version is a label.",
        )
        .push(format!(
            "mqttd_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        ));
}

/// Metric families in first-seen order, each with its samples from every worker.
#[derive(Default)]
struct Families {
    order: Vec<Family>,
    by_name: HashMap<String, usize>,
}

struct Family {
    name: String,
    help: Option<String>,
    kind: Option<String>,
    samples: Vec<String>,
}

impl Families {
    /// The samples of family `name`, created if new; HELP/TYPE are set once.
    fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Vec<String> {
        let family = self.get(name);
        family.kind.get_or_insert_with(|| kind.to_string());
        family.help.get_or_insert_with(|| help.to_string());
        &mut family.samples
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.family(name, kind, help)
            .push(format!("{name} {value}"));
    }

    fn get(&mut self, name: &str) -> &mut Family {
        let at = *self.by_name.entry(name.to_string()).or_insert_with(|| {
            self.order.push(Family {
                name: name.to_string(),
                help: None,
                kind: None,
                samples: Vec::new(),
            });
            self.order.len() - 1
        });
        &mut self.order[at]
    }

    /// Adds one worker's exposition text, labelling its samples `worker="index"`.
    fn add_worker(&mut self, index: usize, text: &str) {
        let mut current: Option<String> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                self.get(name).help.get_or_insert_with(|| help.to_string());
                current = Some(name.to_string());
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
                self.get(name).kind.get_or_insert_with(|| kind.to_string());
                current = Some(name.to_string());
            } else if line.starts_with('#') || line.trim().is_empty() {
                continue;
            } else {
                let name_end = line.find(['{', ' ']).unwrap_or(line.len());
                let name = &line[..name_end];
                // Histogram and summary samples belong to the family they follow.
                let family = match &current {
                    Some(f) if belongs(name, f) => f.clone(),
                    _ => name.to_string(),
                };
                let sample = with_worker_label(line, name_end, index);
                self.get(&family).samples.push(sample);
            }
        }
    }

    fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        for f in &self.order {
            if let Some(help) = &f.help {
                let _ = writeln!(out, "# HELP {} {help}", f.name);
            }
            let _ = writeln!(
                out,
                "# TYPE {} {}",
                f.name,
                f.kind.as_deref().unwrap_or("untyped")
            );
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
        out
    }
}

fn belongs(sample: &str, family: &str) -> bool {
    sample == family
        || sample
            .strip_prefix(family)
            .is_some_and(|suffix| matches!(suffix, "_bucket" | "_sum" | "_count"))
}

/// `name{a="b"} 1` → `name{worker="i",a="b"} 1`; `name 1` → `name{worker="i"} 1`.
fn with_worker_label(line: &str, name_end: usize, index: usize) -> String {
    let (name, rest) = line.split_at(name_end);
    match rest.strip_prefix('{') {
        Some(labels) if labels.starts_with('}') => format!("{name}{{worker=\"{index}\"{labels}"),
        Some(labels) => format!("{name}{{worker=\"{index}\",{labels}"),
        None => format!("{name}{{worker=\"{index}\"}}{rest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKER: &str = "# HELP a_total A.\n# TYPE a_total counter\na_total{qos=\"0\"} 1\n\
        # HELP h H.\n# TYPE h histogram\nh_bucket{le=\"1\"} 0\nh_bucket{le=\"+Inf\"} 2\n\
        h_sum 3\nh_count 2\n# HELP g G.\n# TYPE g gauge\ng 7\n";

    #[test]
    fn merges_families_once_with_a_worker_label() {
        let mut f = Families::default();
        f.add_worker(0, WORKER);
        f.add_worker(1, WORKER);
        let text = f.render();
        assert_eq!(text.matches("# TYPE a_total counter").count(), 1);
        assert_eq!(text.matches("# HELP h H.").count(), 1);
        assert!(text.contains(
            "# TYPE h histogram\nh_bucket{worker=\"0\",le=\"1\"} 0\n\
             h_bucket{worker=\"0\",le=\"+Inf\"} 2\nh_sum{worker=\"0\"} 3\nh_count{worker=\"0\"} 2\n\
             h_bucket{worker=\"1\",le=\"1\"} 0\n"
        ));
        assert!(text.contains("a_total{worker=\"1\",qos=\"0\"} 1\n"));
        assert!(text.ends_with("# TYPE g gauge\ng{worker=\"0\"} 7\ng{worker=\"1\"} 7\n"));
    }

    #[test]
    fn labels_an_empty_label_set() {
        assert_eq!(with_worker_label("x{} 1", 1, 3), "x{worker=\"3\"} 1");
    }

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request_line("GET /metrics?a=b HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(parse_request_line("GET /metrics\r\n"), None);
        assert_eq!(parse_request_line("GET / SMTP/1.0\r\n"), None);
    }

    #[test]
    fn ready_needs_every_slot_ready_and_no_drain() {
        let slot = |ready| SlotView {
            ready,
            ..SlotView::default()
        };
        let mut view = View {
            slots: vec![slot(true), slot(true)],
            draining: false,
        };
        assert!(view.ready());
        view.slots[1].ready = false; // a killed worker, restarting
        assert!(!view.ready());
        view.slots[1].ready = true;
        view.draining = true;
        assert!(!view.ready());
        assert!(!View::default().ready());
    }
}
