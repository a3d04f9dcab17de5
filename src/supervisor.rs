//! Running pipelines keyed by id; owns every worker handle. `plan` decides, purely, what to do to
//! bring what runs in line with what is wanted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::crd::DesiredState;
use crate::engine::config::{Delivery, PipelineConfig};
use crate::engine::metrics::Metrics;
use crate::engine::state::Phase;
use crate::engine::{PipelineHandle, Progress};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    /// The configuration changed in a way a running worker cannot follow: stop, then start.
    Restart,
    Pause,
    Resume,
    Stop,
    Nothing,
}

/// What runs now, as far as planning cares.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    pub config: &'a PipelineConfig,
    /// How long ago the worker gave up on an error that needs a person, if it did.
    pub failed_for: Option<Duration>,
    /// The worker stopped because another process took the pipeline over. Asked again to run it
    /// (the membership says it is this process's), it takes it back at once.
    pub superseded: bool,
}

/// A worker that gave up on a configuration error is tried again this long after, in case the
/// cause (a missing table, a password) was fixed outside the spec.
pub const RETRY_FAILED_AFTER: Duration = Duration::from_secs(60);

pub fn plan(
    desired: Option<(&PipelineConfig, DesiredState)>,
    running: Option<Running<'_>>,
) -> Action {
    match (desired, running) {
        (None, None) | (Some((_, DesiredState::Stopped)), None) => Action::Nothing,
        (None, Some(_)) | (Some((_, DesiredState::Stopped)), Some(_)) => Action::Stop,
        (Some(_), None) => Action::Start,
        (Some((want, _)), Some(run)) => {
            if !want.same_except_delivery(run.config)
                || run.superseded
                || run.failed_for.is_some_and(|d| d >= RETRY_FAILED_AFTER)
            {
                Action::Restart
            } else if want.delivery != run.config.delivery {
                match want.delivery {
                    Delivery::Paused => Action::Pause,
                    Delivery::Running => Action::Resume,
                }
            } else {
                Action::Nothing
            }
        }
    }
}

/// The pipelines this process runs.
#[derive(Clone)]
pub struct Supervisor {
    metrics: Arc<Metrics>,
    /// Who this process is, recorded as the owner of the pipelines it runs.
    identity: Arc<str>,
    pipelines: Arc<Mutex<BTreeMap<String, PipelineHandle>>>,
}

