//! Store failures, and the adapters that turn database and file errors into them (a full
//! disk named as such).

use super::*;

/// A store failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// File I/O failed.
    #[error("store I/O on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// The local disk is full.
    #[error("the local disk is full (writing {path}); free some space and try again")]
    DiskFull {
        /// The file being written.
        path: String,
    },
    /// A database of an older version.
    #[error(
        "{file} was written by an older voltool (it holds table {table:?}); this version cannot read it: move that data directory away to start afresh"
    )]
    OldFormat {
        /// The database file.
        file: String,
        /// The old table found.
        table: String,
    },
    /// The metadata database failed.
    #[error("store database: {0}")]
    Db(String),
    /// The blob is not held (or not completely).
    #[error("blob {0} is not in the store")]
    NotFound(Hash),
    /// Content does not match its hash.
    #[error("blob {hash} failed verification: {message}")]
    Corrupt {
        /// The blob.
        hash: Hash,
        /// What failed.
        message: String,
    },
    /// The reader of an encoding stopped taking it (a requester that cancelled or left):
    /// nothing is wrong with the blob.
    #[error("the receiver of blob {0} stopped reading")]
    ReceiverGone(Hash),
    /// A provider lacks some requested ranges of a partial blob.
    #[error("blob {0} is held only in part; requested ranges are missing")]
    MissingRanges(Hash),
    /// The object store holding the blob bytes failed or refused.
    #[error("{what}: {message}")]
    Remote {
        /// The bucket or object.
        what: String,
        /// What failed.
        message: String,
    },
}

/// A failure of the metadata database, or of decoding what it holds; a full disk under the
/// database says so, as it does under a blob's files.
pub(super) fn db_err(e: impl DbFault) -> StoreError {
    e.into_store()
}

pub(super) trait DbFault {
    fn into_store(self) -> StoreError;
}

impl DbFault for redb::Error {
    fn into_store(self) -> StoreError {
        match self {
            redb::Error::Io(e) if e.kind() == io::ErrorKind::StorageFull => StoreError::DiskFull {
                path: "the store's database".into(),
            },
            e => StoreError::Db(e.to_string()),
        }
    }
}

macro_rules! db_fault_via_redb {
    ($($t:ty),*) => {
        $(impl DbFault for $t {
            fn into_store(self) -> StoreError {
                redb::Error::from(self).into_store()
            }
        })*
    };
}

db_fault_via_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl DbFault for postcard::Error {
    fn into_store(self) -> StoreError {
        StoreError::Db(self.to_string())
    }
}

pub(super) trait IoCtx<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> IoCtx<T> for io::Result<T> {
    fn ctx(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|source| StoreError::io(path, source))
    }
}

impl StoreError {
    /// A failed file operation on `path`; a full disk says so.
    pub fn io(path: &Path, source: io::Error) -> Self {
        let path = path.display().to_string();
        if source.kind() == io::ErrorKind::StorageFull {
            StoreError::DiskFull { path }
        } else {
            StoreError::Io { path, source }
        }
    }
}
