//! `pause`, `resume` and `resync`: merge patches of the pipeline's spec.

use anyhow::Context;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use philotes::crd::CdcPipeline;
use serde_json::json;

async fn patch(
    client: &Client,
    ns: &str,
    name: &str,
    spec: serde_json::Value,
) -> anyhow::Result<()> {
    let api: Api<CdcPipeline> = Api::namespaced(client.clone(), ns);
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": spec })),
    )
    .await
    .with_context(|| format!("patching cdcpipeline {name} in namespace {ns}"))?;
    Ok(())
}

/// Sets `spec.state` (Running, Paused or Stopped).
pub async fn set_state(client: &Client, ns: &str, name: &str, state: &str) -> anyhow::Result<()> {
    patch(client, ns, name, json!({ "state": state })).await?;
    println!("cdcpipeline.philotes.io/{name} patched (spec.state: {state})");
    Ok(())
}

/// Sets a new `spec.resync` token: the operator rebuilds the pipeline once.
pub async fn resync(client: &Client, ns: &str, name: &str, token: &str) -> anyhow::Result<()> {
    patch(client, ns, name, json!({ "resync": token })).await?;
    println!(
        "cdcpipeline.philotes.io/{name} patched (spec.resync: {token}); status.lastResync shows it once done"
    );
    Ok(())
}
