//! The server's Prometheus `/metrics`, scraped over plain HTTP from its metrics listener.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// One sample: name, labels, value.
pub type Sample = (String, HashMap<String, String>, f64);

/// Scrapes `/metrics` and parses its `name{labels} value` lines.
pub async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").unwrap() + 4..];
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (head, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match head.split_once('{') {
                Some((n, rest)) => {
                    let inner = rest.strip_suffix('}').unwrap();
                    let labels = inner
                        .split("\",")
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            let (k, v) = p.split_once("=\"").unwrap();
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
                None => (head.to_string(), HashMap::new()),
            };
            (name, labels, value.parse::<f64>().unwrap())
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include every pair of `want` (0 if none).
pub fn metric(m: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(n, l, _)| {
            n == name
                && want
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

/// The samples named `name`, by the value of their label `label`.
pub fn by_label(m: &[Sample], name: &str, label: &str) -> HashMap<String, f64> {
    m.iter()
        .filter(|(n, _, _)| n == name)
        .filter_map(|(_, l, v)| Some((l.get(label)?.clone(), *v)))
        .collect()
}
