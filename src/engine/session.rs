//! One session of a pipeline: connect, snapshot or slot, register, then run its tasks until one ends.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::backfill::{self, Board};
use super::buffer::{self, Buffer, Ownership};
use super::config::{Delivery, PipelineConfig, SinkConfig};
use super::error::EngineError;
use super::event::Position;
use super::housekeeping::housekeeping;
use super::pg;
use super::processor::Processor;
use super::shared::Shared;
use super::sink::Sink;
use super::sink::iceberg::IcebergSink;
use super::sink::postgres::PostgresSink;
use super::snapshot;
use super::source::{Reader, catalog};
use super::state::Phase;
use super::wide::WideGate;

/// Connects, takes the initial snapshot or uses the slot, registers the pipeline, and runs the reader,
/// processor and housekeeping tasks until the first of them fails or the session is cancelled.
pub(super) async fn run_session(
    cfg: &Arc<PipelineConfig>,
    shared: &Arc<Shared>,
    delivery_rx: watch::Receiver<Delivery>,
    cancel: CancellationToken,
) -> Result<(), EngineError> {
    shared.set_message("connecting");
    // Every request of the setup gets an answer within the response timeout, or the session ends
    // and is made again.
    let t = cfg.response_timeout;
    let source = pg::connect(&cfg.source, "source").await?;
    pg::deadline(t, "migrating the buffer", buffer::migrate(&cfg.buffer)).await?;
    pg::deadline(t, "checking the source", catalog::check_wal_level(&source)).await?;
    let layouts = pg::deadline(
        t,
        "reading the source tables",
        catalog::table_layouts(&source, &cfg.tables),
    )
    .await?;
    let mut control = Buffer::connect(&cfg.buffer, &cfg.id, "buffer").await?;
    let previous = pg::deadline(t, "reading the buffer", control.ownership()).await?;
    // A worker takes the pipeline once (from then on every write of an earlier owner fails); its
    // later sessions go on under that epoch, or stop if another owner has taken it since.
    let held = shared.texts().epoch;
    let epoch = if held > 0 {
        pg::deadline(t, "checking the pipeline's owner", control.resume(held)).await?;
        held
    } else {
        let epoch = pg::deadline(
            t,
            "taking the pipeline",
            control.take(&cfg.name, &cfg.owner, cfg.initial_snapshot),
        )
        .await?;
        shared.texts().epoch = epoch;
        tracing::info!(pipeline = %cfg.name, owner = %cfg.owner, epoch, "pipeline taken");
        epoch
    };
    let snap = pg::deadline(t, "reading the buffer", snapshot::state(&control)).await?;
    let resync = snap.resync_owed(cfg.resync.as_deref());
    // A resync interrupted by a crash is finished by the next session, spec token or not.
    let resyncing = resync || (snap.pending && snap.replaces);
    let snapshot_owed = snap.pending;
    // Tables added since the last session are owed a backfill, recorded before the publication
    // takes them in (a snapshot or a resync copies every table anyway).
    let changes = pg::deadline(
        t,
        "recording the pipeline's tables",
        backfill::record_changes(&control, cfg, resyncing || snapshot_owed),
    )
    .await?;
    if !changes.removed.is_empty() {
        let removed: Vec<String> = changes.removed.iter().map(ToString::to_string).collect();
        tracing::info!(pipeline = %cfg.name, tables = ?removed, "tables no longer captured; their sink tables stay");
        shared.texts().tables_removed = removed;
    }
    if !changes.added.is_empty() {
        tracing::info!(pipeline = %cfg.name, tables = ?changes.added, "tables added; their rows are backfilled while the stream goes on");
    }
    let owned_publication = previous
        .as_ref()
        .is_some_and(|o| o.publication_created && o.publication_name == cfg.publication);
    let publication_created = pg::deadline(
        t,
        "preparing the publication",
        catalog::ensure_publication(&source, &cfg.publication, &cfg.tables, owned_publication),
    )
    .await?;
    let ended = pg::deadline(
        t,
        "releasing the slot",
        catalog::release_slot(&source, &cfg.slot),
    )
    .await?;
    if ended > 0 {
        tracing::info!(pipeline = %cfg.name, slot = %cfg.slot, "ended an earlier owner's replication session on the slot");
    }
    let slot_exists = pg::deadline(
        t,
        "looking up the slot",
        catalog::slot_exists(&source, &cfg.slot),
    )
    .await?;
    let ours = previous
        .as_ref()
        .is_some_and(|o| o.slot_created && o.slot_name == cfg.slot);
    if slot_exists && !snapshot_owed && !resync {
        let state = pg::deadline(
            t,
            "reading the slot",
            catalog::slot_state(&source, &cfg.slot),
        )
        .await?;
        if state.is_some_and(|s| s.wal_status.as_deref() == Some("lost")) {
            let cp = pg::deadline(t, "reading the buffer", control.checkpoint()).await?;
            return Err(EngineError::SlotLost {
                slot: cfg.slot.clone(),
                why: "wal_status = lost: the WAL it needs was removed (max_slot_wal_keep_size)"
                    .into(),
                since: pg::lsn_text(cp.durable_lsn),
            });
        }
    }
    let slot_created = if resyncing
        || (cfg.initial_snapshot && snapshot_owed && (!slot_exists || ours))
    {
        let token = resync.then_some(cfg.resync.as_deref()).flatten();
        if resyncing {
            shared.set_message("resync: dropping the slot and copying the tables again");
            tracing::info!(pipeline = %cfg.name, slot = %cfg.slot, token = ?token, "resync: the slot is made again and the tables copied again");
        } else {
            shared.set_message("initial snapshot");
        }
        let mut writer = Buffer::connect(&cfg.buffer, &cfg.id, "snapshot")
            .await?
            .with_epoch(epoch);
        snapshot::run(cfg, &source, &mut writer, &layouts, shared, token).await?;
        true
    } else {
        if !slot_exists && !snapshot_owed {
            let cp = pg::deadline(t, "reading the buffer", control.checkpoint()).await?;
            if cp.durable_lsn > 0 {
                return Err(EngineError::SlotLost {
                    slot: cfg.slot.clone(),
                    why: "it is gone although this pipeline streamed from it (dropped, or missing after a failover)".into(),
                    since: pg::lsn_text(cp.durable_lsn),
                });
            }
        }
        if cfg.initial_snapshot && snapshot_owed && slot_exists {
            tracing::warn!(pipeline = %cfg.name, slot = %cfg.slot, "the slot was not created by Philotes: no initial snapshot, changes from the slot's position on");
        }
        pg::deadline(
            t,
            "preparing the slot",
            catalog::ensure_slot(&source, &cfg.slot),
        )
        .await?
            || ours
    };
    let snap = pg::deadline(t, "reading the buffer", snapshot::state(&control)).await?;
    if !snap.pending && !snap.replaces {
        shared.texts().resynced = snap.resync_token;
    }
    let ownership = Ownership {
        slot_name: cfg.slot.clone(),
        publication_name: cfg.publication.clone(),
        slot_created,
        publication_created,
    };
    let own = pg::deadline(
        t,
        "registering the pipeline",
        control.register(&cfg.name, &ownership),
    )
    .await?;
    shared.texts().ownership = own;

    // `spec.buffer.bypass`: changes skip the buffer unless a refused transaction is still to be
    // applied change by change from it.
    let bypass = cfg.bypass_buffer
        && matches!(cfg.sink, SinkConfig::Postgres { .. })
        && shared.buffered_until().is_none();
    let sink = match &cfg.sink {
        SinkConfig::Postgres { conn, schema } => {
            let mut sink = PostgresSink::new(conn.clone(), schema.clone(), t)
                .fenced(&cfg.id, &cfg.owner, epoch);
            if bypass {
                // The source is acknowledged only once the sink's commits are on its disk.
                sink = sink.committing_asynchronously();
            }
            sink.prepare(&layouts).await?;
            AnySink::Postgres(Box::new(sink))
        }
        SinkConfig::Iceberg(ib) => {
            let mut sink =
                IcebergSink::connect(ib, &cfg.id, &cfg.name, &cfg.owner, epoch, t).await?;
            pg::deadline(t, "preparing the Iceberg tables", sink.prepare(&layouts)).await?;
            AnySink::Iceberg(Box::new(sink))
        }
    };

    let cp = pg::deadline(t, "reading the buffer", control.checkpoint()).await?;
    pg::deadline(
        t,
        "discarding an incomplete transaction",
        control.discard_incomplete(cp.durable_lsn),
    )
    .await?;
    let depth = pg::deadline(t, "counting buffered events", control.depth(&cp)).await?;
    let owed = pg::deadline(t, "reading the buffer", backfill::owed(&control, cfg)).await?;
    shared.stats.buffer_depth.set(depth);
    // With nothing left in the buffer, delivery goes on after what the sink recorded it holds
    // (the buffer's processed position may lag behind it). Rows a resync copied into the buffer
    // are delivered first.
    let delivered = match sink.recorded() {
        Some(p) if cfg.bypass_buffer && depth == 0 => p.max(cp.processed),
        _ => cp.processed,
    };
    let (sink_ack_tx, sink_ack_rx) = watch::channel(0u64);
    shared.durable_lsn.store(cp.durable_lsn, Ordering::Relaxed);
    let (durable_tx, durable_rx) = watch::channel(cp.durable_lsn);
    let monitor = pg::connect(&cfg.source, "monitor").await?;

    let session = cancel.child_token();
    // The writer hands the rows it just committed to the processor, which then need not read them back.
    let (handoff_tx, handoff_rx) = tokio::sync::mpsc::channel(4);
    let wide = WideGate::new(super::source::REPLICATION_BUFFER_BYTES);
    let board = Board::new(&cfg.id);
    let (acked_tx, acked_rx) = watch::channel(cp.durable_lsn);
    let reader = Reader {
        cfg: cfg.clone(),
        sql: source,
        buffer: Buffer::connect(&cfg.buffer, &cfg.id, "buffer-writer")
            .await?
            .with_epoch(epoch),
        shared: shared.clone(),
        cancel: session.clone(),
        durable_tx,
        handoff: Some(handoff_tx),
        sink_ack: bypass.then_some(sink_ack_rx),
        delivered,
        wide: wide.clone(),
        backfill: board.clone(),
        acked_tx,
    };
    let processor_buffer = Buffer::connect(&cfg.buffer, &cfg.id, "buffer-reader")
        .await?
        .with_epoch(epoch)
        .with_wide_gate(wide);
    let mut tasks = JoinSet::new();
    tasks.spawn(reader.run(cp.durable_lsn));
    if !owed.is_empty() {
        let buffer = Buffer::connect(&cfg.buffer, &cfg.id, "backfill")
            .await?
            .with_epoch(epoch);
        tasks.spawn(backfill::run(
            cfg.clone(),
            owed,
            board,
            acked_rx,
            buffer,
            shared.clone(),
            session.clone(),
        ));
    }
    macro_rules! processor {
        ($sink:expr) => {
            Processor {
                cfg: cfg.clone(),
                buffer: processor_buffer,
                sink: $sink,
                shared: shared.clone(),
                cancel: session.clone(),
                durable_rx,
                delivery_rx: delivery_rx.clone(),
                handoffs: Some(handoff_rx),
                delivered,
                bypass: bypass.then_some(sink_ack_tx),
            }
            .run()
        };
    }
    match sink {
        AnySink::Postgres(s) => tasks.spawn(processor!(*s)),
        AnySink::Iceberg(s) => tasks.spawn(processor!(*s)),
    };
    tasks.spawn(housekeeping(
        cfg.clone(),
        shared.clone(),
        control,
        monitor,
        session.clone(),
    ));
    tasks.spawn(follow_delivery(
        shared.clone(),
        delivery_rx,
        session.clone(),
        bypass,
    ));

    let mut first_error = None;
    while let Some(res) = tasks.join_next().await {
        let err = match res {
            Ok(Ok(())) if session.is_cancelled() => continue,
            Ok(Ok(())) => EngineError::Protocol("a pipeline task ended unexpectedly".into()),
            Ok(Err(e)) => e,
            Err(join) => EngineError::Protocol(format!("a pipeline task panicked: {join}")),
        };
        if first_error.is_none() {
            first_error = Some(err);
        }
        session.cancel();
    }
    match first_error {
        Some(e) if !cancel.is_cancelled() => Err(e),
        _ => Ok(()),
    }
}

