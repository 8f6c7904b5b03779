//! `tessera serve`: an OCI Distribution v1.1 registry.
//!
//! * Blobs live behind the [`backend::Backend`] trait (local filesystem here); all
//!   metadata — repositories, blob links, manifests, tags, referrers, upload sessions and
//!   the global chunk index — lives in one redb database ([`meta::Meta`]). Neither holds
//!   per-process state that matters: upload sessions survive restarts.
//! * A blob is stored once but readable only in repositories it was pushed or mounted to.
//! * tessera images get extra checks: every pack is verified chunk by chunk before the
//!   manifest is accepted, and its chunks enter the global chunk index, which clients
//!   query in bulk (`POST /tessera/v1/chunks`) to upload only what the registry lacks.
//! * Pull-through caching from upstream registries ([`proxy`]).
//!
//! The HTTP API is documented in docs/registry-api.md.

pub mod api;
pub mod auth;
pub mod backend;
pub mod body;
pub mod config;
pub mod conn;
pub mod error;
pub mod ext;
pub mod fuzzing;
pub mod manifest;
pub mod meta;
pub mod metrics;
pub mod names;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod state;
pub mod token;
pub mod twin;
pub mod upstream;

pub use config::ConfigError;
pub use error::ServeError;
pub use server::{router, serve};
pub use state::{Registry, Shared};