impl Supervisor {
    pub fn new(metrics: Arc<Metrics>, identity: &str) -> Self {
        Self {
            metrics,
            identity: identity.into(),
            pipelines: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Brings pipeline `id` to the desired state (None: it should not exist). Returns what was done.
    pub async fn apply(&self, id: &str, desired: Option<(PipelineConfig, DesiredState)>) -> Action {
        let desired = desired.map(|(mut c, s)| {
            c.owner = self.identity.to_string();
            (c, s)
        });
        let mut map = self.pipelines.lock().await;
        let action = plan(
            desired.as_ref().map(|(c, s)| (c, *s)),
            map.get(id).map(|h| Running {
                config: h.config(),
                failed_for: h.failed_for(),
                superseded: h.failed_for().is_some() && h.current().superseded,
            }),
        );
        // A worker being stopped is out of the map first: no lock is held while it stops (it may
        // take seconds to flush), so other pipelines are applied meanwhile.
        let old = match action {
            Action::Restart | Action::Stop => map.remove(id),
            _ => None,
        };
        match action {
            Action::Pause | Action::Resume => {
                if let (Some(h), Some((config, _))) = (map.get_mut(id), &desired) {
                    h.set_delivery(config.delivery);
                }
            }
            Action::Start => {
                if let Some((config, _)) = desired {
                    map.insert(
                        id.to_string(),
                        PipelineHandle::start(config, self.metrics.clone()),
                    );
                }
                return action;
            }
            _ => {}
        }
        drop(map);
        if let Some(old) = old {
            let name = old.config().name.clone();
            old.stop().await;
            if action == Action::Stop && desired.is_none() {
                self.metrics.remove(&name);
            }
        }
        if action == Action::Restart
            && let Some((config, _)) = desired
        {
            self.pipelines.lock().await.insert(
                id.to_string(),
                PipelineHandle::start(config, self.metrics.clone()),
            );
        }
        action
    }

    /// Stops and restarts a pipeline with the same configuration (e.g. after a Secret changed in place).
    pub async fn restart(&self, id: &str) {
        let old = self.pipelines.lock().await.remove(id);
        if let Some(old) = old {
            let config = old.config().clone();
            old.stop().await;
            self.pipelines.lock().await.insert(
                id.to_string(),
                PipelineHandle::start(config, self.metrics.clone()),
            );
        }
    }

    pub async fn progress(&self, id: &str) -> Option<tokio::sync::watch::Receiver<Progress>> {
        self.pipelines.lock().await.get(id).map(|h| h.progress())
    }

    pub async fn snapshot(&self) -> BTreeMap<String, (String, Progress)> {
        self.pipelines
            .lock()
            .await
            .iter()
            .map(|(id, h)| (id.clone(), (h.config().name.clone(), h.current())))
            .collect()
    }

    pub async fn ids(&self) -> Vec<String> {
        self.pipelines.lock().await.keys().cloned().collect()
    }

    /// Stops every pipeline (process shutdown); progress is saved in the buffer.
    pub async fn shutdown(&self) {
        let handles: Vec<PipelineHandle> = std::mem::take(&mut *self.pipelines.lock().await)
            .into_values()
            .collect();
        futures::future::join_all(handles.into_iter().map(|h| h.stop())).await;
    }

    /// Ready when every pipeline is streaming (Running or Paused) with its source connected.
    pub async fn ready(&self) -> (bool, Vec<(String, Phase, bool)>) {
        let snap = self.snapshot().await;
        let detail: Vec<(String, Phase, bool)> = snap
            .values()
            .map(|(name, p)| (name.clone(), p.phase, p.source_connected))
            .collect();
        let ready = detail.iter().all(|(_, phase, connected)| {
            matches!(phase, Phase::Running | Phase::Paused) && *connected
        });
        (ready, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::config::{ConnString, RetryPolicy, SinkConfig, TableName};

    fn config() -> PipelineConfig {
        let c = ConnString::parse("postgres://u:p@h:5432/d").unwrap();
        PipelineConfig {
            id: "id".into(),
            name: "ns/p".into(),
            source: c.clone(),
            tables: vec![TableName {
                schema: "public".into(),
                name: "t".into(),
            }],
            initial_snapshot: true,
            publication: "p".into(),
            slot: "s".into(),
            sink: SinkConfig::Postgres {
                conn: c.clone(),
                schema: "replica".into(),
            },
            buffer: c,
            batch_size: 10,
            bypass_buffer: false,
            flush_interval: Duration::from_secs(1),
            retention: Duration::from_secs(1),
            retry: RetryPolicy {
                max_attempts: 3,
                initial_interval: Duration::from_secs(1),
                max_interval: Duration::from_secs(2),
                multiplier: 2.0,
                jitter: true,
            },
            dead_letter_enabled: true,
            dead_letter_retention: Duration::from_secs(1),
            high_watermark: 10,
            low_watermark: 5,
            check_interval: Duration::from_secs(1),
            response_timeout: Duration::from_secs(20),
            wal_at_risk_bytes: 1 << 30,
            resync: None,
            owner: String::new(),
            delivery: Delivery::Running,
        }
    }

    #[test]
    fn plans() {
        let run = config();
        let running = Some(Running {
            config: &run,
            failed_for: None,
            superseded: false,
        });
        assert_eq!(
            plan(Some((&run, DesiredState::Running)), None),
            Action::Start
        );
        assert_eq!(
            plan(Some((&run, DesiredState::Running)), running),
            Action::Nothing
        );
        assert_eq!(
            plan(Some((&run, DesiredState::Stopped)), running),
            Action::Stop
        );
        assert_eq!(
            plan(Some((&run, DesiredState::Stopped)), None),
            Action::Nothing
        );
        assert_eq!(plan(None, running), Action::Stop);
        assert_eq!(plan(None, None), Action::Nothing);
        let mut paused = config();
        paused.delivery = Delivery::Paused;
        assert_eq!(
            plan(Some((&paused, DesiredState::Paused)), running),
            Action::Pause
        );
        assert_eq!(
            plan(
                Some((&run, DesiredState::Running)),
                Some(Running {
                    config: &paused,
                    failed_for: None,
                    superseded: false,
                })
            ),
            Action::Resume
        );
        let mut bigger = config();
        bigger.batch_size = 500;
        assert_eq!(
            plan(Some((&bigger, DesiredState::Running)), running),
            Action::Restart
        );
        let mut moved = config();
        moved.sink = SinkConfig::Postgres {
            conn: ConnString::parse("postgres://u:other@h:5432/d").unwrap(),
            schema: "replica".into(),
        };
        assert_eq!(
            plan(Some((&moved, DesiredState::Running)), running),
            Action::Restart
        );
        let taken_over = Some(Running {
            config: &run,
            failed_for: Some(Duration::from_secs(1)),
            superseded: true,
        });
        assert_eq!(
            plan(Some((&run, DesiredState::Running)), taken_over),
            Action::Restart,
            "a superseded worker asked to run again takes the pipeline back"
        );
    }
}
