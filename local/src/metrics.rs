//! `GET /metrics`: the chat's metrics ([`chat_shared::metrics`], the same names as in
//! CloudWatch on AWS) in Prometheus text format, so a developer sees locally what the
//! dashboard shows and any Prometheus can scrape the stack.
//!
//! One recorder per process (the `metrics` facade has one global recorder): every stack a
//! process starts counts into it, as the functions of one AWS account count into one namespace.

use std::sync::OnceLock;
use std::time::Duration;

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// How often histograms are folded into their summaries when nobody scrapes: without it a
/// long run that is never scraped would keep every sample.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder, once per process. `None` if another recorder was
/// installed first (an embedding program's own): the chat's metrics then go there.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => {
                chat_shared::metrics::describe();
                let upkeep = handle.clone();
                // A thread, not a task: it must outlive whichever runtime started the first stack.
                let spawned = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || loop {
                        std::thread::sleep(UPKEEP_INTERVAL);
                        upkeep.run_upkeep();
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "no metrics upkeep thread; histograms are folded when scraped");
                }
                Some(handle)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed; GET /metrics will be empty");
                None
            }
        })
        .as_ref()
}

/// `GET /metrics`: Prometheus text exposition format 0.0.4.
pub async fn serve() -> impl IntoResponse {
    let body = install().map(PrometheusHandle::render).unwrap_or_default();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}
