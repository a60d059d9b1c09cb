//! `piiguard-bench kek-rewrap`: the one-shot measurement of issue 12 (docs/KEYS.md, "KEK
//! rotation"). Creates N subjects with a DEK each (EncryptBatch of new subjects), rotates the
//! keyspace's KEK (`Keys.RotateKek`), and times the server's background rewrap until
//! `Keys.GetKeyStatus` reports the run finished and no DEK on an older KEK version (polled,
//! progress printed). The anchor, in the same run: the same number of wrapped values (the
//! index key and every subject record's DEK: what the job rewraps for subjects never rotated,
//! which have no DEK record) sent
//! directly to transit `rewrap` in `batch_input` form, one call at a time, with the job's batch
//! size (`kek.batch`, default 100): wrapped DEKs of the same key and version, made before the
//! rotation with transit `encrypt`.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt as _;
use serde::Serialize;
use serde_json::{Value, json};
use tonic::transport::Channel;

use piiguard::pb;

use crate::Target;
use crate::keys::connect_admin;
use crate::scenario::{Vault, connect_grpc, ok_json};
use crate::stats;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Attempts per EncryptBatch while creating subjects.
const CREATE_ATTEMPTS: usize = 3;

#[derive(Args, Debug, Clone)]
pub struct KekRewrapArgs {
    #[command(flatten)]
    pub target: Target,
    /// New subjects to create (one DEK each) before the rotation; 0 = rotate what is there.
    #[arg(long, default_value_t = 100_000)]
    pub subjects: usize,
    /// Subjects per EncryptBatch while creating them (each new subject is a DEK made in Vault:
    /// 1,000 per call can outlast the 30 s call timeout on a busy machine).
    #[arg(long, default_value_t = 250)]
    pub chunk: usize,
    /// EncryptBatch calls in flight while creating them.
    #[arg(long, default_value_t = 4)]
    pub create_concurrency: usize,
    /// Wrapped values per transit `rewrap` call of the direct run: the server's `kek.batch`
    /// (default 100).
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// GetKeyStatus poll interval, seconds.
    #[arg(long, default_value_t = 0.5)]
    pub poll: f64,
    /// Give up waiting for the rewrap after this many seconds.
    #[arg(long, default_value_t = 3600.0)]
    pub timeout: f64,
    /// piiguard server pid: report its CPU time.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// OpenBao pid: report its CPU time.
    #[arg(long)]
    pub vault_pid: Option<u32>,
    /// Print one JSON document at the end (progress still goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// What one kek-rewrap run measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KekReport {
    pub keyspace: String,
    pub subjects_created: usize,
    pub create_seconds: f64,
    /// Subjects with a DEK in the keyspace when the KEK was rotated (GetKeyStatus).
    pub subjects_in_keyspace: u64,
    pub old_kek_version: u32,
    pub new_kek_version: u32,
    /// RotateKek's own count of wrapped DEKs to move (the counts of the last scan).
    pub to_rewrap_reported: u64,
    /// Records the job went through (index key, DEK records, subject records).
    pub job_records: u64,
    /// From RotateKek to the status reporting the run finished with no DEK on an older version.
    pub job_seconds: f64,
    /// From RotateKek to the first status reporting no DEK on an older version (the counts of
    /// DEKs created since the last full scan are attributed to the newest version, so this can
    /// be early: see the report).
    pub first_zero_old_seconds: Option<f64>,
    pub job_deks_per_sec: f64,
    pub job_records_per_sec: f64,
    pub job_server_cpu_seconds: Option<f64>,
    pub job_vault_cpu_seconds: Option<f64>,
    /// Wrapped values the direct run rewrapped (the job's records: 2 x subjects + 1).
    pub direct_values: usize,
    pub direct_batch: usize,
    pub direct_seconds: f64,
    pub direct_values_per_sec: f64,
    pub direct_vault_cpu_seconds: Option<f64>,
    /// job_seconds / direct_seconds.
    pub job_over_direct: f64,
}

