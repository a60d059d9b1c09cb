//! Client-side commands of the `piiguard` binary: bulk shred from a file, and offline
//! verification of certificates of destruction.

use std::io::{BufRead as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::cli::CommandError;
use crate::ops::erasure::certificate::Certificate;
use crate::pb;

/// The dev PKI identity `shred` connects as unless `--cert` / `--key` say otherwise.
pub const IDENTITY: &str = "erasure";

fn file_error(path: &Path) -> impl FnOnce(std::io::Error) -> CommandError + '_ {
    move |source| CommandError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// One line of a bulk-shred file: `subject[,keyspace[,request_id]]`.
fn parse_line(line: &str, n: usize, prefix: &str) -> Option<(String, String, String)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut cols = line.splitn(3, ',').map(str::trim);
    let subject = cols.next().unwrap_or_default().to_string();
    let keyspace = cols.next().unwrap_or_default().to_string();
    let request_id = cols
        .next()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{prefix}{n}"));
    Some((subject, keyspace, request_id))
}

/// Totals of a bulk shred.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Requests answered.
    pub requests: usize,
    /// Keyspaces shredded now.
    pub shredded: usize,
    /// Keyspaces shredded before.
    pub already_shredded: usize,
    /// Keyspaces whose shred waits out its grace window.
    pub scheduled: usize,
    /// Keyspaces that never held the subject.
    pub not_found: usize,
    /// Keyspaces that failed (named on stderr).
    pub failed: usize,
}

/// `piiguard shred --file`: streams every line of `file` through `Erasure.ShredStream` over
/// `channel` (see [`crate::cli::client`]), with a progress line on stderr; writes certificates
/// into `certificates_dir` if given.
pub async fn bulk_shred(
    channel: Channel,
    file: &Path,
    default_keyspace: &str,
    reason: &str,
    certificates_dir: Option<&Path>,
) -> Result<Summary, CommandError> {
    let f = std::fs::File::open(file).map_err(file_error(file))?;
    let prefix = format!(
        "{}:",
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let mut reqs = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(file_error(file))?;
        if let Some((subject, ks, rid)) = parse_line(&line, i + 1, &prefix) {
            reqs.push(pb::ShredRequest {
                subject,
                keyspace: if ks.is_empty() {
                    default_keyspace.to_string()
                } else {
                    ks
                },
                reason: reason.to_string(),
                request_id: rid,
            });
        }
    }
    if let Some(d) = certificates_dir {
        std::fs::create_dir_all(d).map_err(file_error(d))?;
    }
    let total = reqs.len();
    let mut client =
        pb::erasure_client::ErasureClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut stream = client
        .shred_stream(tokio_stream::iter(reqs))
        .await
        .map_err(|status| CommandError::Rpc {
            method: "ShredStream",
            status,
        })?
        .into_inner();
    let mut s = Summary::default();
    let started = Instant::now();
    let mut last_draw = Instant::now() - Duration::from_secs(1);
    while let Some(resp) = stream
        .message()
        .await
        .map_err(|status| CommandError::Interrupted {
            done: s.requests,
            total,
            status,
        })?
    {
        s.requests += 1;
        for k in &resp.keyspaces {
            match pb::ShredOutcome::try_from(k.outcome).unwrap_or(pb::ShredOutcome::Unspecified) {
                pb::ShredOutcome::Shredded => s.shredded += 1,
                pb::ShredOutcome::AlreadyShredded => s.already_shredded += 1,
                pb::ShredOutcome::Scheduled => s.scheduled += 1,
                pb::ShredOutcome::NotFound => s.not_found += 1,
                _ => {
                    s.failed += 1;
                    let why = k.error.as_ref().map(|e| e.reason.as_str()).unwrap_or("?");
                    eprintln!(
                        "\nrequest {} keyspace {}: failed ({why})",
                        resp.request_id, k.keyspace
                    );
                }
            }
            if let Some(d) = certificates_dir
                && !k.certificate.is_empty()
            {
                let safe: String = format!("{}-{}", resp.request_id, k.keyspace)
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                            c
                        } else {
                            '_'
                        }
                    })
                    .collect();
                let p = d.join(format!("{safe}.json"));
                std::fs::write(&p, &k.certificate).map_err(file_error(&p))?;
            }
        }
        if last_draw.elapsed() > Duration::from_millis(200) || s.requests == total {
            last_draw = Instant::now();
            let pct = (s.requests * 100).checked_div(total).unwrap_or(100);
            let bar: String = (0..30)
                .map(|i| if i * 100 < pct * 30 { '#' } else { '.' })
                .collect();
            eprint!("\r[{bar}] {}/{total} ({pct}%)", s.requests);
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    if s.requests != total {
        return Err(CommandError::Incomplete {
            answered: s.requests,
            total,
        });
    }
    eprintln!(
        "{total} requests in {:.1}s: {} shredded, {} already shredded, {} scheduled, {} never existed, {} failed",
        started.elapsed().as_secs_f64(),
        s.shredded,
        s.already_shredded,
        s.scheduled,
        s.not_found,
        s.failed
    );
    Ok(s)
}

/// `piiguard certificate verify`: checks a certificate's signature with a PEM public key and
/// prints what it certifies.
pub fn verify_certificate(cert_path: &Path, public_key: &Path) -> Result<String, CommandError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CommandError::File {
            path: path.to_path_buf(),
            source,
        })
    };
    let doc = read(cert_path)?;
    let pem = read(public_key)?;
    let cert = Certificate::parse(&doc)?;
    let p = cert.verify(&pem)?;
    let must_delete = p
        .caller_must_delete
        .as_ref()
        .map(|l| format!("\n  the caller must delete: {}", l.join("; ")))
        .unwrap_or_default();
    Ok(format!(
        "OK: certificate {} verified (key {} v{}).\n  keyspace {}, subject_ref {}\n  {} key(s) destroyed at {} ({}), requested {} by request {:?}: {:?}\n  cached copies survive at most {} s; backups at most {} days{}",
        p.certificate_id,
        cert.signature.key,
        cert.signature.key_version,
        p.keyspace,
        p.subject_ref,
        p.destroyed_keys.len(),
        p.executed_at,
        p.method,
        p.requested_at,
        p.request_id,
        p.reason,
        p.cache_max_survival_secs,
        p.backup_retention_days,
        must_delete,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shred_file_lines() {
        assert_eq!(parse_line("  # comment", 1, "f:"), None);
        assert_eq!(parse_line("", 2, "f:"), None);
        assert_eq!(
            parse_line("cust-1", 3, "f:"),
            Some(("cust-1".into(), String::new(), "f:3".into()))
        );
        assert_eq!(
            parse_line("cust-2, orders, req-9", 4, "f:"),
            Some(("cust-2".into(), "orders".into(), "req-9".into()))
        );
    }
}
