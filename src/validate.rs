//! Pure validation: a `CdcPipeline` spec plus the Secrets it references → a [`PipelineConfig`], or
//! every problem found, each naming the field and the fix.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::crd::{CdcPipelineSpec, DesiredState, IcebergSinkSpec, SecretKeyRef, TlsSpec};
use crate::engine::config::{
    ConnString, Delivery, IcebergConfig, PipelineConfig, RetryPolicy, S3Config, SinkConfig,
    TableName, derived_name,
};
use crate::engine::tls::CaCert;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub field: String,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}; fix: {}", self.field, self.problem, self.fix)
    }
}

/// Secrets of the pipeline's namespace: name → key → value.
pub type Secrets = BTreeMap<String, BTreeMap<String, String>>;

/// Who the pipeline is: the uid names its slot, publication and buffer rows.
#[derive(Debug, Clone)]
pub struct Identity {
    pub uid: String,
    pub namespace: String,
    pub name: String,
}

struct Check {
    errors: Vec<SpecError>,
}

impl Check {
    fn err(
        &mut self,
        field: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.errors.push(SpecError {
            field: field.into(),
            problem: problem.into(),
            fix: fix.into(),
        });
    }

    fn duration(&mut self, field: &str, text: &str) -> Duration {
        match humantime::parse_duration(text) {
            Ok(d) => d,
            Err(e) => {
                self.err(
                    field,
                    format!("{text:?} is not a duration ({e})"),
                    "write a duration like 500ms, 1s, 5m or 168h",
                );
                Duration::from_secs(1)
            }
        }
    }

    fn secret(
        &mut self,
        field: &str,
        r: &SecretKeyRef,
        secrets: &Secrets,
        namespace: &str,
    ) -> Option<ConnString> {
        let Some(data) = secrets.get(&r.name) else {
            self.err(
                format!("{field}.name"),
                format!("Secret {:?} not found in namespace {namespace}", r.name),
                format!(
                    "create Secret {:?} with key {:?} holding a postgres:// URI",
                    r.name, r.key
                ),
            );
            return None;
        };
        let Some(uri) = data.get(&r.key) else {
            self.err(
                format!("{field}.key"),
                format!("Secret {:?} has no key {:?}", r.name, r.key),
                format!("add key {:?} to the Secret, or name an existing key", r.key),
            );
            return None;
        };
        match ConnString::parse(uri.trim()) {
            Ok(c) => Some(c),
            Err(problem) => {
                // The value itself is secret: name only where it lives.
                self.err(
                    field,
                    format!("Secret {:?} key {:?}: {problem}", r.name, r.key),
                    "store a URI like postgres://user:password@host:5432/database",
                );
                None
            }
        }
    }

    /// `conn` with the CA of `tls` (field `{field}.tls.caSecretRef`), checked with its `sslmode`.
    fn tls(
        &mut self,
        field: &str,
        conn: Option<ConnString>,
        tls: Option<&TlsSpec>,
        secrets: &Secrets,
        namespace: &str,
    ) -> Option<ConnString> {
        let mut conn = conn?;
        let ca_field = format!("{field}.tls.caSecretRef");
        if let Some(r) = tls.and_then(|t| t.ca_secret_ref.as_ref()) {
            let pem = match secrets.get(&r.name).map(|d| d.get(&r.key)) {
                None => {
                    self.err(
                        format!("{ca_field}.name"),
                        format!("Secret {:?} not found in namespace {namespace}", r.name),
                        format!(
                            "create Secret {:?} with key {:?} holding the CA certificate (PEM)",
                            r.name, r.key
                        ),
                    );
                    return None;
                }
                Some(None) => {
                    self.err(
                        format!("{ca_field}.key"),
                        format!("Secret {:?} has no key {:?}", r.name, r.key),
                        format!("add key {:?} to the Secret, or name an existing key", r.key),
                    );
                    return None;
                }
                Some(Some(pem)) => pem,
            };
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                self.err(
                    ca_field,
                    format!(
                        "Secret {:?} key {:?} holds no PEM certificate",
                        r.name, r.key
                    ),
                    "store the CA certificate as PEM (-----BEGIN CERTIFICATE----- ...)",
                );
                return None;
            }
            if conn.tls().ca.is_some() {
                self.err(
                    ca_field,
                    "the URI names sslrootcert too, so the CA is given twice",
                    "keep one: sslrootcert in the URI or the Secret key here",
                );
                return None;
            }
            conn = conn.with_ca(CaCert::Pem {
                pem: pem.as_str().into(),
                origin: format!("Secret {:?} key {:?}", r.name, r.key),
            });
        }
        if let Some((problem, fix)) = conn.tls().problem(&ca_field) {
            self.err(format!("{field}.connectionSecretRef"), problem, fix);
            return None;
        }
        Some(conn)
    }
}

