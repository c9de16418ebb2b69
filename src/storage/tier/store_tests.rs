use super::*;

const EXTENT: u64 = 64 << 10;
const SIZE: u64 = 8 * EXTENT;

struct Disk {
    dir: tempfile::TempDir,
}

impl Disk {
    fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn open(&self) -> TierStore {
        self.open_as(false)
    }

    /// Opens the disk as a migration's destination would (`incoming`: inactive) or normally.
    fn open_as(&self, incoming: bool) -> TierStore {
        let hot_path = self.dir.path().join("d.hot");
        let hot = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&hot_path)
            .unwrap();
        hot.set_len(SIZE).unwrap();
        let cold = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.dir.path().join("d.cold"))
            .unwrap();
        let journal = journal_path(&hot_path, &self.dir.path().join("d.cold"));
        if incoming {
            return TierStore::open_inactive(Arc::new(hot), &journal, cold, SIZE, EXTENT, 3);
        }
        TierStore::open(Arc::new(hot), &journal, cold, SIZE, EXTENT, 3).unwrap()
    }

    /// Writes through the I/O path; returns the tier work it caused.
    fn write(&self, store: &TierStore, offset: u64, data: &[u8]) -> u64 {
        let begun = store
            .begin_io(offset, data.len() as u64, Access::Write)
            .unwrap();
        assert!(begun.hot, "writes are always served by the hot file");
        store.hot.write_all_at(data, offset).unwrap();
        store.end_io(begun.extents);
        begun.work
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_add(seed))
        .collect()
}

fn read(store: &TierStore, offset: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    store.read(offset, &mut out).unwrap();
    out
}

#[test]
fn demote_read_write_promote_and_reopen_keep_every_byte() {
    let disk = Disk::new();
    let store = disk.open();
    let data = pattern(1, (3 * EXTENT) as usize);
    disk.write(&store, EXTENT, &data);
    assert_eq!(store.demote(0).unwrap(), Moved::Skipped, "unwritten extent");
    for e in 1..4 {
        assert_eq!(store.demote(e).unwrap(), Moved::Done);
    }
    assert_eq!(store.cold_extents(), vec![1, 2, 3]);
    let begun = store.begin_io(EXTENT, 10, Access::Read).unwrap();
    store.end_io(begun.extents);
    assert!(!begun.hot, "a cold extent is not served by the hot file");
    assert_eq!(begun.work, 0, "reads decompress later, in `read`");
    let mut first = vec![0u8; 10];
    assert_eq!(
        store.read(EXTENT, &mut first).unwrap(),
        EXTENT,
        "a cache miss decompresses the whole extent: the guest is charged for it"
    );
    assert_eq!(store.read(EXTENT, &mut first).unwrap(), 0, "cached");
    assert_eq!(read(&store, EXTENT, data.len()), data);
    // A write into a cold extent promotes it first, and costs the whole extent.
    let patch = pattern(9, 4096);
    assert_eq!(disk.write(&store, 2 * EXTENT + 100, &patch), EXTENT);
    assert_eq!(disk.write(&store, 2 * EXTENT, &patch), 0, "hot now");
    let mut model = data.clone();
    model[(EXTENT + 100) as usize..(EXTENT + 100) as usize + 4096].copy_from_slice(&patch);
    model[EXTENT as usize..EXTENT as usize + 4096].copy_from_slice(&patch);
    assert_eq!(store.cold_extents(), vec![1, 3]);
    assert_eq!(read(&store, EXTENT, model.len()), model);
    // Reopen without a clean close (a crash): same contents, same map.
    drop(store);
    let store = disk.open();
    assert_eq!(store.cold_extents(), vec![1, 3]);
    assert_eq!(read(&store, EXTENT, model.len()), model);
    assert_eq!(store.promote(3).unwrap(), Moved::Done);
    assert_eq!(read(&store, EXTENT, model.len()), model);
    store.close().unwrap();
}

#[test]
fn a_write_racing_a_demotion_wins() {
    let disk = Disk::new();
    let store = disk.open();
    disk.write(&store, 0, &pattern(2, EXTENT as usize));
    // A write in flight: the demotion does not even start.
    let extents = store.begin_io(0, 512, Access::Write).unwrap().extents;
    assert_eq!(store.demote(0).unwrap(), Moved::Raced);
    store.end_io(extents);
    // A read in flight holds a demotion back too (it would read a released hot copy).
    let extents = store.begin_io(0, 512, Access::Read).unwrap().extents;
    assert_eq!(store.demote(0).unwrap(), Moved::Raced);
    store.end_io(extents);
    assert_eq!(store.demote(0).unwrap(), Moved::Done);
    assert_eq!(store.stats.failed.load(Ordering::Relaxed), 0);
}

/// The cold file of a store made by [`Disk::open`].
fn cold_file(store: &TierStore) -> &std::fs::File {
    match &store.cold {
        crate::storage::tier::cold::ColdTier::File(file) => file,
        crate::storage::tier::cold::ColdTier::Rados(_) => panic!("a file-backed test store"),
    }
}

