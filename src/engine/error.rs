//! Engine errors, each with a class that decides whether and how it is retried.

use tokio_postgres::error::SqlState;

/// What a failure means for the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The peer is unreachable or the connection broke: retried until it is back.
    Connection,
    /// A passing conflict (serialization failure, deadlock, lock or statement timeout): retried.
    Transient,
    /// The data itself is refused (bad value, constraint): retried `maxAttempts`, then dead-lettered.
    Data,
    /// A database is set up wrong for what Philotes does there (a missing privilege, table or column,
    /// SQLSTATE class 42): a person must fix it, but the pipeline keeps its place and retries with
    /// backoff meanwhile. Never dead-lettered: the data is not at fault.
    Setup,
    /// Configuration that a person must fix (password, missing table, privileges): not retried.
    Config,
}

impl ErrorClass {
    pub fn retries_forever(self) -> bool {
        matches!(
            self,
            ErrorClass::Connection | ErrorClass::Transient | ErrorClass::Setup
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{context}: {}", describe_pg(source))]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{context}: {source}")]
    Replication {
        context: String,
        #[source]
        source: pgwire_replication::PgWireError,
    },
    #[error("buffer migrations: {0}")]
    Migrate(String),
    /// The CA certificate cannot be used (unreadable, not PEM): a person must fix it.
    #[error("{0}")]
    Tls(#[from] crate::engine::tls::TlsError),
    #[error("pgoutput: {0}")]
    Decode(#[from] crate::engine::source::pgoutput::DecodeError),
    /// A database owed an answer for too long: the connection counts as dead.
    #[error("{what}: no answer within {}; the connection is taken for dead and made again", humantime::format_duration(*after))]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
    /// The slot can no longer give the changes the pipeline needs (invalidated by
    /// `max_slot_wal_keep_size`, dropped, or missing after a failover).
    #[error(
        "replication slot {slot} is lost ({why}): the changes made since {since} can no longer be read, so the sink misses them"
    )]
    SlotLost {
        slot: String,
        why: String,
        since: String,
    },
    /// Another process took the pipeline (a higher ownership epoch): this one must not write again.
    #[error(
        "{owner} took this pipeline over (epoch {epoch}, ours {ours}); this worker stopped writing"
    )]
    Superseded {
        owner: String,
        epoch: i64,
        ours: i64,
    },
    /// A problem a person must fix, with the fix.
    #[error("{problem}")]
    Invalid { problem: String, fix: String },
    #[error("{0}")]
    Protocol(String),
    #[error("iceberg sink: {0}")]
    Iceberg(Box<crate::engine::sink::iceberg::IcebergError>),
}

impl From<crate::engine::sink::iceberg::IcebergError> for EngineError {
    fn from(e: crate::engine::sink::iceberg::IcebergError) -> Self {
        EngineError::Iceberg(Box::new(e))
    }
}

impl EngineError {
    pub fn pg(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> EngineError {
        let context = context.into();
        move |source| EngineError::Postgres { context, source }
    }

    pub fn invalid(problem: impl Into<String>, fix: impl Into<String>) -> EngineError {
        EngineError::Invalid {
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// A condition reason for errors that have one of their own.
    pub fn reason(&self) -> Option<&'static str> {
        match self {
            EngineError::SlotLost { .. } => Some("SlotLost"),
            EngineError::Superseded { .. } => Some("Superseded"),
            _ => None,
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            EngineError::Postgres { source, .. } => classify_pg(source),
            EngineError::Replication { source, .. } => classify_wire(source),
            EngineError::Migrate(_) | EngineError::Timeout { .. } => ErrorClass::Connection,
            // The same bytes decode the same way: retrying cannot help.
            EngineError::Decode(_) => ErrorClass::Config,
            EngineError::Protocol(_) => ErrorClass::Transient,
            EngineError::Invalid { .. }
            | EngineError::Tls(_)
            | EngineError::SlotLost { .. }
            | EngineError::Superseded { .. } => ErrorClass::Config,
            EngineError::Iceberg(e) => e.class(),
        }
    }

    /// What a person can do about it, for status and events.
    pub fn fix(&self) -> String {
        match self {
            EngineError::Invalid { fix, .. } => fix.clone(),
            EngineError::SlotLost { .. } => {
                "resync: set spec.resync to a new token (kubectl patch, or `philotes run --resync`): a new slot, the tables copied again and the sink tables' rows replaced in one transaction; to keep it from happening again, raise max_slot_wal_keep_size or keep the pipeline running".into()
            }
            EngineError::Superseded { .. } => {
                "none needed when replicas share pipelines: the new owner goes on from the buffer; if two processes were started on one pipeline by mistake (`philotes run` and the operator), stop one".into()
            }
            EngineError::Iceberg(e) if e.fix().is_some() => e.fix().unwrap_or_default().into(),
            EngineError::Decode(_) => {
                "a replication message could not be decoded: report it with the log; the pipeline stopped before the message, so nothing is lost".into()
            }
            _ => match self.class() {
                ErrorClass::Connection => {
                    "check that the database is up and reachable from the operator; Philotes retries with backoff".into()
                }
                ErrorClass::Transient => "none needed; Philotes retries with backoff".into(),
                ErrorClass::Data => {
                    "the sink refuses the data; the events go to the dead-letter queue (`philotes dlq list`)".into()
                }
                ErrorClass::Config => config_fix(self),
                ErrorClass::Setup => setup_fix(self),
            },
        }
    }
}

/// The server's own words for a database error (severity, SQLSTATE, message, detail); otherwise the
/// error with its causes.
pub fn describe_pg(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(d) = db.detail() {
            s.push_str(&format!(" ({d})"));
        }
        return s;
    }
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(&format!(": {c}"));
        cause = c.source();
    }
    s
}

