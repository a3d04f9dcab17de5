//! Ordinary (non-replication) PostgreSQL connections.

use std::time::Duration;

use std::sync::Arc;

use tokio_postgres::{Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::config::ConnString;
use super::error::EngineError;

/// Settings every session that reads or writes values runs with (walsender, snapshot, buffer, sink),
/// whatever the server's or the user's defaults: values travel in their text form, and these make
/// that form exact and unambiguous on both ends (ISO dates, shortest exact floats, UTC, hex bytea).
pub const SESSION_OPTIONS: &str = "-c DateStyle=ISO,MDY -c IntervalStyle=postgres -c extra_float_digits=3 -c TimeZone=UTC -c bytea_output=hex";

/// Runs `fut`, a request to a database, giving up after `after`: an answer owed that long means the
/// path is dead (TCP does not notice a middlebox that swallows traffic). The caller then drops the
/// connection.
pub async fn deadline<T>(
    after: Duration,
    what: &str,
    fut: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(after, fut).await {
        Ok(r) => r,
        Err(_) => Err(EngineError::Timeout {
            what: what.to_string(),
            after,
        }),
    }
}

/// `options` of a URI with [`SESSION_OPTIONS`] after them (later settings win).
pub fn session_options(existing: Option<&str>) -> String {
    match existing.map(str::trim).filter(|o| !o.is_empty()) {
        Some(o) => format!("{o} {SESSION_OPTIONS}"),
        None => SESSION_OPTIONS.to_string(),
    }
}

/// Connects with a 10 s timeout, TCP keepalives and [`SESSION_OPTIONS`]; the connection is driven
/// by a spawned task that ends when the client is dropped.
pub async fn connect(uri: &ConnString, purpose: &str) -> Result<Client, EngineError> {
    let limit = uri.connect_timeout();
    // The connect timeout of tokio-postgres covers the TCP connect; this covers TLS and login too.
    deadline(
        limit,
        &format!("connecting to {purpose} database {uri}"),
        connect_once(uri, purpose),
    )
    .await
}

async fn connect_once(uri: &ConnString, purpose: &str) -> Result<Client, EngineError> {
    let mut config = uri.config().clone();
    let options = session_options(config.get_options());
    config
        .options(&options)
        .application_name(format!("philotes-{purpose}"))
        .connect_timeout(uri.connect_timeout())
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        // Unacknowledged data this long: the peer is gone (a pulled cable, a crashed host).
        .tcp_user_timeout(Duration::from_secs(30));
    let context = format!("connecting to {purpose} database {uri}");
    let client = match uri.tls().client_config()? {
        None => {
            let (client, connection) = config
                .connect(NoTls)
                .await
                .map_err(EngineError::pg(context))?;
            tokio::spawn(drive(connection));
            client
        }
        Some(tls) => {
            let (client, connection) = config
                .connect(MakeRustlsConnect::new(Arc::unwrap_or_clone(tls)))
                .await
                .map_err(EngineError::pg(context))?;
            tokio::spawn(drive(connection));
            client
        }
    };
    Ok(client)
}

async fn drive<F: std::future::Future<Output = Result<(), tokio_postgres::Error>>>(connection: F) {
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "postgres connection ended");
    }
}

/// Quotes an identifier for SQL.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL.
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `0/16B3748` form of an LSN.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_and_lsn_text() {
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(literal("o'k"), "'o''k'");
        assert_eq!(lsn_text(0x1_016B_3748), "1/16B3748");
        assert_eq!(parse_lsn("1/16B3748"), Some(0x1_016B_3748));
        assert_eq!(parse_lsn("x"), None);
        assert_eq!(session_options(None), SESSION_OPTIONS);
        assert_eq!(
            session_options(Some("-c work_mem=64MB")),
            format!("-c work_mem=64MB {SESSION_OPTIONS}")
        );
    }
}