fn valid_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && !s.contains('\0')
}

fn valid_slot_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A `spec.source.tables` entry (see [`TableName::parse`]).
pub fn parse_table(entry: &str) -> Option<TableName> {
    TableName::parse(entry)
}

/// Validates a spec. `default_buffer` is used when the spec names no buffer database and the operator
/// was given one; otherwise the source database holds the buffer.
pub fn validate(
    id: &Identity,
    spec: &CdcPipelineSpec,
    secrets: &Secrets,
    default_buffer: Option<&SecretKeyRef>,
) -> Result<(PipelineConfig, DesiredState), Vec<SpecError>> {
    let mut c = Check { errors: Vec::new() };
    let ns = id.namespace.as_str();

    let source = c.secret(
        "spec.source.connectionSecretRef",
        &spec.source.connection_secret_ref,
        secrets,
        ns,
    );
    let source = c.tls("spec.source", source, spec.source.tls.as_ref(), secrets, ns);
    let buffer = match (&spec.buffer.connection_secret_ref, default_buffer) {
        (Some(r), _) => c.secret("spec.buffer.connectionSecretRef", r, secrets, ns),
        (None, Some(r)) => c.secret("operator --default-buffer-secret", r, secrets, ns),
        // The source database, with the source's TLS unless spec.buffer.tls names its own CA.
        (None, None) if spec.buffer.tls.is_some() => source.clone().map(ConnString::without_ca),
        (None, None) => source.clone(),
    };
    // The source's TLS is checked already; every other buffer URI is checked here.
    let buffer = match (
        &spec.buffer.connection_secret_ref,
        default_buffer,
        &spec.buffer.tls,
    ) {
        (None, None, None) => buffer,
        (_, _, tls) => c.tls("spec.buffer", buffer, tls.as_ref(), secrets, ns),
    };
    // The PostgreSQL sink's connection and schema, or the Iceberg sink's settings.
    let mut sink_schema = String::new();
    let (sink, iceberg) = match (&spec.sink.postgres, &spec.sink.iceberg) {
        (Some(_), Some(_)) => {
            c.err(
                "spec.sink.iceberg",
                "spec.sink names both postgres and iceberg",
                "keep one of spec.sink.postgres and spec.sink.iceberg: a pipeline delivers to one sink",
            );
            (None, None)
        }
        (None, None) => {
            c.err(
                "spec.sink",
                "no sink named",
                "add spec.sink.postgres or spec.sink.iceberg",
            );
            (None, None)
        }
        (Some(pg), None) => {
            sink_schema = pg.schema.clone();
            let conn = c.secret(
                "spec.sink.postgres.connectionSecretRef",
                &pg.connection_secret_ref,
                secrets,
                ns,
            );
            let conn = c.tls("spec.sink.postgres", conn, pg.tls.as_ref(), secrets, ns);
            (conn, None)
        }
        (None, Some(ib)) => (None, iceberg_sink(&mut c, ib, secrets, ns, buffer.as_ref())),
    };

    let mut tables = Vec::new();
    if spec.source.tables.is_empty() {
        c.err(
            "spec.source.tables",
            "no tables listed",
            "list at least one table as schema.table, e.g. [public.orders]",
        );
    }
    for (i, t) in spec.source.tables.iter().enumerate() {
        match parse_table(t) {
            Some(tn) if tables.contains(&tn) => c.err(
                format!("spec.source.tables[{i}]"),
                format!("{tn} is listed twice"),
                "list each table once",
            ),
            Some(tn) => {
                if let Some(other) = tables.iter().find(|o: &&TableName| o.name == tn.name) {
                    c.err(
                        format!("spec.source.tables[{i}]"),
                        format!(
                            "{tn} and {other} would both land in sink table {}",
                            crate::engine::table_name::sql_ident(&tn.name)
                        ),
                        "capture them in separate pipelines with different sink schemas",
                    );
                }
                tables.push(tn)
            }
            None => c.err(
                format!("spec.source.tables[{i}]"),
                format!("{t:?} is not a table name"),
                r#"write schema.table, e.g. public.orders; quote parts with capitals, spaces, dots or other characters as SQL does, e.g. "Sales Data"."Orders.2024" (unquoted parts fold to lower case)"#,
            ),
        }
    }

    let derived = derived_name(&id.uid);
    let publication = spec
        .source
        .publication
        .clone()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| derived.clone());
    if !valid_identifier(&publication) {
        c.err(
            "spec.source.publication",
            format!("{publication:?} is not a valid publication name"),
            "use at most 63 characters, or leave it empty",
        );
    }
    let slot = spec
        .source
        .slot
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or(derived);
    if !valid_slot_name(&slot) {
        c.err(
            "spec.source.slot",
            format!("{slot:?} is not a valid replication slot name"),
            "use lower-case letters, digits and underscores (at most 63), or leave it empty",
        );
    }
    if spec.sink.postgres.is_some()
        && spec.sink.iceberg.is_none()
        && !valid_identifier(&sink_schema)
    {
        c.err(
            "spec.sink.postgres.schema",
            format!("{sink_schema:?} is not a valid schema name"),
            "name a schema of at most 63 characters",
        );
    }

    let b = &spec.buffer;
    if b.bypass && spec.sink.iceberg.is_some() {
        c.err(
            "spec.buffer.bypass",
            "the Iceberg sink cannot skip the buffer: it makes changes durable only every commitInterval",
            "remove spec.buffer.bypass (or set it to false) for an Iceberg sink",
        );
    }
    if b.batch_size == 0 || b.batch_size > 100_000 {
        c.err(
            "spec.buffer.batchSize",
            format!("{} is out of range", b.batch_size),
            "use 1 to 100000",
        );
    }
    let flush_interval = c.duration("spec.buffer.flushInterval", &b.flush_interval);
    if flush_interval.is_zero() {
        c.err(
            "spec.buffer.flushInterval",
            "must be more than zero",
            "use e.g. 1s",
        );
    }
    let retention = c.duration("spec.buffer.retention", &b.retention);

    let r = &spec.retry;
    if r.max_attempts == 0 {
        c.err("spec.retry.maxAttempts", "must be at least 1", "use e.g. 3");
    }
    let initial_interval = c.duration("spec.retry.initialInterval", &r.initial_interval);
    let max_interval = c.duration("spec.retry.maxInterval", &r.max_interval);
    if initial_interval > max_interval {
        c.err(
            "spec.retry.initialInterval",
            "is longer than spec.retry.maxInterval",
            "make initialInterval at most maxInterval",
        );
    }
    if !(1.0..=60.0).contains(&r.multiplier) {
        c.err(
            "spec.retry.multiplier",
            format!("{} is out of range", r.multiplier),
            "use 1.0 to 60.0, e.g. 2.0",
        );
    }
    let dead_letter_retention =
        c.duration("spec.deadLetter.retention", &spec.dead_letter.retention);

    let bp = &spec.backpressure;
    if bp.low_watermark >= bp.high_watermark {
        c.err(
            "spec.backpressure.lowWatermark",
            format!(
                "{} is not below highWatermark {}",
                bp.low_watermark, bp.high_watermark
            ),
            "make lowWatermark smaller than highWatermark",
        );
    }
    let check_interval = c.duration("spec.backpressure.checkInterval", &bp.check_interval);

    let t = &spec.timeouts;
    let connect_timeout = c.duration("spec.timeouts.connect", &t.connect);
    let response_timeout = c.duration("spec.timeouts.response", &t.response);
    for (field, d) in [
        ("spec.timeouts.connect", connect_timeout),
        ("spec.timeouts.response", response_timeout),
    ] {
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&d) {
            c.err(
                field,
                format!("{} is out of range", humantime::format_duration(d)),
                "use 1s to 10m, e.g. 20s",
            );
        }
    }

    if let Some(t) = &spec.resync
        && (t.trim().is_empty() || t.len() > 253)
    {
        c.err(
            "spec.resync",
            format!("the resync token has {} characters", t.len()),
            "set spec.resync to a new non-empty token of at most 253 characters (e.g. the date), or remove it",
        );
    }

    // The sink is the source: captured tables would be written into themselves, a feedback loop.
    if let (Some(src), Some(dst)) = (&source, &sink)
        && src.same_database(dst)
        && let Some(t) = tables.iter().find(|t| t.schema == sink_schema)
    {
        c.err(
            "spec.sink.postgres.schema",
            format!(
                "schema {sink_schema} of the source database is the sink, so captured table {t} would receive its own changes"
            ),
            "name another sink schema, or a sink database other than the source",
        );
    }

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    let (Some(source), Some(buffer)) = (source, buffer) else {
        return Err(c.errors);
    };
    let sink = match (sink, iceberg) {
        (Some(conn), _) => SinkConfig::Postgres {
            conn: conn.with_connect_timeout(connect_timeout),
            schema: sink_schema,
        },
        (None, Some(mut ib)) => {
            ib.catalog = ib.catalog.with_connect_timeout(connect_timeout);
            SinkConfig::Iceberg(ib)
        }
        (None, None) => return Err(c.errors),
    };
    let (source, buffer) = (
        source.with_connect_timeout(connect_timeout),
        buffer.with_connect_timeout(connect_timeout),
    );
    let config = PipelineConfig {
        id: id.uid.clone(),
        name: format!("{}/{}", id.namespace, id.name),
        source,
        tables,
        initial_snapshot: spec.source.initial_snapshot,
        publication,
        slot,
        sink,
        buffer,
        batch_size: b.batch_size as usize,
        bypass_buffer: b.bypass,
        flush_interval,
        retention,
        retry: RetryPolicy {
            max_attempts: r.max_attempts,
            initial_interval,
            max_interval,
            multiplier: r.multiplier as f32,
            jitter: r.jitter,
        },
        dead_letter_enabled: spec.dead_letter.enabled,
        dead_letter_retention,
        high_watermark: bp.high_watermark,
        low_watermark: bp.low_watermark,
        check_interval,
        response_timeout,
        wal_at_risk_bytes: spec.source.wal_at_risk_bytes,
        resync: spec.resync.clone(),
        owner: String::new(),
        delivery: match spec.state {
            DesiredState::Paused => Delivery::Paused,
            _ => Delivery::Running,
        },
    };
    Ok((config, spec.state))
}

