//! The subject registry: retention, shred state, tombstones, certificates and the eviction
//! feed that tells every replica to drop a shredded subject's keys.
//!
//! One query layer (sqlx `Any`) over SQLite (default: one file, WAL, `secure_delete=ON`) and
//! PostgreSQL (`postgres://…`), with the same schema. Queries use `$N` placeholders, which both
//! engines accept. Nothing stored here lets anyone recover a key: subjects appear only as keyed
//! hashes (`subject_ref`), keys only as their random ids.

pub mod anchor;
pub mod evictions;
pub mod kek;
pub mod token_writer;
pub mod tokens;

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{AnyPool, Row};

use crate::error::{Error, Result};

/// Shred state of a subject in a keyspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectState {
    /// In use.
    Active,
    /// A shred is scheduled (grace window); data calls are refused.
    Scheduled,
    /// A shred is in progress (its intent is recorded; Vault deletion may not be done yet).
    Shredding,
    /// Keys destroyed and certified.
    Shredded,
}

impl FromStr for SubjectState {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "active" => Self::Active,
            "scheduled" => Self::Scheduled,
            "shredding" => Self::Shredding,
            "shredded" => Self::Shredded,
            other => return Err(Error::internal(format!("store: unknown state {other:?}"))),
        })
    }
}

impl SubjectState {
    /// The stored name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Scheduled => "scheduled",
            Self::Shredding => "shredding",
            Self::Shredded => "shredded",
        }
    }
}

/// `$first, $first+1, …` (`n` placeholders) for an `IN (…)` list.
fn placeholders(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A subject's registry row.
#[derive(Debug, Clone)]
pub struct SubjectRow {
    /// Shred state.
    pub state: SubjectState,
    /// When the row was made (Unix seconds).
    pub created_at: i64,
    /// When it last changed (Unix seconds).
    pub updated_at: i64,
    /// Retention end (Unix seconds), after which the reaper shreds.
    pub retain_until: Option<i64>,
    /// When a scheduled shred runs (Unix seconds).
    pub shred_at: Option<i64>,
    /// Request id of the shred.
    pub request_id: Option<String>,
    /// Reason of the shred.
    pub reason: Option<String>,
    /// When the shred was requested (Unix seconds).
    pub requested_at: Option<i64>,
    /// JSON list of the keys the pending shred destroys (`[{"key_id":…,"dek_version":…}]`).
    pub intent: Option<String>,
    /// When the keys were destroyed (Unix seconds).
    pub executed_at: Option<i64>,
    /// The signed certificate of the last shred.
    pub certificate: Option<String>,
}

/// A subject the reaper should process: due scheduled shred, expired retention, or a shred left
/// half-done. Rows come ordered by `due_at`, then keyspace and subject (the paging cursor).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueRow {
    /// The keyspace (always one of those the caller configured).
    pub keyspace: String,
    /// The subject reference.
    pub subject_ref: String,
    /// Its state.
    pub state: SubjectState,
    /// When it became due: `shred_at`, `retain_until`, or the last lease renewal of a
    /// `shredding` row.
    pub due_at: i64,
}

/// What the store knows of a key id ([`Store::key_owner`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    /// A tombstone names it: its subject was shredded.
    pub shredded: bool,
    /// The subject whose registry row names it.
    pub subject_ref: Option<String>,
}

/// A "drop these keys" message for every replica.
#[derive(Debug, Clone)]
pub struct Eviction {
    /// Position in the feed.
    pub seq: i64,
    /// The keyspace.
    pub keyspace: String,
    /// Keyed hash of the subject.
    pub subject_ref: String,
    /// Key ids to evict (JSON).
    pub intent: String,
}

/// The certificate that completes a shred.
#[derive(Debug, Clone, Copy)]
pub struct Certified<'a> {
    /// Its id (`cod-…`).
    pub certificate_id: &'a str,
    /// The request id of the shred.
    pub request_id: &'a str,
    /// The signed certificate (JSON).
    pub document: &'a str,
    /// When the shred was executed (Unix seconds).
    pub executed_at: i64,
}

/// What a shred is about to do, recorded before it does it.
#[derive(Debug, Clone)]
pub struct ShredClaim<'a> {
    /// Key ids to destroy (JSON).
    pub intent: &'a str,
    /// Request id of the shred.
    pub request_id: &'a str,
    /// Reason of the shred.
    pub reason: &'a str,
    /// When it was requested (Unix seconds).
    pub requested_at: i64,
}

fn db(e: sqlx::Error) -> Error {
    if unavailable(&e) {
        Error::StoreUnavailable {
            detail: format!("store: {e}"),
        }
    } else {
        Error::internal(format!("store: {e}"))
    }
}

/// Whether `e` says the database cannot be reached or cannot take the statement now (server
/// stopped or restarting, connection lost, pool exhausted, disk full, read-only file): a
/// retryable `STORE_UNAVAILABLE`, not an `INTERNAL`. Anything else (a constraint, a bad
/// statement) stays a bug.
fn unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => {
            if let Some(pg) = d.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                pg_code_unavailable(pg.code())
            } else if d.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                d.code()
                    .and_then(|c| c.parse::<i32>().ok())
                    .is_some_and(sqlite_code_unavailable)
            } else {
                false
            }
        }
        _ => false,
    }
}

