//! `[keyspaces.<ks>.fields.<field>]`: what piiguard knows of a field for blind indexes and
//! masked reveals (docs/SEARCH.md). Every field has settings: a field the config does not name
//! gets [`FieldConfig::default_for`] (its kind from its name, 32-bit index, version 1, the mask
//! of its kind).

use serde::Deserialize;

use super::ConfigError;
use crate::crypto::blind_index::{FieldKind, MAX_BITS, MIN_BITS};
use crate::crypto::mask::Mask;
use crate::domain::names::Field;

/// Index length of a field the config does not set: 32 bits.
pub const DEFAULT_INDEX_BITS: u16 = 32;

/// Most index key versions of one field queryable at once (current included).
pub const MAX_QUERYABLE_VERSIONS: usize = 4;

/// `[keyspaces.<ks>.fields.<field>]` as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawField {
    /// `email`, `phone`, `card`, `name` or `text` (default: from the field's name, else text).
    #[serde(default)]
    pub kind: Option<String>,
    /// Length of the blind index in bits, 8 to 256 (default 32; docs/SEARCH.md#sizing).
    #[serde(default)]
    pub index_bits: Option<u16>,
    /// Index key version that new indexes are made with (default 1).
    #[serde(default)]
    pub index_version: Option<u32>,
    /// Older index key versions still queryable during a migration (default none): a version
    /// number, or `{ version = N, index_bits = B, kind = "K" }` for a version made with other
    /// settings than the current ones (docs/SEARCH.md, rotation procedure).
    #[serde(default)]
    pub index_previous_versions: Vec<RawPrevious>,
    /// Country calling code (digits, no `+`) for phone numbers written without `+`.
    #[serde(default)]
    pub phone_country_code: Option<String>,
    /// Custom mask: characters shown from the start (with `mask_keep_last`; default: the mask
    /// of the field's kind).
    #[serde(default)]
    pub mask_keep_first: Option<u8>,
    /// Custom mask: characters shown from the end.
    #[serde(default)]
    pub mask_keep_last: Option<u8>,
}

/// One entry of `index_previous_versions` as written (a misspelt setting is refused, not
/// ignored: it would compute the old version's indexes with the current settings).
#[derive(Debug, Deserialize)]
#[serde(untagged, deny_unknown_fields)]
pub enum RawPrevious {
    /// The version only: made with the field's current `index_bits` and `kind`.
    Version(u32),
    /// The version and the settings it was made with (each defaults to the current one).
    Settings {
        /// The version.
        version: u32,
        /// Its index length in bits.
        #[serde(default)]
        index_bits: Option<u16>,
        /// Its kind (its normalisation).
        #[serde(default)]
        kind: Option<String>,
    },
}

impl From<u32> for RawPrevious {
    fn from(v: u32) -> Self {
        RawPrevious::Version(v)
    }
}

/// A queryable index key version and the settings its indexes were made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexVersion {
    /// The index key version.
    pub version: u32,
    /// Index length in bits.
    pub index_bits: u16,
    /// Normalisation.
    pub kind: FieldKind,
}

/// The settings of one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldConfig {
    /// How the field's values are normalised and masked.
    pub kind: FieldKind,
    /// Blind index length in bits.
    pub index_bits: u16,
    /// Index key version of new indexes.
    pub index_version: u32,
    /// Older versions still queryable, newest first, each with the settings it was made with.
    pub index_previous_versions: Vec<IndexVersion>,
    /// Default country calling code of phone numbers (digits).
    pub phone_country_code: Option<String>,
    /// What a masked reveal shows.
    pub mask: Mask,
}

impl FieldConfig {
    /// The settings of a field the config does not name.
    pub fn default_for(field: &str) -> Self {
        let kind = FieldKind::default_for_field(field);
        Self {
            kind,
            index_bits: DEFAULT_INDEX_BITS,
            index_version: 1,
            index_previous_versions: Vec::new(),
            phone_country_code: None,
            mask: Mask::Kind(kind),
        }
    }

