use sharedlb_providers::ProviderError;

/// Why a reconcile failed; `controller::error_policy` branches on it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("cloud: {0}")]
    Provider(#[from] ProviderError),
    #[error(
        "the object changed while its allocation was being written; retrying with the new version"
    )]
    Conflict,
    /// kube-runtime's finalizer helper failed in a way that is not one of ours (it reports only as text).
    #[error("finalizer: {0}")]
    Finalizer(String),
    /// A watch-backed store could not be filled at start.
    #[error("filling the {what} store: {message}")]
    Store { what: &'static str, message: String },
    /// The planner broke its own contract (a bug, reported rather than panicking).
    #[error("placement: {0}")]
    Planner(String),
    #[error(transparent)]
    NoNodePort(#[from] crate::model::NoNodePort),
    #[error("serialising: {0}")]
    Json(#[from] serde_json::Error),
    #[error("leader election: {0}")]
    Lease(String),
    #[error(
        "lost the leader lease; stopping so that a fresh start rebuilds state before placing anything"
    )]
    LostLeadership,
    #[error("{0}")]
    PoolInUse(String),
    #[error(
        "this replica cannot prove it still holds the leader lease; it makes no change until it can"
    )]
    Fenced,
    #[error("serving metrics: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// A 409 from the apiserver: a precondition (resourceVersion) did not hold.
    pub fn from_kube(e: kube::Error) -> Self {
        match &e {
            kube::Error::Api(s) if s.code == 409 => Error::Conflict,
            _ => Error::Kube(e),
        }
    }
}