/// The sink a session delivers to.
enum AnySink {
    Postgres(Box<PostgresSink>),
    Iceberg(Box<IcebergSink>),
}

impl AnySink {
    fn recorded(&self) -> Option<Position> {
        match self {
            AnySink::Postgres(s) => s.recorded(),
            AnySink::Iceberg(s) => s.recorded(),
        }
    }
}

/// Phase follows the delivery setting once the source is connected.
async fn follow_delivery(
    shared: Arc<Shared>,
    mut delivery_rx: watch::Receiver<Delivery>,
    cancel: CancellationToken,
    bypass: bool,
) -> Result<(), EngineError> {
    while !shared.source_connected.load(Ordering::Relaxed) {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    shared.clear_error();
    loop {
        let d = *delivery_rx.borrow_and_update();
        let (phase, msg) = match d {
            Delivery::Running => (Phase::Running, "streaming"),
            Delivery::Paused if bypass => (
                Phase::Paused,
                "paused: delivery to the sink stopped, and reading too (spec.buffer.bypass): the slot retains the WAL",
            ),
            Delivery::Paused => (
                Phase::Paused,
                "paused: delivery to the sink stopped; the slot still drains into the buffer",
            ),
        };
        shared.set_phase(phase);
        shared.set_message(msg);
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = delivery_rx.changed() => if r.is_err() { return Ok(()) },
        }
    }
}
