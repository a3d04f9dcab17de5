//! Pure status computation: what the resource's status should say, from the spec, the validation
//! result and the worker's progress. Conditions keep their `lastTransitionTime` while their status
//! stays the same, so an unchanged pipeline computes an identical status and nothing is written.

use crate::crd::{BackfillStatus, CdcPipelineStatus, Condition, DesiredState, Phase};
use crate::engine::Progress;
use crate::validate::SpecError;

/// What status is computed from, besides the worker's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct Inputs {
    pub generation: Option<i64>,
    pub desired: DesiredState,
    /// Problems found in the spec (or its Secrets): the pipeline cannot run.
    pub invalid: Option<Vec<SpecError>>,
    pub slot: Option<String>,
    pub publication: Option<String>,
    /// The operator replica that runs the pipeline and writes this status.
    pub owner: String,
}

/// A condition; an empty message becomes the reason (the 1.20 API server turns "" into null in
/// server-side apply and then refuses it).
fn cond(
    type_: &str,
    ok: Option<bool>,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    let message = message.into();
    Condition {
        type_: type_.into(),
        status: match ok {
            Some(true) => "True",
            Some(false) => "False",
            None => "Unknown",
        }
        .into(),
        reason: reason.into(),
        message: if message.is_empty() {
            reason.to_string()
        } else {
            message
        },
        last_transition_time: String::new(),
        observed_generation: generation,
    }
}

