//! A pipeline's validated configuration, free of Kubernetes types.

use std::fmt;
use std::time::Duration;

use tokio_postgres::config::SslMode;

use super::tls::{CaCert, TlsError, TlsMode, TlsSettings, percent_decode};

/// A PostgreSQL connection URI. It holds a password, so it never prints: `Debug` and `Display` show
/// only host, port and database (and `sslmode` when it verifies).
#[derive(Clone, PartialEq, Eq)]
pub struct ConnString {
    /// The URI without `sslmode` and `sslrootcert`: [`ConnString::tls`] holds them.
    uri: String,
    config: tokio_postgres::Config,
    tls: TlsSettings,
}

impl ConnString {
    pub fn parse(uri: &str) -> Result<Self, String> {
        let (uri, tls) = split_tls(uri)?;
        let mut config: tokio_postgres::Config = uri
            .parse()
            .map_err(|e| format!("not a valid postgres:// URI ({e})"))?;
        if config.get_hosts().is_empty() {
            return Err("the URI names no host".into());
        }
        if config.get_user().is_none() {
            return Err("the URI names no user".into());
        }
        if config.get_dbname().is_none() {
            return Err("the URI names no database".into());
        }
        // tokio-postgres negotiates TLS; the verifier of [`TlsSettings::client_config`] checks.
        config.ssl_mode(match tls.mode {
            TlsMode::Disable => SslMode::Disable,
            TlsMode::Prefer => SslMode::Prefer,
            _ => SslMode::Require,
        });
        Ok(Self { uri, config, tls })
    }

    pub fn tls(&self) -> &TlsSettings {
        &self.tls
    }

    /// The same URI with the CA from a Secret key (replacing none: validation refuses a CA given
    /// both ways).
    pub fn with_ca(mut self, ca: CaCert) -> Self {
        self.tls.ca = Some(ca);
        self
    }

    /// The same URI without a CA: for a database that defaults to another's but names its own CA.
    pub fn without_ca(mut self) -> Self {
        self.tls.ca = None;
        self
    }

    /// The URI for the sqlx drivers (buffer migrations, the Iceberg SQL catalog): `sslmode` as
    /// connections use it and `sslrootcert` a file.
    pub fn sqlx_uri(&self) -> Result<String, TlsError> {
        let sep = if self.uri.contains('?') { '&' } else { '?' };
        Ok(format!("{}{sep}{}", self.uri, self.tls.sqlx_params()?))
    }

    pub fn config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// How long connecting may take (TCP, TLS and login).
    pub fn connect_timeout(&self) -> Duration {
        self.config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10))
    }

    pub fn with_connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout(d);
        self
    }

    pub fn host(&self) -> String {
        match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => String::new(),
        }
    }

    pub fn port(&self) -> u16 {
        self.config.get_ports().first().copied().unwrap_or(5432)
    }

    pub fn user(&self) -> &str {
        self.config.get_user().unwrap_or_default()
    }

    pub fn password(&self) -> String {
        self.config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    }

    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or_default()
    }

    /// TLS for the replication connection: the same rustls configuration as the others.
    pub fn replication_tls(&self) -> Result<pgwire_replication::TlsConfig, TlsError> {
        let mut tls = pgwire_replication::TlsConfig::disabled();
        tls.mode = match self.tls.effective() {
            TlsMode::Disable => pgwire_replication::SslMode::Disable,
            TlsMode::Prefer => pgwire_replication::SslMode::Prefer,
            _ => pgwire_replication::SslMode::Require,
        };
        tls.rustls_config = self
            .tls
            .client_config()?
            .map(pgwire_replication::RustlsClientConfig);
        Ok(tls)
    }

    /// A replication session on this database for `slot` and `publication`.
    pub fn replication(
        &self,
        slot: &str,
        publication: &str,
        application: &str,
    ) -> Result<pgwire_replication::ReplicationConfig, TlsError> {
        Ok(pgwire_replication::ReplicationConfig::new(
            self.host(),
            self.user(),
            self.password(),
            self.dbname(),
            slot,
            publication,
        )
        .with_port(self.port())
        .with_tls(self.replication_tls()?)
        .with_options(super::pg::session_options(self.config.get_options()))
        .with_application_name(application))
    }

    /// Whether two URIs point at the same database (same host, port and database name).
    pub fn same_database(&self, other: &ConnString) -> bool {
        self.host() == other.host()
            && self.port() == other.port()
            && self.dbname() == other.dbname()
    }
}

