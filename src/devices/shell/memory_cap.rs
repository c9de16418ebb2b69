//! How much guest memory a front-end may have the daemon map: at most `mem-max` per
//! connection (a device option, 1 TiB by default) and [`MEMORY_BUDGET`](crate::devices::options::MEMORY_BUDGET) for all connections
//! together.
//!
//! Why: a region of a sparse memfd costs its front-end nothing, but each one the daemon maps
//! takes its size in the daemon's address space (47 bits, 128 TiB, on x86-64 with 4-level
//! page tables). Without a cap one front-end could map terabytes of holes until every later
//! `mmap` in the process failed: other tenants' memory tables, thread stacks, the heap (an
//! allocation failure aborts the daemon).
//!
//! How (`shell::relay`): before a memory message (`SET_MEM_TABLE`, a distinct `ADD_MEM_REG`)
//! reaches `vhost-user-backend`, the relay [reserves](MemoryCap::reserve) what it would map:
//! the new total against the connection's cap, and, in the daemon's pool, the old mapping
//! and the new one together (the handler maps a new table before it drops the old). Once
//! the handler has dealt with the message, the share is [settled](MemoryCap::settle) at what
//! is really mapped ([`Tables`]): the current table, and older tables that requests in flight
//! or held back by QoS still hold (a table stays mapped while anything holds it; without
//! counting those, a front-end replacing its table under pinned requests again and again
//! kept many tables mapped for the price of one). The share goes back to the pool when the
//! connection's mappings are gone.
//!
//! Bound: a table replacement is checked as if the table it replaces were let go; if
//! requests still hold that one, it is counted from then on, and the next memory message is
//! refused until it is gone. So one connection maps at most its cap plus the one table it
//! replaced, and the pool counts both.

// Front-end-controlled sizes flow through here: no indexing or arithmetic that can panic or
// wrap silently.
#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::checks::{table_count, table_region};
use crate::vring::GuestMemory;

/// Why a memory table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryCapError {
    /// The connection's own cap (`mem-max`).
    #[error("the memory table maps {asked} bytes; this device allows {limit} (mem-max)")]
    Connection {
        /// Bytes the table would map.
        asked: u64,
        /// The device's cap.
        limit: u64,
    },
    /// The daemon's cap for all connections.
    #[error(
        "the memory table maps {asked} bytes; {free} of the daemon's guest-memory budget are left"
    )]
    Daemon {
        /// Bytes the table would map.
        asked: u64,
        /// What other connections leave.
        free: u64,
    },
    /// The regions' sizes add up past 2^64.
    #[error("memory region sizes overflow")]
    Overflow,
    /// More older tables are still held than are remembered.
    #[error("more than {MAX_TABLES} memory tables still mapped")]
    TooManyTables,
    /// The memory message is malformed (shorter than its region count says).
    #[error("malformed memory table")]
    Malformed,
}

/// Guest memory mapped by all connections together.
#[derive(Debug)]
pub struct Pool {
    mapped: AtomicU64,
    limit: u64,
}

impl Pool {
    /// A pool of `limit` bytes.
    pub const fn new(limit: u64) -> Self {
        Self {
            mapped: AtomicU64::new(0),
            limit,
        }
    }

    /// The daemon's pool.
    pub fn daemon() -> &'static Pool {
        static POOL: Pool = Pool::new(crate::devices::options::MEMORY_BUDGET);
        &POOL
    }

    /// Bytes held by all connections.
    pub fn mapped(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }
}

/// One connection's share: what its memory table maps now.
#[derive(Debug)]
pub struct MemoryCap {
    pool: &'static Pool,
    limit: u64,
    held: u64,
}

impl MemoryCap {
    /// A connection allowed `limit` bytes from `pool`; it holds nothing yet.
    pub fn new(pool: &'static Pool, limit: u64) -> Self {
        Self {
            pool,
            limit,
            held: 0,
        }
    }

    /// Bytes this connection holds.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Before a memory message: the connection would keep `kept` bytes mapped once it is
    /// dealt with, and have `peak` mapped meanwhile. `kept` is checked against the
    /// connection's cap, `peak` taken from the pool; refused, nothing changes.
    pub fn reserve(&mut self, kept: u64, peak: u64) -> Result<(), MemoryCapError> {
        if kept > self.limit {
            return Err(MemoryCapError::Connection {
                asked: kept,
                limit: self.limit,
            });
        }
        let held = self.held;
        let limit = self.pool.limit;
        self.pool
            .mapped
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |mapped| {
                let others = mapped.saturating_sub(held);
                let after = others.checked_add(peak)?;
                (after <= limit).then_some(after)
            })
            .map_err(|mapped| MemoryCapError::Daemon {
                asked: peak,
                free: limit.saturating_sub(mapped.saturating_sub(held)),
            })?;
        self.held = peak;
        Ok(())
    }

    /// After a memory message: the connection's share becomes what the handler has mapped,
    /// `mapped` (never more than reserved: the handler maps only what a message asks).
    pub fn settle(&mut self, mapped: u64) {
        let held = self.held;
        // The closure never refuses.
        let _ = self
            .pool
            .mapped
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                Some(total.saturating_sub(held).saturating_add(mapped))
            });
        self.held = mapped;
    }
}