/// Status for `inputs` and `progress` (None: no worker runs), keeping transition times from `prev`.
pub fn compute(
    inputs: &Inputs,
    progress: Option<&Progress>,
    prev: Option<&CdcPipelineStatus>,
    now: &str,
) -> CdcPipelineStatus {
    let g = inputs.generation;
    let mut s = CdcPipelineStatus {
        observed_generation: g,
        slot_name: inputs.slot.clone(),
        publication_name: inputs.publication.clone(),
        owner: Some(inputs.owner.clone()).filter(|o| !o.is_empty()),
        ..Default::default()
    };
    let mut conditions = Vec::new();
    s.last_resync = prev.and_then(|p| p.last_resync.clone());
    if let Some(errors) = &inputs.invalid {
        let text = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        s.phase = Some(Phase::Failed);
        s.last_error = Some(text.clone());
        s.message = Some(format!("invalid spec: {text}"));
        conditions.push(cond("Ready", Some(false), "InvalidSpec", text, g));
        conditions.push(cond("SourceConnected", None, "InvalidSpec", "", g));
        conditions.push(cond("SinkHealthy", None, "InvalidSpec", "", g));
        conditions.push(cond("Backpressured", Some(false), "NotRunning", "", g));
    } else if let Some(p) = progress {
        s.phase = Some(p.phase);
        if !p.ownership.slot_name.is_empty() {
            s.slot_name = Some(p.ownership.slot_name.clone());
            s.publication_name = Some(p.ownership.publication_name.clone());
            s.slot_created = Some(p.ownership.slot_created);
            s.publication_created = Some(p.ownership.publication_created);
        }
        s.confirmed_lsn = p.confirmed_lsn.clone();
        s.lag_bytes = Some(p.lag_bytes);
        s.wal_status = p.slot.wal_status.clone();
        s.safe_wal_bytes = p.slot.safe_wal_bytes;
        s.buffer_depth = Some(p.buffer_depth);
        if p.resynced.is_some() {
            s.last_resync = p.resynced.clone();
        }
        // This worker's backfills and removed tables; an earlier worker's until it has its own.
        s.backfills = if p.backfills.is_empty() {
            prev.map(|p| p.backfills.clone()).unwrap_or_default()
        } else {
            p.backfills
                .iter()
                .map(|b| BackfillStatus {
                    table: b.table.clone(),
                    rows_copied: b.rows_copied as i64,
                    rows_estimated: b.rows_estimated as i64,
                    done: b.done,
                })
                .collect()
        };
        s.tables_removed = if p.tables_removed.is_empty() {
            prev.map(|p| p.tables_removed.clone()).unwrap_or_default()
        } else {
            p.tables_removed.clone()
        };
        s.events_read = Some(p.events_read as i64);
        s.events_delivered = Some(p.events_delivered as i64);
        s.events_dead_lettered = Some(p.events_dead_lettered as i64);
        s.last_error = p.last_error.clone();
        s.message = Some(match (&p.last_error, &p.fix) {
            (Some(e), Some(fix)) if p.phase == Phase::Failed => {
                format!(
                    "{e}; fix: {fix}{}",
                    if p.retrying { " (retrying)" } else { "" }
                )
            }
            _ => p.message.clone(),
        });
        let (ready, reason, msg) = match p.phase {
            Phase::Running if p.source_connected && p.sink_healthy => {
                (true, "Streaming", "changes flow to the sink".to_string())
            }
            Phase::Running if !p.sink_healthy => (
                false,
                "SinkUnavailable",
                p.last_error.clone().unwrap_or_default(),
            ),
            Phase::Running => (
                false,
                "SourceDisconnected",
                p.last_error.clone().unwrap_or_default(),
            ),
            Phase::Paused => (
                false,
                "Paused",
                "delivery to the sink is paused (spec.state: Paused)".into(),
            ),
            Phase::Failed => (
                false,
                p.reason.as_deref().unwrap_or("Failed"),
                p.last_error.clone().unwrap_or_default(),
            ),
            other => (false, other.as_str(), p.message.clone()),
        };
        conditions.push(cond("Ready", Some(ready), reason, msg, g));
        conditions.push(cond(
            "SourceConnected",
            Some(p.source_connected),
            if p.source_connected {
                "Streaming"
            } else {
                "NotConnected"
            },
            "",
            g,
        ));
        conditions.push(cond(
            "SinkHealthy",
            Some(p.sink_healthy),
            if p.sink_healthy {
                "Healthy"
            } else {
                "Unavailable"
            },
            if p.sink_healthy {
                String::new()
            } else {
                p.last_error.clone().unwrap_or_default()
            },
            g,
        ));
        conditions.push(cond(
            "Backpressured",
            Some(p.backpressured),
            if p.backpressured { "BufferFull" } else { "BelowWatermark" },
            if p.backpressured { "the buffer holds more undelivered changes than highWatermark; reading is paused and the slot retains WAL" } else { "" },
            g,
        ));
        conditions.push(cond(
            "WalAtRisk",
            Some(p.slot.at_risk),
            if p.slot.at_risk { "SlotNearInvalidation" } else { "Safe" },
            if p.slot.at_risk {
                format!(
                    "slot {} may soon lose the WAL it needs (wal_status {}, safe_wal_size {} bytes): let the pipeline catch up, or raise max_slot_wal_keep_size",
                    s.slot_name.clone().unwrap_or_default(),
                    p.slot.wal_status.as_deref().unwrap_or("unknown"),
                    p.slot.safe_wal_bytes.map_or("unknown".into(), |b| b.to_string())
                )
            } else {
                String::new()
            },
            g,
        ));
    } else {
        // No worker: stopped on purpose (or not started yet).
        let stopped = inputs.desired == DesiredState::Stopped;
        s.phase = Some(if stopped {
            Phase::Stopped
        } else {
            Phase::Starting
        });
        s.lag_bytes = prev.and_then(|p| p.lag_bytes);
        s.confirmed_lsn = prev.and_then(|p| p.confirmed_lsn.clone());
        s.slot_created = prev.and_then(|p| p.slot_created);
        s.publication_created = prev.and_then(|p| p.publication_created);
        s.message = Some(if stopped {
            "stopped (spec.state: Stopped); the slot is kept and retains WAL".into()
        } else {
            "starting".into()
        });
        conditions.push(cond(
            "Ready",
            Some(false),
            if stopped { "Stopped" } else { "Starting" },
            "",
            g,
        ));
        conditions.push(cond("SourceConnected", Some(false), "NotRunning", "", g));
        conditions.push(cond("SinkHealthy", None, "NotRunning", "", g));
        conditions.push(cond("Backpressured", Some(false), "NotRunning", "", g));
    }
    if inputs.desired == DesiredState::Stopped && inputs.invalid.is_none() {
        let slot = s.slot_name.clone().unwrap_or_default();
        conditions.push(cond(
            "WalRetained",
            Some(true),
            "Stopped",
            format!("slot {slot} is kept while the pipeline is stopped, so the source retains WAL from its position on; set spec.state to Running, or delete the pipeline with reclaimPolicy: Delete"),
            g,
        ));
    }
    for c in &mut conditions {
        c.last_transition_time = prev
            .and_then(|p| {
                p.conditions
                    .iter()
                    .find(|o| o.type_ == c.type_ && o.status == c.status)
            })
            .map(|o| o.last_transition_time.clone())
            .unwrap_or_else(|| now.to_string());
    }
    s.conditions = conditions;
    s.message = s.message.filter(|m| !m.is_empty());
    s.last_error = s.last_error.filter(|m| !m.is_empty());
    s
}

/// A change between two statuses worth an Event of its own (besides phase changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    pub reason: &'static str,
    pub note: String,
}

