//! The `CdcPipeline` API (philotes.io/v1alpha1): spec and status types. The CRD YAML in `crds/` is
//! generated from these types (`philotes crd`).

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A PostgreSQL change-data-capture pipeline: a logical replication slot on the source, a durable buffer,
/// and batched delivery to a sink: idempotent into PostgreSQL, exactly once into Apache Iceberg.
#[derive(CustomResource, Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[kube(
    group = "philotes.io",
    version = "v1alpha1",
    kind = "CdcPipeline",
    plural = "cdcpipelines",
    shortname = "cdcp",
    namespaced,
    status = "CdcPipelineStatus",
    derive = "PartialEq",
    doc = "A PostgreSQL change-data-capture pipeline run by the Philotes operator",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Lag","type":"integer","jsonPath":".status.lagBytes","description":"bytes of WAL the slot retains beyond its confirmed position"}"#,
    printcolumn = r#"{"name":"Buffered","type":"integer","jsonPath":".status.bufferDepth","priority":1}"#,
    printcolumn = r#"{"name":"Delivered","type":"integer","jsonPath":".status.eventsDelivered"}"#,
    printcolumn = r#"{"name":"Owner","type":"string","jsonPath":".status.owner","priority":1}"#,
    printcolumn = r#"{"name":"Message","type":"string","jsonPath":".status.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct CdcPipelineSpec {
    /// Desired state: Running, Paused (delivery stops, the slot keeps draining into the buffer) or
    /// Stopped (the worker ends; slot and buffer are kept, so WAL is retained).
    #[serde(default)]
    pub state: DesiredState,
    pub source: SourceSpec,
    pub sink: SinkSpec,
    #[serde(default)]
    pub buffer: BufferSpec,
    #[serde(default)]
    pub retry: RetrySpec,
    #[serde(default)]
    pub dead_letter: DeadLetterSpec,
    #[serde(default)]
    pub backpressure: BackpressureSpec,
    #[serde(default)]
    pub timeouts: TimeoutsSpec,
    /// What happens to the slot and publication Philotes created when the pipeline is deleted.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
    /// A token; each new value rebuilds the pipeline once, in place: the slot is dropped and made
    /// again with an exported snapshot, the tables are copied again, and each sink table's rows are
    /// replaced in one sink transaction (readers see the old rows until it commits). The fix for a
    /// lost slot (`SlotLost`). Any string, e.g. a date: `kubectl philotes resync` or a patch sets it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync: Option<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum DesiredState {
    #[default]
    Running,
    Paused,
    Stopped,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default, JsonSchema)]
pub enum ReclaimPolicy {
    #[default]
    Retain,
    Delete,
}

/// A key of a Secret in the pipeline's namespace.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}

/// TLS of a database connection beyond what its URI says (`sslmode` stays in the URI).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret key holding the PEM of the CA certificate(s) that signed the server's certificate:
    /// what `sslrootcert` names in a URI. Needs `sslmode=verify-ca`, `verify-full` or `require`
    /// (which then checks as `verify-ca`) in the URI, and no `sslrootcert` there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceSpec {
    /// Secret key holding a connection URI `postgres://user:password@host:port/database`.
    pub connection_secret_ref: SecretKeyRef,
    /// TLS of the source connections (the CA to verify the server with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Tables to capture, as `schema.table` (or `table` for `public`), each part written as in SQL:
    /// unquoted parts fold to lower case, `"Sales Data"."Orders.2024"` keeps case, dots and spaces
    /// (`""` is a quote). Each needs a primary key. A table added while the pipeline runs has its
    /// existing rows copied while the stream goes on (status `backfills`); one removed is no longer
    /// captured, and its sink table stays.
    #[schemars(length(min = 1))]
    pub tables: Vec<String>,
    /// Copy the rows the tables hold when the pipeline creates its slot, before streaming changes
    /// (default true). A slot named in `slot` that already exists gets no snapshot.
    #[serde(default = "default_true")]
    pub initial_snapshot: bool,
    /// Publication name; default derived from the resource uid. Created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication: Option<String>,
    /// Replication slot name; default derived from the resource uid. Created when missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<String>,
    /// The slot's WAL is at risk (condition WalAtRisk) when the source can write fewer than this
    /// many bytes more before `max_slot_wal_keep_size` would invalidate it (`safe_wal_size`), or when
    /// its `wal_status` is `unreserved`. Default 1 GiB.
    #[serde(default = "default_wal_at_risk_bytes")]
    pub wal_at_risk_bytes: i64,
}

