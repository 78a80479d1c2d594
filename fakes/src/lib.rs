//! HTTP fakes of cloud APIs that have no emulator. They are **fakes**, not the clouds: each serves exactly the
//! resources and methods sharedlb's provider uses, with the semantics that matter to it, and the real SDK client
//! talks to it over loopback (127.0.0.1 only). Tests start one per test and drop it to stop it.

pub mod azure;
pub mod gcp;