/// The notices from `before` to `next`: WAL at risk turning True or back, a resync completed.
/// Nothing is noticed against an unknown `before` (a first status, an operator restart).
pub fn notices(before: Option<&CdcPipelineStatus>, next: &CdcPipelineStatus) -> Vec<Notice> {
    let Some(before) = before else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let at_risk = |s: &CdcPipelineStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == "WalAtRisk")
            .map(|c| (c.status.clone(), c.message.clone()))
    };
    match (at_risk(before), at_risk(next)) {
        (Some((was, _)), Some((now, msg))) if was != now && now == "True" => out.push(Notice {
            warning: true,
            reason: "WalAtRisk",
            note: msg,
        }),
        (Some((was, _)), Some((now, _))) if was == "True" && now == "False" => out.push(Notice {
            warning: false,
            reason: "WalSafe",
            note: format!(
                "slot {}: its WAL is no longer at risk (wal_status {})",
                next.slot_name.as_deref().unwrap_or(""),
                next.wal_status.as_deref().unwrap_or("unknown")
            ),
        }),
        _ => {}
    }
    if !next.tables_removed.is_empty() && next.tables_removed != before.tables_removed {
        out.push(Notice {
            warning: false,
            reason: "TablesRemoved",
            note: format!(
                "no longer captured (removed from spec.source.tables and from the publication): {}; their sink tables and rows stay",
                next.tables_removed.join(", ")
            ),
        });
    }
    for b in &next.backfills {
        let was = before.backfills.iter().find(|x| x.table == b.table);
        if b.done && was.is_none_or(|w| !w.done) {
            out.push(Notice {
                warning: false,
                reason: "BackfillDone",
                note: format!(
                    "table {} added: its {} existing rows are copied",
                    b.table, b.rows_copied
                ),
            });
        } else if was.is_none() && !b.done {
            out.push(Notice {
                warning: false,
                reason: "BackfillStarted",
                note: format!(
                    "table {} added: copying its existing rows (about {}) while the stream goes on",
                    b.table, b.rows_estimated
                ),
            });
        }
    }
    if let Some(token) = &next.last_resync
        && before.last_resync.as_ref() != Some(token)
    {
        out.push(Notice {
            warning: false,
            reason: "Resynced",
            note: format!(
                "resync {token}: slot {} made again and the tables copied again; each sink table's rows are replaced in one transaction as the copy is delivered",
                next.slot_name.as_deref().unwrap_or("")
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::buffer::Ownership;

    fn inputs(desired: DesiredState) -> Inputs {
        Inputs {
            generation: Some(3),
            desired,
            invalid: None,
            slot: Some("s".into()),
            publication: Some("p".into()),
            owner: "replica-a".into(),
        }
    }

    fn progress(phase: Phase) -> Progress {
        Progress {
            phase,
            source_connected: true,
            sink_healthy: true,
            backpressured: false,
            ownership: Ownership {
                slot_name: "s".into(),
                publication_name: "p".into(),
                slot_created: true,
                publication_created: true,
            },
            confirmed_lsn: Some("0/1".into()),
            lag_bytes: 10,
            buffer_depth: 0,
            events_read: 5,
            events_delivered: 5,
            events_dead_lettered: 0,
            last_error: None,
            fix: None,
            retrying: false,
            message: "streaming".into(),
            reason: None,
            superseded: false,
            slot: Default::default(),
            resynced: None,
            backfills: vec![],
            tables_removed: vec![],
            epoch: 1,
        }
    }

    fn find<'a>(s: &'a CdcPipelineStatus, t: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == t).unwrap()
    }

    #[test]
    fn wal_at_risk_and_a_lost_slot_show_in_conditions() {
        let mut p = progress(Phase::Running);
        p.slot = crate::engine::SlotHealth {
            wal_status: Some("unreserved".into()),
            safe_wal_bytes: Some(-100),
            at_risk: true,
        };
        let s = compute(&inputs(DesiredState::Running), Some(&p), None, "T1");
        assert_eq!(find(&s, "WalAtRisk").status, "True");
        assert_eq!(s.wal_status.as_deref(), Some("unreserved"));
        assert!(
            find(&s, "WalAtRisk")
                .message
                .contains("max_slot_wal_keep_size")
        );
        p.phase = Phase::Failed;
        p.reason = Some("SlotLost".into());
        p.last_error = Some("replication slot s is lost".into());
        let s = compute(&inputs(DesiredState::Running), Some(&p), None, "T2");
        assert_eq!(find(&s, "Ready").reason, "SlotLost");
    }

    #[test]
    fn wal_at_risk_and_a_resync_are_noticed_once_on_change() {
        let mut p = progress(Phase::Running);
        let safe = compute(&inputs(DesiredState::Running), Some(&p), None, "T0");
        assert!(notices(None, &safe).is_empty());
        assert!(notices(Some(&safe), &safe).is_empty());
        p.slot.at_risk = true;
        let risky = compute(&inputs(DesiredState::Running), Some(&p), Some(&safe), "T1");
        let n = notices(Some(&safe), &risky);
        assert_eq!(n.len(), 1);
        assert!(n[0].warning && n[0].reason == "WalAtRisk", "{n:?}");
        assert!(notices(Some(&risky), &risky).is_empty());
        assert_eq!(notices(Some(&risky), &safe)[0].reason, "WalSafe");
        p.slot.at_risk = false;
        p.resynced = Some("r1".into());
        let resynced = compute(&inputs(DesiredState::Running), Some(&p), Some(&safe), "T2");
        assert_eq!(notices(Some(&safe), &resynced)[0].reason, "Resynced");
        assert!(notices(Some(&resynced), &resynced).is_empty());
        // A worker that has not said yet keeps the last resync in status.
        p.resynced = None;
        let later = compute(
            &inputs(DesiredState::Running),
            Some(&p),
            Some(&resynced),
            "T3",
        );
        assert_eq!(later.last_resync.as_deref(), Some("r1"));
    }

    #[test]
    fn added_and_removed_tables_are_noticed_once_and_kept_across_workers() {
        use crate::engine::backfill::BackfillProgress;
        let mut p = progress(Phase::Running);
        let before = compute(&inputs(DesiredState::Running), Some(&p), None, "T0");
        p.backfills = vec![BackfillProgress {
            table: "public.b".into(),
            rows_copied: 0,
            rows_estimated: 30000,
            done: false,
        }];
        p.tables_removed = vec!["public.a".into()];
        let started = compute(
            &inputs(DesiredState::Running),
            Some(&p),
            Some(&before),
            "T1",
        );
        let reasons = |n: Vec<Notice>| n.iter().map(|n| n.reason).collect::<Vec<_>>();
        assert_eq!(
            reasons(notices(Some(&before), &started)),
            ["TablesRemoved", "BackfillStarted"]
        );
        assert!(notices(Some(&started), &started).is_empty());
        p.backfills[0].rows_copied = 30000;
        p.backfills[0].done = true;
        let done = compute(
            &inputs(DesiredState::Running),
            Some(&p),
            Some(&started),
            "T2",
        );
        assert_eq!(reasons(notices(Some(&started), &done)), ["BackfillDone"]);
        assert_eq!(done.backfills[0].rows_copied, 30000);
        // A new worker (after a restart) knows nothing of them yet: the status keeps them.
        let fresh = compute(
            &inputs(DesiredState::Running),
            Some(&progress(Phase::Running)),
            Some(&done),
            "T3",
        );
        assert_eq!(fresh.backfills, done.backfills);
        assert_eq!(fresh.tables_removed, vec!["public.a".to_string()]);
        assert!(notices(Some(&done), &fresh).is_empty());
    }

    #[test]
    fn running_is_ready_and_unchanged_status_is_identical() {
        let a = compute(
            &inputs(DesiredState::Running),
            Some(&progress(Phase::Running)),
            None,
            "T1",
        );
        assert_eq!(a.phase, Some(Phase::Running));
        assert_eq!(a.observed_generation, Some(3));
        assert_eq!(find(&a, "Ready").status, "True");
        assert_eq!(find(&a, "Ready").last_transition_time, "T1");
        let b = compute(
            &inputs(DesiredState::Running),
            Some(&progress(Phase::Running)),
            Some(&a),
            "T2",
        );
        assert_eq!(a, b, "nothing changed, so nothing to write");
        let mut p = progress(Phase::Running);
        p.sink_healthy = false;
        p.last_error = Some("sink down".into());
        let c = compute(&inputs(DesiredState::Running), Some(&p), Some(&b), "T3");
        assert_eq!(find(&c, "Ready").status, "False");
        assert_eq!(find(&c, "Ready").reason, "SinkUnavailable");
        assert_eq!(find(&c, "Ready").last_transition_time, "T3");
        assert_eq!(find(&c, "SourceConnected").last_transition_time, "T1");
    }

    #[test]
    fn invalid_paused_and_stopped() {
        let mut i = inputs(DesiredState::Running);
        i.invalid = Some(vec![SpecError {
            field: "spec.buffer.flushInterval".into(),
            problem: "\"soon\" is not a duration".into(),
            fix: "write 1s".into(),
        }]);
        let s = compute(&i, None, None, "T");
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(find(&s, "Ready").reason, "InvalidSpec");
        assert!(
            find(&s, "Ready")
                .message
                .contains("spec.buffer.flushInterval")
        );

        let s = compute(
            &inputs(DesiredState::Paused),
            Some(&progress(Phase::Paused)),
            None,
            "T",
        );
        assert_eq!(find(&s, "Ready").reason, "Paused");

        let s = compute(&inputs(DesiredState::Stopped), None, None, "T");
        assert_eq!(s.phase, Some(Phase::Stopped));
        assert_eq!(find(&s, "WalRetained").status, "True");
    }
}
