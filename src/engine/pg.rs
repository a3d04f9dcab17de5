//! Ordinary (non-replication) PostgreSQL connections.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::config::ConnString;
use super::error::EngineError;

/// Connects with a 10 s timeout and TCP keepalives; the connection is driven by a spawned task that
/// ends when the client is dropped.
pub async fn connect(uri: &ConnString, purpose: &str) -> Result<Client, EngineError> {
    let mut config = uri.config().clone();
    config
        .application_name(format!("philotes-{purpose}"))
        .connect_timeout(Duration::from_secs(10))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(EngineError::pg(format!(
            "connecting to {purpose} database {uri}"
        )))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection ended");
        }
    });
    Ok(client)
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
    }
}
