//! Where a pipeline's dead letters are: the plugin reads the pipeline and the Secrets it names with
//! the user's own RBAC, and connects to the buffer database itself. The URIs stay in memory: what is
//! printed names only host, port and database.

use anyhow::{Context, anyhow};
use kube::api::Api;
use kube::{Client, ResourceExt};
use philotes::crd::{CdcPipeline, SecretKeyRef};
use philotes::engine::config::PipelineConfig;
use philotes::operator::dereference::read_secrets;
use philotes::validate::{Identity, validate};

/// The configuration the operator runs pipeline `name` of `ns` with.
pub async fn config(
    client: &Client,
    ns: &str,
    name: &str,
    default_buffer: Option<&SecretKeyRef>,
) -> anyhow::Result<PipelineConfig> {
    let api: Api<CdcPipeline> = Api::namespaced(client.clone(), ns);
    let p = api
        .get(name)
        .await
        .with_context(|| format!("cdcpipeline {name} in namespace {ns}"))?;
    let secrets = read_secrets(client, ns, &p.spec, default_buffer)
        .await
        .with_context(|| {
            format!("reading the pipeline's Secrets (needs get on secrets in namespace {ns})")
        })?;
    let id = Identity {
        uid: p.uid().context("the pipeline has no uid")?,
        namespace: ns.to_string(),
        name: p.name_any(),
    };
    match validate(&id, &p.spec, &secrets, default_buffer) {
        Ok((cfg, _)) => Ok(cfg),
        Err(errors) => Err(anyhow!(
            "cdcpipeline {ns}/{name} cannot be resolved: {}",
            errors
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        )),
    }
}
