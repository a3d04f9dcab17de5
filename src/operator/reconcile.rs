//! Reconcile: finalizer first, then dereference (Secrets) → validate (pure) → plan and apply to the
//! supervisor → hand the status inputs to the pipeline's status writer. Never streams.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Resource, ResourceExt};

use super::dereference::read_secrets;
use super::reporter::{self, Input, Target};
use super::secret_hold;
use super::status::Inputs;
use super::{Context, Error};
use crate::crd::{CdcPipeline, CdcPipelineSpec, ReclaimPolicy, SecretKeyRef};
use crate::supervisor::Action as Planned;
use crate::validate::{Identity, Secrets, validate};

pub const FINALIZER: &str = "philotes.io/cleanup";

pub async fn reconcile(obj: Arc<CdcPipeline>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.supervisor.metrics().reconciles.inc();
    let uid = obj.uid().unwrap_or_default();
    let members = ctx.membership.members();
    let owner = ctx
        .placement
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .owner(&uid, super::pipeline_uids(&ctx.pipelines), members);
    if owner.as_deref() != Some(ctx.membership.identity.as_str()) {
        // Another replica runs it (or this one is not a member yet): nothing of it runs here, and
        // only its owner writes its status. A change of members reconciles it again.
        if ctx.supervisor.apply(&uid, None).await == Planned::Stop {
            tracing::info!(pipeline = %obj.name_any(), owner = ?owner, "pipeline handed over");
        }
        ctx.reporters.remove(&uid).await;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<CdcPipeline> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            Finalizer::Apply(o) => apply(o, &ctx).await,
            Finalizer::Cleanup(o) => cleanup(o, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

pub fn error_policy(obj: Arc<CdcPipeline>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(pipeline = %obj.name_any(), error = %err, "reconcile failed; retrying in 10s");
    Action::requeue(Duration::from_secs(10))
}

/// Names of the Secrets a spec refers to (a name may appear more than once).
pub fn secret_refs<'a>(
    spec: &'a CdcPipelineSpec,
    default_buffer: Option<&'a SecretKeyRef>,
) -> Vec<&'a str> {
    let mut refs = vec![spec.source.connection_secret_ref.name.as_str()];
    if let Some(pg) = &spec.sink.postgres {
        refs.push(&pg.connection_secret_ref.name);
    }
    if let Some(ib) = &spec.sink.iceberg {
        if let Some(r) = ib
            .catalog
            .sql
            .as_ref()
            .and_then(|s| s.connection_secret_ref.as_ref())
        {
            refs.push(&r.name);
        }
        if let Some(r) = ib
            .s3
            .as_ref()
            .and_then(|s| s.credentials_secret_ref.as_ref())
        {
            refs.push(&r.name);
        }
    }
    match (&spec.buffer.connection_secret_ref, default_buffer) {
        (Some(r), _) => refs.push(&r.name),
        (None, Some(r)) => refs.push(&r.name),
        (None, None) => {}
    }
    let tls = [
        spec.source.tls.as_ref(),
        spec.buffer.tls.as_ref(),
        spec.sink.postgres.as_ref().and_then(|p| p.tls.as_ref()),
        spec.sink
            .iceberg
            .as_ref()
            .and_then(|i| i.catalog.sql.as_ref())
            .and_then(|s| s.tls.as_ref()),
    ];
    for r in tls
        .into_iter()
        .flatten()
        .filter_map(|t| t.ca_secret_ref.as_ref())
    {
        refs.push(&r.name);
    }
    refs
}

async fn dereference(ctx: &Context, ns: &str, spec: &CdcPipelineSpec) -> Result<Secrets, Error> {
    Ok(read_secrets(&ctx.client, ns, spec, ctx.default_buffer.as_ref()).await?)
}

fn identity(obj: &CdcPipeline) -> Identity {
    Identity {
        uid: obj.uid().unwrap_or_default(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
    }
}

fn target(ctx: &Context, obj: &CdcPipeline) -> Target {
    Target {
        client: ctx.client.clone(),
        recorder: ctx.recorder.clone(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        reference: obj.object_ref(&()),
        current: obj.status.clone(),
    }
}

/// Names of the Secrets a spec refers to.
fn secret_names(spec: &CdcPipelineSpec, default_buffer: Option<&SecretKeyRef>) -> BTreeSet<String> {
    secret_refs(spec, default_buffer)
        .into_iter()
        .map(str::to_string)
        .collect()
}

/// Releases the pipeline's Secrets from the reclaim finalizer (see [`secret_hold`]).
async fn release_secrets(ctx: &Context, obj: &CdcPipeline, id: &Identity) -> Result<(), Error> {
    let names = secret_names(&obj.spec, ctx.default_buffer.as_ref());
    secret_hold::release(
        &ctx.client,
        &id.namespace,
        &names,
        &id.uid,
        ctx.default_buffer.as_ref(),
    )
    .await?;
    Ok(())
}

async fn apply(obj: Arc<CdcPipeline>, ctx: &Context) -> Result<Action, Error> {
    let id = identity(&obj);
    // Reclaim needs the Secrets at deletion: held while the policy is Delete, released otherwise.
    let names = secret_names(&obj.spec, ctx.default_buffer.as_ref());
    if obj.spec.reclaim_policy == ReclaimPolicy::Delete {
        secret_hold::hold(&ctx.client, &id.namespace, &names).await?;
    } else {
        release_secrets(ctx, &obj, &id).await?;
    }
    let secrets = dereference(ctx, &id.namespace, &obj.spec).await?;
    let reference = obj.object_ref(&());
    match validate(&id, &obj.spec, &secrets, ctx.default_buffer.as_ref()) {
        Err(errors) => {
            if ctx.supervisor.apply(&id.uid, None).await == Planned::Stop {
                reporter::publish(
                    &ctx.recorder,
                    &reference,
                    true,
                    "Stopped",
                    "stopped: the spec became invalid".into(),
                )
                .await;
            }
            let text = errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            let inputs = Inputs {
                generation: obj.meta().generation,
                desired: obj.spec.state,
                invalid: Some(errors),
                slot: None,
                publication: None,
                owner: ctx.membership.identity.clone(),
            };
            if obj.status.as_ref().and_then(|s| s.observed_generation) != obj.meta().generation {
                reporter::publish(&ctx.recorder, &reference, true, "InvalidSpec", text).await;
            }
            ctx.reporters
                .update(
                    &id.uid,
                    target(ctx, &obj),
                    Input {
                        inputs,
                        progress: None,
                    },
                )
                .await;
            // A fix comes as a spec or Secret change, which triggers a reconcile.
            Ok(Action::requeue(Duration::from_secs(300)))
        }
        Ok((config, desired)) => {
            let inputs = Inputs {
                generation: obj.meta().generation,
                desired,
                invalid: None,
                slot: Some(config.slot.clone()),
                publication: Some(config.publication.clone()),
                owner: ctx.membership.identity.clone(),
            };
            let planned = ctx.supervisor.apply(&id.uid, Some((config, desired))).await;
            let note = match planned {
                Planned::Start => Some(("Started", "worker started".to_string())),
                Planned::Restart => Some((
                    "Restarted",
                    "worker restarted: its configuration or a referenced Secret changed".into(),
                )),
                Planned::Pause => Some((
                    "Pausing",
                    "delivery to the sink pauses (spec.state: Paused)".into(),
                )),
                Planned::Resume => Some(("Resuming", "delivery to the sink resumes".into())),
                Planned::Stop => Some((
                    "Stopping",
                    "worker stops (spec.state: Stopped); the slot is kept and retains WAL".into(),
                )),
                Planned::Nothing => None,
            };
            if let Some((reason, note)) = note {
                tracing::info!(pipeline = %format!("{}/{}", id.namespace, id.name), action = ?planned, "reconciled");
                reporter::publish(
                    &ctx.recorder,
                    &reference,
                    planned == Planned::Stop,
                    reason,
                    note,
                )
                .await;
            }
            let progress = ctx.supervisor.progress(&id.uid).await;
            let failed = progress
                .as_ref()
                .is_some_and(|p| p.borrow().phase == crate::engine::state::Phase::Failed);
            ctx.reporters
                .update(&id.uid, target(ctx, &obj), Input { inputs, progress })
                .await;
            // A failed worker is tried again after a while; a healthy one needs no timer (spec,
            // Secret, phase and membership changes reconcile it), so idle pipelines cost no API
            // requests. The long requeue is a safety net only.
            Ok(Action::requeue(if failed {
                crate::supervisor::RETRY_FAILED_AFTER + Duration::from_secs(5)
            } else {
                Duration::from_secs(1800)
            }))
        }
    }
}

/// Deletion: stop the worker; with `reclaimPolicy: Delete`, drop the slot and publication this
/// pipeline created, tolerating that they or the source are gone already.
async fn cleanup(obj: Arc<CdcPipeline>, ctx: &Context) -> Result<Action, Error> {
    let id = identity(&obj);
    ctx.supervisor.apply(&id.uid, None).await;
    ctx.reporters.remove(&id.uid).await;
    let reference = obj.object_ref(&());
    let slot = obj
        .status
        .as_ref()
        .and_then(|s| s.slot_name.clone())
        .unwrap_or_default();
    if obj.spec.reclaim_policy == ReclaimPolicy::Retain {
        // The buffer rows are of no use without the resource (a new one gets a new uid).
        let secrets = dereference(ctx, &id.namespace, &obj.spec).await?;
        let (warning, reason, note) =
            match validate(&id, &obj.spec, &secrets, ctx.default_buffer.as_ref()) {
                Ok((config, _)) => match tokio::time::timeout(
                    Duration::from_secs(60),
                    crate::engine::forget_buffer(&config),
                )
                .await
                {
                    Ok(Ok(())) => (
                        false,
                        "BufferRowsRemoved",
                        "its rows in the buffer tables were removed".to_string(),
                    ),
                    Ok(Err(e)) => (
                        true,
                        "BufferRowsKept",
                        format!("its rows in the buffer tables could not be removed: {e}"),
                    ),
                    Err(_) => (
                        true,
                        "BufferRowsKept",
                        "the buffer database did not answer within 60s; its rows stay".into(),
                    ),
                },
                Err(_) => (
                    true,
                    "BufferRowsKept",
                    "its Secrets are gone, so its rows in the buffer tables stay".into(),
                ),
            };
        reporter::publish(&ctx.recorder, &reference, warning, reason, note).await;
        release_secrets(ctx, &obj, &id).await?;
        reporter::publish(
            &ctx.recorder,
            &reference,
            true,
            "SlotRetained",
            format!("reclaimPolicy Retain: replication slot {slot} stays and retains WAL until dropped (SELECT pg_drop_replication_slot('{slot}'))"),
        )
        .await;
        return Ok(Action::await_change());
    }
    let secrets = dereference(ctx, &id.namespace, &obj.spec).await?;
    let outcome = match validate(&id, &obj.spec, &secrets, ctx.default_buffer.as_ref()) {
        Ok((config, _)) => match tokio::time::timeout(Duration::from_secs(60), crate::engine::reclaim(&config)).await {
            Ok(Ok(dropped)) if dropped.is_empty() => Ok("nothing to drop: the slot and publication were not created by Philotes or are gone".to_string()),
            Ok(Ok(dropped)) => Ok(format!("dropped {}", dropped.join(" and "))),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the source did not answer within 60s".into()),
        },
        Err(errors) => Err(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")),
    };
    // The Secrets were held for this; no longer (unless another pipeline needs them).
    release_secrets(ctx, &obj, &id).await?;
    match outcome {
        Ok(note) => reporter::publish(&ctx.recorder, &reference, false, "Reclaimed", note).await,
        Err(e) => {
            // Deletion goes on: a pipeline must not be stuck because its source is gone.
            tracing::warn!(pipeline = %id.name, error = %e, "could not drop the slot and publication");
            reporter::publish(
                &ctx.recorder,
                &reference,
                true,
                "ReclaimFailed",
                format!("could not drop slot {slot}: {e}; drop it by hand if it still exists"),
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secrets_of_a_spec_include_its_ca_secrets() {
        let spec: CdcPipelineSpec = serde_yaml::from_str(
            "source: {connectionSecretRef: {name: src, key: uri}, tls: {caSecretRef: {name: src-ca, key: ca.crt}}, tables: [t]}
sink: {postgres: {connectionSecretRef: {name: dst, key: uri}, tls: {caSecretRef: {name: dst-ca, key: ca.crt}}}}
buffer: {tls: {caSecretRef: {name: buf-ca, key: ca.crt}}}",
        )
        .unwrap();
        let refs = secret_refs(&spec, None);
        for name in ["src", "dst", "src-ca", "dst-ca", "buf-ca"] {
            assert!(refs.contains(&name), "{name} missing from {refs:?}");
        }
    }
}
