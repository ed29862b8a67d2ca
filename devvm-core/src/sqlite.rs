//! What every SQLite database of devvm shares (the journal, the lease database, the
//! placement reservations): how it is opened and how its errors become devvm errors.

use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};

use crate::error::{Error, ErrorKind};

/// Maps an SQLite error to a devvm error saying `what`; a busy or locked database is
/// [`ErrorKind::Unavailable`] (retryable), anything else [`ErrorKind::Backend`].
pub(crate) fn err(what: String, backend: &'static str) -> impl Fn(rusqlite::Error) -> Error {
    move |e| {
        let busy = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        let kind = if busy {
            ErrorKind::Unavailable
        } else {
            ErrorKind::Backend
        };
        Error::new(kind, what.clone())
            .with_backend(backend)
            .with_source(e)
    }
}

/// Opens `path` durably: WAL, `synchronous=FULL` (a crash never leaves half a
/// transaction), and a 30 s wait for other writers. Several processes may share it. The
/// database and its WAL files are readable by their owner only (0600).
pub(crate) fn open(path: &Path, backend: &'static str) -> Result<Connection, Error> {
    let e = err(format!("database {}", path.display()), backend);
    let conn = Connection::open(path).map_err(&e)?;
    conn.busy_timeout(Duration::from_secs(30)).map_err(&e)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&e)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&e)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        owner_only(Path::new(&p)).map_err(|err| {
            Error::backend(format!("cannot restrict {}", path.display()))
                .with_backend(backend)
                .with_source(err)
        })?;
    }
    Ok(conn)
}

/// Makes the file at `path` (if it exists) readable and writable by its owner only.
pub(crate) fn owner_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Brings the schema of `conn` forward to the newest of `steps` (one SQL batch per
/// version, kept in SQLite's `user_version`). Every step runs once, in order, in one
/// transaction with its version bump. A database from a newer devvm (a higher
/// `user_version` than `steps` knows) is refused rather than misread.
pub(crate) fn migrate(
    conn: &mut Connection,
    steps: &[&'static str],
    what: String,
    backend: &'static str,
) -> Result<(), Error> {
    let migrations = Migrations::new(steps.iter().map(|sql| M::up(sql)).collect());
    migrations.to_latest(conn).map_err(|e| {
        let kind = match &e {
            rusqlite_migration::Error::RusqliteError { err, .. }
                if matches!(
                    err.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) =>
            {
                ErrorKind::Unavailable
            }
            rusqlite_migration::Error::MigrationDefinition(
                rusqlite_migration::MigrationDefinitionError::DatabaseTooFarAhead,
            ) => ErrorKind::Conflict,
            _ => ErrorKind::Backend,
        };
        Error::new(
            kind,
            format!("cannot bring the schema of {what} up to date"),
        )
        .with_backend(backend)
        .with_source(e)
    })
}

/// Creates `dir` and its missing parents with mode 0700 (devvm's state is its own).
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Deletes the row of `table` (a constant, never input) for `vm` if its `owner` column
/// names `owner`, in one transaction. A row of another owner is left and reported as
/// [`Undone::Foreign`](crate::types::Undone::Foreign); a row without an owner (from before owners were recorded) is
/// foreign too, its holder described by `unowned`.
#[cfg(any(feature = "sqlite", feature = "libvirt"))]
pub(crate) fn release_owned(
    conn: &mut Connection,
    table: &'static str,
    vm: &str,
    owner: &str,
    unowned: &str,
    err: &impl Fn(rusqlite::Error) -> Error,
) -> Result<crate::types::Undone, Error> {
    use rusqlite::{OptionalExtension, TransactionBehavior, params};
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(err)?;
    let n = tx
        .execute(
            &format!("DELETE FROM {table} WHERE vm = ?1 AND owner = ?2"),
            params![vm, owner],
        )
        .map_err(err)?;
    let left: Option<Option<String>> = tx
        .query_row(
            &format!("SELECT owner FROM {table} WHERE vm = ?1"),
            params![vm],
            |r| r.get(0),
        )
        .optional()
        .map_err(err)?;
    tx.commit().map_err(err)?;
    Ok(match (n, left) {
        (0, Some(holder)) => {
            crate::types::Undone::foreign(holder.unwrap_or_else(|| unowned.to_owned()))
        }
        (0, None) => crate::types::Undone::Absent,
        _ => crate::types::Undone::Removed,
    })
}