impl fmt::Debug for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for ConnString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "postgres://{}:{}/{}",
            self.host(),
            self.port(),
            self.dbname()
        )?;
        match self.tls.effective() {
            m if m.verifies() => write!(f, "?sslmode={}", m.as_str()),
            _ => Ok(()),
        }
    }
}

/// Takes `sslmode` and `sslrootcert` out of a `postgres://` URI's query (tokio-postgres knows
/// neither verify mode nor the root certificate); the rest stays as written.
fn split_tls(uri: &str) -> Result<(String, TlsSettings), String> {
    let mut tls = TlsSettings::default();
    let is_url = uri.starts_with("postgres://") || uri.starts_with("postgresql://");
    let Some((base, query)) = uri.split_once('?').filter(|_| is_url) else {
        return Ok((uri.to_string(), tls));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_decode(value)
                .ok_or_else(|| format!("the URI's {key} is not valid percent-encoded text"))
        };
        match key {
            "sslmode" => {
                let v = value()?;
                tls.mode = TlsMode::parse(&v).ok_or_else(|| {
                    format!("sslmode {v:?} is not one of disable, prefer, require, verify-ca, verify-full")
                })?;
            }
            "sslrootcert" => tls.ca = Some(CaCert::File(value()?.into())),
            _ => kept.push(pair),
        }
    }
    let uri = match kept.is_empty() {
        true => base.to_string(),
        false => format!("{base}?{}", kept.join("&")),
    };
    Ok((uri, tls))
}

pub use super::table_name::TableName;

/// Where the pipeline delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum SinkConfig {
    /// Tables in `schema` of a PostgreSQL database, kept equal to the source.
    Postgres { conn: ConnString, schema: String },
    /// Changelog tables in an Apache Iceberg catalog.
    Iceberg(IcebergConfig),
}

impl SinkConfig {
    /// What the sink is, for logs: no secrets.
    pub fn describe(&self) -> String {
        match self {
            SinkConfig::Postgres { conn, schema } => format!("postgres {conn} schema {schema}"),
            SinkConfig::Iceberg(c) => format!(
                "iceberg {} namespace {} (catalog {})",
                c.warehouse, c.namespace, c.catalog
            ),
        }
    }
}

/// The Iceberg sink's settings (`spec.sink.iceberg`).
#[derive(Debug, Clone, PartialEq)]
pub struct IcebergConfig {
    /// The PostgreSQL database holding the SQL catalog's tables.
    pub catalog: ConnString,
    /// `file:///...` or `s3://bucket/prefix`.
    pub warehouse: String,
    pub s3: Option<S3Config>,
    pub namespace: String,
    pub commit_interval: Duration,
    pub target_file_size: u64,
}

