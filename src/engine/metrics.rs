//! Prometheus metrics, one series per pipeline (label `pipeline`).

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::state::Phase;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabel {
    pub pipeline: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub pipeline: String,
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub pipeline: String,
    pub table: String,
}

type HistogramFamily = Family<PipelineLabel, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    registry: Mutex<Registry>,
    events_read: Family<PipelineLabel, Counter>,
    events_delivered: Family<PipelineLabel, Counter>,
    events_dead_lettered: Family<PipelineLabel, Counter>,
    retries: Family<PipelineLabel, Counter>,
    lag_bytes: Family<PipelineLabel, Gauge>,
    safe_wal_bytes: Family<PipelineLabel, Gauge>,
    wal_at_risk: Family<PipelineLabel, Gauge>,
    buffer_depth: Family<PipelineLabel, Gauge>,
    backpressured: Family<PipelineLabel, Gauge>,
    phase: Family<PhaseLabel, Gauge>,
    backfill_rows_copied: Family<TableLabel, Gauge>,
    backfill_rows_estimated: Family<TableLabel, Gauge>,
    /// The labels of the two above (a family cannot be searched by its pipeline label).
    backfill_tables: Mutex<Vec<TableLabel>>,
    batch_seconds: HistogramFamily,
    delivery_latency_seconds: HistogramFamily,
    /// Process-wide: it outlives the series of the pipelines that moved away.
    pub superseded_writes: Counter,
    /// Reconciles of the operator's controller.
    pub reconciles: Counter,
}