impl Drop for MemoryCap {
    fn drop(&mut self) {
        self.settle(0);
    }
}

/// Guest memory a connection has mapped now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mapped {
    /// The handler's current memory table.
    pub current: u64,
    /// Older tables something still holds (their regions not in the current table).
    pub older: u64,
}

impl Mapped {
    /// All of it.
    pub fn total(&self) -> u64 {
        self.current.saturating_add(self.older)
    }
}

/// Most tables remembered at once (the current one and older ones still held). A front-end
/// that keeps more of its tables mapped (each pinned by a request) is refused: forgetting one
/// would stop counting memory that is still mapped.
pub const MAX_TABLES: usize = 256;

/// The memory tables a connection's handler installed, for counting what is still mapped.
#[derive(Debug, Default)]
pub struct Tables {
    tables: Mutex<Vec<Weak<GuestMemory>>>,
}

impl Tables {
    /// The handler installed `table` (it is the current one from now on); refused when
    /// [`MAX_TABLES`] are still mapped (the caller then ends the connection).
    pub fn installed(&self, table: &Arc<GuestMemory>) -> Result<(), MemoryCapError> {
        let mut tables = crate::lock::lock(&self.tables);
        tables.retain(|t| t.strong_count() > 0);
        if tables.len() >= MAX_TABLES {
            return Err(MemoryCapError::TooManyTables);
        }
        tables.push(Arc::downgrade(table));
        Ok(())
    }

    /// What is mapped now: the current table, and the regions of older tables still held
    /// that the current one does not share (a region is counted once, by its mapping).
    pub fn mapped(&self) -> Mapped {
        let mut tables = crate::lock::lock(&self.tables);
        tables.retain(|t| t.strong_count() > 0);
        let live: Vec<Arc<GuestMemory>> = tables.iter().filter_map(Weak::upgrade).collect();
        drop(tables);
        let Some((current, older)) = live.split_last() else {
            return Mapped::default();
        };
        let mut seen = std::collections::HashSet::new();
        let mut count = |table: &GuestMemory| {
            let mut bytes = 0u64;
            for region in table.iter() {
                if seen.insert(region.as_ptr() as usize) {
                    bytes = bytes.saturating_add(region.len());
                }
            }
            bytes
        };
        let current = count(current);
        let older = older
            .iter()
            .fold(0u64, |sum, table| sum.saturating_add(count(table)));
        Mapped { current, older }
    }
}

/// The bytes a `SET_MEM_TABLE` payload maps: the sum of its regions' sizes (a region is
/// guest address, size, front-end address, mmap offset, each a u64, after a u32 count and
/// 4 bytes of padding). `None` when the payload is shorter than its count says or the sum
/// overflows.
pub fn table_bytes(payload: &[u8]) -> Option<u64> {
    (0..table_count(payload)?).try_fold(0u64, |total, index| {
        total.checked_add(region_bytes(table_region(payload, index)?)?)
    })
}

/// The size field of one region description (`ADD_MEM_REG`'s payload after 8 bytes of
/// padding, or one entry of a table).
pub fn region_bytes(region: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(region.get(8..16)?.try_into().ok()?))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)] // tests fail loudly by design
mod tests {
    use super::*;

