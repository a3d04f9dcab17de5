//! One status writer per pipeline: follows the worker's progress and the reconciler's inputs, and
//! writes the status (server-side apply, its own field manager) only when it changes. Phase and
//! condition changes are written at once; counters at most every few seconds. Phase changes become
//! Kubernetes Events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use super::status::{self, Inputs};
use crate::crd::{CdcPipeline, CdcPipelineStatus, Phase};
use crate::engine::Progress;

pub const STATUS_MANAGER: &str = "philotes-status";
/// Counters alone are written at most this often.
const COUNTER_INTERVAL: Duration = Duration::from_secs(3);
/// Positions alone (lag, confirmed LSN, safe WAL: they move with keepalives on an idle pipeline)
/// are written at most this often, so idle pipelines cost few API requests.
const POSITION_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Input {
    pub inputs: Inputs,
    pub progress: Option<watch::Receiver<Progress>>,
}

struct Writer {
    tx: watch::Sender<Input>,
    task: JoinHandle<()>,
}

/// Every pipeline's status writer.
#[derive(Default, Clone)]
pub struct Reporters {
    writers: Arc<Mutex<HashMap<String, Writer>>>,
}

pub struct Target {
    pub client: Client,
    pub recorder: Recorder,
    pub namespace: String,
    pub name: String,
    pub reference: ObjectReference,
    pub current: Option<CdcPipelineStatus>,
}

impl Reporters {
    /// Gives pipeline `uid`'s writer new inputs, starting the writer if needed.
    pub async fn update(&self, uid: &str, target: Target, input: Input) {
        let mut map = self.writers.lock().await;
        if let Some(w) = map.get(uid)
            && !w.task.is_finished()
        {
            w.tx.send_replace(input);
            return;
        }
        let (tx, rx) = watch::channel(input);
        let task = tokio::spawn(write_loop(target, rx));
        map.insert(uid.to_string(), Writer { tx, task });
    }

    /// Stops pipeline `uid`'s writer (the resource is going away).
    pub async fn remove(&self, uid: &str) {
        if let Some(w) = self.writers.lock().await.remove(uid) {
            w.task.abort();
        }
    }

    /// Lets every writer write its last status, then ends them (operator shutdown).
    pub async fn finish(&self) {
        let writers: Vec<Writer> = self.writers.lock().await.drain().map(|(_, w)| w).collect();
        for w in writers {
            drop(w.tx);
            let _ = tokio::time::timeout(Duration::from_secs(5), w.task).await;
        }
    }
}

/// The counters of a status: written every [`COUNTER_INTERVAL`] when they change.
fn counters(s: &CdcPipelineStatus) -> impl PartialEq + use<> {
    (
        s.events_read,
        s.events_delivered,
        s.events_dead_lettered,
        s.buffer_depth,
        s.backfills.clone(),
    )
}

/// The parts of a status that are written at once when they change.
fn significant(s: &CdcPipelineStatus) -> impl PartialEq + use<> {
    (
        s.phase,
        s.conditions.clone(),
        s.last_error.clone(),
        s.message.clone(),
        s.observed_generation,
        s.slot_name.clone(),
        s.slot_created,
        s.last_resync.clone(),
        s.tables_removed.clone(),
        s.backfills
            .iter()
            .map(|b| (b.table.clone(), b.done))
            .collect::<Vec<_>>(),
    )
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The worker's next progress. Once its worker is gone the receiver is kept (its last value, say
/// Stopped, is what status shows) and only new inputs wake the writer.
async fn changed(rx: &mut Option<watch::Receiver<Progress>>, gone: &mut bool) {
    match rx {
        Some(r) if !*gone => {
            if r.changed().await.is_err() {
                *gone = true;
            }
        }
        _ => std::future::pending().await,
    }
}

async fn write_loop(t: Target, mut rx: watch::Receiver<Input>) {
    let api: Api<CdcPipeline> = Api::namespaced(t.client.clone(), &t.namespace);
    let mut last = t.current.clone();
    let mut last_write = Instant::now() - COUNTER_INTERVAL;
    let mut progress_rx = rx.borrow().progress.clone();
    let mut gone = false;
    let mut closing = false;
    loop {
        let input = rx.borrow_and_update().clone();
        let progress = progress_rx.as_ref().map(|r| r.borrow().clone());
        let next = status::compute(&input.inputs, progress.as_ref(), last.as_ref(), &now());
        let differs = last.as_ref() != Some(&next);
        let urgent = last.as_ref().map(significant) != Some(significant(&next));
        let interval = if last.as_ref().map(counters) != Some(counters(&next)) {
            COUNTER_INTERVAL
        } else {
            POSITION_INTERVAL
        };
        if differs && (urgent || closing || last_write.elapsed() >= interval) {
            match write(&api, &t.name, &next).await {
                Ok(()) => {
                    last_write = Instant::now();
                    let before = last.as_ref().and_then(|s| s.phase);
                    if next.phase != before {
                        announce(&t, &next).await;
                    }
                    for n in status::notices(last.as_ref(), &next) {
                        publish(&t.recorder, &t.reference, n.warning, n.reason, n.note).await;
                    }
                    last = Some(next);
                }
                Err(e) => {
                    tracing::warn!(pipeline = %t.name, error = %e, "status write failed; retrying")
                }
            }
        }
        if closing {
            return;
        }
        tokio::select! {
            r = rx.changed() => {
                match r {
                    Ok(()) => {
                        let next = rx.borrow().progress.clone();
                        // A new worker (or none): follow it; the same one: keep its state.
                        let same = matches!((&next, &progress_rx), (Some(a), Some(b)) if a.same_channel(b));
                        if !same {
                            progress_rx = next;
                            gone = false;
                        }
                    }
                    Err(_) => closing = true,
                }
            }
            _ = changed(&mut progress_rx, &mut gone) => {}
            _ = tokio::time::sleep(if differs { Duration::from_millis(500) } else { COUNTER_INTERVAL }) => {}
        }
    }
}

async fn write(
    api: &Api<CdcPipeline>,
    name: &str,
    status: &CdcPipelineStatus,
) -> Result<(), kube::Error> {
    let patch = json!({
        "apiVersion": "philotes.io/v1alpha1",
        "kind": "CdcPipeline",
        "status": status,
    });
    let pp = PatchParams::apply(STATUS_MANAGER).force();
    tokio::time::timeout(
        Duration::from_secs(10),
        api.patch_status(name, &pp, &Patch::Apply(&patch)),
    )
    .await
    .map_err(|_| kube::Error::Service("status write timed out".into()))??;
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// An Event for a phase change; Failed is a Warning carrying the error and its fix.
async fn announce(t: &Target, s: &CdcPipelineStatus) {
    let Some(phase) = s.phase else { return };
    let (type_, note) = match phase {
        Phase::Failed => (EventType::Warning, s.message.clone().unwrap_or_default()),
        _ => (EventType::Normal, s.message.clone().unwrap_or_default()),
    };
    let ev = Event {
        type_,
        reason: phase.to_string(),
        note: Some(truncate(&note, 1000)),
        action: "Phase".into(),
        secondary: None,
    };
    if let Err(e) = t.recorder.publish(&ev, &t.reference).await {
        tracing::debug!(error = %e, "event not published");
    }
}

pub async fn publish(
    recorder: &Recorder,
    reference: &ObjectReference,
    warning: bool,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(truncate(&note, 1000)),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, reference).await {
        tracing::debug!(error = %e, "event not published");
    }
}