/// S3 settings of an `s3://` warehouse. The secret key never prints.
#[derive(Clone, PartialEq)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: String,
    pub path_style: bool,
    /// Access key id and secret access key; none: the environment's credentials.
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<secret>"),
            )
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_interval: Duration,
    pub max_interval: Duration,
    pub multiplier: f32,
    pub jitter: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Running,
    Paused,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PipelineConfig {
    /// Stable identity: the resource uid (buffer rows and derived names hang off it).
    pub id: String,
    /// `namespace/name`, for logs and metrics.
    pub name: String,
    pub source: ConnString,
    pub tables: Vec<TableName>,
    /// Copy the tables' rows first when the pipeline creates its slot.
    pub initial_snapshot: bool,
    pub publication: String,
    pub slot: String,
    pub sink: SinkConfig,
    pub buffer: ConnString,
    pub batch_size: usize,
    /// Changes go from the replication stream straight to the sink (`spec.buffer.bypass`); the
    /// sink's own recorded position is then what the source is acknowledged up to.
    pub bypass_buffer: bool,
    pub flush_interval: Duration,
    pub retention: Duration,
    pub retry: RetryPolicy,
    pub dead_letter_enabled: bool,
    pub dead_letter_retention: Duration,
    pub high_watermark: u64,
    pub low_watermark: u64,
    pub check_interval: Duration,
    /// How long a database may owe an answer (or a replication stream stay silent) before the
    /// connection counts as dead. The connect timeout is in each [`ConnString`].
    pub response_timeout: Duration,
    /// `safe_wal_size` below this many bytes puts the slot's WAL at risk.
    pub wal_at_risk_bytes: i64,
    /// Rebuild once when this token differs from the last resync's (`spec.resync`).
    pub resync: Option<String>,
    /// Who runs the pipeline (operator replica identity, or `philotes run` and its host): recorded
    /// with the ownership epoch. Set by the supervisor, not by the spec.
    pub owner: String,
    pub delivery: Delivery,
}

impl PipelineConfig {
    /// Whether `other` differs only in what a running worker can change in place (delivery).
    pub fn same_except_delivery(&self, other: &PipelineConfig) -> bool {
        let mut a = self.clone();
        a.delivery = other.delivery;
        &a == other
    }
}

/// Slot and publication names derived from a uid: `philotes_` and the uid's hex digits.
pub fn derived_name(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .take(32)
        .collect();
    format!("philotes_{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conn_string_never_prints_the_password() {
        let c = ConnString::parse("postgres://app:s3cret@db.example:6543/shop").unwrap();
        assert_eq!(format!("{c}"), "postgres://db.example:6543/shop");
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.password(), "s3cret");
        assert_eq!(c.user(), "app");
        assert!(ConnString::parse("postgres://app@/x").is_err());
        assert!(ConnString::parse("nonsense").is_err());
    }

    #[test]
    fn sslmode_and_sslrootcert_are_taken_out_of_the_uri() {
        let c = ConnString::parse(
            "postgres://app:s3cret@db:5432/shop?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%201.crt",
        )
        .unwrap();
        assert_eq!(c.tls().mode, TlsMode::VerifyFull);
        assert_eq!(c.tls().ca, Some(CaCert::File("/etc/ca 1.crt".into())));
        assert_eq!(c.to_string(), "postgres://db:5432/shop?sslmode=verify-full");
        assert_eq!(
            c.sqlx_uri().unwrap(),
            "postgres://app:s3cret@db:5432/shop?application_name=x&sslmode=verify-full&sslrootcert=/etc/ca%201.crt"
        );
        assert_eq!(c.config().get_ssl_mode(), SslMode::Require);
        let plain = ConnString::parse("postgres://app:pw@db/shop").unwrap();
        assert_eq!(plain.tls().mode, TlsMode::Prefer);
        assert_eq!(plain.to_string(), "postgres://db:5432/shop");
        assert_eq!(
            plain.sqlx_uri().unwrap(),
            "postgres://app:pw@db/shop?sslmode=prefer"
        );
        let err = ConnString::parse("postgres://app:s3cret@db/shop?sslmode=verify").unwrap_err();
        assert!(
            err.contains("verify-full") && !err.contains("s3cret"),
            "{err}"
        );
    }

    #[test]
    fn s3_credentials_never_print() {
        let s3 = S3Config {
            endpoint: None,
            region: "us-east-1".into(),
            path_style: true,
            credentials: Some(("AKIAEXAMPLE".into(), "wJalrXUtnFEMI".into())),
        };
        let text = format!("{s3:?}");
        assert!(
            !text.contains("wJalrXUtnFEMI") && !text.contains("AKIAEXAMPLE"),
            "{text}"
        );
    }

    #[test]
    fn derived_names_are_valid_identifiers() {
        let n = derived_name("6f1c2d3e-0000-4b5a-9c8d-112233445566");
        assert_eq!(n, "philotes_6f1c2d3e00004b5a9c8d112233445566");
        assert!(n.len() <= 63);
    }
}
