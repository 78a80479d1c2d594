//! The sharedlb operator: the imperative shell around the pure placement core.
//!
//! One reconcile of a SharedLB: observe (reflector stores, the pool's allocator rebuilt from statuses and the
//! provider inventory) -> `placement::PoolState::plan` -> write the allocation to status with a resourceVersion
//! precondition -> commit the plan -> cloud calls and the backing Service -> `Ready` status.

pub mod allocator;
pub mod claims;
pub mod controller;
pub mod cost;
pub mod drift;
pub mod endpoints;
pub mod error;
pub mod fence;
#[cfg(test)]
mod fixtures;
pub mod forward;
pub mod model;
pub mod pacer;
pub mod plan;
pub mod providers;
pub mod telemetry;

pub use controller::{BackingService, LeaderElection, Settings, run};
pub use error::Error;
#[cfg(feature = "azure")]
pub use providers::AzureAccess;
pub use providers::{BuiltinProviders, ProviderFactory};

/// Chooses rustls's crypto backend for the process. Both `ring` (kube) and `aws-lc-rs` (the AWS SDK) may be
/// compiled in, and then rustls cannot choose by itself; call this before making any client. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
