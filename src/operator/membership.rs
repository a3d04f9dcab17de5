//! Membership: each operator replica keeps a Lease of its own alive in the operator's namespace
//! (`philotes-member-<identity>`, label `philotes.io/member`), renewed every [`RENEW`]; the live
//! members are the Leases renewed within their duration. A replica that stops gracefully deletes
//! its Lease, so the others take its pipelines at once instead of after [`DURATION`].
//!
//! Hand-written rather than kube-lease-manager (which resolves with kube 5): that crate elects one
//! holder of one contended Lease, while membership needs every replica's own heartbeat and a view
//! of all of them, which it does not give; the heartbeat is one server-side apply.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const LABEL: &str = "philotes.io/member";
/// A member whose Lease was not renewed for this long is gone.
pub const DURATION: Duration = Duration::from_secs(15);
/// How often a member renews its Lease and reads the others'.
pub const RENEW: Duration = Duration::from_secs(3);
const MANAGER: &str = "philotes-membership";

/// The live members as this replica sees them, and whether its own Lease is held.
#[derive(Clone)]
pub struct Membership {
    pub identity: String,
    members: watch::Receiver<BTreeSet<String>>,
    held: Arc<AtomicBool>,
}

impl Membership {
    /// The live members (sorted); empty until this replica's own Lease is written.
    pub fn members(&self) -> BTreeSet<String> {
        self.members.borrow().clone()
    }

    /// Whether this replica's Lease was renewed lately (it serves).
    pub fn held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }

    pub fn held_flag(&self) -> Arc<AtomicBool> {
        self.held.clone()
    }

    /// Changes of the member set, for reconciling every pipeline when it changes.
    pub fn changes(&self) -> watch::Receiver<BTreeSet<String>> {
        self.members.clone()
    }
}

/// The Lease name of member `identity` (a DNS subdomain: lower case, other characters as `-`).
pub fn lease_name(identity: &str) -> String {
    let clean: String = identity
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let mut name = format!(
        "philotes-member-{}",
        clean.trim_matches(|c| c == '-' || c == '.')
    );
    name.truncate(253);
    name
}

/// Whether a Lease renewed at `renewed` for `duration` is live at `now`.
fn live(renewed: Option<Timestamp>, duration: Option<i32>, now: Timestamp) -> bool {
    let (Some(renewed), Some(secs)) = (renewed, duration) else {
        return false;
    };
    now.duration_since(renewed) < SignedDuration::from_secs(secs.max(0) as i64)
}

/// Starts keeping this replica's Lease in `namespace` until `stop`; then deletes it.
pub fn start(
    client: Client,
    namespace: &str,
    identity: &str,
    stop: CancellationToken,
) -> (Membership, JoinHandle<()>) {
    let (tx, rx) = watch::channel(BTreeSet::new());
    let held = Arc::new(AtomicBool::new(false));
    let m = Membership {
        identity: identity.to_string(),
        members: rx,
        held: held.clone(),
    };
    let api: Api<Lease> = Api::namespaced(client, namespace);
    let identity = identity.to_string();
    let task = tokio::spawn(async move {
        let name = lease_name(&identity);
        // Members are published from the second round on: replicas started together have then all
        // written their Leases, so a new replica does not take every pipeline for a moment.
        let mut rounds = 0u32;
        loop {
            let renewed = renew(&api, &name, &identity).await;
            match &renewed {
                Ok(()) => held.store(true, Ordering::Relaxed),
                Err(e) => {
                    held.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "could not renew the membership Lease");
                }
            }
            match read_members(&api).await {
                // Without its own Lease renewed, a replica counts no one: it must not run pipelines
                // that the others may already have taken.
                Ok(_) if renewed.is_ok() && rounds == 0 => rounds += 1,
                Ok(members) if renewed.is_ok() => {
                    tx.send_if_modified(|m| {
                        if *m != members {
                            tracing::info!(?members, "operator members");
                            *m = members;
                            true
                        } else {
                            false
                        }
                    });
                }
                Ok(_) => {
                    tx.send_if_modified(|m| !std::mem::take(m).is_empty());
                }
                Err(e) => tracing::warn!(error = %e, "could not read the membership Leases"),
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(RENEW) => {}
            }
        }
        held.store(false, Ordering::Relaxed);
        tx.send_replace(BTreeSet::new());
        match tokio::time::timeout(
            Duration::from_secs(5),
            api.delete(&name, &DeleteParams::default()),
        )
        .await
        {
            Ok(Ok(_)) => {
                tracing::info!(lease = %name, "membership Lease deleted: pipelines hand over")
            }
            Ok(Err(e)) => {
                tracing::warn!(lease = %name, error = %e, "could not delete the membership Lease")
            }
            Err(_) => tracing::warn!(lease = %name, "deleting the membership Lease timed out"),
        }
    });
    (m, task)
}

async fn renew(api: &Api<Lease>, name: &str, identity: &str) -> Result<(), kube::Error> {
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "labels": {LABEL: "true"}},
        "spec": LeaseSpec {
            holder_identity: Some(identity.to_string()),
            lease_duration_seconds: Some(DURATION.as_secs() as i32),
            renew_time: Some(MicroTime(Timestamp::now())),
            ..LeaseSpec::default()
        },
    });
    tokio::time::timeout(
        Duration::from_secs(10),
        api.patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&lease),
        ),
    )
    .await
    .map_err(|_| kube::Error::Service("renewing the membership Lease timed out".into()))??;
    Ok(())
}

async fn read_members(api: &Api<Lease>) -> Result<BTreeSet<String>, kube::Error> {
    let list = tokio::time::timeout(
        Duration::from_secs(10),
        api.list(&ListParams::default().labels(LABEL)),
    )
    .await
    .map_err(|_| kube::Error::Service("listing the membership Leases timed out".into()))??;
    let now = Timestamp::now();
    Ok(list
        .items
        .into_iter()
        .filter_map(|l| {
            let s = l.spec?;
            live(s.renew_time.map(|t| t.0), s.lease_duration_seconds, now)
                .then_some(s.holder_identity)
                .flatten()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_dns_names_and_liveness_follows_the_duration() {
        assert_eq!(
            lease_name("philotes-7d9f_x"),
            "philotes-member-philotes-7d9f-x"
        );
        assert_eq!(lease_name("Pod.A"), "philotes-member-pod.a");
        let now = Timestamp::now();
        let ago = |s: i64| Some(now - SignedDuration::from_secs(s));
        assert!(live(ago(3), Some(15), now));
        assert!(!live(ago(16), Some(15), now));
        assert!(!live(None, Some(15), now));
        assert!(!live(ago(1), None, now));
    }
}