/// Wrapped DEKs the status counts on a KEK version below `new_version`.
pub fn old_deks(s: &pb::GetKeyStatusResponse, new_version: u32) -> u64 {
    s.deks_by_kek_version
        .iter()
        .filter(|c| c.kek_version < new_version)
        .map(|c| c.deks)
        .sum()
}

/// Whether the job has moved everything to `new_version`: its run is over (not running, not
/// due) and no DEK is counted on an older version.
pub fn rewrap_done(s: &pb::GetKeyStatusResponse, new_version: u32) -> bool {
    let running = s.rewrap.as_ref().is_some_and(|r| r.running);
    !running && s.kek_latest_version >= new_version && old_deks(s, new_version) == 0
}

/// One progress line.
pub fn progress_line(elapsed: f64, s: &pb::GetKeyStatusResponse, new_version: u32) -> String {
    let (done, remaining, running) = s
        .rewrap
        .as_ref()
        .map_or((0, 0, false), |r| (r.done, r.remaining, r.running));
    let total = done + remaining;
    let pct = if total > 0 {
        100.0 * done as f64 / total as f64
    } else {
        0.0
    };
    format!(
        "  {elapsed:7.1} s  records {done}/{total} ({pct:.1}%)  DEKs on older KEK versions {}  {}",
        old_deks(s, new_version),
        if running { "running" } else { "idle" }
    )
}

async fn status(admin: &Channel, ks: &str) -> Result<pb::GetKeyStatusResponse, String> {
    pb::keys_client::KeysClient::new(admin.clone())
        .get_key_status(pb::GetKeyStatusRequest {
            keyspace: ks.to_string(),
        })
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| {
            format!(
                "GetKeyStatus: {:?} {} (needs the `keys` grant: --admin-cert)",
                s.code(),
                s.message()
            )
        })
}