/// Handles on one pipeline's series; clones share the same values.
#[derive(Clone, Debug)]
pub struct PipelineStats {
    pub events_read: Counter,
    pub events_delivered: Counter,
    pub events_dead_lettered: Counter,
    pub retries: Counter,
    pub lag_bytes: Gauge,
    pub safe_wal_bytes: Gauge,
    pub wal_at_risk: Gauge,
    pub buffer_depth: Gauge,
    pub backpressured: Gauge,
    pub batch_seconds: Histogram,
    pub delivery_latency_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Mutex::new(Registry::with_prefix("philotes")),
            events_read: Family::default(),
            events_delivered: Family::default(),
            events_dead_lettered: Family::default(),
            retries: Family::default(),
            lag_bytes: Family::default(),
            safe_wal_bytes: Family::default(),
            wal_at_risk: Family::default(),
            buffer_depth: Family::default(),
            backpressured: Family::default(),
            phase: Family::default(),
            backfill_rows_copied: Family::default(),
            backfill_rows_estimated: Family::default(),
            backfill_tables: Mutex::new(Vec::new()),
            batch_seconds: Family::new_with_constructor(seconds_histogram),
            delivery_latency_seconds: Family::new_with_constructor(seconds_histogram),
            superseded_writes: Counter::default(),
            reconciles: Counter::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register(
                "events_read",
                "Changes read from the replication slot",
                m.events_read.clone(),
            );
            r.register(
                "events_delivered",
                "Changes applied to the sink",
                m.events_delivered.clone(),
            );
            r.register(
                "events_dead_lettered",
                "Changes sent to the dead-letter queue",
                m.events_dead_lettered.clone(),
            );
            r.register(
                "sink_retries",
                "Failed sink attempts that were retried",
                m.retries.clone(),
            );
            r.register(
                "lag_bytes",
                "WAL bytes the slot retains beyond its confirmed position",
                m.lag_bytes.clone(),
            );
            r.register(
                "slot_safe_wal_bytes",
                "WAL the source can still write before the slot is invalidated (safe_wal_size; -1 without max_slot_wal_keep_size)",
                m.safe_wal_bytes.clone(),
            );
            r.register(
                "wal_at_risk",
                "1 while the slot's WAL is at risk (wal_status unreserved, or safe_wal_size below the threshold)",
                m.wal_at_risk.clone(),
            );
            r.register(
                "buffer_depth",
                "Durably buffered changes not yet delivered",
                m.buffer_depth.clone(),
            );
            r.register(
                "backpressured",
                "1 while the reader is held back by backpressure",
                m.backpressured.clone(),
            );
            r.register(
                "pipeline_phase",
                "1 for the pipeline's current phase",
                m.phase.clone(),
            );
            r.register(
                "backfill_rows_copied",
                "Rows of a table added to a running pipeline copied so far (its backfill)",
                m.backfill_rows_copied.clone(),
            );
            r.register(
                "backfill_rows_estimated",
                "The source's estimate of the rows of a table being backfilled",
                m.backfill_rows_estimated.clone(),
            );
            r.register(
                "batch_seconds",
                "Time to apply one batch to the sink",
                m.batch_seconds.clone(),
            );
            r.register(
                "reconciles",
                "Reconciles run by the operator's controller",
                m.reconciles.clone(),
            );
            r.register(
                "superseded_writes",
                "Writes of this process refused because another owner had taken the pipeline (its worker then stopped)",
                m.superseded_writes.clone(),
            );
            r.register(
                "delivery_latency_seconds",
                "Time from source commit to sink commit, per change",
                m.delivery_latency_seconds.clone(),
            );
        }
        m
    }

    pub fn pipeline(&self, name: &str) -> PipelineStats {
        let l = PipelineLabel {
            pipeline: name.to_string(),
        };
        PipelineStats {
            events_read: self.events_read.get_or_create(&l).clone(),
            events_delivered: self.events_delivered.get_or_create(&l).clone(),
            events_dead_lettered: self.events_dead_lettered.get_or_create(&l).clone(),
            retries: self.retries.get_or_create(&l).clone(),
            lag_bytes: self.lag_bytes.get_or_create(&l).clone(),
            safe_wal_bytes: self.safe_wal_bytes.get_or_create(&l).clone(),
            wal_at_risk: self.wal_at_risk.get_or_create(&l).clone(),
            buffer_depth: self.buffer_depth.get_or_create(&l).clone(),
            backpressured: self.backpressured.get_or_create(&l).clone(),
            batch_seconds: self.batch_seconds.get_or_create(&l).clone(),
            delivery_latency_seconds: self.delivery_latency_seconds.get_or_create(&l).clone(),
        }
    }

    pub fn set_phase(&self, name: &str, phase: Phase) {
        for p in [
            Phase::Starting,
            Phase::Running,
            Phase::Paused,
            Phase::Stopping,
            Phase::Stopped,
            Phase::Failed,
        ] {
            let l = PhaseLabel {
                pipeline: name.to_string(),
                phase: p.to_string(),
            };
            self.phase.get_or_create(&l).set((p == phase) as i64);
        }
    }

    /// Where a table's backfill stands.
    pub fn set_backfill(&self, name: &str, b: &crate::engine::backfill::BackfillProgress) {
        let l = TableLabel {
            pipeline: name.to_string(),
            table: b.table.clone(),
        };
        self.backfill_rows_copied
            .get_or_create(&l)
            .set(b.rows_copied as i64);
        self.backfill_rows_estimated
            .get_or_create(&l)
            .set(b.rows_estimated as i64);
        if let Ok(mut tables) = self.backfill_tables.lock()
            && !tables.contains(&l)
        {
            tables.push(l);
        }
    }

    /// Removes a pipeline's series (when the pipeline is deleted).
    pub fn remove(&self, name: &str) {
        let l = PipelineLabel {
            pipeline: name.to_string(),
        };
        self.events_read.remove(&l);
        self.events_delivered.remove(&l);
        self.events_dead_lettered.remove(&l);
        self.retries.remove(&l);
        self.lag_bytes.remove(&l);
        self.safe_wal_bytes.remove(&l);
        self.wal_at_risk.remove(&l);
        self.buffer_depth.remove(&l);
        self.backpressured.remove(&l);
        self.batch_seconds.remove(&l);
        self.delivery_latency_seconds.remove(&l);
        if let Ok(mut tables) = self.backfill_tables.lock() {
            tables.retain(|t| {
                if t.pipeline != name {
                    return true;
                }
                self.backfill_rows_copied.remove(t);
                self.backfill_rows_estimated.remove(t);
                false
            });
        }
        for p in [
            "Starting", "Running", "Paused", "Stopping", "Stopped", "Failed",
        ] {
            self.phase.remove(&PhaseLabel {
                pipeline: name.to_string(),
                phase: p.to_string(),
            });
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = encode(&mut out, &r);
        }
        out
    }
}
