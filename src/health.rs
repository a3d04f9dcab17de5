//! The health server: `/health`, `/health/live`, `/health/ready`, `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::supervisor::Supervisor;

#[derive(Clone)]
pub struct Health {
    pub supervisor: Supervisor,
    /// False until the controller's watch has synced (always true without a controller).
    pub controller_ready: Arc<AtomicBool>,
    /// The operator's membership Lease is held. With it, readiness means "this replica serves"
    /// (synced and a member); pipeline health is then in status, Events and metrics, so that one
    /// failed pipeline does not take the replica out of its Service. Without it (`philotes run`),
    /// readiness is every pipeline streaming.
    pub member: Option<Arc<AtomicBool>>,
}

async fn live() -> &'static str {
    "ok"
}

async fn detail(h: &Health) -> (bool, serde_json::Value) {
    let (pipelines_ready, detail) = h.supervisor.ready().await;
    let controller = h.controller_ready.load(Ordering::Relaxed);
    let ready = match &h.member {
        Some(member) => controller && member.load(Ordering::Relaxed),
        None => pipelines_ready && controller,
    };
    let pipelines: Vec<serde_json::Value> = detail
        .iter()
        .map(|(name, phase, connected)| json!({"pipeline": name, "phase": phase, "sourceConnected": connected}))
        .collect();
    (
        ready,
        json!({"status": if ready { "ready" } else { "not ready" }, "controllerSynced": controller,
               "member": h.member.as_ref().map(|m| m.load(Ordering::Relaxed)), "pipelines": pipelines}),
    )
}

async fn health(State(h): State<Health>) -> impl IntoResponse {
    let (_, body) = detail(&h).await;
    axum::Json(body)
}

async fn ready(State(h): State<Health>) -> impl IntoResponse {
    let (ready, body) = detail(&h).await;
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body))
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        h.supervisor.metrics().encode(),
    )
}

pub fn router(h: Health) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(h)
}

/// Serves until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    h: Health,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "health server listening");
    axum::serve(listener, router(h))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
