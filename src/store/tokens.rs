//! Token tables. No plaintext and no raw subject id: a token is stored only as a keyed hash
//! of itself (`token_hash`), a deterministic token's value only as a keyed hash
//! (`value_hash`), the value only sealed under the subject's DEK, the subject only as its
//! `subject_ref`.
//!
//! `token_map` has one row per token (unique `token_hash` per keyspace: two values can never
//! share a token; a colliding insert fails and the caller draws again), and in that row the
//! sealed value of its first holder (`subject_ref`, `sealed`): a new token is **one** row
//! insert (schema 4; earlier schemas wrote a second row into a `token_values` table, a second
//! random-key B-tree insert per token). `token_holders` holds the sealed value of every
//! further subject that tokenised the same value (a join token, `DETERMINISTIC_JOIN` or a
//! deterministic token made before per-subject scope, can belong to several subjects with the
//! same value; any other token holds one subject's value, in its `token_map` row). A shred
//! deletes the subject's values (clears the row's slot, deletes its `token_holders` rows) and
//! turns tokens left without any value into `shredded` tombstones; expiry deletes the values
//! and leaves `expired` tombstones, so Detokenize can still say why.

use std::collections::HashSet;

use sqlx::pool::PoolConnection;
use sqlx::{Any, Connection as _, Row};

use super::{Store, db};
use crate::error::Result;

/// Rows per multi-row `INSERT` (11 parameters each: far below SQLite's and PostgreSQL's
/// parameter limits; a small set of statement shapes for the statement cache).
const ROWS_PER_STATEMENT: usize = 32;

/// State of a token row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// In use.
    Live,
    /// Past its TTL.
    Expired,
    /// Keys destroyed and certified.
    Shredded,
}

impl TokenState {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "live" => Self::Live,
            "expired" => Self::Expired,
            "shredded" => Self::Shredded,
            other => {
                return Err(crate::error::Error::internal(format!(
                    "store: unknown token state {other:?}"
                )));
            }
        })
    }
}

/// A new token and its first sealed value.
#[derive(Clone, Copy)]
pub struct NewToken<'a> {
    /// Keyspace name.
    pub keyspace: &'a str,
    /// Keyed hash of the token.
    pub token_hash: &'a str,
    /// Field name.
    pub field: &'a str,
    /// Token format.
    pub format: &'a str,
    /// Deterministic tokens only.
    pub value_hash: Option<&'a str>,
    /// Which draw made the token.
    pub attempt: u32,
    /// Keyed hash of the subject.
    pub subject_ref: &'a str,
    /// The value sealed under the subject's DEK (text form).
    pub sealed: &'a str,
    /// Unix seconds of the write.
    pub now: i64,
    /// When it expires (Unix seconds), if it has a TTL.
    pub expires_at: Option<i64>,
}

/// A deterministic token found by its value hash.
#[derive(Debug, Clone)]
pub struct DeterministicRow {
    /// Keyed hash of the token.
    pub token_hash: String,
    /// Which draw made the token.
    pub attempt: u32,
    /// Token state.
    pub state: TokenState,
    /// When it expires (Unix seconds), if it has a TTL.
    pub expires_at: Option<i64>,
    /// Whether the asking subject already has its sealed value on this token.
    pub mine: bool,
}

/// A subject's sealed value for an existing (deterministic) token.
pub struct AddValue<'a> {
    /// Keyspace name.
    pub keyspace: &'a str,
    /// Keyed hash of the token.
    pub token_hash: &'a str,
    /// Keyed hash of the subject.
    pub subject_ref: &'a str,
    /// The value sealed under the subject's DEK (text form).
    pub sealed: &'a str,
    /// Unix seconds of the write.
    pub now: i64,
    /// The token's new expiry (replaces the stored one).
    pub expires_at: Option<i64>,
}

/// One token write; many of them share a transaction in [`Store::write_tokens`].
pub enum TokenWrite<'a> {
    /// A new token with its first value ([`Store::insert_token`]).
    Insert(NewToken<'a>),
    /// One more subject's value on an existing token ([`Store::add_token_value`]).
    AddValue(AddValue<'a>),
}

/// Appends `rows` comma-separated copies of the tuple `row`, whose placeholders `$1..$width`
/// are numbered within one row, renumbered so that row `r` uses `$(r*width+1)..`.
fn push_rows(sql: &mut String, rows: usize, width: usize, row: &str) {
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        let mut rest = row;
        while let Some(i) = rest.find('$') {
            sql.push_str(&rest[..=i]);
            rest = &rest[i + 1..];
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            let k: usize = rest[..digits].parse().unwrap_or(0);
            sql.push_str(&(r * width + k).to_string());
            rest = &rest[digits..];
        }
        sql.push_str(rest);
    }
}

/// The multi-row insert of a group's new tokens, each with its first holder's sealed value.
/// On SQLite `INSERT OR IGNORE`: with `ON CONFLICT DO NOTHING` a multi-row insert could still
/// abort half-way (a NOT NULL column), so SQLite would copy every page it touches to a
/// statement journal first; `OR IGNORE` cannot abort and needs none. The rows bound are never
/// NULL where the schema says NOT NULL, so both forms skip exactly the rows whose key (token
/// hash, or deterministic value hash) is taken.
fn insert_map_sql(rows: usize, sqlite: bool) -> String {
    let mut sql = String::from(if sqlite {
        "INSERT OR IGNORE INTO token_map (keyspace, token_hash, field, format, value_hash,
                                          attempt, state, created_at, updated_at, expires_at,
                                          subject_ref, sealed)
         VALUES "
    } else {
        "INSERT INTO token_map (keyspace, token_hash, field, format, value_hash, attempt,
                                state, created_at, updated_at, expires_at, subject_ref, sealed)
         VALUES "
    });
    // Anonymous `?` placeholders on SQLite: sqlx binds a named one (`$N`) by asking SQLite its
    // name, a linear search of the statement's names, so 352 of them cost ~5% of a random
    // Tokenize's server CPU (profile in bench/RESULTS.md); `?` has no name to look up.
    // PostgreSQL only knows `$N`.
    push_rows(
        &mut sql,
        rows,
        11,
        if sqlite {
            "(?, ?, ?, ?, ?, ?, 'live', ?, ?, ?, ?, ?)"
        } else {
            "($1, $2, $3, $4, $5, $6, 'live', $7, $8, $9, $10, $11)"
        },
    );
    if !sqlite {
        sql.push_str(" ON CONFLICT DO NOTHING");
    }
    sql.push_str(" RETURNING keyspace, token_hash");
    sql
}