fn default_wal_at_risk_bytes() -> i64 {
    1 << 30
}

/// Where changes go: exactly one of `postgres` and `iceberg`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
pub struct SinkSpec {
    /// A PostgreSQL database: tables with the source's columns and key, kept equal to the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresSinkSpec>,
    /// Apache Iceberg tables: an append-only changelog of each source table, exactly once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iceberg: Option<IcebergSinkSpec>,
}

/// A Secret in the pipeline's namespace, by name (its keys are fixed by the field that refers to it).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretRef {
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcebergSinkSpec {
    /// The catalog holding the tables' metadata pointers. Default: a SQL catalog in the pipeline's
    /// buffer database.
    #[serde(default)]
    pub catalog: IcebergCatalogSpec,
    /// Where data and metadata files go: `file:///path` or `s3://bucket/prefix`.
    pub warehouse: String,
    /// S3 settings for an `s3://` warehouse.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<IcebergS3Spec>,
    /// Iceberg namespace of the tables (`<namespace>.<table>`); created when missing.
    #[serde(default = "default_iceberg_namespace")]
    pub namespace: String,
    /// How often buffered changes become an Iceberg snapshot (also earlier, when `targetFileSize`
    /// fills).
    #[serde(default = "default_commit_interval")]
    pub commit_interval: String,
    /// Data file size that ends a file and commits a snapshot, as a Kubernetes quantity
    /// (`128Mi`, `1Gi`) or bytes.
    #[serde(default = "default_target_file_size")]
    pub target_file_size: String,
}

fn default_iceberg_namespace() -> String {
    "cdc".into()
}
fn default_commit_interval() -> String {
    "10s".into()
}
fn default_target_file_size() -> String {
    "128Mi".into()
}

/// The Iceberg catalog. Only the SQL catalog (in PostgreSQL) for now.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
pub struct IcebergCatalogSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<SqlCatalogSpec>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SqlCatalogSpec {
    /// Secret key holding a `postgres://` URI of the database with the catalog tables
    /// (`iceberg_tables`, `iceberg_namespace_properties`); default: the buffer database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret_ref: Option<SecretKeyRef>,
    /// TLS of the catalog connection; default: the buffer's when the catalog is the buffer database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IcebergS3Spec {
    /// Endpoint of an S3-compatible service, e.g. `http://minio:9000`; default: AWS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`), as MinIO and moto want.
    #[serde(default)]
    pub path_style: bool,
    /// Secret with keys `accessKeyId` and `secretAccessKey`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

fn default_s3_region() -> String {
    "us-east-1".into()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostgresSinkSpec {
    pub connection_secret_ref: SecretKeyRef,
    /// TLS of the sink connections (the CA to verify the server with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// Target schema; tables are created there with the source's columns and primary key.
    #[serde(default = "default_sink_schema")]
    pub schema: String,
}

fn default_sink_schema() -> String {
    "public".into()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BufferSpec {
    /// Database holding the `philotes` schema; default: the source database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret_ref: Option<SecretKeyRef>,
    /// TLS of the buffer connections; default: the source's when the buffer is the source database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    #[serde(default = "default_batch_size")]
    pub batch_size: u32,
    #[serde(default = "default_flush_interval")]
    pub flush_interval: String,
    /// How long processed rows stay in the buffer.
    #[serde(default = "default_retention")]
    pub retention: String,
    /// Deliver changes from the replication stream straight to the sink, which records its position
    /// in the same transaction (PostgreSQL sinks only), instead of storing them in the buffer first.
    /// Faster; but a paused pipeline stops reading (the slot keeps the WAL) instead of draining into
    /// the buffer. The dead-letter queue and backpressure work as before. Default false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bypass: bool,
}

impl Default for BufferSpec {
    fn default() -> Self {
        Self {
            connection_secret_ref: None,
            tls: None,
            batch_size: default_batch_size(),
            flush_interval: default_flush_interval(),
            retention: default_retention(),
            bypass: false,
        }
    }
}

fn default_batch_size() -> u32 {
    1000
}
fn default_flush_interval() -> String {
    "1s".into()
}
fn default_retention() -> String {
    "168h".into()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetrySpec {
    /// Attempts for an event-level sink error before the events go to the dead-letter queue.
    /// Sink outages (connection errors) are retried until the sink is back.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_interval")]
    pub initial_interval: String,
    #[serde(default = "default_max_interval")]
    pub max_interval: String,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default = "default_true")]
    pub jitter: bool,
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_interval: default_initial_interval(),
            max_interval: default_max_interval(),
            multiplier: default_multiplier(),
            jitter: true,
        }
    }
}

