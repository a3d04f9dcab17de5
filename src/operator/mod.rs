//! The Kubernetes side: a kube-runtime Controller over CdcPipeline (and the Secrets they reference)
//! that turns each resource into a supervised engine worker and reports status.

pub mod reconcile;
pub mod reporter;
pub mod secret_hold;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;

use crate::crd::{CdcPipeline, SecretKeyRef};
use crate::engine::metrics::Metrics;
use crate::health::{self, Health};
use crate::supervisor::Supervisor;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Watch one namespace, or all.
    pub namespace: Option<String>,
    /// Buffer database for pipelines that name none (a Secret in the pipeline's namespace).
    pub default_buffer: Option<SecretKeyRef>,
    /// Where /health and /metrics are served; None: not served (tests).
    pub health_addr: Option<SocketAddr>,
    /// Reporting instance for Events (the pod name).
    pub instance: Option<String>,
}

pub struct Context {
    pub client: Client,
    pub supervisor: Supervisor,
    pub recorder: Recorder,
    pub default_buffer: Option<SecretKeyRef>,
    pub reporters: reporter::Reporters,
}

/// Runs the controller until `shutdown`; then stops every worker (their progress is in the buffer)
/// and writes their last status.
pub async fn run(
    client: Client,
    cfg: OperatorConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    crate::install_crypto_provider();
    let supervisor = Supervisor::new(Arc::new(Metrics::new()));
    let synced = Arc::new(AtomicBool::new(false));
    let health_stop = CancellationToken::new();
    let health_task = cfg.health_addr.map(|addr| {
        let h = Health {
            supervisor: supervisor.clone(),
            controller_ready: synced.clone(),
        };
        tokio::spawn(health::serve(addr, h, health_stop.clone()))
    });

    let (pipelines, secrets): (Api<CdcPipeline>, Api<Secret>) = match &cfg.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let controller = Controller::new(pipelines, watcher::Config::default());
    let store = controller.store();
    let by_secret = store.clone();
    let default_buffer = cfg.default_buffer.clone();
    let controller = controller
        .watches(
            secrets,
            watcher::Config::default(),
            move |secret: Secret| {
                let ns = secret.namespace();
                let name = secret.name_any();
                by_secret
                    .state()
                    .into_iter()
                    .filter(|p| {
                        p.namespace() == ns
                            && reconcile::secret_refs(&p.spec, default_buffer.as_ref())
                                .iter()
                                .any(|r| *r == name)
                    })
                    .map(|p| ObjectRef::from_obj(&*p))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());

    let ready_flag = synced.clone();
    tokio::spawn(async move {
        // Polled again every second: the store's readiness future wakes only one of its waiters, and
        // the controller's own runner waits on it too.
        loop {
            match tokio::time::timeout(std::time::Duration::from_secs(1), store.wait_until_ready())
                .await
            {
                Ok(Ok(())) => {
                    ready_flag.store(true, Ordering::Relaxed);
                    tracing::info!("controller synced");
                    return;
                }
                Ok(Err(_)) => return,
                Err(_) => {}
            }
        }
    });

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "philotes".into(),
            instance: cfg.instance.clone(),
        },
    );
    let ctx = Arc::new(Context {
        client,
        supervisor: supervisor.clone(),
        recorder,
        default_buffer: cfg.default_buffer.clone(),
        reporters: reporter::Reporters::default(),
    });
    controller
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "controller");
            }
        })
        .await;

    tracing::info!("controller stopped; stopping pipelines");
    supervisor.shutdown().await;
    ctx.reporters.finish().await;
    health_stop.cancel();
    if let Some(t) = health_task {
        let _ = t.await;
    }
    Ok(())
}