/// PostgreSQL SQLSTATEs of an unavailable server: class 08 (connection exception), 53
/// (insufficient resources: disk full, out of memory, too many connections), 57P01-57P05
/// (shut down, crashed, starting up, idle session ended), 25006 (read-only transaction: a
/// standby after a fail-over).
fn pg_code_unavailable(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("53") || code.starts_with("57P") || code == "25006"
}

/// SQLite (extended) result codes of a store that cannot take the statement now: BUSY (5),
/// LOCKED (6), READONLY (8), IOERR (10), FULL (13), CANTOPEN (14).
fn sqlite_code_unavailable(extended: i32) -> bool {
    matches!(extended & 0xff, 5 | 6 | 8 | 10 | 13 | 14)
}

/// A PostgreSQL URL, kept for the eviction listener's own connection. It may hold the
/// database password: never printed.
#[derive(Clone)]
struct PgUrl(String);

impl std::fmt::Debug for PgUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgUrl(***)")
    }
}

/// The schema version this binary writes (`schema_version.version`). Raise it with every
/// schema change; see docs/OPERATIONS.md, "Store schema and upgrades".
pub const SCHEMA_VERSION: i64 = 5;

/// The oldest schema version of a binary that can still run on the schema this binary writes
/// (`schema_version.compatible_from`). Raise it only when a change breaks older binaries (a
/// dropped or renamed column, a new NOT NULL column without a default), or when older binaries
/// would misread what this one writes: schema 3 raised it to 3, because a new subject's DEK
/// lives only in its Vault subject record and the registry's `subjects.key_id` (docs/KEYS.md,
/// "Vault layout"), which older binaries cannot find by key id; schema 4 to 4, because it moved
/// token values out of `token_values` (dropped), which older binaries read and write; schema 5
/// to 5, because a random opaque token is stored by the locator it encrypts
/// (`crypto::tokens::locator`; no table changes), which older binaries would look up by its
/// keyed hash and answer `UNKNOWN_TOKEN`.
pub const SCHEMA_COMPATIBLE_FROM: i64 = 5;

/// The PostgreSQL advisory lock key that serialises schema set-up ("piiguard" in ASCII).
pub const MIGRATION_LOCK: i64 = 0x7069_6967_7561_7264;

/// The schema version recorded in a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchemaVersion {
    /// The version of the binary that last migrated the store.
    pub version: i64,
    /// The oldest binary schema version that may use the store.
    pub compatible_from: i64,
}

/// Page cache of each SQLite connection: 32 MiB (negative: KiB), allocated as pages are read.
const SQLITE_CACHE_SIZE: &str = "PRAGMA cache_size = -32768";
/// WAL pages (4 KiB) between automatic checkpoints (SQLite's default: 1,000): at most ~32 MiB
/// of WAL.
const SQLITE_WAL_AUTOCHECKPOINT: &str = "PRAGMA wal_autocheckpoint = 8192";

/// The store.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Set on PostgreSQL (LISTEN/NOTIFY of the eviction feed).
    postgres_url: Option<std::sync::Arc<PgUrl>>,
}