/// Creates `n` new subjects (one DEK each) with EncryptBatch.
async fn create_subjects(t: &Target, chs: &[Channel], a: &KekRewrapArgs) -> Result<f64, String> {
    let run = {
        let mut b = [0u8; 8];
        aws_lc_rs::rand::fill(&mut b).map_err(|_| "CSPRNG")?;
        u64::from_le_bytes(b)
    };
    let start = Instant::now();
    let n = a.subjects;
    let chunk = a.chunk.max(1);
    let pt = crate::scenario::plaintext(16);
    let futs = (0..n.div_ceil(chunk)).map(|c| {
        let subjects: Vec<String> = (c * chunk..((c + 1) * chunk).min(n))
            .map(|i| format!("bench-kek-{run:016x}-{i}"))
            .collect();
        let ch = chs[c % chs.len()].clone();
        let pt = pt.clone();
        async move {
            // A call that timed out may have made some of the DEKs: the same subjects again
            // reuse them (a DEK is made once per subject), so a retry is harmless.
            let mut last = String::new();
            for _ in 0..CREATE_ATTEMPTS {
                match crate::scenario::encrypt_all(t, &ch, &subjects, &pt).await {
                    Ok(cts) => return Ok(cts.len()),
                    Err(e) => last = e,
                }
            }
            Err(format!("{last} (after {CREATE_ATTEMPTS} attempts)"))
        }
    });
    let mut stream = futures_util::stream::iter(futs).buffer_unordered(a.create_concurrency.max(1));
    let mut done = 0usize;
    let mut last = Instant::now();
    while let Some(r) = stream.next().await {
        done += r?;
        if last.elapsed() >= Duration::from_secs(5) || done == n {
            last = Instant::now();
            let s = start.elapsed().as_secs_f64();
            eprintln!(
                "  created {done}/{n} subjects in {s:.0} s ({:.0}/s)",
                done as f64 / s
            );
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

/// `n` wrapped 32-byte DEKs of `kek` at its current version (transit encrypt, batch_input).
async fn wrap_values(
    v: &Vault,
    t: &Target,
    kek: &str,
    n: usize,
    batch: usize,
) -> Result<Vec<String>, String> {
    let path = format!("{}/encrypt/{kek}", t.transit_mount);
    let batch = batch.max(1);
    let futs = (0..n.div_ceil(batch)).map(|c| {
        let k = batch.min(n - c * batch);
        let items: Vec<Value> = (0..k)
            .map(|_| {
                let mut dek = [0u8; 32];
                let _ = aws_lc_rs::rand::fill(&mut dek);
                json!({ "plaintext": B64.encode(dek) })
            })
            .collect();
        let body = Bytes::from(json!({ "batch_input": items }).to_string());
        let f = v.call(c, reqwest::Method::POST, &path, Some(body));
        let path = path.clone();
        async move {
            let r = ok_json(&path, f.await?)?;
            r["data"]["batch_results"]
                .as_array()
                .ok_or("transit encrypt: no batch_results")?
                .iter()
                .map(|x| {
                    x["ciphertext"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("transit encrypt item: {x}"))
                })
                .collect::<Result<Vec<String>, String>>()
        }
    });
    let parts: Vec<Result<Vec<String>, String>> =
        futures_util::stream::iter(futs).buffered(4).collect().await;
    let mut out = Vec::with_capacity(n);
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// The direct run: every value through transit `rewrap`, `batch` at a time, one call in flight
/// (as the job makes them). Checks every result is on `new_version`.
async fn rewrap_direct(
    v: &Vault,
    t: &Target,
    kek: &str,
    values: &[String],
    batch: usize,
    new_version: u32,
) -> Result<f64, String> {
    let path = format!("{}/rewrap/{kek}", t.transit_mount);
    let prefix = format!("vault:v{new_version}:");
    let start = Instant::now();
    for chunk in values.chunks(batch.max(1)) {
        let items: Vec<Value> = chunk.iter().map(|c| json!({ "ciphertext": c })).collect();
        let body = Bytes::from(json!({ "batch_input": items }).to_string());
        let r = ok_json(
            &path,
            v.call(0, reqwest::Method::POST, &path, Some(body)).await?,
        )?;
        let results = r["data"]["batch_results"]
            .as_array()
            .ok_or("transit rewrap: no batch_results")?;
        if results.len() != chunk.len()
            || results.iter().any(|x| {
                !x["ciphertext"]
                    .as_str()
                    .is_some_and(|c| c.starts_with(&prefix))
            })
        {
            return Err(format!(
                "transit rewrap: a result is not on version {new_version}"
            ));
        }
    }
    Ok(start.elapsed().as_secs_f64())
}

pub async fn run(a: KekRewrapArgs) -> Result<(), String> {
    let t = &a.target;
    let ks = t.keyspace.clone();
    let kek = format!("kek-{ks}");
    let ticks = stats::clock_ticks();
    let cpu = |pid: Option<u32>| pid.and_then(|p| stats::process_cpu(&p.to_string(), ticks));
    let chs = connect_grpc(t, 4).await?;
    let admin = connect_admin(t).await?;
    let vault = Vault::new(t, 4)?;
    let s0 = status(&admin, &ks).await?;
    eprintln!(
        "keyspace {ks}: KEK version {}, {} subjects, rewrap running: {}",
        s0.kek_latest_version,
        s0.subjects,
        s0.rewrap.as_ref().is_some_and(|r| r.running)
    );
    if s0.rewrap.as_ref().is_some_and(|r| r.running) {
        return Err("a KEK rewrap is already running or due on this keyspace; wait for it".into());
    }
    let mut rep = KekReport {
        keyspace: ks.clone(),
        subjects_created: a.subjects,
        direct_batch: a.batch.max(1),
        ..Default::default()
    };
    if a.subjects > 0 {
        eprintln!("creating {} subjects ...", a.subjects);
        rep.create_seconds = create_subjects(t, &chs, &a).await?;
    }
    let s1 = status(&admin, &ks).await?;
    rep.subjects_in_keyspace = s1.subjects;
    rep.old_kek_version = s1.kek_latest_version;
    // The index key and each subject record's DEK (a subject never rotated has no DEK record;
    // the DEK records of rotated subjects are not counted: none on a fresh keyspace).
    let values = s1.subjects as usize + 1;
    eprintln!("wrapping {values} values for the direct run (transit encrypt, not measured) ...");
    let wrapped = wrap_values(&vault, t, &kek, values, 100).await?;
    rep.direct_values = wrapped.len();

    eprintln!("RotateKek({ks}) ...");
    let (srv0, bao0) = (cpu(a.server_pid), cpu(a.vault_pid));
    let start = Instant::now();
    let r = pb::keys_client::KeysClient::new(admin.clone())
        .rotate_kek(pb::RotateKekRequest {
            keyspace: ks.clone(),
        })
        .await
        .map_err(|s| format!("RotateKek: {:?} {}", s.code(), s.message()))?
        .into_inner();
    rep.new_kek_version = r.new_version;
    rep.to_rewrap_reported = r.to_rewrap;
    eprintln!(
        "new KEK version {} (RotateKek reports {} wrapped DEKs to move)",
        r.new_version, r.to_rewrap
    );
    let deadline = start + Duration::from_secs_f64(a.timeout);
    let mut last_print = Instant::now() - Duration::from_secs(60);
    let last = loop {
        tokio::time::sleep(Duration::from_secs_f64(a.poll.max(0.05))).await;
        let s = status(&admin, &ks).await?;
        let el = start.elapsed().as_secs_f64();
        if rep.first_zero_old_seconds.is_none() && old_deks(&s, r.new_version) == 0 {
            rep.first_zero_old_seconds = Some(el);
        }
        let done = rewrap_done(&s, r.new_version);
        if done || last_print.elapsed() >= Duration::from_secs(5) {
            last_print = Instant::now();
            eprintln!("{}", progress_line(el, &s, r.new_version));
        }
        if done {
            break s;
        }
        if Instant::now() > deadline {
            return Err(format!("the rewrap did not finish in {} s", a.timeout));
        }
    };
    rep.job_seconds = start.elapsed().as_secs_f64();
    let (srv1, bao1) = (cpu(a.server_pid), cpu(a.vault_pid));
    rep.job_server_cpu_seconds = srv0
        .zip(srv1)
        .map(|(b, e)| e.saturating_sub(b).as_secs_f64());
    rep.job_vault_cpu_seconds = bao0
        .zip(bao1)
        .map(|(b, e)| e.saturating_sub(b).as_secs_f64());
    rep.job_records = last.rewrap.as_ref().map_or(0, |p| p.done);
    rep.job_deks_per_sec = rep.subjects_in_keyspace as f64 / rep.job_seconds;
    rep.job_records_per_sec = rep.job_records as f64 / rep.job_seconds;

    eprintln!(
        "direct: {} transit rewraps, {} per call, one call at a time ...",
        wrapped.len(),
        rep.direct_batch
    );
    let b0 = cpu(a.vault_pid);
    rep.direct_seconds = rewrap_direct(&vault, t, &kek, &wrapped, a.batch, r.new_version).await?;
    rep.direct_vault_cpu_seconds = b0
        .zip(cpu(a.vault_pid))
        .map(|(b, e)| e.saturating_sub(b).as_secs_f64());
    rep.direct_values_per_sec = rep.direct_values as f64 / rep.direct_seconds;
    rep.job_over_direct = rep.job_seconds / rep.direct_seconds;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&rep).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", text(&rep));
    }
    Ok(())
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

/// The text report of a run.
pub fn text(r: &KekReport) -> String {
    format!(
        "kek-rewrap {ks}: {subj} subjects (created {created} in {cs:.0} s), KEK v{o} -> v{n}\n\
         job:    {js:.1} s for {rec} records ({jr:.0} records/s, {jd:.0} DEKs/s); server CPU {sc} s, OpenBao CPU {bc} s\n\
         \x20       first status with no DEK counted on an older version after {fz} s (RotateKek reported {tr} to move)\n\
         direct: {ds:.1} s for {dv} transit rewraps in batches of {db} ({dr:.0} values/s); OpenBao CPU {dc} s\n\
         job / direct: {ratio:.2}\n",
        ks = r.keyspace,
        subj = r.subjects_in_keyspace,
        created = r.subjects_created,
        cs = r.create_seconds,
        o = r.old_kek_version,
        n = r.new_kek_version,
        js = r.job_seconds,
        rec = r.job_records,
        jr = r.job_records_per_sec,
        jd = r.job_deks_per_sec,
        sc = opt(r.job_server_cpu_seconds),
        bc = opt(r.job_vault_cpu_seconds),
        fz = opt(r.first_zero_old_seconds),
        tr = r.to_rewrap_reported,
        ds = r.direct_seconds,
        dv = r.direct_values,
        db = r.direct_batch,
        dr = r.direct_values_per_sec,
        dc = opt(r.direct_vault_cpu_seconds),
        ratio = r.job_over_direct,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(
        latest: u32,
        counts: &[(u32, u64)],
        running: bool,
        done: u64,
        remaining: u64,
    ) -> pb::GetKeyStatusResponse {
        pb::GetKeyStatusResponse {
            keyspace: "orders".into(),
            kek_latest_version: latest,
            deks_by_kek_version: counts
                .iter()
                .map(|&(kek_version, deks)| pb::KekVersionCount { kek_version, deks })
                .collect(),
            rewrap: Some(pb::RewrapProgress {
                running,
                target_kek_version: if running { latest } else { 0 },
                done,
                remaining,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn done_only_when_the_run_is_over_and_no_dek_is_on_an_older_version() {
        // Running, DEKs still on v1.
        let s = st(2, &[(1, 40), (2, 60)], true, 61, 140);
        assert_eq!(old_deks(&s, 2), 40);
        assert!(!rewrap_done(&s, 2));
        // Counts at zero but the run still going (the subject records' phase): not done.
        let s = st(2, &[(2, 100)], true, 150, 51);
        assert_eq!(old_deks(&s, 2), 0);
        assert!(!rewrap_done(&s, 2));
        // Finished.
        let s = st(2, &[(2, 100)], false, 201, 0);
        assert!(rewrap_done(&s, 2));
        // Idle but the status does not know the new version yet: not done.
        assert!(!rewrap_done(&st(1, &[(1, 100)], false, 0, 0), 2));
        // A later rotation (v3) counts v2 as old for it, not for v2.
        let s = st(3, &[(2, 5), (3, 95)], false, 201, 0);
        assert!(rewrap_done(&s, 2));
        assert!(!rewrap_done(&s, 3));
        // No progress message at all: not running.
        let mut s = st(2, &[], false, 0, 0);
        s.rewrap = None;
        assert!(rewrap_done(&s, 2));
    }

    #[test]
    fn progress_lines_show_records_percent_and_old_deks() {
        let l = progress_line(12.34, &st(2, &[(1, 40), (2, 60)], true, 50, 150), 2);
        assert!(l.contains("12.3 s"), "{l}");
        assert!(l.contains("records 50/200 (25.0%)"), "{l}");
        assert!(l.contains("older KEK versions 40"), "{l}");
        assert!(l.ends_with("running"), "{l}");
        let l = progress_line(1.0, &st(2, &[], false, 0, 0), 2);
        assert!(
            l.contains("records 0/0 (0.0%)") && l.ends_with("idle"),
            "{l}"
        );
    }

    #[test]
    fn the_text_report_names_both_runs_and_their_ratio() {
        let r = KekReport {
            keyspace: "orders".into(),
            subjects_in_keyspace: 100,
            job_seconds: 4.0,
            direct_seconds: 2.0,
            job_over_direct: 2.0,
            direct_values: 201,
            direct_batch: 100,
            ..Default::default()
        };
        let s = text(&r);
        assert!(s.contains("job:    4.0 s"), "{s}");
        assert!(
            s.contains("direct: 2.0 s for 201 transit rewraps in batches of 100"),
            "{s}"
        );
        assert!(s.contains("job / direct: 2.00"), "{s}");
    }
}
