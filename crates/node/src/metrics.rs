//! The node's Prometheus metrics (`/metrics`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub call: &'static str,
    pub code: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    /// Snapshots API calls by call and gRPC code.
    pub calls: Family<CallLabels, Counter>,
    /// Lazy mounts being served.
    pub lazy_mounts: Gauge,
    /// Images served from their twin (lazy snapshots that exist).
    pub lazy_images: Gauge,
    /// Lower layers answered from a twin without download.
    pub placeholders: Counter,
    /// Placeholder layers that had to be downloaded after all (a plain image built on them).
    pub materialized: Counter,
    /// Layers containerd unpacked itself because the twin could not serve them.
    pub twin_fallbacks: Counter,
    /// Lazy mounts taken over from a daemon before this one (through the keeper).
    pub adopted_mounts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tessera_node");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("snapshot_calls", "Snapshots API calls", calls.clone());
        let lazy_mounts = Gauge::default();
        registry.register(
            "lazy_mounts",
            "Lazy image mounts being served",
            lazy_mounts.clone(),
        );
        let lazy_images = Gauge::default();
        registry.register(
            "lazy_images",
            "Snapshots served lazily from a tessera twin",
            lazy_images.clone(),
        );
        let placeholders = Counter::default();
        registry.register(
            "placeholder_layers",
            "Lower layers answered from a twin without download",
            placeholders.clone(),
        );
        let materialized = Counter::default();
        registry.register(
            "materialized_layers",
            "Placeholder layers downloaded because a plain image built on them",
            materialized.clone(),
        );
        let twin_fallbacks = Counter::default();
        registry.register(
            "twin_fallbacks",
            "Layers containerd unpacked itself because the twin could not serve them",
            twin_fallbacks.clone(),
        );
        let adopted_mounts = Counter::default();
        registry.register(
            "adopted_mounts",
            "Lazy mounts taken over from an earlier daemon, with their readers",
            adopted_mounts.clone(),
        );
        Metrics {
            registry,
            calls,
            lazy_mounts,
            lazy_images,
            placeholders,
            materialized,
            twin_fallbacks,
            adopted_mounts,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