fn default_max_attempts() -> u32 {
    3
}
fn default_initial_interval() -> String {
    "1s".into()
}
fn default_max_interval() -> String {
    "30s".into()
}
fn default_multiplier() -> f64 {
    2.0
}
fn default_true() -> bool {
    true
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
pub struct DeadLetterSpec {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_retention")]
    pub retention: String,
}

impl Default for DeadLetterSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            retention: default_retention(),
        }
    }
}

/// How soon a dead connection is noticed: no connection waits forever.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TimeoutsSpec {
    /// Connecting to a database (TCP, TLS, login) may take this long.
    #[serde(default = "default_connect_timeout")]
    pub connect: String,
    /// A database that owes an answer this long, or a replication stream silent this long although
    /// asked for a reply, counts as unreachable: the connection is dropped and made again.
    #[serde(default = "default_response_timeout")]
    pub response: String,
}

impl Default for TimeoutsSpec {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            response: default_response_timeout(),
        }
    }
}

fn default_connect_timeout() -> String {
    "10s".into()
}

fn default_response_timeout() -> String {
    "20s".into()
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackpressureSpec {
    /// Unprocessed buffered events above which the reader stops reading the slot.
    #[serde(default = "default_high")]
    pub high_watermark: u64,
    /// Unprocessed buffered events below which the reader resumes.
    #[serde(default = "default_low")]
    pub low_watermark: u64,
    #[serde(default = "default_check_interval")]
    pub check_interval: String,
}

impl Default for BackpressureSpec {
    fn default() -> Self {
        Self {
            high_watermark: default_high(),
            low_watermark: default_low(),
            check_interval: default_check_interval(),
        }
    }
}

fn default_high() -> u64 {
    8000
}
fn default_low() -> u64 {
    5000
}
fn default_check_interval() -> String {
    "1s".into()
}

/// Observed state, written by the operator.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CdcPipelineStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication_name: Option<String>,
    /// Whether Philotes created the slot / publication (only those are dropped on delete).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_created: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publication_created: Option<bool>,
    /// Last LSN durably buffered and acknowledged to the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirmed_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<i64>,
    /// The slot's `wal_status` on the source: reserved, extended, unreserved or lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wal_status: Option<String>,
    /// The source's `safe_wal_size` for the slot: WAL that can still be written before the slot is
    /// invalidated (absent without `max_slot_wal_keep_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_wal_bytes: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer_depth: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_read: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_delivered: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_dead_lettered: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `spec.resync` token of the last resync whose copy is complete.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resync: Option<String>,
    /// The operator replica that runs this pipeline (its identity, the pod name); only it writes
    /// this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// Tables added to `spec.source.tables` while the pipeline ran: their existing rows are copied
    /// while the stream goes on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backfills: Vec<BackfillStatus>,
    /// Tables the last change of `spec.source.tables` removed: no longer captured; their sink
    /// tables stay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tables_removed: Vec<String>,
}

/// The backfill of a table added to a running pipeline.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackfillStatus {
    /// `schema.table`.
    pub table: String,
    pub rows_copied: i64,
    /// The source's estimate of the table's rows when the backfill started.
    pub rows_estimated: i64,
    pub done: bool,
}

pub use crate::engine::state::Phase;

/// A plain string enum (schemars would add `null` to the enum of an Option, which kubectl rejects).
fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "enum": ["Starting", "Running", "Paused", "Stopping", "Stopped", "Failed"],
        "description": "Phase of the pipeline's worker."
    })
}

/// A standard Kubernetes condition.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    pub message: String,
    /// RFC 3339 time of the last change of `status`.
    pub last_transition_time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The CRD as YAML, as `philotes crd` prints it and `crds/cdcpipeline.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&CdcPipeline::crd())
}