#[test]
fn a_corrupt_record_fails_only_its_own_reads() {
    let disk = Disk::new();
    let store = disk.open();
    disk.write(&store, 0, &pattern(3, (2 * EXTENT) as usize));
    store.demote(0).unwrap();
    store.demote(1).unwrap();
    let location = lock(&store.state).cold[&0];
    let mut byte = [0u8; 1];
    let at = location.offset + location.len as u64 - 5;
    store.cold.read_exact_at(&mut byte, at).unwrap();
    cold_file(&store)
        .write_all_at(&[byte[0] ^ 0x40], at)
        .unwrap();
    let mut out = vec![0u8; 512];
    assert!(matches!(
        store.read(0, &mut out),
        Err(TierError::Record { extent: 0, .. })
    ));
    assert_eq!(
        read(&store, EXTENT, 512),
        pattern(3, (2 * EXTENT) as usize)[EXTENT as usize..][..512]
    );
    assert_eq!(store.stats.corrupt.load(Ordering::Relaxed), 1);
    // Writing over it is refused too (its old contents cannot be read to merge).
    assert!(store.begin_io(0, 512, Access::Write).is_err());
    // Zeroing the whole extent does not need its contents: allowed, and it reads zeros.
    let extents = store.begin_io(0, EXTENT, Access::Zero).unwrap().extents;
    store.end_io(extents);
    assert_eq!(read(&store, 0, 512), vec![0u8; 512]);
}

#[test]
fn space_leaked_by_a_crash_is_reclaimed_at_start() {
    use std::os::unix::fs::MetadataExt;
    let disk = Disk::new();
    let store = disk.open();
    disk.write(&store, 0, &pattern(4, EXTENT as usize));
    store.demote(0).unwrap();
    // A crash after a record was written but before its journal entry: unreferenced bytes.
    let junk = vec![0x5au8; 256 << 10];
    let end = cold_file(&store).metadata().unwrap().len();
    cold_file(&store).write_all_at(&junk, end).unwrap();
    cold_file(&store).sync_all().unwrap();
    drop(store);
    let before = std::fs::metadata(disk.dir.path().join("d.cold"))
        .unwrap()
        .blocks();
    let store = disk.open();
    let after = cold_file(&store).metadata().unwrap().blocks();
    assert!(
        after + 400 < before,
        "leaked space not reclaimed: {before} -> {after} blocks"
    );
    assert_eq!(read(&store, 0, 4096), pattern(4, 4096));
}

#[test]
fn the_engine_reads_a_range_across_both_tiers_in_pieces() {
    use crate::storage::{Engine, IoOp, OpKind};
    let disk = Disk::new();
    let store = disk.open();
    let data = pattern(5, (4 * EXTENT) as usize);
    disk.write(&store, 0, &data);
    store.demote(1).unwrap();
    store.demote(2).unwrap();
    let store = Arc::new(store);
    let inner = Box::new(crate::storage::sync::SyncEngine::new(Arc::clone(
        &store.hot,
    )));
    let mut engine = super::super::engine::TierEngine::new(inner, Arc::clone(&store));
    // From inside extent 0 to inside extent 3: hot, cold, cold, hot; many 4 KiB pieces.
    let (start, len) = (EXTENT - 1000, 2 * EXTENT + 3000);
    let mut out = vec![0u8; len as usize];
    let iovec = libc::iovec {
        iov_base: out.as_mut_ptr().cast(),
        iov_len: out.len(),
    };
    // SAFETY: `out` is ours, writable, and outlives the reap below.
    unsafe {
        engine.push(IoOp {
            kind: OpKind::Read { offset: start },
            iovecs: vec![iovec].into(),
            tag: 7,
        })
    };
    let mut done = Vec::new();
    engine.drain(&mut done);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].result, Ok(()));
    assert_eq!(out, data[start as usize..(start + len) as usize]);
    assert!(store.stats.cold_reads.load(Ordering::Relaxed) > 0);
}

#[test]
fn a_live_migration_hands_the_tier_over_and_back_without_losing_a_byte() {
    let disk = Disk::new();
    let source = disk.open();
    let data = pattern(5, (4 * EXTENT) as usize);
    disk.write(&source, 0, &data);
    assert_eq!(source.demote(1).unwrap(), Moved::Done);
    // The destination exists while the source runs: it has touched nothing.
    let dest = disk.open_as(true);
    assert!(!dest.is_active());
    assert!(matches!(dest.demote(0), Err(TierError::Inactive)));
    assert_eq!(
        source.demote(2).unwrap(),
        Moved::Done,
        "the source goes on moving"
    );
    // Switchover: the source stops, the destination replays what the source left.
    source.deactivate();
    assert!(matches!(source.demote(0), Err(TierError::Inactive)));
    source.close().unwrap(); // not the source's journal any more: nothing appended
    dest.activate().unwrap();
    assert_eq!(dest.cold_extents(), vec![1, 2]);
    assert_eq!(read(&dest, 0, data.len()), data);
    assert_eq!(dest.demote(3).unwrap(), Moved::Done);
    assert_eq!(dest.promote(1).unwrap(), Moved::Done);
    // And back (the VM migrates home): the source sees the destination's moves.
    dest.deactivate();
    source.activate().unwrap();
    assert_eq!(source.cold_extents(), vec![2, 3]);
    assert_eq!(read(&source, 0, data.len()), data);
    drop(source);
    drop(dest);
    assert_eq!(
        read(&disk.open(), 0, data.len()),
        data,
        "a fresh start agrees"
    );
}
