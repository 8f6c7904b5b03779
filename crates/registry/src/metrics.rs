//! Prometheus metrics, served as text at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<RouteLabels, Histogram>,
    pub bytes_sent: Counter,
    pub bytes_received: Counter,
    pub uploads_active: Gauge,
    pub packs_verified: Counter,
    pub packs_rejected: Counter,
    pub chunks_indexed: Gauge,
    pub upstream_fetches: Counter,
    pub upstream_errors: Counter,
    pub twins_converted: Counter,
    pub twins_failed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tessera_registry");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to response headers",
            latency.clone(),
        );
        let bytes_sent = Counter::default();
        registry.register(
            "blob_bytes_sent",
            "Blob bytes sent to clients",
            bytes_sent.clone(),
        );
        let bytes_received = Counter::default();
        registry.register(
            "blob_bytes_received",
            "Blob bytes received in uploads",
            bytes_received.clone(),
        );
        let uploads_active = Gauge::default();
        registry.register(
            "uploads_active",
            "Upload requests in progress",
            uploads_active.clone(),
        );
        let packs_verified = Counter::default();
        registry.register(
            "packs_verified",
            "tessera packs verified and admitted",
            packs_verified.clone(),
        );
        let packs_rejected = Counter::default();
        registry.register(
            "packs_rejected",
            "tessera packs that failed verification",
            packs_rejected.clone(),
        );
        let chunks_indexed = Gauge::default();
        registry.register(
            "chunks_indexed",
            "Chunks in the global chunk index",
            chunks_indexed.clone(),
        );
        let upstream_fetches = Counter::default();
        registry.register(
            "upstream_fetches",
            "Pull-through requests sent upstream",
            upstream_fetches.clone(),
        );
        let upstream_errors = Counter::default();
        registry.register(
            "upstream_errors",
            "Pull-through upstream failures",
            upstream_errors.clone(),
        );
        let twins_converted = Counter::default();
        registry.register(
            "twins_converted",
            "tessera twins made by --convert-on-push",
            twins_converted.clone(),
        );
        let twins_failed = Counter::default();
        registry.register(
            "twins_failed",
            "--convert-on-push conversions that failed",
            twins_failed.clone(),
        );
        Metrics {
            registry,
            twins_converted,
            twins_failed,
            requests,
            latency,
            bytes_sent,
            bytes_received,
            uploads_active,
            packs_verified,
            packs_rejected,
            chunks_indexed,
            upstream_fetches,
            upstream_errors,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
