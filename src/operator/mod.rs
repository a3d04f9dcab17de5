//! The Kubernetes side: a kube-runtime Controller over CdcPipeline (and the Secrets they reference)
//! that turns each resource into a supervised engine worker and reports status.

pub mod assignment;
pub mod dereference;
pub mod membership;
pub mod reconcile;
pub mod reporter;
pub mod secret_hold;
pub mod status;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::core::PartialObjectMeta;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
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
    /// This replica's identity among the operator's replicas (the pod name), recorded as the owner
    /// of the pipelines it runs.
    pub identity: String,
    /// Where the replicas keep their membership Leases (the operator's own namespace).
    pub lease_namespace: String,
}

pub struct Context {
    pub client: Client,
    pub supervisor: Supervisor,
    pub recorder: Recorder,
    pub default_buffer: Option<SecretKeyRef>,
    pub reporters: reporter::Reporters,
    pub membership: membership::Membership,
    /// Every pipeline this replica watches: the owner of one depends on all of them.
    pub pipelines: reflector::Store<CdcPipeline>,
    /// Their owners as last placed (see [`assignment::Placement`]).
    pub placement: std::sync::Mutex<assignment::Placement>,
}

/// The uids of every pipeline in `store`.
pub fn pipeline_uids(store: &reflector::Store<CdcPipeline>) -> BTreeSet<String> {
    store.state().iter().filter_map(|p| p.uid()).collect()
}

/// Yields whenever the set of pipelines in `store` changes (looked at every 2 s, in memory).
fn pipeline_set_changes(
    store: reflector::Store<CdcPipeline>,
) -> impl futures::Stream<Item = ()> + Send {
    futures::stream::unfold((store, BTreeSet::new()), |(store, mut seen)| async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            let now = pipeline_uids(&store);
            if now != seen {
                seen = now;
                return Some(((), (store, seen)));
            }
        }
    })
}

/// What of a pipeline is worth a reconcile: its generation (spec), deletion, finalizers and
/// annotations, and its phase and owner (a worker that stopped because another replica took the
/// pipeline over is looked at again). Counters and lag in status are not.
fn worth_a_reconcile(p: &CdcPipeline) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.metadata.generation.hash(&mut h);
    p.metadata.deletion_timestamp.is_some().hash(&mut h);
    p.metadata.finalizers.hash(&mut h);
    p.metadata.annotations.hash(&mut h);
    if let Some(s) = &p.status {
        s.phase.map(|ph| ph.as_str()).hash(&mut h);
        s.owner.hash(&mut h);
    }
    Some(h.finish())
}

/// Runs the controller until `shutdown`; then stops every worker (their progress is in the buffer)
/// and writes their last status.
pub async fn run(
    client: Client,
    cfg: OperatorConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    crate::install_crypto_provider();
    let supervisor = Supervisor::new(Arc::new(Metrics::new()), &cfg.identity);
    let synced = Arc::new(AtomicBool::new(false));
    let member_stop = CancellationToken::new();
    let (membership, member_task) = membership::start(
        client.clone(),
        &cfg.lease_namespace,
        &cfg.identity,
        member_stop.clone(),
    );
    let health_stop = CancellationToken::new();
    let health_task = cfg.health_addr.map(|addr| {
        let h = Health {
            supervisor: supervisor.clone(),
            controller_ready: synced.clone(),
            member: Some(membership.held_flag()),
        };
        tokio::spawn(health::serve(addr, h, health_stop.clone()))
    });

    // Secrets as metadata only (PartialObjectMeta: metadata-only requests).
    let (pipelines, secrets): (Api<CdcPipeline>, Api<PartialObjectMeta<Secret>>) =
        match &cfg.namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (Api::all(client.clone()), Api::all(client.clone())),
        };
    // Reconciles follow spec, deletion, finalizer and annotation changes and phase or owner changes,
    // not the counters this operator writes into status every few seconds.
    let (store, writer) = reflector::store();
    let changes = watcher(pipelines, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(worth_a_reconcile, Default::default());
    let controller = Controller::for_stream(changes, store.clone());
    let by_secret = store.clone();
    let default_buffer = cfg.default_buffer.clone();
    let controller = controller
        // Secrets as metadata only: a change of a referenced Secret is seen by its resourceVersion,
        // and reconcile reads just the Secrets the pipeline names. No Secret value is held here.
        .watches_stream(
            watcher(secrets, watcher::Config::default())
                .default_backoff()
                .touched_objects(),
            move |secret: PartialObjectMeta<Secret>| {
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
        // Every pipeline is looked at again when the members or the set of pipelines change: some
        // may move.
        .reconcile_all_on(futures::stream::select(
            futures::stream::unfold(membership.changes(), |mut rx| async move {
                rx.changed().await.ok()?;
                Some(((), rx))
            }),
            pipeline_set_changes(store.clone()),
        ))
        .graceful_shutdown_on(shutdown.clone().cancelled_owned());

    let ready_flag = synced.clone();
    let ready_store = store.clone();
    tokio::spawn(async move {
        // Polled again every second: the store's readiness future wakes only one of its waiters, and
        // the controller's own runner waits on it too.
        loop {
            match tokio::time::timeout(
                std::time::Duration::from_secs(1),
                ready_store.wait_until_ready(),
            )
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
        membership,
        pipelines: store.clone(),
        placement: Default::default(),
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
    // Last: the other replicas see this one leave and take its pipelines.
    member_stop.cancel();
    let _ = member_task.await;
    health_stop.cancel();
    if let Some(t) = health_task {
        let _ = t.await;
    }
    Ok(())
}