    fn pool(limit: u64) -> &'static Pool {
        Box::leak(Box::new(Pool::new(limit)))
    }

    fn table(sizes: &[u64]) -> Vec<u8> {
        let mut payload = (sizes.len() as u32).to_le_bytes().to_vec();
        payload.extend_from_slice(&[0; 4]);
        for (i, size) in sizes.iter().enumerate() {
            payload.extend_from_slice(&((i as u64) << 40).to_le_bytes());
            payload.extend_from_slice(&size.to_le_bytes());
            payload.extend_from_slice(&[0; 16]);
        }
        payload
    }

    #[test]
    fn a_table_maps_the_sum_of_its_regions() {
        assert_eq!(table_bytes(&table(&[1 << 30, 3 << 30])), Some(4 << 30));
        assert_eq!(table_bytes(&table(&[])), Some(0));
        // A count larger than the payload, and sizes that overflow, are refused.
        let mut short = table(&[1 << 30]);
        short[0] = 2;
        assert_eq!(table_bytes(&short), None);
        assert_eq!(table_bytes(&table(&[u64::MAX, 1])), None);
        assert_eq!(table_bytes(&[1, 0]), None);
    }

    #[test]
    fn a_connection_is_held_to_its_own_limit() {
        let pool = pool(1 << 40);
        let mut cap = MemoryCap::new(pool, 8 << 30);
        cap.reserve(8 << 30, 8 << 30).unwrap();
        assert_eq!(
            cap.reserve((8 << 30) + 1, (8 << 30) + 1),
            Err(MemoryCapError::Connection {
                asked: (8 << 30) + 1,
                limit: 8 << 30
            })
        );
        // A refused reservation keeps the old share.
        assert_eq!(cap.held(), 8 << 30);
        assert_eq!(pool.mapped(), 8 << 30);
        // Replacing 8 GiB by 6: both are mapped for a moment (the pool sees 14), then the
        // handler's answer settles it.
        cap.reserve(6 << 30, 14 << 30).unwrap();
        assert_eq!(pool.mapped(), 14 << 30);
        cap.settle(6 << 30);
        assert_eq!(pool.mapped(), 6 << 30);
    }

    #[test]
    fn a_refused_message_settles_at_what_stayed_mapped() {
        let pool = pool(1 << 40);
        let mut cap = MemoryCap::new(pool, 8 << 30);
        cap.reserve(4 << 30, 4 << 30).unwrap();
        cap.settle(4 << 30);
        // A table of 2 GiB the handler then refuses: the 4 GiB stay mapped, and counted.
        cap.reserve(2 << 30, 6 << 30).unwrap();
        cap.settle(4 << 30);
        assert_eq!((cap.held(), pool.mapped()), (4 << 30, 4 << 30));
    }

    #[test]
    fn older_tables_count_while_something_holds_them() {
        use vm_memory::GuestAddress;
        let tables = Tables::default();
        assert_eq!(tables.mapped(), Mapped::default());
        let first = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        tables.installed(&first).unwrap();
        // A region added: the new table shares the first one's region.
        let second = Arc::new(
            first
                .insert_region(Arc::new(
                    vm_memory::GuestRegionMmap::from_range(GuestAddress(1 << 30), 2 << 20, None)
                        .unwrap(),
                ))
                .unwrap(),
        );
        tables.installed(&second).unwrap();
        // A request still holds the first table: its region is the current table's too.
        assert_eq!(
            tables.mapped(),
            Mapped {
                current: 3 << 20,
                older: 0
            }
        );
        // A new table of its own, while a request holds the second.
        let third = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
        tables.installed(&third).unwrap();
        drop(first);
        assert_eq!(
            tables.mapped(),
            Mapped {
                current: 4 << 20,
                older: 3 << 20
            }
        );
        // Let go: counted no more.
        drop(second);
        assert_eq!(tables.mapped().total(), 4 << 20);
    }

    #[test]
    fn tables_still_held_past_the_limit_are_refused_not_forgotten() {
        use vm_memory::GuestAddress;
        let tables = Tables::default();
        let held: Vec<_> = (0..MAX_TABLES)
            .map(|_| {
                let t = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
                tables.installed(&t).unwrap();
                t
            })
            .collect();
        let one_more = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 4096)]).unwrap());
        assert_eq!(
            tables.installed(&one_more),
            Err(MemoryCapError::TooManyTables)
        );
        assert_eq!(tables.mapped().total(), MAX_TABLES as u64 * 4096);
        // Once they are let go there is room again.
        drop(held);
        tables.installed(&one_more).unwrap();
    }

    #[test]
    fn connections_share_the_pool_and_give_back_what_they_held() {
        let pool = pool(10 << 30);
        let mut a = MemoryCap::new(pool, 8 << 30);
        let mut b = MemoryCap::new(pool, 8 << 30);
        a.reserve(6 << 30, 6 << 30).unwrap();
        assert_eq!(
            b.reserve(6 << 30, 6 << 30),
            Err(MemoryCapError::Daemon {
                asked: 6 << 30,
                free: 4 << 30
            })
        );
        b.reserve(4 << 30, 4 << 30).unwrap();
        // Moving within one's own share needs only what the others leave.
        a.settle(2 << 30);
        a.reserve(6 << 30, 6 << 30).unwrap();
        assert_eq!(pool.mapped(), 10 << 30);
        drop(a);
        assert_eq!(pool.mapped(), 4 << 30);
        b.reserve(8 << 30, 8 << 30).unwrap();
        drop(b);
        assert_eq!(pool.mapped(), 0);
    }
}
