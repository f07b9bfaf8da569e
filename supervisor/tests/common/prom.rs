//! Scraping the broker's Prometheus endpoint: a minimal HTTP/1.1 GET and a strict parser
//! of the text exposition format (0.0.4), so tests check exactly what Prometheus would read.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::Broker;

/// Longest wait for a metric to reach a value.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub struct Response {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

/// One request on a fresh connection; the server closes it after the reply.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> Response {
    let mut stream = TcpStream::connect(addr).expect("connect to the metrics endpoint");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: test\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers: HashMap<String, String> = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header line");
            (k.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    let len: usize = headers["content-length"].parse().unwrap();
    assert_eq!(len, body.len(), "Content-Length");
    Response {
        status,
        headers,
        body: body.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: family types and every sample.
#[derive(Debug)]
pub struct Exposition {
    pub types: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

pub fn scrape(broker: &Broker) -> Exposition {
    let r = http(broker.metrics_addr, "GET", "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    parse(&r.body)
}

pub fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

pub fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub fn parse_value(s: &str) -> f64 {
    match s {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        _ => s.parse().unwrap_or_else(|_| panic!("bad value {s:?}")),
    }
}

/// `{a="b",c="d"}` → labels and the rest of the line after the `}`.
pub fn parse_labels(s: &str, line: &str) -> (BTreeMap<String, String>, String) {
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after.to_string());
        }
        let (name, after) = rest
            .split_once("=\"")
            .unwrap_or_else(|| panic!("label without =\" in {line:?}"));
        assert!(is_label_name(name), "bad label name {name:?} in {line:?}");
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => panic!("bad escape {other:?} in {line:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => panic!("unterminated label value in {line:?}"),
            }
        };
        assert!(
            labels.insert(name.to_string(), value).is_none(),
            "duplicate label {name} in {line:?}"
        );
        rest = &after[end + 1..];
        if let Some(r) = rest.strip_prefix(',') {
            rest = r;
        }
    }
}

/// The family a sample belongs to: itself, or a histogram/summary's base name.
pub fn family_of<'a>(sample: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = sample.strip_suffix(suffix) {
            if matches!(types.get(base).map(String::as_str), Some("histogram")) {
                return base;
            }
        }
    }
    sample
}

/// A strict parser of the text format 0.0.4: HELP and TYPE at most once per family and
/// before its samples, a family's samples together, no duplicate series, valid names,
/// counters non-negative and named `_total`, histograms cumulative and consistent.
pub fn parse(text: &str) -> Exposition {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helped: BTreeSet<String> = BTreeSet::new();
    let mut finished: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    let mut samples = Vec::new();
    let mut series = BTreeSet::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut switch = |current: &mut Option<String>, to: &str| {
        if current.as_deref() != Some(to) {
            if let Some(old) = current.take() {
                finished.insert(old);
            }
            assert!(!finished.contains(to), "family {to} is split");
            *current = Some(to.to_string());
        }
    };
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, _doc) = rest.split_once(' ').expect("HELP with text");
            assert!(is_metric_name(name), "{line}");
            assert!(helped.insert(name.to_string()), "second HELP for {name}");
            switch(&mut current, name);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE with a type");
            assert!(is_metric_name(name), "{line}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "{line}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "second TYPE for {name}"
            );
            switch(&mut current, name);
        } else {
            assert!(!line.starts_with('#') && !line.is_empty(), "{line:?}");
            let name_end = line.find(['{', ' ']).expect("a value");
            let name = &line[..name_end];
            assert!(is_metric_name(name), "{line}");
            let (labels, rest) = match line[name_end..].strip_prefix('{') {
                Some(labels) => parse_labels(labels, line),
                None => (BTreeMap::new(), line[name_end..].to_string()),
            };
            let mut fields = rest
                .strip_prefix(' ')
                .unwrap_or_else(|| panic!("no space before the value: {line:?}"))
                .split(' ');
            let value = parse_value(fields.next().unwrap());
            if let Some(ts) = fields.next() {
                ts.parse::<i64>().expect("timestamp");
            }
            assert!(fields.next().is_none(), "{line}");
            let family = family_of(name, &types).to_string();
            assert!(
                types.contains_key(&family),
                "sample before its TYPE: {line}"
            );
            switch(&mut current, &family);
            if types[&family] == "counter" {
                assert!(family.ends_with("_total"), "counter {family}");
                assert!(value >= 0.0, "{line}");
            }
            assert!(
                series.insert((name.to_string(), labels.clone())),
                "duplicate series {line}"
            );
            samples.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
    }
    let exposition = Exposition { types, samples };
    exposition.check_histograms();
    exposition
}

impl Exposition {
    pub fn check_histograms(&self) {
        for (family, _) in self.types.iter().filter(|(_, t)| *t == "histogram") {
            let mut groups: BTreeMap<BTreeMap<String, String>, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.samples_of(&format!("{family}_bucket")) {
                let mut key = s.labels.clone();
                let le = parse_value(&key.remove("le").expect("bucket without le"));
                groups.entry(key).or_default().push((le, s.value));
            }
            for (labels, buckets) in groups {
                assert!(
                    buckets
                        .windows(2)
                        .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                    "{family}{labels:?}: buckets not ascending and cumulative"
                );
                let (le, inf) = *buckets.last().unwrap();
                assert_eq!(le, f64::INFINITY, "{family}: last bucket is +Inf");
                assert_eq!(Some(inf), self.get(&format!("{family}_count"), &labels));
                assert!(self.get(&format!("{family}_sum"), &labels).is_some());
            }
        }
    }

    pub fn samples_of<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The value of the series with exactly these labels.
    pub fn get(&self, name: &str, labels: &BTreeMap<String, String>) -> Option<f64> {
        self.samples_of(name)
            .find(|s| &s.labels == labels)
            .map(|s| s.value)
    }

    /// The value of `name` with exactly `labels` (pairs); panics if absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.get(name, &labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?}"))
    }

    /// Sum over workers of the series of `name` that have `labels` (and any worker).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples_of(name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Every family name and every sample name.
    pub fn names(&self) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self.types.keys().cloned().collect();
        names.extend(self.samples.iter().map(|s| s.name.clone()));
        names
    }
}

/// Scrapes until `check` accepts the exposition, panicking with `what` after [`DEADLINE`].
pub fn scrape_until<T>(
    broker: &Broker,
    what: &str,
    mut check: impl FnMut(&Exposition) -> Option<T>,
) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let e = scrape(broker);
        if let Some(v) = check(&e) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
