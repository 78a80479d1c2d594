//! What all the listeners of one process may hold together. Each TCP connection takes one connection and its two
//! copy buffers; each UDP session one connection and its reply buffer. Whatever would exceed the budget is
//! refused at once (and counted), so the forwarder's memory is bounded by the budget, not by the clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The copy buffer of each direction of a TCP connection.
pub const TCP_BUFFER: usize = 32 * 1024;
/// The reply buffer of a UDP session: a whole datagram.
pub const UDP_BUFFER: usize = 64 * 1024;

/// The limits, across every listener of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetLimits {
    /// Open TCP connections and live UDP sessions.
    pub max_connections: usize,
    /// Bytes of their buffers.
    pub max_buffer_bytes: usize,
    /// Live UDP sessions one client address (IP) may have on one listener: a source can be spoofed, so one
    /// sender cannot take the whole budget by varying its ports.
    pub max_udp_sessions_per_source: usize,
}

impl Default for BudgetLimits {
    /// 16,384 connections and 256 MiB of buffers: 4,096 TCP connections with busy buffers (64 KiB each) fit
    /// under the chart's 512 MiB memory limit with room for everything else.
    fn default() -> Self {
        BudgetLimits {
            max_connections: 16_384,
            max_buffer_bytes: 256 << 20,
            max_udp_sessions_per_source: 64,
        }
    }
}

/// The budget in use and what it refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BudgetSnapshot {
    pub connections: u64,
    pub buffer_bytes: u64,
    pub refused_connections: u64,
    pub refused_buffer_bytes: u64,
    pub refused_udp_per_source: u64,
}

#[derive(Debug)]
pub struct Budget {
    limits: BudgetLimits,
    connections: Arc<Semaphore>,
    /// In KiB, so that a large budget stays within a semaphore's permits.
    kib: Arc<Semaphore>,
    refused_connections: AtomicU64,
    refused_buffer_bytes: AtomicU64,
    refused_udp_per_source: AtomicU64,
}

/// What one admitted connection or session holds; dropping it gives it back.
#[derive(Debug)]
pub struct Admission {
    _connection: OwnedSemaphorePermit,
    _buffers: OwnedSemaphorePermit,
}

impl Budget {
    pub fn new(limits: BudgetLimits) -> Arc<Self> {
        Arc::new(Budget {
            limits,
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            kib: Arc::new(Semaphore::new(limits.max_buffer_bytes / 1024)),
            refused_connections: AtomicU64::new(0),
            refused_buffer_bytes: AtomicU64::new(0),
            refused_udp_per_source: AtomicU64::new(0),
        })
    }

    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// One connection with `buffer_bytes` of buffers, or None (counted) when the budget has no room.
    pub fn admit(&self, buffer_bytes: usize) -> Option<Admission> {
        let Ok(connection) = self.connections.clone().try_acquire_owned() else {
            self.refused_connections.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let kib = u32::try_from(buffer_bytes.div_ceil(1024)).unwrap_or(u32::MAX);
        let Ok(buffers) = self.kib.clone().try_acquire_many_owned(kib) else {
            self.refused_buffer_bytes.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        Some(Admission {
            _connection: connection,
            _buffers: buffers,
        })
    }

    pub fn refuse_udp_per_source(&self) {
        self.refused_udp_per_source.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> BudgetSnapshot {
        let used = |s: &Semaphore, max: usize| (max - s.available_permits()) as u64;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BudgetSnapshot {
            connections: used(&self.connections, self.limits.max_connections),
            buffer_bytes: used(&self.kib, self.limits.max_buffer_bytes / 1024) * 1024,
            refused_connections: l(&self.refused_connections),
            refused_buffer_bytes: l(&self.refused_buffer_bytes),
            refused_udp_per_source: l(&self.refused_udp_per_source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_up_to_its_limits_and_counts_refusals() {
        let b = Budget::new(BudgetLimits {
            max_connections: 3,
            max_buffer_bytes: 200 * 1024,
            max_udp_sessions_per_source: 1,
        });
        let first = b.admit(64 * 1024).expect("room");
        let second = b.admit(64 * 1024).expect("room");
        assert!(b.admit(128 * 1024).is_none(), "72 KiB of buffers left");
        let third = b.admit(64 * 1024).expect("room");
        assert!(b.admit(0).is_none(), "three connections at most");
        let s = b.snapshot();
        assert_eq!((s.connections, s.buffer_bytes), (3, 192 * 1024));
        assert_eq!((s.refused_buffer_bytes, s.refused_connections), (1, 1));
        drop((first, second, third));
        assert_eq!(b.snapshot().connections, 0, "given back when dropped");
    }
}
