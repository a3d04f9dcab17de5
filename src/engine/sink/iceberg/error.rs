//! The Iceberg sink's errors, each with the class that decides how the processor retries it.

use crate::engine::error::ErrorClass;

#[derive(Debug, thiserror::Error)]
pub enum IcebergError {
    /// The catalog, or the warehouse's storage, failed or could not be reached.
    #[error("{context}: {source}")]
    Iceberg {
        context: String,
        #[source]
        source: Box<iceberg::Error>,
    },
    /// A value the source sent does not fit the column's Iceberg type.
    #[error("table {table} column {column}: {problem}")]
    Value {
        table: String,
        column: String,
        problem: String,
    },
    /// A source column changed in a way the Iceberg schema cannot follow.
    #[error("table {table} column {column}: {problem}")]
    Schema {
        table: String,
        column: String,
        problem: String,
    },
    /// Arrow could not assemble the rows of a data file (a bug, or a schema the sink did not expect).
    #[error("building the rows of {table}: {source}")]
    Arrow {
        table: String,
        #[source]
        source: arrow_schema::ArrowError,
    },
    /// The catalog's CA certificate cannot be used.
    #[error("the Iceberg SQL catalog's TLS: {0}")]
    Tls(#[from] crate::engine::tls::TlsError),
    /// The snapshot summary holds a position the sink cannot read.
    #[error("table {table}: snapshot summary {key} = {value:?} is not a position")]
    Summary {
        table: String,
        key: &'static str,
        value: String,
    },
}

impl IcebergError {
    pub fn iceberg(context: impl Into<String>) -> impl FnOnce(iceberg::Error) -> IcebergError {
        let context = context.into();
        move |source| IcebergError::Iceberg {
            context,
            source: Box::new(source),
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            IcebergError::Iceberg { source, .. } => classify(source),
            IcebergError::Value { .. } => ErrorClass::Data,
            IcebergError::Schema { .. } | IcebergError::Summary { .. } | IcebergError::Tls(_) => {
                ErrorClass::Config
            }
            IcebergError::Arrow { .. } => ErrorClass::Transient,
        }
    }

    pub fn fix(&self) -> Option<&'static str> {
        match self {
            IcebergError::Schema { .. } => Some(
                "Iceberg cannot change a column's type this way: give the column a new name at the source (added columns are added to the Iceberg table), or re-create the pipeline into a new namespace",
            ),
            IcebergError::Summary { .. } => Some(
                "another writer committed to the table with a philotes.position Philotes cannot read: give this pipeline its own namespace",
            ),
            _ => None,
        }
    }
}

/// Catalog and storage failures are taken for outages (retried until the warehouse is back),
/// except those that no retry can fix.
fn classify(e: &iceberg::Error) -> ErrorClass {
    use iceberg::ErrorKind as K;
    match e.kind() {
        K::FeatureUnsupported | K::PreconditionFailed => ErrorClass::Config,
        K::CatalogCommitConflicts => ErrorClass::Transient,
        _ => ErrorClass::Connection,
    }
}
