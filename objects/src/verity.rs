//! Userspace fs-verity digests (sha256, 4 KiB blocks, no salt), computed while data streams by.
//!
//! This is the digest `FS_IOC_MEASURE_VERITY` reports and overlayfs checks. It lives here,
//! not in the `composefs` crate, for two reasons: the object store (and through it the mount
//! helper) must not pull in composefs's tokio/OpenSSL dependencies, and ingest needs a hasher
//! that takes data in any chunking without a copy or allocation per block and hashes holes of
//! sparse files without reading zeros. Tests check it against composefs's implementation and
//! the `fsverity` tool.

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;

/// The fs-verity Merkle tree block size velo uses (and `mkfs.ext4 -b 4096` stores need).
pub const BLOCK_SIZE: usize = 4096;
const HASH_SIZE: usize = 32;
const HASHES_PER_BLOCK: usize = BLOCK_SIZE / HASH_SIZE;

/// One level of the Merkle tree: hashes of the level below, packed into 4 KiB blocks.
#[derive(Clone)]
struct Level {
    block: Sha256,
    in_block: usize,
    total: u64,
    last: [u8; HASH_SIZE],
}

impl Level {
    fn new() -> Self {
        Self {
            block: Sha256::new(),
            in_block: 0,
            total: 0,
            last: [0; HASH_SIZE],
        }
    }
}

/// Incremental fs-verity sha256 hasher. Feed bytes with [`update`](Self::update) in any
/// chunking, holes with [`update_zeros`](Self::update_zeros), then call
/// [`finalize`](Self::finalize).
#[derive(Clone)]
pub struct VerityHasher {
    partial: Box<[u8; BLOCK_SIZE]>,
    partial_len: usize,
    data_size: u64,
    levels: Vec<Level>,
}

impl Default for VerityHasher {
    fn default() -> Self {
        Self::new()
    }
}

fn zero_block_hash() -> [u8; HASH_SIZE] {
    static ZERO: std::sync::OnceLock<[u8; HASH_SIZE]> = std::sync::OnceLock::new();
    *ZERO.get_or_init(|| Sha256::digest([0u8; BLOCK_SIZE]).into())
}

impl VerityHasher {
    /// A hasher for an empty file.
    pub fn new() -> Self {
        Self {
            partial: Box::new([0; BLOCK_SIZE]),
            partial_len: 0,
            data_size: 0,
            levels: Vec::new(),
        }
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.data_size
    }

    /// True before any byte was fed.
    pub fn is_empty(&self) -> bool {
        self.data_size == 0
    }

    /// The fs-verity digest of a whole buffer.
    pub fn digest(data: &[u8]) -> Digest {
        let mut h = Self::new();
        h.update(data);
        h.finalize()
    }

