//! Reading the Secrets a pipeline's spec refers to, with whichever client is given: the operator's,
//! or the user's own (`kubectl philotes dlq`).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;

use super::reconcile::secret_refs;
use crate::crd::{CdcPipelineSpec, SecretKeyRef};
use crate::validate::Secrets;

/// Reads the referenced Secrets of namespace `ns`; a missing one is left out (validation names it).
pub async fn read_secrets(
    client: &Client,
    ns: &str,
    spec: &CdcPipelineSpec,
    default_buffer: Option<&SecretKeyRef>,
) -> kube::Result<Secrets> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut out = Secrets::new();
    for r in secret_refs(spec, default_buffer) {
        if out.contains_key(r) {
            continue;
        }
        if let Some(s) = api.get_opt(r).await? {
            let mut data: BTreeMap<String, String> = BTreeMap::new();
            for (k, v) in s.data.unwrap_or_default() {
                if let Ok(text) = String::from_utf8(v.0) {
                    data.insert(k, text);
                }
            }
            data.extend(s.string_data.unwrap_or_default());
            out.insert(r.to_string(), data);
        }
    }
    Ok(out)
}