    /// Every queryable version with its settings, current first.
    pub fn queryable_versions(&self) -> impl Iterator<Item = IndexVersion> + '_ {
        std::iter::once(self.current_version()).chain(self.index_previous_versions.iter().copied())
    }

    /// The version new indexes are made with, and its settings.
    pub fn current_version(&self) -> IndexVersion {
        IndexVersion {
            version: self.index_version,
            index_bits: self.index_bits,
            kind: self.kind,
        }
    }

    /// Validates `[keyspaces.<ks>.fields.<field>]`.
    pub fn from_raw(ks: &str, field: &str, raw: RawField) -> Result<Self, ConfigError> {
        let at = |m: String| ConfigError(format!("keyspaces.{ks}.fields.{field}: {m}"));
        if !Field::is_valid(field) {
            return Err(at("not a valid field name".into()));
        }
        let parse_kind = |k: &str| {
            FieldKind::parse(k).ok_or_else(|| {
                at(format!(
                    "kind {k:?}: expected one of {}",
                    FieldKind::ALL.map(FieldKind::as_str).join(", ")
                ))
            })
        };
        let check_bits = |b: u16| {
            if (MIN_BITS..=MAX_BITS).contains(&b) {
                Ok(b)
            } else {
                Err(at(format!(
                    "index_bits must be between {MIN_BITS} and {MAX_BITS}"
                )))
            }
        };
        let kind = match raw.kind.as_deref() {
            None => FieldKind::default_for_field(field),
            Some(k) => parse_kind(k)?,
        };
        let index_bits = check_bits(raw.index_bits.unwrap_or(DEFAULT_INDEX_BITS))?;
        let index_version = raw.index_version.unwrap_or(1);
        if index_version == 0 {
            return Err(at("index_version starts at 1".into()));
        }
        let mut prev = Vec::with_capacity(raw.index_previous_versions.len());
        for p in raw.index_previous_versions {
            prev.push(match p {
                RawPrevious::Version(version) => IndexVersion {
                    version,
                    index_bits,
                    kind,
                },
                RawPrevious::Settings {
                    version,
                    index_bits: b,
                    kind: k,
                } => IndexVersion {
                    version,
                    index_bits: b.map_or(Ok(index_bits), check_bits)?,
                    kind: k.as_deref().map_or(Ok(kind), parse_kind)?,
                },
            });
        }
        prev.sort_unstable_by_key(|v| std::cmp::Reverse(v.version));
        if prev
            .windows(2)
            .any(|w| w[0].version == w[1].version && w[0] != w[1])
        {
            return Err(at(
                "index_previous_versions names a version twice with different settings".into(),
            ));
        }
        prev.dedup();
        if prev
            .iter()
            .any(|v| v.version == 0 || v.version >= index_version)
        {
            return Err(at(
                "index_previous_versions must be older (lower) than index_version, and at least 1"
                    .into(),
            ));
        }
        if prev.len() + 1 > MAX_QUERYABLE_VERSIONS {
            return Err(at(format!(
                "at most {MAX_QUERYABLE_VERSIONS} index versions can be queryable at once"
            )));
        }
        if let Some(cc) = &raw.phone_country_code
            && (cc.is_empty()
                || cc.len() > 3
                || !cc.bytes().all(|b| b.is_ascii_digit())
                || cc.starts_with('0'))
        {
            return Err(at(
                "phone_country_code is 1 to 3 digits without + (e.g. \"44\")".into(),
            ));
        }
        let mask = match (raw.mask_keep_first, raw.mask_keep_last) {
            (None, None) => Mask::Kind(kind),
            (f, l) => Mask::Keep {
                keep_first: f.unwrap_or(0),
                keep_last: l.unwrap_or(0),
            },
        };
        Ok(Self {
            kind,
            index_bits,
            index_version,
            index_previous_versions: prev,
            phone_country_code: raw.phone_country_code,
            mask,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_field_name() {
        let e = FieldConfig::default_for("email");
        assert_eq!(e.kind, FieldKind::Email);
        assert_eq!(e.mask, Mask::Kind(FieldKind::Email));
        assert_eq!(e.index_bits, 32);
        assert_eq!(
            e.queryable_versions()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            [1]
        );
        assert_eq!(FieldConfig::default_for("address").kind, FieldKind::Text);
    }

    #[test]
    fn bad_field_settings_are_refused() {
        let raw = |f: fn(&mut RawField)| {
            let mut r = RawField::default();
            f(&mut r);
            FieldConfig::from_raw("orders", "email", r)
        };
        assert!(raw(|r| r.kind = Some("iban".into())).is_err());
        assert!(raw(|r| r.index_bits = Some(4)).is_err());
        assert!(raw(|r| r.index_bits = Some(257)).is_err());
        assert!(raw(|r| r.index_version = Some(0)).is_err());
        assert!(raw(|r| r.index_previous_versions = vec![1.into()]).is_err());
        assert!(raw(|r| r.phone_country_code = Some("+44".into())).is_err());
        let ok = raw(|r| {
            r.index_version = Some(3);
            r.index_previous_versions = vec![1.into(), 2.into(), 2.into()];
            r.mask_keep_last = Some(2);
        })
        .unwrap();
        assert_eq!(
            ok.queryable_versions()
                .map(|v| v.version)
                .collect::<Vec<_>>(),
            [3, 2, 1]
        );
        assert_eq!(
            ok.mask,
            Mask::Keep {
                keep_first: 0,
                keep_last: 2
            }
        );
    }

    /// A previous version keeps the settings it was made with when they are given: changing
    /// `index_bits` or `kind` together with a rotation must not change the indexes of the old
    /// rows that are still queried by version 1 (exploratory testing: they were cut to the new
    /// bits and normalised by the new kind, and matched no row).
    #[test]
    fn previous_versions_keep_their_own_settings() {
        let toml = r#"
kind = "email"
index_bits = 16
index_version = 3
index_previous_versions = [{ version = 2, index_bits = 32 }, { version = 1, index_bits = 32, kind = "text" }]
"#;
        let raw: RawField = toml::from_str(toml).unwrap();
        let f = FieldConfig::from_raw("orders", "email", raw).unwrap();
        let v: Vec<IndexVersion> = f.queryable_versions().collect();
        let want = |version, index_bits, kind| IndexVersion {
            version,
            index_bits,
            kind,
        };
        assert_eq!(
            v,
            [
                want(3, 16, FieldKind::Email),
                want(2, 32, FieldKind::Email),
                want(1, 32, FieldKind::Text)
            ]
        );
        // A bare number still means "the current settings"; one version twice with different
        // settings is refused.
        let raw: RawField =
            toml::from_str("index_version = 2\nindex_previous_versions = [1]").unwrap();
        let f = FieldConfig::from_raw("orders", "email", raw).unwrap();
        assert_eq!(f.index_previous_versions[0].index_bits, DEFAULT_INDEX_BITS);
        let raw: RawField = toml::from_str(
            "index_version = 3\nindex_previous_versions = [1, { version = 1, index_bits = 8 }]",
        )
        .unwrap();
        assert!(FieldConfig::from_raw("orders", "email", raw).is_err());
        // A misspelt setting does not parse.
        assert!(
            toml::from_str::<RawField>(
                "index_version = 2\nindex_previous_versions = [{ version = 1, bits = 32 }]"
            )
            .is_err()
        );
    }
}