    /// Feeds file bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.data_size += data.len() as u64;
        if self.partial_len > 0 {
            let take = (BLOCK_SIZE - self.partial_len).min(data.len());
            self.partial[self.partial_len..self.partial_len + take].copy_from_slice(&data[..take]);
            self.partial_len += take;
            data = &data[take..];
            if self.partial_len < BLOCK_SIZE {
                return;
            }
            let hash: [u8; HASH_SIZE] = Sha256::digest(&self.partial[..]).into();
            self.partial_len = 0;
            self.push_hash(0, hash);
        }
        let mut blocks = data.chunks_exact(BLOCK_SIZE);
        for block in &mut blocks {
            let hash: [u8; HASH_SIZE] = Sha256::digest(block).into();
            self.push_hash(0, hash);
        }
        let rest = blocks.remainder();
        self.partial[..rest.len()].copy_from_slice(rest);
        self.partial_len = rest.len();
    }

    /// Feeds `len` zero bytes (a hole in a sparse file) without hashing them one by one
    /// where they cover whole blocks.
    pub fn update_zeros(&mut self, mut len: u64) {
        const ZEROS: [u8; BLOCK_SIZE] = [0; BLOCK_SIZE];
        if self.partial_len > 0 {
            let take = ((BLOCK_SIZE - self.partial_len) as u64).min(len) as usize;
            self.update(&ZEROS[..take]);
            len -= take as u64;
        }
        let whole = len / BLOCK_SIZE as u64;
        if whole > 0 {
            let hash = zero_block_hash();
            for _ in 0..whole {
                self.push_hash(0, hash);
            }
            self.data_size += whole * BLOCK_SIZE as u64;
        }
        let rest = (len % BLOCK_SIZE as u64) as usize;
        self.update(&ZEROS[..rest]);
    }

    fn push_hash(&mut self, mut level: usize, mut hash: [u8; HASH_SIZE]) {
        loop {
            if self.levels.len() <= level {
                self.levels.push(Level::new());
            }
            let l = &mut self.levels[level];
            l.block.update(hash);
            l.in_block += 1;
            l.total += 1;
            l.last = hash;
            if l.in_block < HASHES_PER_BLOCK {
                return;
            }
            hash = l.block.finalize_reset().into();
            l.in_block = 0;
            level += 1;
        }
    }

    /// The fs-verity digest of everything fed.
    pub fn finalize(mut self) -> Digest {
        if self.partial_len > 0 {
            self.partial[self.partial_len..].fill(0);
            let hash: [u8; HASH_SIZE] = Sha256::digest(&self.partial[..]).into();
            self.partial_len = 0;
            self.push_hash(0, hash);
        }
        let mut root = [0u8; HASH_SIZE];
        let mut level = 0;
        while level < self.levels.len() {
            let top = level + 1 == self.levels.len();
            let l = &mut self.levels[level];
            if top && l.total == 1 {
                root = l.last;
                break;
            }
            if l.in_block > 0 {
                for _ in l.in_block..HASHES_PER_BLOCK {
                    l.block.update([0u8; HASH_SIZE]);
                }
                let hash: [u8; HASH_SIZE] = l.block.finalize_reset().into();
                l.in_block = 0;
                self.push_hash(level + 1, hash);
            }
            level += 1;
        }
        // struct fsverity_descriptor, as the kernel hashes it.
        let mut desc = Sha256::new();
        desc.update([1u8, 1, 12, 0]); // version, hash algorithm (sha256), log2(block size), salt size
        desc.update([0u8; 4]); // sig_size (reserved)
        desc.update(self.data_size.to_le_bytes());
        desc.update(root);
        desc.update([0u8; 64 - HASH_SIZE]); // root_hash is a 64-byte field
        desc.update([0u8; 32]); // salt
        desc.update([0u8; 144]); // reserved
        Digest::from_bytes(desc.finalize().into())
    }
}

impl std::io::Write for VerityHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use composefs::fsverity::{FsVerityHashValue, FsVerityHasher, Sha256HashValue};

    fn reference(data: &[u8]) -> String {
        FsVerityHasher::<Sha256HashValue, 12>::hash(data).to_hex()
    }

    fn pattern(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn known_value() {
        // The value composefs's own test asserts for b"hello world".
        assert_eq!(
            VerityHasher::digest(b"hello world").to_hex(),
            "1e2eaa4202d750a41174ee454970b92c1bc2f925b1e35076d8c7d5f56362ba64"
        );
    }

    #[test]
    fn matches_composefs_at_tree_shape_boundaries() {
        // Sizes around 1 block, 128 blocks (one full level-1 block), 128*128 blocks.
        let sizes = [
            0,
            1,
            4095,
            4096,
            4097,
            8192,
            127 * 4096,
            128 * 4096 - 1,
            128 * 4096,
            128 * 4096 + 1,
            129 * 4096,
            128 * 128 * 4096,
            128 * 128 * 4096 + 4096,
        ];
        for (i, &len) in sizes.iter().enumerate() {
            let data = pattern(len, i as u32);
            let ours = VerityHasher::digest(&data).to_hex();
            assert_eq!(ours, reference(&data), "size {len}");
        }
    }

    #[test]
    fn chunking_does_not_matter() {
        let data = pattern(300_000, 7);
        let whole = VerityHasher::digest(&data);
        for chunk in [1, 7, 4095, 4096, 4097, 65536] {
            let mut h = VerityHasher::new();
            for piece in data.chunks(chunk) {
                h.update(piece);
            }
            assert_eq!(h.finalize(), whole, "chunk {chunk}");
        }
    }

    #[test]
    fn zeros_equal_explicit_zero_bytes() {
        for (head, hole, tail) in [(0, 4096 * 200, 10), (100, 5000, 0), (4096, 4096 * 129, 3)] {
            let mut data = pattern(head, 1);
            data.extend(std::iter::repeat_n(0u8, hole));
            data.extend(pattern(tail, 2));
            let mut h = VerityHasher::new();
            h.update(&data[..head]);
            h.update_zeros(hole as u64);
            h.update(&data[head + hole..]);
            assert_eq!(h.finalize().to_hex(), reference(&data));
        }
    }
}