impl Store {
    /// Opens (creating if needed) the store at `url` (`sqlite://path` or `postgres://…`) and
    /// applies the schema.
    pub async fn open(url: &str) -> Result<Self> {
        install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' })
        } else {
            url.to_string()
        };
        let mut opts = AnyPoolOptions::new()
            .max_connections(if sqlite { 4 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            // A SQLite connection is a local file: a ping before each use (a round trip to
            // its worker thread) finds nothing the query itself would not.
            .test_before_acquire(!sqlite);
        if sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    use sqlx::Executor as _;
                    conn.execute("PRAGMA busy_timeout = 10000").await?;
                    conn.execute("PRAGMA secure_delete = ON").await?;
                    conn.execute("PRAGMA foreign_keys = ON").await?;
                    conn.execute("PRAGMA synchronous = NORMAL").await?;
                    // Tokens stored by keyed hash (all but random opaque ones, which append
                    // by locator) insert random keys into an index, so every such row touches
                    // another leaf page. With SQLite's defaults (a 2 MiB page
                    // cache, a checkpoint every 1,000 WAL pages) a random Tokenize spent ~15%
                    // of the store thread re-reading evicted pages and ~30% in checkpoints
                    // (profile in bench/RESULTS.md). A bigger cache keeps the indexes in
                    // memory (pages are allocated as used: at most this per connection, 4
                    // pooled and the token writer's own: 160 MiB on a store past that); a
                    // checkpoint every SQLITE_WAL_AUTOCHECKPOINT pages copies each page once
                    // for the many commits that dirtied it meanwhile (and fsyncs less often).
                    // Durability is unchanged: a commit is in the WAL before its caller hears.
                    conn.execute(SQLITE_CACHE_SIZE).await?;
                    conn.execute(SQLITE_WAL_AUTOCHECKPOINT).await?;
                    Ok(())
                })
            });
        }
        let pool = opts
            .connect(&url)
            .await
            .map_err(|e| Error::internal(format!("cannot open store: {e}")))?;
        let postgres_url = (url.starts_with("postgres:") || url.starts_with("postgresql:"))
            .then(|| std::sync::Arc::new(PgUrl(url.clone())));
        let store = Self { pool, postgres_url };
        store.migrate(sqlite).await?;
        Ok(store)
    }

    /// Applies the schema, serialised across processes: on PostgreSQL every statement runs in
    /// one transaction holding the advisory lock [`MIGRATION_LOCK`] (replicas started together
    /// wait for each other instead of racing on the catalog); on SQLite in one `BEGIN
    /// IMMEDIATE` transaction (the write lock, waited for up to `busy_timeout`). A store whose
    /// recorded schema is newer than [`SCHEMA_VERSION`] is left untouched; it is used if it
    /// accepts this binary ([`SchemaVersion::compatible_from`]), otherwise the start is refused.
    async fn migrate(&self, sqlite: bool) -> Result<()> {
        if sqlite {
            // Not allowed inside a transaction; idempotent.
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&self.pool)
                .await
                .map_err(db)?;
        }
        let mut tx = self
            .pool
            .begin_with(if sqlite { "BEGIN IMMEDIATE" } else { "BEGIN" })
            .await
            .map_err(db)?;
        if !sqlite {
            // Released at commit or rollback (also if this process dies mid-way).
            sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock($1)")
                .bind(MIGRATION_LOCK)
                .fetch_one(&mut *tx)
                .await
                .map_err(db)?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_version (
                id BIGINT PRIMARY KEY,
                version BIGINT NOT NULL,
                compatible_from BIGINT NOT NULL,
                updated_at BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let found = Self::schema_version_in(&mut tx).await?;
        if let Some(v) = found
            && v.version > SCHEMA_VERSION
        {
            if v.compatible_from > SCHEMA_VERSION {
                return Err(Error::internal(format!(
                    "the store's schema is version {} and needs a binary of schema version {} or later; this binary writes version {SCHEMA_VERSION}: upgrade piiguard (or roll the store back)",
                    v.version, v.compatible_from
                )));
            }
            tracing::info!(
                store_schema = v.version,
                binary_schema = SCHEMA_VERSION,
                "the store's schema is newer than this binary's but compatible with it: used as it is"
            );
            tx.commit().await.map_err(db)?;
            return Ok(());
        }
        let serial = if sqlite {
            "INTEGER PRIMARY KEY AUTOINCREMENT"
        } else {
            "BIGSERIAL PRIMARY KEY"
        };
        let ddl = [
            "CREATE TABLE IF NOT EXISTS subjects (
                keyspace TEXT NOT NULL,
                subject_ref TEXT NOT NULL,
                state TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                retain_until BIGINT,
                shred_at BIGINT,
                request_id TEXT,
                reason TEXT,
                requested_at BIGINT,
                intent TEXT,
                executed_at BIGINT,
                certificate TEXT,
                PRIMARY KEY (keyspace, subject_ref))"
                .to_string(),
            "CREATE INDEX IF NOT EXISTS subjects_by_state ON subjects (state, shred_at)".into(),
            "CREATE INDEX IF NOT EXISTS subjects_by_retention ON subjects (state, retain_until)"
                .into(),
            "CREATE TABLE IF NOT EXISTS tombstones (
                keyspace TEXT NOT NULL,
                key_id TEXT NOT NULL,
                subject_ref TEXT NOT NULL,
                shredded_at BIGINT NOT NULL,
                PRIMARY KEY (keyspace, key_id))"
                .into(),
            format!(
                "CREATE TABLE IF NOT EXISTS evictions (
                    seq {serial},
                    keyspace TEXT NOT NULL,
                    subject_ref TEXT NOT NULL,
                    intent TEXT NOT NULL,
                    at BIGINT NOT NULL)"
            ),
            // Encryptions reserved per DEK version (docs/KEYS.md#usage-limits); added in
            // schema 2 (older binaries do not read it).
            "CREATE TABLE IF NOT EXISTS dek_uses (
                keyspace TEXT NOT NULL,
                key_id TEXT NOT NULL,
                dek_version BIGINT NOT NULL,
                reserved BIGINT NOT NULL,
                first_at BIGINT NOT NULL,
                PRIMARY KEY (keyspace, key_id, dek_version))"
                .into(),
            "CREATE TABLE IF NOT EXISTS certificates (
                certificate_id TEXT PRIMARY KEY,
                keyspace TEXT NOT NULL,
                subject_ref TEXT NOT NULL,
                request_id TEXT NOT NULL,
                issued_at BIGINT NOT NULL,
                document TEXT NOT NULL)"
                .into(),
        ];
        for stmt in ddl {
            // The only non-literal part is the serial column type chosen above.
            sqlx::query(sqlx::AssertSqlSafe(stmt))
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        // Added after the first release: also upgrades an existing database. Reaper backoff
        // (`reap_attempts`, `reap_next_at`) and the owner of a shred's lease (`lease_owner`;
        // the lease runs `erasure.stale_shred_secs` from `updated_at`).
        // Schema 3: the subject's key id (`key_id`, hex), by which a DEK that has only its
        // Vault subject record is found from a ciphertext ([`Store::subject_of_key`]).
        for (column, ddl) in [
            ("reap_attempts", "BIGINT NOT NULL DEFAULT 0"),
            ("reap_next_at", "BIGINT"),
            ("lease_owner", "TEXT"),
            ("key_id", "TEXT"),
        ] {
            Self::add_column(&mut tx, sqlite, "subjects", column, ddl).await?;
        }
        sqlx::query("CREATE INDEX IF NOT EXISTS subjects_by_key ON subjects (keyspace, key_id)")
            .execute(&mut *tx)
            .await
            .map_err(db)?;
        Self::migrate_tokens(&mut tx, sqlite).await?;
        Self::migrate_anchors(&mut tx).await?;
        Self::migrate_kek(&mut tx).await?;
        sqlx::query(
            "INSERT INTO schema_version (id, version, compatible_from, updated_at)
             VALUES (1, $1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET version = $1, compatible_from = $2, updated_at = $3",
        )
        .bind(SCHEMA_VERSION)
        .bind(SCHEMA_COMPATIBLE_FROM)
        .bind(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)),
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)
    }

    /// The recorded schema version, if any (a store made before versions were recorded has
    /// none).
    async fn schema_version_in(conn: &mut sqlx::AnyConnection) -> Result<Option<SchemaVersion>> {
        let row = sqlx::query("SELECT version, compatible_from FROM schema_version WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?;
        row.map(|r| {
            Ok(SchemaVersion {
                version: r.try_get("version").map_err(db)?,
                compatible_from: r.try_get("compatible_from").map_err(db)?,
            })
        })
        .transpose()
    }

    /// The schema version recorded in the store (`None` for a store made before versions were
    /// recorded).
    pub async fn schema_version(&self) -> Result<Option<SchemaVersion>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        Self::schema_version_in(&mut conn).await
    }

    /// `ALTER TABLE table ADD COLUMN`, unless the column exists (SQLite has no `ADD COLUMN IF
    /// NOT EXISTS`). Runs inside the migration transaction, under its lock: no other replica
    /// adds the column meanwhile.
    pub(super) async fn add_column(
        conn: &mut sqlx::AnyConnection,
        sqlite: bool,
        table: &'static str,
        column: &'static str,
        ddl: &'static str,
    ) -> Result<()> {
        let probe = if sqlite {
            "SELECT 1 AS found FROM pragma_table_info($1) WHERE name = $2"
        } else {
            "SELECT 1 AS found FROM information_schema.columns
             WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2"
        };
        let exists = sqlx::query(probe)
            .bind(table)
            .bind(column)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?
            .is_some();
        if !exists {
            // Only the constant names of this file's callers are spliced in.
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "ALTER TABLE {table} ADD COLUMN {column} {ddl}"
            )))
            .execute(&mut *conn)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    /// The registry row of a subject.
    pub async fn subject(&self, keyspace: &str, subject_ref: &str) -> Result<Option<SubjectRow>> {
        let row = sqlx::query(
            "SELECT state, created_at, updated_at, retain_until, shred_at, request_id, reason,
                    requested_at, intent, executed_at, certificate
             FROM subjects WHERE keyspace = $1 AND subject_ref = $2",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(SubjectRow {
                state: r.try_get::<String, _>("state").map_err(db)?.parse()?,
                created_at: r.try_get("created_at").map_err(db)?,
                updated_at: r.try_get("updated_at").map_err(db)?,
                retain_until: r.try_get("retain_until").map_err(db)?,
                shred_at: r.try_get("shred_at").map_err(db)?,
                request_id: r.try_get("request_id").map_err(db)?,
                reason: r.try_get("reason").map_err(db)?,
                requested_at: r.try_get("requested_at").map_err(db)?,
                intent: r.try_get("intent").map_err(db)?,
                executed_at: r.try_get("executed_at").map_err(db)?,
                certificate: r.try_get("certificate").map_err(db)?,
            })
        })
        .transpose()
    }

    /// Records a subject key (first use, or first use after a shred) with its key id (hex;
    /// [`subject_of_key`](Self::subject_of_key) finds the subject by it). An existing row is
    /// left as it is, except that a row without a key id gets this one, and that a shredded
    /// subject becomes active again (with this key id) when `reactivate` is set: only when the
    /// keyspace allows new keys after a shred (`after_shred = "new_key"`) and the caller saw the
    /// subject shredded before it made the key (so the key cannot be one the shred listed). The
    /// caller reads the state again afterwards: anything but `active` means the key must not be
    /// used.
    pub async fn register_subject(
        &self,
        keyspace: &str,
        subject_ref: &str,
        key_id: &str,
        now: i64,
        retain_until: Option<i64>,
        reactivate: bool,
    ) -> Result<()> {
        let sql = if reactivate {
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until, key_id)
             VALUES ($1, $2, 'active', $3, $3, $4, $5)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'active', created_at = $3, updated_at = $3, retain_until = $4,
                 shred_at = NULL, intent = NULL, reap_attempts = 0, reap_next_at = NULL,
                 lease_owner = NULL, key_id = $5
             WHERE subjects.state = 'shredded'"
        } else {
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until, key_id)
             VALUES ($1, $2, 'active', $3, $3, $4, $5)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE SET key_id = $5
             WHERE subjects.key_id IS NULL"
        };
        sqlx::query(sql)
            .bind(keyspace)
            .bind(subject_ref)
            .bind(now)
            .bind(retain_until)
            .bind(key_id)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(())
    }

    /// The subject whose key has id `key_id` (hex), as recorded by
    /// [`register_subject`](Self::register_subject); `None` for a key id the registry does not
    /// know (a key of a schema-2 binary, which has its Vault DEK record, or no key at all).
    pub async fn subject_of_key(&self, keyspace: &str, key_id: &str) -> Result<Option<String>> {
        let r = sqlx::query(
            "SELECT subject_ref FROM subjects WHERE keyspace = $1 AND key_id = $2 LIMIT 1",
        )
        .bind(keyspace)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        r.map(|r| r.try_get("subject_ref").map_err(db)).transpose()
    }

    /// What the store knows of a key id, in one round trip: whether it is tombstoned (shredded)
    /// and which subject's registry row names it (`None`: a key made before schema 3 and not
    /// yet re-recorded, a store restored from an older backup, or no such key).
    pub async fn key_owner(&self, keyspace: &str, key_id: &str) -> Result<KeyOwner> {
        let r = sqlx::query(
            "SELECT (SELECT 1 FROM tombstones WHERE keyspace = $1 AND key_id = $2) AS shredded,
                    (SELECT subject_ref FROM subjects WHERE keyspace = $1 AND key_id = $2 LIMIT 1)
                      AS subject_ref",
        )
        .bind(keyspace)
        .bind(key_id)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let shredded: Option<i32> = r.try_get("shredded").map_err(db)?;
        let subject_ref: Option<String> = r.try_get("subject_ref").map_err(db)?;
        Ok(KeyOwner {
            shredded: shredded.is_some(),
            subject_ref,
        })
    }

    /// Sets a subject's retention deadline (creating its row if needed).
    pub async fn set_retention(
        &self,
        keyspace: &str,
        subject_ref: &str,
        retain_until: Option<i64>,
        now: i64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, retain_until)
             VALUES ($1, $2, 'active', $3, $3, $4)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE SET retain_until = $4, updated_at = $3",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(retain_until)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Schedules a shred at `shred_at` if the subject is active (or unregistered). Returns
    /// whether this call scheduled it.
    pub async fn schedule(
        &self,
        keyspace: &str,
        subject_ref: &str,
        shred_at: i64,
        claim: &ShredClaim<'_>,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at, shred_at,
                                   request_id, reason, requested_at, intent)
             VALUES ($1, $2, 'scheduled', $3, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'scheduled', updated_at = $3, shred_at = $4, request_id = $5,
                 reason = $6, requested_at = $7, intent = $8
             WHERE subjects.state = 'active'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(shred_at)
        .bind(claim.request_id)
        .bind(claim.reason)
        .bind(claim.requested_at)
        .bind(claim.intent)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Cancels a scheduled shred. Returns whether one was cancelled.
    pub async fn cancel(&self, keyspace: &str, subject_ref: &str, now: i64) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET state = 'active', updated_at = $3, shred_at = NULL,
                    request_id = NULL, reason = NULL, requested_at = NULL, intent = NULL,
                    reap_attempts = 0, reap_next_at = NULL
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'scheduled'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Claims an immediate shred: records its intent and moves the subject to `shredding`,
    /// atomically, only from `active` (or unregistered), with the lease held by `owner`.
    /// Returns whether this call claimed it.
    pub async fn claim_shred(
        &self,
        keyspace: &str,
        subject_ref: &str,
        claim: &ShredClaim<'_>,
        now: i64,
        owner: &str,
    ) -> Result<bool> {
        let r = sqlx::query(
            "INSERT INTO subjects (keyspace, subject_ref, state, created_at, updated_at,
                                   request_id, reason, requested_at, intent, lease_owner)
             VALUES ($1, $2, 'shredding', $3, $3, $4, $5, $6, $7, $8)
             ON CONFLICT (keyspace, subject_ref) DO UPDATE
             SET state = 'shredding', updated_at = $3, request_id = $4, reason = $5,
                 requested_at = $6, intent = $7, lease_owner = $8
             WHERE subjects.state = 'active'",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(claim.request_id)
        .bind(claim.reason)
        .bind(claim.requested_at)
        .bind(claim.intent)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Moves a due scheduled shred, or a `shredding` row whose lease was not renewed since
    /// `stale_before` (its process died), to `shredding` with the lease held by `owner`, in
    /// one atomic statement. Returns whether the caller won (exactly one caller does).
    pub async fn claim_pending(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
        stale_before: i64,
        owner: &str,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET state = 'shredding', updated_at = $3, lease_owner = $5
             WHERE keyspace = $1 AND subject_ref = $2
               AND ((state = 'scheduled' AND shred_at <= $3)
                    OR (state = 'shredding' AND updated_at < $4))",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(stale_before)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// One page of the subjects the reaper should process, in the configured `keyspaces` only:
    /// scheduled shreds due at `now`, retentions passed at `now`, and shreds left half-done
    /// (`shredding` with a lease not renewed since `stale_before`); rows in their retry backoff
    /// (`reap_next_at` after `now`) are left out. Ordered by due time, then keyspace and
    /// subject; `after` (the last row of the previous page) resumes the scan.
    pub async fn due(
        &self,
        now: i64,
        stale_before: i64,
        keyspaces: &[&str],
        after: Option<&DueRow>,
        limit: i64,
    ) -> Result<Vec<DueRow>> {
        if keyspaces.is_empty() {
            return Ok(Vec::new());
        }
        let (c_at, c_ks, c_ref) = after
            .map(|r| (r.due_at, r.keyspace.as_str(), r.subject_ref.as_str()))
            .unwrap_or((i64::MIN, "", ""));
        let sql = format!(
            "SELECT keyspace, subject_ref, state, due_at FROM (
                SELECT keyspace, subject_ref, state,
                       CASE state WHEN 'scheduled' THEN shred_at
                                  WHEN 'active' THEN retain_until
                                  ELSE updated_at END AS due_at
                FROM subjects
                WHERE ((state = 'scheduled' AND shred_at <= $1)
                       OR (state = 'active' AND retain_until IS NOT NULL AND retain_until <= $1)
                       OR (state = 'shredding' AND updated_at < $2))
                  AND (reap_next_at IS NULL OR reap_next_at <= $1)
                  AND keyspace IN ({})) d
             WHERE d.due_at > $3 OR (d.due_at = $3 AND (d.keyspace > $4
                   OR (d.keyspace = $4 AND d.subject_ref > $5)))
             ORDER BY d.due_at, d.keyspace, d.subject_ref
             LIMIT $6",
            placeholders(7, keyspaces.len())
        );
        // The only non-literal part is the list of `$N` placeholders.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(stale_before)
            .bind(c_at)
            .bind(c_ks)
            .bind(c_ref)
            .bind(limit);
        for ks in keyspaces {
            q = q.bind(*ks);
        }
        let rows = q.fetch_all(&self.pool).await.map_err(db)?;
        rows.into_iter()
            .map(|r| {
                Ok(DueRow {
                    keyspace: r.try_get("keyspace").map_err(db)?,
                    subject_ref: r.try_get("subject_ref").map_err(db)?,
                    state: r.try_get::<String, _>("state").map_err(db)?.parse()?,
                    due_at: r.try_get("due_at").map_err(db)?,
                })
            })
            .collect()
    }

    /// How many rows would be due now in keyspaces that are not configured (the reaper cannot
    /// process them: their retention promise is not being kept; reported, not deleted).
    pub async fn due_unconfigured(
        &self,
        now: i64,
        stale_before: i64,
        keyspaces: &[&str],
    ) -> Result<i64> {
        let not_in = if keyspaces.is_empty() {
            String::new()
        } else {
            format!("AND keyspace NOT IN ({})", placeholders(3, keyspaces.len()))
        };
        let sql = format!(
            "SELECT COUNT(*) AS n FROM subjects
             WHERE ((state = 'scheduled' AND shred_at <= $1)
                    OR (state = 'active' AND retain_until IS NOT NULL AND retain_until <= $1)
                    OR (state = 'shredding' AND updated_at < $2))
               {not_in}"
        );
        // The only non-literal part is the list of `$N` placeholders.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(now)
            .bind(stale_before);
        for ks in keyspaces {
            q = q.bind(*ks);
        }
        let r = q.fetch_one(&self.pool).await.map_err(db)?;
        r.try_get("n").map_err(db)
    }

    /// Records a failed reaper attempt at a subject: one more consecutive failure, and no new
    /// attempt before `now + backoff(attempts)`. Returns the number of consecutive failures,
    /// counted atomically (each failure, on any replica, gets its own number).
    pub async fn reap_failed(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
        backoff: impl Fn(i64) -> i64,
    ) -> Result<i64> {
        let row = sqlx::query(
            "UPDATE subjects SET reap_attempts = reap_attempts + 1
             WHERE keyspace = $1 AND subject_ref = $2
             RETURNING reap_attempts",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        let Some(row) = row else { return Ok(0) };
        let attempts: i64 = row.try_get("reap_attempts").map_err(db)?;
        sqlx::query(
            "UPDATE subjects SET reap_next_at = $3 WHERE keyspace = $1 AND subject_ref = $2",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now.saturating_add(backoff(attempts)))
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(attempts)
    }

    /// How many subjects have failed at least `min_attempts` reaper attempts in a row.
    pub async fn reap_failing(&self, min_attempts: i64) -> Result<i64> {
        let r = sqlx::query("SELECT COUNT(*) AS n FROM subjects WHERE reap_attempts >= $1")
            .bind(min_attempts)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        r.try_get("n").map_err(db)
    }

    /// Replaces the recorded intent (keys to destroy) of a subject in `state`. Returns whether
    /// the row was still in that state.
    pub async fn record_intent(
        &self,
        keyspace: &str,
        subject_ref: &str,
        intent: &str,
        state: SubjectState,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET intent = $3
             WHERE keyspace = $1 AND subject_ref = $2 AND state = $4",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(intent)
        .bind(state.as_str())
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Records tombstones for destroyed key ids (idempotent).
    pub async fn add_tombstones(
        &self,
        keyspace: &str,
        subject_ref: &str,
        key_ids: &[String],
        now: i64,
    ) -> Result<()> {
        for kid in key_ids {
            sqlx::query(
                "INSERT INTO tombstones (keyspace, key_id, subject_ref, shredded_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (keyspace, key_id) DO NOTHING",
            )
            .bind(keyspace)
            .bind(kid)
            .bind(subject_ref)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        }
        Ok(())
    }

    /// The tombstone of a key id: (subject_ref, shredded_at).
    pub async fn tombstone(&self, keyspace: &str, key_id: &str) -> Result<Option<(String, i64)>> {
        let r = sqlx::query(
            "SELECT subject_ref, shredded_at FROM tombstones WHERE keyspace = $1 AND key_id = $2",
        )
        .bind(keyspace)
        .bind(key_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        r.map(|r| {
            Ok((
                r.try_get("subject_ref").map_err(db)?,
                r.try_get("shredded_at").map_err(db)?,
            ))
        })
        .transpose()
    }

    /// Reserves `block` more encryptions of one DEK version for this process, in one round
    /// trip: returns the total reserved so far across every replica and restart (this block
    /// included) and when the first block was reserved (Unix seconds). A process that dies
    /// loses its unused part, which stays counted as used.
    pub async fn reserve_dek_uses(
        &self,
        keyspace: &str,
        key_id: &str,
        dek_version: u32,
        block: u64,
        now: i64,
    ) -> Result<(u64, i64)> {
        let block = i64::try_from(block).unwrap_or(i64::MAX);
        let row = sqlx::query(
            "INSERT INTO dek_uses (keyspace, key_id, dek_version, reserved, first_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (keyspace, key_id, dek_version)
             DO UPDATE SET reserved = dek_uses.reserved + excluded.reserved
             RETURNING reserved, first_at",
        )
        .bind(keyspace)
        .bind(key_id)
        .bind(i64::from(dek_version))
        .bind(block)
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?;
        let reserved: i64 = row.try_get("reserved").map_err(db)?;
        let first_at: i64 = row.try_get("first_at").map_err(db)?;
        Ok((u64::try_from(reserved).unwrap_or(0), first_at))
    }

    /// The most encryptions reserved for any one DEK version of a keyspace (0 if none): how
    /// close the most used key is to `max_dek_uses`, for `Keys.GetKeyStatus`.
    pub async fn max_dek_uses(&self, keyspace: &str) -> Result<u64> {
        let row =
            sqlx::query("SELECT COALESCE(MAX(reserved), 0) AS m FROM dek_uses WHERE keyspace = $1")
                .bind(keyspace)
                .fetch_one(&self.pool)
                .await
                .map_err(db)?;
        let m: i64 = row.try_get("m").map_err(db)?;
        Ok(u64::try_from(m).unwrap_or(0))
    }

    /// Publishes an eviction for every replica: one transaction that inserts the row and, on
    /// PostgreSQL, notifies the listeners ([`evictions::EVICTIONS_CHANNEL`], delivered at
    /// commit). Readers must use [`next_evictions`](Self::next_evictions): the row's seq is
    /// drawn before the commit, so rows can become visible out of seq order.
    pub async fn publish_eviction(
        &self,
        keyspace: &str,
        subject_ref: &str,
        intent: &str,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        sqlx::query(
            "INSERT INTO evictions (keyspace, subject_ref, intent, at) VALUES ($1, $2, $3, $4)",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(intent)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        crate::config::failpoint::point("publish-eviction-before-commit").await;
        if self.postgres_url.is_some() {
            // A constant statement; the simple query protocol (NOTIFY has no parameters).
            sqlx::raw_sql("NOTIFY piiguard_evictions")
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        }
        tx.commit().await.map_err(db)?;
        Ok(())
    }

    /// Evictions after `seq`, oldest first. Only the rows committed when the query runs: a
    /// reader that moves past the highest seq it saw must also ask again for the seqs it
    /// skipped (see [`evictions::EvictionFeed`]).
    pub async fn evictions_since(&self, seq: i64, limit: i64) -> Result<Vec<Eviction>> {
        let rows = sqlx::query(
            "SELECT seq, keyspace, subject_ref, intent FROM evictions WHERE seq > $1
             ORDER BY seq LIMIT $2",
        )
        .bind(seq)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        rows.into_iter()
            .map(|r| {
                Ok(Eviction {
                    seq: r.try_get("seq").map_err(db)?,
                    keyspace: r.try_get("keyspace").map_err(db)?,
                    subject_ref: r.try_get("subject_ref").map_err(db)?,
                    intent: r.try_get("intent").map_err(db)?,
                })
            })
            .collect()
    }

    /// Deletes evictions older than `before` (every replica has read them long ago: they are
    /// kept far longer than the poll interval). Returns how many were deleted.
    pub async fn prune_evictions(&self, before: i64) -> Result<u64> {
        let r = sqlx::query("DELETE FROM evictions WHERE at < $1")
            .bind(before)
            .execute(&self.pool)
            .await
            .map_err(db)?;
        Ok(r.rows_affected())
    }

    /// The newest eviction sequence number (0 if none).
    pub async fn last_eviction_seq(&self) -> Result<i64> {
        let r = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS m FROM evictions")
            .fetch_one(&self.pool)
            .await
            .map_err(db)?;
        r.try_get("m").map_err(db)
    }

    /// Completes a shred: stores the certificate and marks the subject shredded, if it is
    /// still `shredding` and `owner` still holds its lease. Returns whether this call
    /// completed it.
    pub async fn finish_shred(
        &self,
        keyspace: &str,
        subject_ref: &str,
        owner: &str,
        cert: &Certified<'_>,
    ) -> Result<bool> {
        let Certified {
            certificate_id,
            request_id,
            document,
            executed_at,
        } = *cert;
        let mut tx = self.pool.begin().await.map_err(db)?;
        let r = sqlx::query(
            "UPDATE subjects SET state = 'shredded', updated_at = $3, executed_at = $3,
                    certificate = $4, shred_at = NULL, retain_until = NULL,
                    reap_attempts = 0, reap_next_at = NULL, lease_owner = NULL
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'shredding'
               AND lease_owner = $5",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(executed_at)
        .bind(document)
        .bind(owner)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        if r.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO certificates (certificate_id, keyspace, subject_ref, request_id, issued_at, document)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(certificate_id)
        .bind(keyspace)
        .bind(subject_ref)
        .bind(request_id)
        .bind(executed_at)
        .bind(document)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(true)
    }

    /// Renews `owner`'s lease on a `shredding` row so that other replicas do not take it over
    /// while this one works on it. Returns false if the lease is lost (taken over, or the
    /// shred finished): the caller must stop.
    pub async fn renew_lease(
        &self,
        keyspace: &str,
        subject_ref: &str,
        owner: &str,
        now: i64,
    ) -> Result<bool> {
        let r = sqlx::query(
            "UPDATE subjects SET updated_at = $3
             WHERE keyspace = $1 AND subject_ref = $2 AND state = 'shredding'
               AND lease_owner = $4",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(db)?;
        Ok(r.rows_affected() == 1)
    }

    /// Returns the state of a subject without the rest of the row (cold-path check).
    pub async fn state(&self, keyspace: &str, subject_ref: &str) -> Result<Option<SubjectState>> {
        let r = sqlx::query("SELECT state FROM subjects WHERE keyspace = $1 AND subject_ref = $2")
            .bind(keyspace)
            .bind(subject_ref)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        r.map(|r| r.try_get::<String, _>("state").map_err(db)?.parse())
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every pooled SQLite connection runs with the token-write tuning (a bigger page cache,
    /// checkpoints every 8,192 WAL pages), not SQLite's defaults (2 MiB, 1,000 pages).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_connections_have_the_write_tuning() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", d.path().join("t.db").display());
        let s = Store::open(&url).await.unwrap();
        // Several connections at once, so more than one of the pool is asked.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = s.pool.acquire().await.unwrap();
            let cache: i64 = sqlx::query("PRAGMA cache_size")
                .fetch_one(&mut *c)
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
            let ckpt: i64 = sqlx::query("PRAGMA wal_autocheckpoint")
                .fetch_one(&mut *c)
                .await
                .unwrap()
                .try_get(0)
                .unwrap();
            assert_eq!((cache, ckpt), (-32768, 8192));
            held.push(c);
        }
    }

    #[test]
    fn unavailable_codes_are_told_from_bugs() {
        for c in [
            "08006", "08001", "57P01", "57P03", "53100", "53300", "25006",
        ] {
            assert!(pg_code_unavailable(c), "{c}");
        }
        for c in ["23505", "42P01", "42601", "40001", "22P02"] {
            assert!(!pg_code_unavailable(c), "{c}");
        }
        // BUSY, READONLY, READONLY_DBMOVED (8 | 4 << 8), IOERR_WRITE (10 | 3 << 8), FULL.
        for c in [5, 8, 1032, 778, 13, 14] {
            assert!(sqlite_code_unavailable(c), "{c}");
        }
        // CONSTRAINT_PRIMARYKEY, ERROR, CORRUPT.
        for c in [1555, 1, 11] {
            assert!(!sqlite_code_unavailable(c), "{c}");
        }
    }

    /// The same SQLite file through a one-connection pool on which `pragma` runs first.
    async fn limited(url: &str, pragma: String) -> Store {
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .after_connect(move |conn, _| {
                let pragma = pragma.clone();
                Box::pin(async move {
                    sqlx::query(sqlx::AssertSqlSafe(pragma))
                        .execute(&mut *conn)
                        .await?;
                    Ok(())
                })
            })
            .connect(url)
            .await
            .unwrap();
        Store {
            pool,
            postgres_url: None,
        }
    }

    /// A full disk (SQLite's page limit: the same SQLITE_FULL an ENOSPC gives) and a
    /// read-only database: writes fail as STORE_UNAVAILABLE, change nothing, and work once
    /// the store can be written again. (Tests run as root in CI, where `chmod` does not make a
    /// file read-only: the pragmas give SQLite's own codes for both faults.)
    #[tokio::test]
    async fn sqlite_full_or_read_only_is_store_unavailable() {
        let d = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", d.path().join("t.db").display());
        let s = Store::open(&url).await.unwrap();
        s.register_subject("ks", "before", "00", 1, None, false)
            .await
            .unwrap();
        let pages: i64 = sqlx::query("PRAGMA page_count")
            .fetch_one(&s.pool)
            .await
            .unwrap()
            .get(0);
        // One page of room: the big row below needs overflow pages.
        let full = limited(&url, format!("PRAGMA max_page_count = {}", pages + 1)).await;
        let big = "x".repeat(64 * 1024);
        let e = full
            .register_subject("ks", &big, "00", 2, None, false)
            .await
            .expect_err("disk full");
        assert_eq!(e.reason(), crate::error::Reason::StoreUnavailable, "{e:?}");
        let ro = limited(&url, "PRAGMA query_only = ON".into()).await;
        let e = ro
            .register_subject("ks", "ro", "00", 2, None, false)
            .await
            .expect_err("read-only");
        assert_eq!(e.reason(), crate::error::Reason::StoreUnavailable, "{e:?}");
        // Reads still work; nothing was written.
        assert_eq!(ro.state("ks", "ro").await.unwrap(), None);
        assert_eq!(s.state("ks", &big).await.unwrap(), None);
        // Writable again: the same writes succeed.
        s.register_subject("ks", &big, "00", 3, None, false)
            .await
            .unwrap();
        s.register_subject("ks", "ro", "00", 3, None, false)
            .await
            .unwrap();
        assert_eq!(
            s.state("ks", "ro").await.unwrap(),
            Some(SubjectState::Active)
        );
    }
}
