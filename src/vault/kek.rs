//! Transit KEK administration and bulk reads for the KEK rotation job (`keys/kek.rs`): key
//! information (latest and minimum decryption versions, version creation times, the
//! auto-rotation period), rotation, key configuration, transit `rewrap` with `batch_input`, and
//! KV v2 `LIST`. Custom endpoints ([`endpoints::Raw`]) through vaultrs'
//! `exec_with_result` / `exec_with_empty`: vaultrs' own key read lacks `latest_version` and
//! `auto_rotate_period`, and it has no batch rewrap.
//!
//! A rewrap never exposes a plaintext: Vault decrypts and re-encrypts inside transit.

use rustify::enums::RequestMethod;
use serde_json::{Value, json};

use super::{Vault, endpoints};
use crate::error::{Error, Result};
use crate::secret::WrappedDek;

/// What piiguard needs to know of a transit KEK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekInfo {
    /// The version new encryptions use.
    pub latest_version: u32,
    /// Ciphertexts of older versions no longer decrypt.
    pub min_decryption_version: u32,
    /// Versions whose key material is still kept (older ones were trimmed).
    pub min_available_version: u32,
    /// Vault's `auto_rotate_period`, in seconds (0: off).
    pub auto_rotate_period_secs: u64,
    /// Creation time (Unix seconds) of each version still kept, oldest first.
    pub version_created_at: Vec<(u32, i64)>,
}

impl KekInfo {
    /// Parses the `data` of `GET transit/keys/<name>`.
    pub fn parse(d: &Value) -> Option<Self> {
        let num = |k: &str| d[k].as_u64().and_then(|v| u32::try_from(v).ok());
        let mut version_created_at: Vec<(u32, i64)> = d["keys"]
            .as_object()?
            .iter()
            .filter_map(|(v, t)| Some((v.parse().ok()?, created_of(t)?)))
            .collect();
        version_created_at.sort_unstable();
        Some(Self {
            latest_version: num("latest_version")?,
            min_decryption_version: num("min_decryption_version").unwrap_or(1),
            min_available_version: num("min_available_version").unwrap_or(0),
            auto_rotate_period_secs: match &d["auto_rotate_period"] {
                Value::Number(n) => n.as_u64().unwrap_or(0),
                Value::String(s) => parse_go_duration(s).unwrap_or(0),
                _ => 0,
            },
            version_created_at,
        })
    }

    /// Creation time of `version`, if Vault still keeps it.
    pub fn created_at(&self, version: u32) -> Option<i64> {
        self.version_created_at
            .iter()
            .find(|(v, _)| *v == version)
            .map(|(_, t)| *t)
    }
}

/// A symmetric key's version entry is its creation time, Unix seconds (an object with
/// `creation_time` for asymmetric keys, which KEKs are not).
fn created_of(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::Object(_) => Some(0),
        _ => None,
    }
}

/// Seconds of a Go duration string as Vault prints it (`"2160h0m0s"`, `"0s"`).
fn parse_go_duration(s: &str) -> Option<u64> {
    let mut total = 0f64;
    let mut num = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            num.push(c);
            continue;
        }
        let mut unit = c.to_string();
        if c == 'm' && chars.peek() == Some(&'s') {
            unit.push(chars.next()?);
        }
        let n: f64 = num.parse().ok()?;
        num.clear();
        total += n * match unit.as_str() {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            _ => return None,
        };
    }
    if !num.is_empty() {
        total += num.parse::<f64>().ok()?;
    }
    Some(total as u64)
}

impl Vault {
    /// `GET transit/keys/<kek>`: versions and settings of a KEK.
    pub async fn kek_info(&self, kek: &str) -> Result<KekInfo> {
        let path = format!("{}/keys/{kek}", self.cfg.transit_mount);
        let p: &str = &path;
        let v: Value = self
            .call("other", |s| async move {
                let e = endpoints::Raw {
                    method: RequestMethod::GET,
                    path: p,
                    body: None,
                };
                vaultrs::api::exec_with_result(&s.client, e).await
            })
            .await
            .map_err(|e| e.into_error(&format!("transit key {kek}")))?;
        KekInfo::parse(&v)
            .ok_or_else(|| Error::internal(format!("transit key {kek}: unexpected answer")))
    }

    async fn post_empty(&self, path: &str, body: &Value, what: &str) -> Result<()> {
        self.call("other", |s| async move {
            let e = endpoints::Raw {
                method: RequestMethod::POST,
                path,
                body: Some(body),
            };
            vaultrs::api::exec_with_empty(&s.client, e).await
        })
        .await
        .map_err(|e| e.into_error(what))
    }

