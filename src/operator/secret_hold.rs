//! Holds the Secrets of pipelines with `reclaimPolicy: Delete`: a finalizer on each, so that deleting a
//! pipeline together with its Secrets (`kubectl delete -f` of one file) still lets reclaim read the
//! connection and drop the slot. A Secret is released once no such pipeline in its namespace refers to
//! it any more.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::reconcile::secret_refs;
use crate::crd::{CdcPipeline, ReclaimPolicy, SecretKeyRef};

pub const SECRET_FINALIZER: &str = "philotes.io/reclaim";

/// Sets `finalizers` on Secret `s` (optimistic: a concurrent change makes the patch fail, and the
/// reconcile runs again).
async fn set_finalizers(
    api: &Api<Secret>,
    s: &Secret,
    finalizers: Vec<String>,
) -> kube::Result<()> {
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": s.metadata.resource_version,
    }});
    api.patch(
        &s.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

/// Adds the finalizer to the Secrets `names` that exist, are not being deleted, and lack it.
pub async fn hold(client: &Client, ns: &str, names: &BTreeSet<String>) -> kube::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    for name in names {
        let Some(s) = api.get_opt(name).await? else {
            continue;
        };
        let mut f = s.finalizers().to_vec();
        if s.metadata.deletion_timestamp.is_some() || f.iter().any(|x| x == SECRET_FINALIZER) {
            continue;
        }
        f.push(SECRET_FINALIZER.into());
        set_finalizers(&api, &s, f).await?;
    }
    Ok(())
}

/// Removes the finalizer from the Secrets `names` unless a pipeline with `reclaimPolicy: Delete` in
/// the namespace, other than `except` (a uid), still refers to them.
pub async fn release(
    client: &Client,
    ns: &str,
    names: &BTreeSet<String>,
    except: &str,
    default_buffer: Option<&SecretKeyRef>,
) -> kube::Result<()> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut held = Vec::new();
    for name in names {
        if let Some(s) = api.get_opt(name).await?
            && s.finalizers().iter().any(|x| x == SECRET_FINALIZER)
        {
            held.push(s);
        }
    }
    if held.is_empty() {
        return Ok(());
    }
    let pipelines: Api<CdcPipeline> = Api::namespaced(client.clone(), ns);
    let needed: BTreeSet<String> = pipelines
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|p| {
            // One being deleted still needs them until its own cleanup has run.
            p.uid().as_deref() != Some(except) && p.spec.reclaim_policy == ReclaimPolicy::Delete
        })
        .flat_map(|p| {
            secret_refs(&p.spec, default_buffer)
                .into_iter()
                .map(str::to_string)
        })
        .collect();
    for s in held {
        if needed.contains(&s.name_any()) {
            continue;
        }
        let f: Vec<String> = s
            .finalizers()
            .iter()
            .filter(|x| *x != SECRET_FINALIZER)
            .cloned()
            .collect();
        set_finalizers(&api, &s, f).await?;
    }
    Ok(())
}