/// The inserts of `ops` that can succeed, with their index in `ops`: the first of each token
/// hash and of each value hash (a later one would conflict with it and change nothing).
fn first_inserts<'o, 'a>(ops: &'o [TokenWrite<'a>]) -> Vec<(usize, &'o NewToken<'a>)> {
    let mut tokens = HashSet::new();
    let mut values = HashSet::new();
    let mut inserts = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let TokenWrite::Insert(t) = op else { continue };
        let th = (t.keyspace, t.token_hash);
        let vh = t.value_hash.map(|v| (t.keyspace, v));
        if tokens.contains(&th) || vh.is_some_and(|v| values.contains(&v)) {
            continue;
        }
        tokens.insert(th);
        if let Some(v) = vh {
            values.insert(v);
        }
        inserts.push((i, t));
    }
    inserts
}

type AnyQuery<'q> = sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>;

/// Binds one row of [`insert_map_sql`].
fn bind_new_token<'q>(q: AnyQuery<'q>, t: &NewToken<'q>) -> AnyQuery<'q> {
    q.bind(t.keyspace)
        .bind(t.token_hash)
        .bind(t.field)
        .bind(t.format)
        .bind(t.value_hash)
        .bind(i64::from(t.attempt))
        .bind(t.now)
        .bind(t.now)
        .bind(t.expires_at)
        .bind(t.subject_ref)
        .bind(t.sealed)
}