/// Checks `spec.sink.iceberg`; the catalog defaults to the buffer database.
fn iceberg_sink(
    c: &mut Check,
    ib: &IcebergSinkSpec,
    secrets: &Secrets,
    ns: &str,
    buffer: Option<&ConnString>,
) -> Option<IcebergConfig> {
    let sql = ib.catalog.sql.as_ref();
    let tls = sql.and_then(|s| s.tls.as_ref());
    let field = "spec.sink.iceberg.catalog.sql";
    let catalog = match sql.and_then(|s| s.connection_secret_ref.as_ref()) {
        Some(r) => {
            let conn = c.secret(&format!("{field}.connectionSecretRef"), r, secrets, ns);
            c.tls(field, conn, tls, secrets, ns)
        }
        // The buffer database, with the buffer's TLS unless the catalog names its own CA.
        None if tls.is_some() => {
            let plain = buffer.cloned().map(ConnString::without_ca);
            c.tls(field, plain, tls, secrets, ns)
        }
        None => buffer.cloned(),
    };
    let w = ib.warehouse.trim();
    let s3_bucket = w
        .strip_prefix("s3://")
        .map(|rest| rest.split('/').next().unwrap_or(""));
    match (w.strip_prefix("file://"), s3_bucket) {
        (Some(path), _) if path.starts_with('/') => {}
        (_, Some(bucket)) if !bucket.is_empty() => {}
        _ => c.err(
            "spec.sink.iceberg.warehouse",
            format!("{w:?} is not a warehouse location"),
            "write file:///absolute/path or s3://bucket/prefix",
        ),
    }
    let s3 = match &ib.s3 {
        None => None,
        Some(s3) => {
            let credentials = match &s3.credentials_secret_ref {
                None => None,
                Some(r) => {
                    let field = "spec.sink.iceberg.s3.credentialsSecretRef";
                    match secrets.get(&r.name) {
                        None => {
                            c.err(
                                format!("{field}.name"),
                                format!("Secret {:?} not found in namespace {ns}", r.name),
                                format!(
                                    "create Secret {:?} with keys accessKeyId and secretAccessKey",
                                    r.name
                                ),
                            );
                            None
                        }
                        Some(data) => {
                            match (data.get("accessKeyId"), data.get("secretAccessKey")) {
                                (Some(id), Some(key)) => {
                                    Some((id.trim().to_string(), key.trim().to_string()))
                                }
                                _ => {
                                    c.err(
                                        field,
                                        format!(
                                            "Secret {:?} lacks key accessKeyId or secretAccessKey",
                                            r.name
                                        ),
                                        "add both keys to the Secret",
                                    );
                                    None
                                }
                            }
                        }
                    }
                }
            };
            if let Some(e) = &s3.endpoint
                && !(e.starts_with("http://") || e.starts_with("https://"))
            {
                c.err(
                    "spec.sink.iceberg.s3.endpoint",
                    format!("{e:?} is not an http(s) URL"),
                    "write e.g. http://minio:9000, or leave it out for AWS",
                );
            }
            Some(S3Config {
                endpoint: s3.endpoint.clone(),
                region: s3.region.clone(),
                path_style: s3.path_style,
                credentials,
            })
        }
    };
    let ns_name = ib.namespace.trim();
    if !valid_identifier(ns_name) || ns_name.contains('.') {
        c.err(
            "spec.sink.iceberg.namespace",
            format!("{ns_name:?} is not a namespace name"),
            "name one namespace level of at most 63 characters, without dots, e.g. cdc",
        );
    }
    let commit_interval = c.duration("spec.sink.iceberg.commitInterval", &ib.commit_interval);
    if !(Duration::from_millis(100)..=Duration::from_secs(3600)).contains(&commit_interval) {
        c.err(
            "spec.sink.iceberg.commitInterval",
            format!(
                "{} is out of range",
                humantime::format_duration(commit_interval)
            ),
            "use 100ms to 1h, e.g. 10s",
        );
    }
    let target_file_size = match parse_quantity(&ib.target_file_size) {
        Some(n) if ((1 << 20)..=(16u64 << 30)).contains(&n) => n,
        _ => {
            c.err(
                "spec.sink.iceberg.targetFileSize",
                format!("{:?} is not a size from 1Mi to 16Gi", ib.target_file_size),
                "write a size like 128Mi or 1Gi",
            );
            128 << 20
        }
    };
    Some(IcebergConfig {
        catalog: catalog?,
        warehouse: w.trim_end_matches('/').to_string(),
        s3,
        namespace: ns_name.to_string(),
        commit_interval,
        target_file_size,
    })
}