    /// `POST transit/keys/<kek>/rotate`: a new KEK version; returns the key as it is after.
    pub async fn rotate_kek(&self, kek: &str) -> Result<KekInfo> {
        let path = format!("{}/keys/{kek}/rotate", self.cfg.transit_mount);
        self.post_empty(&path, &json!({}), &format!("transit rotate {kek}"))
            .await?;
        self.kek_info(kek).await
    }

    /// `POST transit/keys/<kek>/config` with `settings` (e.g. `min_decryption_version`,
    /// `auto_rotate_period`).
    pub async fn configure_kek(&self, kek: &str, settings: &Value) -> Result<()> {
        let path = format!("{}/keys/{kek}/config", self.cfg.transit_mount);
        self.post_empty(&path, settings, &format!("transit config {kek}"))
            .await
    }

    /// `POST transit/rewrap/<kek>` with `batch_input`: every wrapped value re-encrypted with the
    /// KEK's latest version, in order, without the plaintext leaving Vault. An error for the
    /// whole batch if any item fails (the caller retries them; a rewrap is idempotent).
    pub async fn rewrap_batch(&self, kek: &str, items: &[&WrappedDek]) -> Result<Vec<WrappedDek>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let path = format!("{}/rewrap/{kek}", self.cfg.transit_mount);
        let what = format!("transit rewrap with {kek}");
        let body = json!({
            "batch_input": items.iter().map(|w| json!({"ciphertext": w.as_str()})).collect::<Vec<_>>()
        });
        let (p, b) = (path.as_str(), &body);
        let v: Value = self
            .call("transit_rewrap", |s| async move {
                let e = endpoints::Raw {
                    method: RequestMethod::POST,
                    path: p,
                    body: Some(b),
                };
                vaultrs::api::exec_with_result(&s.client, e).await
            })
            .await
            .map_err(|e| e.into_error(&what))?;
        let results = v["batch_results"]
            .as_array()
            .ok_or_else(|| Error::internal(format!("{what}: no batch_results")))?;
        if results.len() != items.len() {
            return Err(Error::internal(format!(
                "{what}: {} results for {} items",
                results.len(),
                items.len()
            )));
        }
        results
            .iter()
            .map(|r| {
                if let Some(err) = r["error"].as_str().filter(|e| !e.is_empty()) {
                    return Err(Error::internal(format!("{what}: {err}")));
                }
                r["ciphertext"]
                    .as_str()
                    .and_then(|c| WrappedDek::parse(c).ok())
                    .ok_or_else(|| Error::internal(format!("{what}: bad ciphertext in answer")))
            })
            .collect()
    }

    /// `LIST` of the KV v2 metadata under `prefix` (e.g. `deks/orders`): the keys directly
    /// under it (folders end with `/`), sorted. Empty if there are none.
    pub async fn kv_list(&self, prefix: &str) -> Result<Vec<String>> {
        let path = format!(
            "{}/metadata/{}/",
            self.cfg.kv_mount,
            prefix.trim_end_matches('/')
        );
        let p: &str = &path;
        let r = self
            .call("kv_list", |s| async move {
                let e = endpoints::Raw {
                    method: RequestMethod::LIST,
                    path: p,
                    body: None,
                };
                vaultrs::api::exec_with_result(&s.client, e).await
            })
            .await;
        let v: Value = match r {
            Ok(v) => v,
            Err(e) if e.status() == Some(404) => return Ok(Vec::new()),
            Err(e) => return Err(e.into_error(&format!("KV list {path}"))),
        };
        let mut keys: Vec<String> = v["keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        keys.sort_unstable();
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_info_parses_openbao_answers() {
        let d = json!({
            "latest_version": 3, "min_decryption_version": 2, "min_available_version": 0,
            "auto_rotate_period": 604800, "keys": {"1": 100, "2": 200, "3": 300}, "type": "aes256-gcm96"
        });
        let k = KekInfo::parse(&d).unwrap();
        assert_eq!(k.latest_version, 3);
        assert_eq!(k.min_decryption_version, 2);
        assert_eq!(k.auto_rotate_period_secs, 604_800);
        assert_eq!(k.created_at(2), Some(200));
        assert_eq!(k.version_created_at.len(), 3);
        let mut d2 = d.clone();
        d2["auto_rotate_period"] = json!("2160h0m0s");
        assert_eq!(
            KekInfo::parse(&d2).unwrap().auto_rotate_period_secs,
            2160 * 3600
        );
        assert!(KekInfo::parse(&json!({"keys": {}})).is_none());
    }

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_go_duration("0s"), Some(0));
        assert_eq!(parse_go_duration("1h30m5s"), Some(5405));
        assert_eq!(parse_go_duration("90m"), Some(5400));
        assert_eq!(parse_go_duration("x"), None);
    }
}