/// Sets `out[i]` for each insert of `chunk` that `rows` (the `keyspace, token_hash` of the
/// rows that went in) says went in.
fn mark_inserted(
    out: &mut [bool],
    chunk: &[(usize, &NewToken<'_>)],
    rows: &[sqlx::any::AnyRow],
) -> Result<()> {
    if rows.len() == chunk.len() {
        // Every row went in (the usual case).
        for (i, _) in chunk {
            out[*i] = true;
        }
        return Ok(());
    }
    let mut inserted = HashSet::with_capacity(rows.len());
    for r in rows {
        let ks: String = r.try_get("keyspace").map_err(db)?;
        let th: String = r.try_get("token_hash").map_err(db)?;
        inserted.insert((ks, th));
    }
    // (keyspace, token_hash) is unique within the chunk, so each returned row is exactly one
    // of our inserts.
    for (i, t) in chunk {
        out[*i] = inserted.contains(&(t.keyspace.to_string(), t.token_hash.to_string()));
    }
    Ok(())
}

/// [`Store::insert_group_sqlite`]'s statements: the group's rows in one `INSERT OR IGNORE`
/// without `RETURNING` (which buffers the rows in an ephemeral table and sends each back
/// through sqlx), then how many went in and the last rowid, the one row answered.
fn insert_group_sql(rows: usize) -> String {
    let mut sql = String::from("BEGIN IMMEDIATE; ");
    let insert = insert_map_sql(rows, true);
    sql.push_str(
        insert
            .strip_suffix(" RETURNING keyspace, token_hash")
            .unwrap_or(&insert),
    );
    sql.push_str("; SELECT changes() AS inserted, last_insert_rowid() AS last; COMMIT");
    sql
}

/// What Detokenize needs: the token row and every sealed copy of its value.
pub struct TokenRow {
    /// The field the token stands for.
    pub field: String,
    /// Token state.
    pub state: TokenState,
    /// When it expires (Unix seconds), if it has a TTL.
    pub expires_at: Option<i64>,
    /// The value sealed under each holder's DEK (text form).
    pub sealed: Vec<String>,
    /// The subject reference (hex) of each holder, in the order of `sealed`.
    pub subject_refs: Vec<String>,
}

impl Store {
    /// The token tables, on the migration transaction's connection; upgrades a store of
    /// schema 3 or older (values in `token_values`) in place.
    pub(super) async fn migrate_tokens(conn: &mut sqlx::AnyConnection, sqlite: bool) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS token_map (
                keyspace TEXT NOT NULL,
                token_hash TEXT NOT NULL,
                field TEXT NOT NULL,
                format TEXT NOT NULL,
                value_hash TEXT,
                attempt BIGINT NOT NULL,
                state TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                expires_at BIGINT,
                subject_ref TEXT,
                sealed TEXT,
                PRIMARY KEY (keyspace, token_hash))",
        )
        .execute(&mut *conn)
        .await
        .map_err(db)?;
        // Schema 4: the first holder's value in the token's own row.
        for column in ["subject_ref", "sealed"] {
            Self::add_column(conn, sqlite, "token_map", column, "TEXT").await?;
        }
        let ddl = [
            // Partial indexes (schema 4): a random token has no value hash and most tokens
            // have no expiry, so a random Tokenize inserts into neither (schema 3 indexed
            // every row, NULLs included: two more B-tree inserts per token). The lookups
            // (`value_hash = $2`, `expires_at IS NOT NULL AND ...`, `subject_ref = $2`) imply
            // the conditions, so both engines use them.
            "CREATE UNIQUE INDEX IF NOT EXISTS token_map_det ON token_map (keyspace, value_hash)
                WHERE value_hash IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS token_map_ttl ON token_map (state, expires_at)
                WHERE expires_at IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS token_map_by_subject ON token_map (keyspace, subject_ref)
                WHERE subject_ref IS NOT NULL",
            "DROP INDEX IF EXISTS token_map_by_value",
            "DROP INDEX IF EXISTS token_map_by_expiry",
            "CREATE TABLE IF NOT EXISTS token_holders (
                keyspace TEXT NOT NULL,
                token_hash TEXT NOT NULL,
                subject_ref TEXT NOT NULL,
                sealed TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                PRIMARY KEY (keyspace, token_hash, subject_ref))",
            "CREATE INDEX IF NOT EXISTS token_holders_by_subject
                ON token_holders (keyspace, subject_ref)",
        ];
        for stmt in ddl {
            sqlx::query(stmt).execute(&mut *conn).await.map_err(db)?;
        }
        let probe = if sqlite {
            "SELECT 1 AS found FROM sqlite_master WHERE type = 'table' AND name = 'token_values'"
        } else {
            "SELECT 1 AS found FROM information_schema.tables
             WHERE table_schema = current_schema() AND table_name = 'token_values'"
        };
        if sqlx::query(probe)
            .fetch_optional(&mut *conn)
            .await
            .map_err(db)?
            .is_none()
        {
            return Ok(());
        }
        // A store of schema 3 or older: each token's first holder (the least subject
        // reference) moves into its row, the others into `token_holders`; then `token_values`
        // goes, so that a binary of schema 3 or older still running against this store fails
        // (no such table) instead of answering from half the values.
        let upgrade = [
            "UPDATE token_map SET subject_ref = (
                SELECT MIN(v.subject_ref) FROM token_values v
                WHERE v.keyspace = token_map.keyspace AND v.token_hash = token_map.token_hash)
             WHERE subject_ref IS NULL AND sealed IS NULL",
            "UPDATE token_map SET sealed = (
                SELECT v.sealed FROM token_values v
                WHERE v.keyspace = token_map.keyspace AND v.token_hash = token_map.token_hash
                  AND v.subject_ref = token_map.subject_ref)
             WHERE subject_ref IS NOT NULL AND sealed IS NULL",
            "INSERT INTO token_holders (keyspace, token_hash, subject_ref, sealed, created_at)
             SELECT v.keyspace, v.token_hash, v.subject_ref, v.sealed, v.created_at
             FROM token_values v
             WHERE NOT EXISTS (SELECT 1 FROM token_map m
                               WHERE m.keyspace = v.keyspace AND m.token_hash = v.token_hash
                                 AND m.subject_ref = v.subject_ref)",
            "DROP TABLE token_values",
        ];
        // It runs before the server listens (health included) and can take minutes: say so
        // before and after (docs/OPERATIONS.md, "Store schema and upgrades").
        let started = std::time::Instant::now();
        tracing::warn!(
            "store upgrade: moving every token value out of token_values in one transaction \
             (measured ~30 s per million tokens on SQLite); the server listens when it is done"
        );
        for stmt in upgrade {
            sqlx::query(stmt).execute(&mut *conn).await.map_err(db)?;
        }
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "store upgrade: token values moved"
        );
        Ok(())
    }

    /// Inserts a new token with its first value. Returns `false`, changing nothing, if the
    /// token hash is taken (a collision: draw again) or a deterministic token of the same
    /// value appeared meanwhile (look it up again).
    pub async fn insert_token(&self, t: &NewToken<'_>) -> Result<bool> {
        let ops = [TokenWrite::Insert(*t)];
        Ok(self.write_tokens(&ops).await?[0])
    }

    /// Adds a subject's sealed value to an existing (deterministic) token: another subject's
    /// value on a join token, or the same subject's again (new expiry), keeping an existing
    /// one, and sets its expiry and state to live. Returns `false`, changing nothing, if the
    /// token was shredded or removed meanwhile.
    pub async fn add_token_value(
        &self,
        keyspace: &str,
        token_hash: &str,
        subject_ref: &str,
        sealed: &str,
        now: i64,
        expires_at: Option<i64>,
    ) -> Result<bool> {
        let ops = [TokenWrite::AddValue(AddValue {
            keyspace,
            token_hash,
            subject_ref,
            sealed,
            now,
            expires_at,
        })];
        Ok(self.write_tokens(&ops).await?[0])
    }

    /// Applies many token writes in **one transaction** (group commit): all of them or, on
    /// an error, none. Each write gets its own outcome, as [`Store::insert_token`] and
    /// [`Store::add_token_value`] would give it: `false` changed nothing. Of several inserts
    /// of one token hash, or of one deterministic value hash, only the first can succeed;
    /// the others get `false`, as if they had come after it.
    pub async fn write_tokens(&self, ops: &[TokenWrite<'_>]) -> Result<Vec<bool>> {
        let mut conn = self.pool.acquire().await.map_err(db)?;
        self.write_tokens_on(&mut conn, ops).await
    }

    /// [`Store::write_tokens`] on the token writer's own connection `held` on SQLite (taken
    /// from the pool when `None`, given back after an error); on PostgreSQL on any pooled one.
    ///
    /// Why one connection on SQLite: in WAL mode a connection that begins a transaction after
    /// another connection committed discards its whole page cache. The pool hands its idle
    /// connections out in turn, so each group commit used to start on a connection whose cache
    /// the previous commit (on another connection) had invalidated, and re-read the index
    /// pages it inserts into from the file. The writer's own connection keeps them cached
    /// (its own commits do not invalidate them).
    pub async fn write_tokens_with(
        &self,
        held: &mut Option<PoolConnection<Any>>,
        ops: &[TokenWrite<'_>],
    ) -> Result<Vec<bool>> {
        if !self.is_sqlite() {
            return self.write_tokens(ops).await;
        }
        let conn = match held {
            Some(c) => c,
            None => held.insert(self.pool.acquire().await.map_err(db)?),
        };
        if ops.iter().all(|op| matches!(op, TokenWrite::Insert(_))) {
            let out = Self::insert_group_sqlite(conn, ops).await;
            if out.is_err()
                && let Some(c) = held.take()
            {
                // The transaction may still be open on it: closing the connection rolls it
                // back; the pool opens a fresh one for the next group.
                let _ = c.close().await;
            }
            return out;
        }
        let out = self.write_tokens_on(conn, ops).await;
        if out.is_err() {
            // The failed transaction is rolled back when the connection is next used.
            *held = None;
        }
        out
    }

    /// A group of new tokens on SQLite in **one** statement batch: `BEGIN IMMEDIATE`, one
    /// multi-row insert, `COMMIT`, handed to the connection's worker thread at once. Through
    /// sqlx's transaction API the same group is three round trips between the writer task and
    /// that thread (begin, insert, commit; begin and commit each wait until the task has taken
    /// the answer), each a wake-up of a busy tokio worker, and the group commit is serial: its
    /// latency bounds the token rate. Answers as [`Store::write_tokens`]. After an error the
    /// transaction may still be open: the caller closes the connection.
    ///
    /// The insert has one row per write of the group (up to `MAX_GROUP`, 64 x 11 parameters):
    /// one statement shape per group size, all prepared once on the writer's own connection
    /// (its statement cache holds 100).
    ///
    /// Several statements in one query with bound parameters is SQLite-only sqlx behaviour that
    /// sqlx has marked deprecated (launchbadge/sqlx#3108); the group writer's unit tests pin
    /// it, and the fallback is [`Store::write_tokens_on`] (three round trips).
    async fn insert_group_sqlite(
        conn: &mut sqlx::AnyConnection,
        ops: &[TokenWrite<'_>],
    ) -> Result<Vec<bool>> {
        let mut out = vec![false; ops.len()];
        let inserts = first_inserts(ops);
        let sql = insert_group_sql(inserts.len());
        // Only placeholders are generated; every value is bound.
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for (_, t) in &inserts {
            q = bind_new_token(q, t);
        }
        // `fetch_all`, not `fetch_one`: sqlx stops a statement batch at the first row when
        // asked for one, and the `COMMIT` after it would never run.
        let rows = q.fetch_all(&mut *conn).await.map_err(db)?;
        let [row] = rows.as_slice() else {
            return Err(crate::error::Error::internal(
                "store: a token group answered no count",
            ));
        };
        let inserted: i64 = row.try_get("inserted").map_err(db)?;
        if usize::try_from(inserted).is_ok_and(|n| n == inserts.len()) {
            // Every row went in (the usual case).
            for (i, _) in &inserts {
                out[*i] = true;
            }
            return Ok(out);
        }
        // Some were ignored (a taken token hash or deterministic value hash). The rows that
        // went in are the last `inserted` rowids: each new row of a rowid table gets the
        // largest rowid + 1, and the group held the write lock. Read them back (the group is
        // committed; token rows are never deleted, later inserts get larger rowids).
        let last: i64 = row.try_get("last").map_err(db)?;
        let rows = sqlx::query(
            "SELECT keyspace, token_hash FROM token_map WHERE rowid > $1 AND rowid <= $2",
        )
        .bind(last.saturating_sub(inserted))
        .bind(last)
        .fetch_all(&mut *conn)
        .await
        .map_err(db)?;
        if i64::try_from(rows.len()).ok() != Some(inserted) {
            // Not expected; the caller hears an error, never a token of someone else's row.
            return Err(crate::error::Error::internal(
                "store: the rows of a token group are not where expected",
            ));
        }
        mark_inserted(&mut out, &inserts, &rows)?;
        Ok(out)
    }

    async fn write_tokens_on(
        &self,
        conn: &mut sqlx::AnyConnection,
        ops: &[TokenWrite<'_>],
    ) -> Result<Vec<bool>> {
        let mut out = vec![false; ops.len()];
        let inserts = first_inserts(ops);
        let sqlite = self.is_sqlite();
        let mut tx = conn.begin().await.map_err(db)?;
        for chunk in inserts.chunks(ROWS_PER_STATEMENT) {
            let sql = insert_map_sql(chunk.len(), sqlite);
            // Only placeholders are generated; every value is bound.
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for (_, t) in chunk {
                q = bind_new_token(q, t);
            }
            let rows = q.fetch_all(&mut *tx).await.map_err(db)?;
            mark_inserted(&mut out, chunk, &rows)?;
        }
        for (i, op) in ops.iter().enumerate() {
            let TokenWrite::AddValue(a) = op else {
                continue;
            };
            // The value goes into the row's own slot when it is free (the token expired and
            // its values were purged), else into `token_holders` unless the subject holds the
            // slot already (its existing value is kept, as the expiry is updated).
            let r = sqlx::query(
                "UPDATE token_map SET state = 'live', expires_at = $3, updated_at = $4,
                        subject_ref = CASE WHEN sealed IS NULL THEN $5 ELSE subject_ref END,
                        sealed = CASE WHEN sealed IS NULL THEN $6 ELSE sealed END
                 WHERE keyspace = $1 AND token_hash = $2 AND state <> 'shredded'",
            )
            .bind(a.keyspace)
            .bind(a.token_hash)
            .bind(a.expires_at)
            .bind(a.now)
            .bind(a.subject_ref)
            .bind(a.sealed)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            if r.rows_affected() != 1 {
                continue;
            }
            sqlx::query(
                "INSERT INTO token_holders (keyspace, token_hash, subject_ref, sealed, created_at)
                 SELECT $1, $2, $3, $4, $5
                 WHERE NOT EXISTS (SELECT 1 FROM token_map m
                                   WHERE m.keyspace = $1 AND m.token_hash = $2
                                     AND m.subject_ref = $3)
                 ON CONFLICT (keyspace, token_hash, subject_ref) DO NOTHING",
            )
            .bind(a.keyspace)
            .bind(a.token_hash)
            .bind(a.subject_ref)
            .bind(a.sealed)
            .bind(a.now)
            .execute(&mut *tx)
            .await
            .map_err(db)?;
            out[i] = true;
        }
        tx.commit().await.map_err(db)?;
        Ok(out)
    }

    /// The deterministic token of a value hash, if any, and whether `subject_ref` already
    /// has its value on it.
    pub async fn token_by_value(
        &self,
        keyspace: &str,
        value_hash: &str,
        subject_ref: &str,
    ) -> Result<Option<DeterministicRow>> {
        let r = sqlx::query(
            "SELECT m.token_hash, m.attempt, m.state, m.expires_at, m.subject_ref AS first,
                    h.subject_ref AS other
             FROM token_map m LEFT JOIN token_holders h
               ON h.keyspace = m.keyspace AND h.token_hash = m.token_hash AND h.subject_ref = $3
             WHERE m.keyspace = $1 AND m.value_hash = $2",
        )
        .bind(keyspace)
        .bind(value_hash)
        .bind(subject_ref)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        r.map(|r| {
            Ok(DeterministicRow {
                token_hash: r.try_get("token_hash").map_err(db)?,
                attempt: u32::try_from(r.try_get::<i64, _>("attempt").map_err(db)?)
                    .map_err(|_| crate::error::Error::internal("store: bad attempt"))?,
                state: TokenState::parse(&r.try_get::<String, _>("state").map_err(db)?)?,
                expires_at: r.try_get("expires_at").map_err(db)?,
                mine: r
                    .try_get::<Option<String>, _>("first")
                    .map_err(db)?
                    .is_some_and(|f| f == subject_ref)
                    || r.try_get::<Option<String>, _>("other")
                        .map_err(db)?
                        .is_some(),
            })
        })
        .transpose()
    }

    /// The pool, for tests that break the store on purpose.
    #[cfg(test)]
    pub(crate) fn pool(&self) -> &sqlx::AnyPool {
        &self.pool
    }

    fn is_sqlite(&self) -> bool {
        self.pool.connect_options().database_url.scheme() == "sqlite"
    }

    /// Whether WAL checkpoints should run off the token writer's commit path
    /// ([`Store::checkpoint`]): SQLite only.
    pub fn background_checkpoints(&self) -> bool {
        self.is_sqlite()
    }

    /// A passive WAL checkpoint on a pooled connection (SQLite; nothing on PostgreSQL): copies
    /// committed WAL pages into the database file without blocking the writer, which keeps
    /// committing meanwhile. The writer's own automatic checkpoint (every
    /// `SQLITE_WAL_AUTOCHECKPOINT` pages of WAL) then finds little or nothing left to copy,
    /// instead of copying and fsyncing up to 32 MiB inside a commit while every Tokenize of
    /// the next group waits.
    pub async fn checkpoint(&self) -> Result<()> {
        if self.is_sqlite() {
            sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&self.pool)
                .await
                .map_err(db)?;
        }
        Ok(())
    }

    /// How many token writers may run at once: one on SQLite (one writer at a time anyway;
    /// more would only wait on its lock), a few on PostgreSQL.
    pub fn token_writers(&self) -> usize {
        if self.is_sqlite() { 1 } else { 4 }
    }

    /// A token and its sealed values.
    pub async fn token(&self, keyspace: &str, token_hash: &str) -> Result<Option<TokenRow>> {
        let rows = sqlx::query(
            "SELECT m.field, m.state, m.expires_at, m.subject_ref AS first_ref,
                    m.sealed AS first_sealed, h.subject_ref, h.sealed
             FROM token_map m LEFT JOIN token_holders h
               ON h.keyspace = m.keyspace AND h.token_hash = m.token_hash
             WHERE m.keyspace = $1 AND m.token_hash = $2",
        )
        .bind(keyspace)
        .bind(token_hash)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let Some(first) = rows.first() else {
            return Ok(None);
        };
        let mut out = TokenRow {
            field: first.try_get("field").map_err(db)?,
            state: TokenState::parse(&first.try_get::<String, _>("state").map_err(db)?)?,
            expires_at: first.try_get("expires_at").map_err(db)?,
            sealed: Vec::with_capacity(rows.len() + 1),
            subject_refs: Vec::with_capacity(rows.len() + 1),
        };
        // The row's own value first, then the further holders'.
        let holders = std::iter::once((first, "first_sealed", "first_ref"))
            .chain(rows.iter().map(|r| (r, "sealed", "subject_ref")));
        for (r, sealed, sref) in holders {
            if let Some(s) = r.try_get::<Option<String>, _>(sealed).map_err(db)? {
                out.sealed.push(s);
                out.subject_refs.push(
                    r.try_get::<Option<String>, _>(sref)
                        .map_err(db)?
                        .unwrap_or_default(),
                );
            }
        }
        Ok(Some(out))
    }

    /// Crypto-shred of a subject: deletes its sealed token values and turns its tokens that
    /// have no other subject's value left into `shredded` tombstones (their value hash is
    /// dropped too). Idempotent. Returns how many values were deleted.
    pub async fn purge_subject_tokens(
        &self,
        keyspace: &str,
        subject_ref: &str,
        now: i64,
    ) -> Result<u64> {
        // Most shredded subjects have no tokens: a read, not a write transaction, for them.
        let any = sqlx::query(
            "SELECT 1 AS one FROM token_map WHERE keyspace = $1 AND subject_ref = $2
             UNION ALL
             SELECT 1 AS one FROM token_holders WHERE keyspace = $1 AND subject_ref = $2
             LIMIT 1",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        if any.is_none() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await.map_err(db)?;
        // Tokens whose own value is the subject's: the value goes; a token that no other
        // subject holds becomes a tombstone (its value hash dropped).
        let own = sqlx::query(
            "UPDATE token_map SET subject_ref = NULL, sealed = NULL, updated_at = $3,
                    state = CASE WHEN EXISTS (SELECT 1 FROM token_holders h
                                        WHERE h.keyspace = $1
                                          AND h.token_hash = token_map.token_hash
                                          AND h.subject_ref <> $2)
                                 THEN state ELSE 'shredded' END,
                    value_hash = CASE WHEN EXISTS (SELECT 1 FROM token_holders h
                                        WHERE h.keyspace = $1
                                          AND h.token_hash = token_map.token_hash
                                          AND h.subject_ref <> $2)
                                      THEN value_hash ELSE NULL END,
                    expires_at = CASE WHEN EXISTS (SELECT 1 FROM token_holders h
                                        WHERE h.keyspace = $1
                                          AND h.token_hash = token_map.token_hash
                                          AND h.subject_ref <> $2)
                                      THEN expires_at ELSE NULL END
             WHERE keyspace = $1 AND subject_ref = $2",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        // Tokens the subject holds a further value of: a tombstone when neither the row's own
        // slot nor another subject's row holds a value.
        sqlx::query(
            "UPDATE token_map SET state = 'shredded', value_hash = NULL, expires_at = NULL,
                                  updated_at = $3
             WHERE keyspace = $1 AND sealed IS NULL
               AND token_hash IN (SELECT token_hash FROM token_holders
                                  WHERE keyspace = $1 AND subject_ref = $2)
               AND NOT EXISTS (SELECT 1 FROM token_holders o
                               WHERE o.keyspace = $1 AND o.token_hash = token_map.token_hash
                                 AND o.subject_ref <> $2)",
        )
        .bind(keyspace)
        .bind(subject_ref)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        let held =
            sqlx::query("DELETE FROM token_holders WHERE keyspace = $1 AND subject_ref = $2")
                .bind(keyspace)
                .bind(subject_ref)
                .execute(&mut *tx)
                .await
                .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(own.rows_affected() + held.rows_affected())
    }

    /// Expires live tokens whose TTL passed at `now`, i.e. `expires_at < now` (all keyspaces, or one token when
    /// `only` names it): their sealed values are deleted and an `expired` tombstone stays.
    /// Returns how many tokens expired.
    pub async fn purge_expired_tokens(&self, now: i64, only: Option<(&str, &str)>) -> Result<u64> {
        let mut tx = self.pool.begin().await.map_err(db)?;
        let r = match only {
            None => sqlx::query(
                "UPDATE token_map SET state = 'expired', updated_at = $1, subject_ref = NULL,
                                      sealed = NULL
                 WHERE state = 'live' AND expires_at IS NOT NULL AND expires_at < $1",
            )
            .bind(now),
            Some((ks, th)) => sqlx::query(
                "UPDATE token_map SET state = 'expired', updated_at = $1, subject_ref = NULL,
                                      sealed = NULL
                 WHERE state = 'live' AND expires_at IS NOT NULL AND expires_at < $1
                   AND keyspace = $2 AND token_hash = $3",
            )
            .bind(now)
            .bind(ks)
            .bind(th),
        }
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        sqlx::query(
            "DELETE FROM token_holders WHERE EXISTS (
                SELECT 1 FROM token_map m
                WHERE m.keyspace = token_holders.keyspace AND m.token_hash = token_holders.token_hash
                  AND m.state = 'expired')",
        )
        .execute(&mut *tx)
        .await
        .map_err(db)?;
        tx.commit().await.map_err(db)?;
        Ok(r.rows_affected())
    }

    /// Number of sealed values and of tokens in a keyspace (tests, operators).
    pub async fn token_counts(&self, keyspace: &str) -> Result<(i64, i64)> {
        let own: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM token_map WHERE keyspace = $1 AND sealed IS NOT NULL",
        )
        .bind(keyspace)
        .fetch_one(&self.pool)
        .await
        .map_err(db)?
        .try_get("n")
        .map_err(db)?;
        let more: i64 = sqlx::query("SELECT COUNT(*) AS n FROM token_holders WHERE keyspace = $1")
            .bind(keyspace)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?
            .try_get("n")
            .map_err(db)?;
        let v = own + more;
        let m = sqlx::query("SELECT COUNT(*) AS n FROM token_map WHERE keyspace = $1")
            .bind(keyspace)
            .fetch_one(&self.pool)
            .await
            .map_err(db)?
            .try_get("n")
            .map_err(db)?;
        Ok((v, m))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn multi_row_placeholders_are_numbered_per_row() {
        let mut sql = String::new();
        push_rows(&mut sql, 3, 2, "($1, 'x', $2, $2)");
        assert_eq!(sql, "($1, 'x', $2, $2),($3, 'x', $4, $4),($5, 'x', $6, $6)");
        let map = insert_map_sql(2, false);
        assert!(map.contains(
            "($1, $2, $3, $4, $5, $6, 'live', $7, $8, $9, $10, $11),($12, $13, $14, $15, $16, $17, 'live', $18, $19, $20, $21, $22)"
        ));
        assert!(insert_map_sql(2, true).contains(
            "(?, ?, ?, ?, ?, ?, 'live', ?, ?, ?, ?, ?),(?, ?, ?, ?, ?, ?, 'live', ?, ?, ?, ?, ?)"
        ));
    }

    async fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", d.path().join("t.db").display());
        let s = Store::open(&url).await.unwrap();
        (d, s)
    }

    /// Makes every insert of the token hash `th` into `token_map` fail (a trigger), as a
    /// store fault half-way through a group would.
    pub(crate) async fn refuse_token(s: &Store, th: &str) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TRIGGER refuse_{th} BEFORE INSERT ON token_map WHEN NEW.token_hash = '{th}'
             BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )))
        .execute(s.pool())
        .await
        .unwrap();
    }

    /// A store holding token "old" with value hash "vo", which [`group_with_conflicts`]
    /// collides with.
    async fn store_holding_old() -> (tempfile::TempDir, Store) {
        let (d, s) = store().await;
        assert!(
            s.insert_token(&new("old", Some("vo"), "a", None))
                .await
                .unwrap()
        );
        (d, s)
    }

    /// A group of new tokens `names` (holder "a") followed by five that must not go in:
    /// a token hash repeated within the group (70), two holders of one value hash (71 goes
    /// in, 72 does not), a token hash already stored (73: "old") and a value hash already
    /// stored (74: "vo"), against [`store_holding_old`].
    fn group_with_conflicts(names: &[String]) -> Vec<TokenWrite<'_>> {
        let mut ops: Vec<TokenWrite<'_>> = names
            .iter()
            .map(|n| TokenWrite::Insert(new(n, None, "a", None)))
            .collect();
        ops.push(TokenWrite::Insert(new("t3", None, "b", None)));
        ops.push(TokenWrite::Insert(new("d1", Some("v"), "a", None)));
        ops.push(TokenWrite::Insert(new("d2", Some("v"), "b", None)));
        ops.push(TokenWrite::Insert(new("old", None, "b", None)));
        ops.push(TokenWrite::Insert(new("d3", Some("vo"), "b", None)));
        ops
    }

    fn new<'a>(th: &'a str, vh: Option<&'a str>, sref: &'a str, exp: Option<i64>) -> NewToken<'a> {
        NewToken {
            keyspace: "ks",
            token_hash: th,
            field: "email",
            format: "opaque",
            value_hash: vh,
            attempt: 0,
            subject_ref: sref,
            sealed: "pg1.sealed",
            now: 10,
            expires_at: exp,
        }
    }

    /// Schema 4: a new token and its value are one `token_map` row; `token_holders` gets
    /// only further holders of the same token.
    #[tokio::test]
    async fn a_new_token_is_one_row_and_only_further_holders_have_their_own() {
        let (_d, s) = store().await;
        assert!(s.insert_token(&new("t1", None, "a", None)).await.unwrap());
        let count = |sql: &'static str| {
            let s = s.clone();
            async move {
                sqlx::query_scalar::<_, i64>(sql)
                    .fetch_one(s.pool())
                    .await
                    .unwrap()
            }
        };
        assert_eq!(
            count(
                "SELECT COUNT(*) FROM token_map WHERE sealed = 'pg1.sealed' AND subject_ref = 'a'"
            )
            .await,
            1
        );
        assert_eq!(count("SELECT COUNT(*) FROM token_holders").await, 0);
        assert!(
            s.add_token_value("ks", "t1", "a", "pg1.again", 11, None)
                .await
                .unwrap()
        );
        assert_eq!(
            count("SELECT COUNT(*) FROM token_holders").await,
            0,
            "a holds it"
        );
        assert!(
            s.add_token_value("ks", "t1", "b", "pg1.b", 11, None)
                .await
                .unwrap()
        );
        assert_eq!(count("SELECT COUNT(*) FROM token_holders").await, 1);
        let row = s.token("ks", "t1").await.unwrap().unwrap();
        assert_eq!(row.sealed, ["pg1.sealed", "pg1.b"]);
        assert_eq!(row.subject_refs, ["a", "b"]);
    }

    #[tokio::test]
    async fn token_hash_and_value_hash_are_unique() {
        let (_d, s) = store().await;
        assert!(s.insert_token(&new("t1", None, "a", None)).await.unwrap());
        assert!(
            !s.insert_token(&new("t1", None, "b", None)).await.unwrap(),
            "token collision"
        );
        assert!(
            s.insert_token(&new("t2", Some("v"), "a", None))
                .await
                .unwrap()
        );
        assert!(
            !s.insert_token(&new("t3", Some("v"), "a", None))
                .await
                .unwrap(),
            "same value"
        );
        assert_eq!(
            s.token_counts("ks").await.unwrap(),
            (2, 2),
            "failed inserts left nothing"
        );
        let row = s.token_by_value("ks", "v", "a").await.unwrap().unwrap();
        assert_eq!(row.token_hash, "t2");
    }

    #[tokio::test]
    async fn one_transaction_writes_many_and_answers_each() {
        let (_d, s) = store_holding_old().await;
        let names: Vec<String> = (0..70).map(|i| format!("t{i}")).collect();
        // Values added to existing tokens after the group's conflicts.
        let mut ops = group_with_conflicts(&names);
        let add = |th, sref| {
            TokenWrite::AddValue(AddValue {
                keyspace: "ks",
                token_hash: th,
                subject_ref: sref,
                sealed: "pg1.add",
                now: 12,
                expires_at: Some(99),
            })
        };
        ops.push(add("old", "b")); // 75
        ops.push(add("missing", "b")); // 76: no such token
        let out = s.write_tokens(&ops).await.unwrap();
        assert!(
            out[..70].iter().all(|&ok| ok),
            "70 new tokens over 3 statements"
        );
        assert_eq!(
            &out[70..],
            &[false, true, false, false, false, true, false],
            "duplicates, collisions and a missing token change nothing"
        );
        assert_eq!(s.token("ks", "t3").await.unwrap().unwrap().sealed.len(), 1);
        let old = s.token("ks", "old").await.unwrap().unwrap();
        assert_eq!((old.sealed.len(), old.expires_at), (2, Some(99)));
        assert_eq!(s.token_counts("ks").await.unwrap(), (73, 72));
    }

    /// The writer's path on SQLite (one statement batch, no `RETURNING`): when some rows of a
    /// group are ignored, each write still learns whether its own row went in.
    #[tokio::test]
    async fn a_group_batch_with_ignored_rows_answers_each_write() {
        let (_d, s) = store_holding_old().await;
        let names: Vec<String> = (0..70).map(|i| format!("t{i}")).collect();
        let ops = group_with_conflicts(&names);
        let mut held = None;
        let out = s.write_tokens_with(&mut held, &ops).await.unwrap();
        assert!(out[..70].iter().all(|&ok| ok));
        assert_eq!(&out[70..], &[false, true, false, false, false]);
        assert_eq!(s.token_counts("ks").await.unwrap(), (72, 72));
        assert!(held.is_some(), "the writer keeps its connection");
        // A group where every row goes in (the usual case: the count alone answers).
        let more = [
            TokenWrite::Insert(new("m1", None, "c", None)),
            TokenWrite::Insert(new("m2", None, "c", Some(99))),
        ];
        assert_eq!(
            s.write_tokens_with(&mut held, &more).await.unwrap(),
            [true, true]
        );
        let m2 = s.token("ks", "m2").await.unwrap().unwrap();
        assert_eq!((m2.sealed.len(), m2.expires_at), (1, Some(99)));
    }

    /// A group batch that fails half-way leaves its transaction open on the writer's
    /// connection; the writer must not keep that connection, or its write lock would block
    /// every other writer (busy) and its next group would fail too.
    #[tokio::test]
    async fn a_failed_group_batch_leaves_no_transaction_open() {
        let (_d, s) = store().await;
        refuse_token(&s, "bad").await;
        let mut held = None;
        let bad = [
            TokenWrite::Insert(new("ok1", None, "a", None)),
            TokenWrite::Insert(new("bad", None, "a", None)),
        ];
        assert!(s.write_tokens_with(&mut held, &bad).await.is_err());
        assert!(held.is_none(), "the failed connection was closed");
        assert!(
            s.token("ks", "ok1").await.unwrap().is_none(),
            "the group rolled back"
        );
        // Another connection can write at once (no write lock left behind)...
        assert!(s.insert_token(&new("t1", None, "a", None)).await.unwrap());
        // ...and so can the writer.
        let good = [TokenWrite::Insert(new("t2", None, "a", None))];
        assert_eq!(s.write_tokens_with(&mut held, &good).await.unwrap(), [true]);
        assert_eq!(s.token_counts("ks").await.unwrap(), (2, 2));
    }

    #[tokio::test]
    async fn token_by_value_tells_whether_the_subject_holds_a_value() {
        let (_d, s) = store().await;
        s.insert_token(&new("t1", Some("v"), "a", None))
            .await
            .unwrap();
        assert!(
            s.token_by_value("ks", "v", "a")
                .await
                .unwrap()
                .unwrap()
                .mine
        );
        assert!(
            !s.token_by_value("ks", "v", "b")
                .await
                .unwrap()
                .unwrap()
                .mine
        );
        s.add_token_value("ks", "t1", "b", "pg1.b", 11, None)
            .await
            .unwrap();
        assert!(
            s.token_by_value("ks", "v", "b")
                .await
                .unwrap()
                .unwrap()
                .mine
        );
        assert!(s.token_by_value("ks", "w", "a").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn shred_purges_values_and_leaves_tombstones_only_when_no_owner_is_left() {
        let (_d, s) = store().await;
        s.insert_token(&new("t1", None, "a", None)).await.unwrap();
        s.insert_token(&new("t2", Some("v"), "a", None))
            .await
            .unwrap();
        assert!(
            s.add_token_value("ks", "t2", "b", "pg1.b", 11, None)
                .await
                .unwrap()
        );
        assert_eq!(s.purge_subject_tokens("ks", "a", 20).await.unwrap(), 2);
        let t1 = s.token("ks", "t1").await.unwrap().unwrap();
        assert_eq!(t1.state, TokenState::Shredded);
        assert!(t1.sealed.is_empty());
        let t2 = s.token("ks", "t2").await.unwrap().unwrap();
        assert_eq!(t2.state, TokenState::Live, "b still owns t2");
        assert_eq!(t2.sealed, vec!["pg1.b".to_string()]);
        assert_eq!(s.purge_subject_tokens("ks", "b", 21).await.unwrap(), 1);
        assert_eq!(
            s.token("ks", "t2").await.unwrap().unwrap().state,
            TokenState::Shredded
        );
        assert!(
            s.token_by_value("ks", "v", "a").await.unwrap().is_none(),
            "value hash dropped"
        );
        assert!(
            !s.add_token_value("ks", "t2", "c", "pg1.c", 22, None)
                .await
                .unwrap()
        );
        assert_eq!(s.token_counts("ks").await.unwrap().0, 0);
    }

    #[tokio::test]
    async fn expiry_purges_values() {
        let (_d, s) = store().await;
        s.insert_token(&new("t1", None, "a", Some(100)))
            .await
            .unwrap();
        s.insert_token(&new("t2", None, "a", Some(200)))
            .await
            .unwrap();
        s.insert_token(&new("t3", None, "a", None)).await.unwrap();
        assert_eq!(
            s.purge_expired_tokens(100, None).await.unwrap(),
            0,
            "valid through 100"
        );
        assert_eq!(
            s.purge_expired_tokens(150, Some(("ks", "t2")))
                .await
                .unwrap(),
            0
        );
        assert_eq!(s.purge_expired_tokens(150, None).await.unwrap(), 1);
        let t1 = s.token("ks", "t1").await.unwrap().unwrap();
        assert_eq!(t1.state, TokenState::Expired);
        assert!(t1.sealed.is_empty());
        assert_eq!(s.token_counts("ks").await.unwrap(), (2, 3));
    }
}