/// A Kubernetes quantity of bytes: `134217728`, `128Mi`, `1Gi`, `500M`.
pub fn parse_quantity(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.find(|ch: char| !ch.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n.parse().ok()?;
    let factor: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "k" | "K" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> CdcPipelineSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn secrets() -> Secrets {
        let mut s = Secrets::new();
        s.insert(
            "src".into(),
            BTreeMap::from([("uri".into(), "postgres://u:topsecret@db:5432/shop".into())]),
        );
        s.insert(
            "dst".into(),
            BTreeMap::from([("uri".into(), "postgres://u:p@wh:5432/wh".into())]),
        );
        s
    }

    fn id() -> Identity {
        Identity {
            uid: "0a1b2c3d-4e5f-6789-abcd-ef0123456789".into(),
            namespace: "ns".into(),
            name: "p".into(),
        }
    }

    const GOOD: &str = "source: {connectionSecretRef: {name: src, key: uri}, tables: [public.orders, customers]}\nsink: {postgres: {connectionSecretRef: {name: dst, key: uri}, schema: replica}}";

    #[test]
    fn good_spec_gets_defaults_and_derived_names() {
        let (c, state) = validate(&id(), &spec(GOOD), &secrets(), None).unwrap();
        assert_eq!(state, DesiredState::Running);
        assert_eq!(c.slot, "philotes_0a1b2c3d4e5f6789abcdef0123456789");
        assert_eq!(c.publication, c.slot);
        assert_eq!(c.tables[1].to_string(), "public.customers");
        assert_eq!(c.batch_size, 1000);
        assert_eq!(c.flush_interval, Duration::from_secs(1));
        assert_eq!(c.retention, Duration::from_secs(168 * 3600));
        assert!(c.buffer.same_database(&c.source));
        assert_eq!(c.name, "ns/p");
    }

    #[test]
    fn every_problem_names_its_field_and_never_the_secret() {
        let bad = "source: {connectionSecretRef: {name: nope, key: uri}, tables: []}\nsink: {postgres: {connectionSecretRef: {name: dst, key: other}}}\nbuffer: {batchSize: 0, flushInterval: soon}\nretry: {maxAttempts: 0, initialInterval: 1m, maxInterval: 1s}\nbackpressure: {highWatermark: 10, lowWatermark: 10}";
        let errs = validate(&id(), &spec(bad), &secrets(), None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.source.connectionSecretRef.name",
            "spec.sink.postgres.connectionSecretRef.key",
            "spec.source.tables",
            "spec.buffer.batchSize",
            "spec.buffer.flushInterval",
            "spec.retry.maxAttempts",
            "spec.retry.initialInterval",
            "spec.backpressure.lowWatermark",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert!(errs.iter().all(|e| !e.fix.is_empty()));
        let mut s = secrets();
        s.get_mut("src")
            .unwrap()
            .insert("uri".into(), "mysql://topsecret".into());
        let errs = validate(&id(), &spec(GOOD), &s, None).unwrap_err();
        assert_eq!(errs[0].field, "spec.source.connectionSecretRef");
        assert!(!errs[0].to_string().contains("topsecret"), "{}", errs[0]);
    }

    #[test]
    fn a_sink_that_is_the_source_is_refused() {
        let mut s = secrets();
        s.get_mut("dst")
            .unwrap()
            .insert("uri".into(), "postgres://other:pw@db:5432/shop".into());
        let loop_spec = "source: {connectionSecretRef: {name: src, key: uri}, tables: [public.orders]}\nsink: {postgres: {connectionSecretRef: {name: dst, key: uri}}}";
        let errs = validate(&id(), &spec(loop_spec), &s, None).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.sink.postgres.schema");
        assert!(errs[0].problem.contains("public.orders"), "{}", errs[0]);
        // Another schema of the same database is fine.
        assert!(validate(&id(), &spec(GOOD), &s, None).is_ok());
    }

    const ICEBERG: &str = "source: {connectionSecretRef: {name: src, key: uri}, tables: [public.orders]}\nsink: {iceberg: {warehouse: \"s3://lake/cdc\", s3: {endpoint: \"http://127.0.0.1:9000\", pathStyle: true, credentialsSecretRef: {name: lake-s3}}, commitInterval: 2s, targetFileSize: 64Mi}}";

    fn lake_secrets() -> Secrets {
        let mut s = secrets();
        s.insert(
            "lake-s3".into(),
            BTreeMap::from([
                ("accessKeyId".into(), "AKIDEXAMPLE".into()),
                ("secretAccessKey".into(), "sup3rs3cret".into()),
            ]),
        );
        s
    }

    #[test]
    fn an_iceberg_sink_gets_its_catalog_in_the_buffer_database_by_default() {
        let (c, _) = validate(&id(), &spec(ICEBERG), &lake_secrets(), None).unwrap();
        let SinkConfig::Iceberg(ib) = &c.sink else {
            panic!("not an iceberg sink: {:?}", c.sink);
        };
        assert!(ib.catalog.same_database(&c.buffer));
        assert_eq!(ib.namespace, "cdc");
        assert_eq!(ib.commit_interval, Duration::from_secs(2));
        assert_eq!(ib.target_file_size, 64 << 20);
        let s3 = ib.s3.as_ref().unwrap();
        assert!(s3.path_style);
        assert_eq!(s3.region, "us-east-1");
        assert_eq!(
            s3.credentials,
            Some(("AKIDEXAMPLE".into(), "sup3rs3cret".into()))
        );
        assert!(!format!("{c:?}").contains("sup3rs3cret"));
        assert!(!c.sink.describe().contains("sup3rs3cret"));
    }

    #[test]
    fn bypassing_the_buffer_is_for_postgres_sinks_only() {
        let good = format!("{GOOD}\nbuffer: {{bypass: true}}");
        let (c, _) = validate(&id(), &spec(&good), &secrets(), None).unwrap();
        assert!(c.bypass_buffer);
        let (c, _) = validate(&id(), &spec(GOOD), &secrets(), None).unwrap();
        assert!(!c.bypass_buffer, "off by default");
        let lake = format!("{ICEBERG}\nbuffer: {{bypass: true}}");
        let errs = validate(&id(), &spec(&lake), &lake_secrets(), None).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.buffer.bypass");
        assert!(
            errs[0].fix.contains("remove spec.buffer.bypass"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn iceberg_problems_name_their_field() {
        let both = format!("{ICEBERG}\n").replace(
            "sink: {iceberg:",
            "sink: {postgres: {connectionSecretRef: {name: dst, key: uri}}, iceberg:",
        );
        let errs = validate(&id(), &spec(&both), &lake_secrets(), None).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].field, "spec.sink.iceberg");
        let none = "source: {connectionSecretRef: {name: src, key: uri}, tables: [t]}\nsink: {}";
        let errs = validate(&id(), &spec(none), &secrets(), None).unwrap_err();
        assert_eq!(errs[0].field, "spec.sink");
        let bad = ICEBERG
            .replace("s3://lake/cdc", "lake/cdc")
            .replace("64Mi", "lots")
            .replace("2s", "0s")
            .replace("http://127.0.0.1:9000", "127.0.0.1:9000");
        let errs = validate(&id(), &spec(&bad), &secrets(), None).unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.sink.iceberg.warehouse",
            "spec.sink.iceberg.targetFileSize",
            "spec.sink.iceberg.commitInterval",
            "spec.sink.iceberg.s3.endpoint",
            "spec.sink.iceberg.s3.credentialsSecretRef.name",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
        assert_eq!(parse_quantity("128Mi"), Some(128 << 20));
        assert_eq!(parse_quantity("1000"), Some(1000));
        assert_eq!(parse_quantity("2G"), Some(2_000_000_000));
        assert_eq!(parse_quantity("1.5Gi"), None);
    }

    #[test]
    fn a_ca_comes_from_the_uri_or_a_secret_key_and_must_suit_the_sslmode() {
        let mut s = secrets();
        let pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
        s.insert("ca".into(), BTreeMap::from([("ca.crt".into(), pem.into())]));
        s.get_mut("src").unwrap().insert(
            "uri".into(),
            "postgres://u:topsecret@db:5432/shop?sslmode=verify-full".into(),
        );
        let errs = validate(&id(), &spec(GOOD), &s, None).unwrap_err();
        assert_eq!(errs[0].field, "spec.source.connectionSecretRef", "{errs:?}");
        assert!(
            errs[0].problem.contains("sslmode=verify-full"),
            "{}",
            errs[0]
        );
        assert!(
            errs[0].fix.contains("spec.source.tls.caSecretRef"),
            "{}",
            errs[0]
        );
        assert!(!errs[0].to_string().contains("topsecret"));

        // The Secret's CA; the buffer (the source database) verifies the same way.
        let with_ca = GOOD.replace(
            "tables:",
            "tls: {caSecretRef: {name: ca, key: ca.crt}}, tables:",
        );
        let (c, _) = validate(&id(), &spec(&with_ca), &s, None).unwrap();
        assert!(c.source.tls().ca.is_some() && c.buffer.tls().ca.is_some());
        assert_eq!(
            c.source.to_string(),
            "postgres://db:5432/shop?sslmode=verify-full"
        );

        // A CA that sslmode (prefer, the default) would not use; a missing key; a CA given twice.
        let sink_ca = with_ca.replace(
            "schema: replica",
            "schema: replica, tls: {caSecretRef: {name: ca, key: ca.crt}}",
        );
        let errs = validate(&id(), &spec(&sink_ca), &s, None).unwrap_err();
        assert_eq!(errs[0].field, "spec.sink.postgres.connectionSecretRef");
        assert!(errs[0].fix.contains("sslmode=verify-full"), "{}", errs[0]);
        let no_key = with_ca.replace("key: ca.crt", "key: nope");
        let errs = validate(&id(), &spec(&no_key), &s, None).unwrap_err();
        assert_eq!(errs[0].field, "spec.source.tls.caSecretRef.key");
        s.get_mut("src").unwrap().insert(
            "uri".into(),
            "postgres://u:topsecret@db:5432/shop?sslmode=verify-ca&sslrootcert=/etc/ca.crt".into(),
        );
        let errs = validate(&id(), &spec(&with_ca), &s, None).unwrap_err();
        assert_eq!(errs[0].field, "spec.source.tls.caSecretRef");
        assert!(validate(&id(), &spec(GOOD), &s, None).is_ok());

        // The operator's default buffer is checked too.
        s.insert(
            "shared-buffer".into(),
            BTreeMap::from([(
                "uri".into(),
                "postgres://u:p@buf:5432/b?sslmode=verify-full".into(),
            )]),
        );
        let default = SecretKeyRef {
            name: "shared-buffer".into(),
            key: "uri".into(),
        };
        let errs = validate(&id(), &spec(GOOD), &s, Some(&default)).unwrap_err();
        assert_eq!(errs[0].field, "spec.buffer.connectionSecretRef", "{errs:?}");
    }

    #[test]
    fn quoted_table_names_are_parsed_and_named_as_sql_writes_them() {
        let quoted = GOOD.replace(
            "tables: [public.orders, customers]",
            r#"tables: ['"Sales Data"."Orders.2024"', 'Shop.Orders', '"Sales Data"."Orders.2024"', '"Bad']"#,
        );
        let errs = validate(&id(), &spec(&quoted), &secrets(), None).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].field, "spec.source.tables[2]");
        assert_eq!(
            errs[0].problem,
            r#""Sales Data"."Orders.2024" is listed twice"#
        );
        assert_eq!(errs[1].field, "spec.source.tables[3]");
        assert!(
            errs[1].fix.contains(r#""Sales Data"."Orders.2024""#),
            "{}",
            errs[1]
        );
        let ok = quoted.replace(r#", '"Sales Data"."Orders.2024"', '"Bad'"#, "");
        let (c, _) = validate(&id(), &spec(&ok), &secrets(), None).unwrap();
        assert_eq!(
            (c.tables[0].schema.as_str(), c.tables[0].name.as_str()),
            ("Sales Data", "Orders.2024")
        );
        assert_eq!(c.tables[1].to_string(), "shop.orders");
    }

    #[test]
    fn table_names_and_slot_names() {
        assert_eq!(
            parse_table("a.b").map(|t| t.to_string()),
            Some("a.b".into())
        );
        assert_eq!(
            parse_table("b").map(|t| t.to_string()),
            Some("public.b".into())
        );
        assert!(parse_table("").is_none());
        assert!(parse_table("a.b.c").is_none());
        let bad = format!("{GOOD}\n");
        let mut s = spec(&bad);
        s.source.slot = Some("Bad-Slot".into());
        s.source.tables.push("other.orders".into());
        let errs = validate(&id(), &s, &secrets(), None).unwrap_err();
        assert!(errs.iter().any(|e| e.field == "spec.source.slot"));
        assert!(errs.iter().any(|e| e.field == "spec.source.tables[2]"));
    }
}
