//! The one place an engine is chosen: [`EngineKind`] from the configuration, [`open_engine`]
//! building a queue worker's engine over the device's backing (null, sync, io_uring or rbd), wrapped
//! in the tier engine for a tiered disk.

use std::fs::File;
use std::sync::Arc;

use super::null::NullEngine;
use super::rbd::engine::RbdEngine;
use super::rbd::image::RbdImage;
use super::sync::SyncEngine;
use super::tier::engine::TierEngine;
use super::tier::store::TierStore;
use super::uring::UringEngine;
use super::{uring_available, Engine, EngineError};

/// Which I/O engine serves a device's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// One io_uring per queue worker (falls back to `sync` when io_uring is unavailable).
    Uring,
    /// Blocking `preadv`/`pwritev` on the worker thread.
    Sync,
}

impl EngineKind {
    /// The kind that will really run: `Uring` becomes `Sync` where io_uring is unavailable.
    pub fn available(self) -> Self {
        if self == EngineKind::Uring && !uring_available() {
            EngineKind::Sync
        } else {
            self
        }
    }
}

/// What a queue worker's engine is built over.
#[derive(Clone, Default)]
pub struct EngineSource {
    /// The backing file (`None`: the null device).
    pub file: Option<Arc<File>>,
    /// The engine kind (already [`EngineKind::available`]).
    pub kind: Option<EngineKind>,
    /// The tier store of a tiered disk.
    pub tier: Option<Arc<TierStore>>,
    /// Test-only: the device's modelled volatile write cache ([`super::volatile`]).
    pub volatile: Option<super::volatile::Cache>,
    /// An image on a Ceph cluster (instead of `file`).
    pub rbd: Option<Arc<RbdImage>>,
}

impl EngineSource {
    /// The engine's name as reported to users ("null" for the null device).
    pub fn name(&self) -> &'static str {
        if self.rbd.is_some() {
            return "rbd";
        }
        if self.file.is_some() && self.volatile.is_some() {
            return "volatile-cache";
        }
        match (&self.file, self.kind) {
            (None, _) | (_, None) => "null",
            (Some(_), Some(EngineKind::Uring)) => "uring",
            (Some(_), Some(EngineKind::Sync)) => "sync",
        }
    }
}

/// A new engine for one queue worker; `queue_size` sizes io_uring's rings.
pub fn open_engine(source: &EngineSource, queue_size: u16) -> Result<Box<dyn Engine>, EngineError> {
    if let Some(image) = &source.rbd {
        let engine = RbdEngine::new(Arc::clone(image)).map_err(EngineError::Setup)?;
        return with_reorder(Box::new(engine));
    }
    let (Some(file), Some(kind)) = (&source.file, source.kind) else {
        return Ok(Box::new(NullEngine::default()));
    };
    let inner: Box<dyn Engine> = match (kind, &source.volatile) {
        (_, Some(cache)) => Box::new(super::volatile::VolatileCacheEngine::new(
            Arc::clone(file),
            Arc::clone(cache),
        )),
        (EngineKind::Uring, None) => {
            let entries = u32::from(queue_size).saturating_mul(2);
            Box::new(UringEngine::new(Arc::clone(file), entries)?)
        }
        (EngineKind::Sync, None) => Box::new(SyncEngine::new(Arc::clone(file))),
    };
    let engine: Box<dyn Engine> = match &source.tier {
        Some(store) => Box::new(TierEngine::new(inner, Arc::clone(store))),
        None => inner,
    };
    with_reorder(engine)
}

/// `engine`, behind the test-only reordering wrapper when it is asked for.
fn with_reorder(engine: Box<dyn Engine>) -> Result<Box<dyn Engine>, EngineError> {
    Ok(if super::reorder::requested() {
        Box::new(super::reorder::ReorderEngine::new(engine)?)
    } else {
        engine
    })
}