fn config_fix(e: &EngineError) -> String {
    let code = match e {
        EngineError::Postgres { source, .. } => source.code().cloned(),
        _ => None,
    };
    match code {
        Some(c)
            if c == SqlState::INVALID_PASSWORD
                || c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            "correct the user or password in the connection Secret".into()
        }
        Some(c) if c == SqlState::INVALID_CATALOG_NAME => {
            "correct the database name in the connection URI".into()
        }
        Some(c) if c == SqlState::INSUFFICIENT_PRIVILEGE => {
            "grant the user REPLICATION and the needed privileges on the tables and schemas".into()
        }
        Some(c) if c == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE => {
            "set wal_level=logical on the source and restart it".into()
        }
        _ => "correct the configuration named in the error".into(),
    }
}

fn setup_fix(e: &EngineError) -> String {
    let code = match e {
        EngineError::Postgres { source, .. } => source.code().map(|c| c.code().to_string()),
        _ => None,
    };
    let what = match code.as_deref() {
        Some("42501") => {
            "grant the user the privilege the error names (the README lists what each database needs)"
        }
        Some("42P01") | Some("42703") | Some("3F000") => {
            "re-create the table, column or schema the error names (or restart the pipeline, which creates missing sink tables)"
        }
        _ => "correct the database object the error names",
    };
    format!("{what}; Philotes keeps its place and retries until then, and dead-letters nothing")
}

fn classify_pg(e: &tokio_postgres::Error) -> ErrorClass {
    let Some(code) = e.code() else {
        // No SQLSTATE: an I/O error, a closed connection or a timeout.
        return ErrorClass::Connection;
    };
    classify_sqlstate(code.code())
}

/// Classifies a SQLSTATE by its class (first two characters) and a few exact codes.
pub fn classify_sqlstate(code: &str) -> ErrorClass {
    match code {
        "40001" | "40P01" | "55P03" | "57014" | "53300" | "53200" | "53100" => {
            ErrorClass::Transient
        }
        "57P01" | "57P02" | "57P03" | "57P04" => ErrorClass::Connection,
        "55006" => ErrorClass::Transient, // object in use, e.g. slot active in another session
        _ => match &code[..code.len().min(2)] {
            "08" => ErrorClass::Connection,
            "22" | "23" | "2F" => ErrorClass::Data,
            "42" => ErrorClass::Setup,
            "28" | "3D" | "3F" | "55" => ErrorClass::Config,
            _ => ErrorClass::Transient,
        },
    }
}

fn classify_wire(e: &pgwire_replication::PgWireError) -> ErrorClass {
    use pgwire_replication::PgWireError as W;
    match e {
        W::Auth(_) => ErrorClass::Config,
        W::Server(text) => match text.find("SQLSTATE ") {
            Some(i) => {
                let code: String = text[i + 9..].chars().take(5).collect();
                match classify_sqlstate(&code) {
                    // A refused replication command is a configuration problem, not bad data.
                    ErrorClass::Data | ErrorClass::Setup => ErrorClass::Config,
                    c => c,
                }
            }
            None => ErrorClass::Transient,
        },
        W::Tls(_) => ErrorClass::Config,
        _ => ErrorClass::Connection,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_classes() {
        assert_eq!(classify_sqlstate("40001"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("40P01"), ErrorClass::Transient);
        assert_eq!(classify_sqlstate("08006"), ErrorClass::Connection);
        assert_eq!(classify_sqlstate("57P01"), ErrorClass::Connection);
        assert_eq!(classify_sqlstate("22001"), ErrorClass::Data);
        assert_eq!(classify_sqlstate("23514"), ErrorClass::Data);
        assert_eq!(classify_sqlstate("28P01"), ErrorClass::Config);
        assert_eq!(classify_sqlstate("3D000"), ErrorClass::Config);
        // Privileges and missing objects are not the data's fault.
        assert_eq!(classify_sqlstate("42501"), ErrorClass::Setup);
        assert_eq!(classify_sqlstate("42P01"), ErrorClass::Setup);
        assert!(ErrorClass::Setup.retries_forever());
        let decode = EngineError::Decode(crate::engine::source::pgoutput::DecodeError::Truncated(
            "a test",
        ));
        assert_eq!(decode.class(), ErrorClass::Config);
        assert!(ErrorClass::Connection.retries_forever());
        assert!(!ErrorClass::Data.retries_forever());
    }
}
