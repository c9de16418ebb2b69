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

fn run(engine: &str, queues: i32) {
    let spec =
        format!("socket={{dir}}/d.sock,path={{dir}}/d.img,size=64M,queues=2,engine={engine}");
    let daemon = Daemon::start(&["--blk", &spec]);
    let mut blkio = Blkio::new("virtio-blk-vhost-user").expect("blkio driver");
    blkio
        .set_str("path", daemon.path("d.sock").to_str().unwrap())
        .unwrap();
    blkio.connect().expect("connect");
    assert_eq!(blkio.get_u64("capacity").unwrap(), 64 << 20);
    blkio.set_i32("num-queues", queues).unwrap();
    let mut started = blkio.start().expect("start");
    let region = blkio.alloc_mem_region(WRITES * BLOCK * 2).expect("alloc");
    blkio.map_mem_region(&region).expect("map");
    let base = region.addr as *mut u8;

    // Distinct random block numbers (deterministic shuffle).
    let blocks_total = (64 << 20) / BLOCK;
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
    let image = std::fs::File::open(daemon.path("d.img")).unwrap();
    for (i, &block) in blocks.iter().enumerate() {
        let want = pattern(i as u64, BLOCK);
        // SAFETY: the read into this slot completed; the region is still mapped.
        let got = unsafe { std::slice::from_raw_parts(base.add((WRITES + i) * BLOCK), BLOCK) };
        assert_eq!(
            got,
            &want[..],
            "block {block} read back wrong through blkio"
        );
        let mut on_disk = vec![0u8; BLOCK];
        image
            .read_exact_at(&mut on_disk, (block * BLOCK) as u64)
            .unwrap();
        assert_eq!(on_disk, want, "block {block} wrong in the image");
    }
    blkio.unmap_mem_region(&region);
    blkio.free_mem_region(&region);
}

#[test]
fn libblkio_random_writes_flush_read_back_uring() {
    run("uring", 2);
}

#[test]
fn libblkio_random_writes_flush_read_back_sync() {
    run("sync", 1);
}
