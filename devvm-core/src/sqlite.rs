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
/// transaction), and a 30 s wait for other writers. Several processes may share it.
pub(crate) fn open(path: &Path, backend: &'static str) -> Result<Connection, Error> {
    let e = err(format!("database {}", path.display()), backend);
    let conn = Connection::open(path).map_err(&e)?;
    conn.busy_timeout(Duration::from_secs(30)).map_err(&e)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(&e)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&e)?;
    Ok(conn)
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
