//! An independent front-end drives the daemon: libblkio's pure-Rust `virtio-blk-vhost-user`
//! driver (the `blkio` crate), which none of us wrote. Random 4 KiB writes with many requests
//! in flight, a flush, read-back verified through blkio and against the image file.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;

use crate::common::blk::pattern;
use crate::common::daemon::Daemon;
use blkio::{Blkio, Completion, ReqFlags};

const BLOCK: usize = 4096;
const WRITES: usize = 256;

/// Waits for `n` completions and checks each succeeded.
fn complete(q: &mut blkio::Blkioq, n: usize) {
    let mut done = 0;
    let mut completions: Vec<MaybeUninit<Completion>> =
        (0..n).map(|_| MaybeUninit::uninit()).collect();
    while done < n {
        let got = q
            .do_io(&mut completions[..n - done], n - done, None, None)
            .expect("do_io");
        for c in &completions[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            assert_eq!(c.ret, 0, "request {} failed: {}", c.user_data, c.ret);
        }
        done += got;
    }
}

/// A started libblkio instance on the daemon's `d.sock` with `queues` queues, and a mapped
/// region of `len` bytes (its address).
fn start_blkio(
    daemon: &Daemon,
    queues: i32,
    len: usize,
) -> (Blkio, blkio::BlkioStartOutcome, blkio::MemoryRegion) {
    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
    blkio
        .set_str("path", daemon.path("d.sock").to_str().unwrap())
        .unwrap();
    blkio.connect().expect("connect");
    blkio.set_i32("num-queues", queues).unwrap();
    let started = blkio.start().expect("start");
    let region = blkio.alloc_mem_region(len).expect("alloc");
    blkio.map_mem_region(&region).expect("map");
    (blkio, started, region)
}

/// Random 4 KiB writes of distinct blocks on queue 0 of the daemon's `d.sock`, a flush, and
/// a read-back through the last queue, checked; returns (offset, data) of every write.
pub fn random_writes_flush_read_back(
    daemon: &Daemon,
    queues: i32,
    capacity: u64,
) -> Vec<(u64, Vec<u8>)> {
    let (mut blkio, mut started, region) = start_blkio(daemon, queues, WRITES * BLOCK * 2);
    assert_eq!(blkio.get_u64("capacity").unwrap(), capacity);
    let base = region.addr as *mut u8;

    // Distinct random block numbers (deterministic shuffle).
    let blocks_total = capacity as usize / BLOCK;
    let mut blocks: Vec<usize> = (0..blocks_total).collect();
    let noise = pattern(99, blocks_total * 4);
    for i in (1..blocks_total).rev() {
        let r = u32::from_le_bytes(noise[i * 4..i * 4 + 4].try_into().unwrap()) as usize % (i + 1);
        blocks.swap(i, r);
    }
    let blocks = &blocks[..WRITES];

    let q = &mut started.queues[0];
    for (i, &block) in blocks.iter().enumerate() {
        let data = pattern(i as u64, BLOCK);
        // SAFETY: the region is WRITES*2 blocks long and mapped; slot i is in the first half.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), base.add(i * BLOCK), BLOCK) };
        // SAFETY: same buffer, which stays allocated and untouched until completion.
        q.write(
            (block * BLOCK) as u64,
            unsafe { base.add(i * BLOCK) },
            BLOCK,
            i,
            ReqFlags::empty(),
        );
    }
    complete(q, WRITES);
    q.flush(0, ReqFlags::empty());
    complete(q, 1);

    // Read back on the last queue into the second half of the region.
    let q = started.queues.last_mut().unwrap();
    for (i, &block) in blocks.iter().enumerate() {
        // SAFETY: slot WRITES+i is inside the region; nothing else touches it meanwhile.
        let buf = unsafe { base.add((WRITES + i) * BLOCK) };
        q.read((block * BLOCK) as u64, buf, BLOCK, i, ReqFlags::empty());
    }
    complete(q, WRITES);
    let mut written = Vec::new();
    for (i, &block) in blocks.iter().enumerate() {
        let want = pattern(i as u64, BLOCK);
        // SAFETY: the read into this slot completed; the region is still mapped.
        let got = unsafe { std::slice::from_raw_parts(base.add((WRITES + i) * BLOCK), BLOCK) };
        assert_eq!(
            got,
            &want[..],
            "block {block} read back wrong through blkio"
        );
        written.push(((block * BLOCK) as u64, want));
    }
    blkio.unmap_mem_region(&region);
    blkio.free_mem_region(&region);
    written
}

/// Reads `len` bytes at `offset` of the daemon's read-only `d.sock`, after checking that
/// libblkio refuses to start it writable (the device offers `VIRTIO_BLK_F_RO`).
pub fn read_from_read_only(daemon: &Daemon, offset: u64, len: usize) -> Vec<u8> {
    let socket = daemon.path("d.sock");
    let mut writable = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
    writable.set_str("path", socket.to_str().unwrap()).unwrap();
    writable.connect().expect("connect");
    let refused = writable.start().err().expect("started writable");
    assert_eq!(refused.errno().raw_os_error(), libc::EROFS, "{refused:?}");
    drop(writable);
    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
    blkio.set_str("path", socket.to_str().unwrap()).unwrap();
    blkio.set_bool("read-only", true).unwrap();
    blkio.connect().expect("connect");
    let mut started = blkio.start().expect("start");
    let region = blkio.alloc_mem_region(len).expect("alloc");
    blkio.map_mem_region(&region).expect("map");
    let base = region.addr as *mut u8;
    let q = &mut started.queues[0];
    q.read(offset, base, len, 0, ReqFlags::empty());
    complete(q, 1);
    // SAFETY: the read completed; the region is mapped and `len` long.
    let data = unsafe { std::slice::from_raw_parts(base, len) }.to_vec();
    blkio.unmap_mem_region(&region);
    blkio.free_mem_region(&region);
    data
}

fn run(engine: &str, queues: i32) {
    let spec =
        format!("socket={{dir}}/d.sock,path={{dir}}/d.img,size=64M,queues=2,engine={engine}");
    let daemon = Daemon::start(&["--blk", &spec]);
    let written = random_writes_flush_read_back(&daemon, queues, 64 << 20);
    let image = std::fs::File::open(daemon.path("d.img")).unwrap();
    for (offset, want) in written {
        let mut on_disk = vec![0u8; BLOCK];
        image.read_exact_at(&mut on_disk, offset).unwrap();
        assert_eq!(on_disk, want, "block at {offset} wrong in the image");
    }
}

#[test]
fn libblkio_random_writes_flush_read_back_uring() {
    run("uring", 2);
}

#[test]
fn libblkio_random_writes_flush_read_back_sync() {
    run("sync", 1);
}
