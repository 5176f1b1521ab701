//! The kernel's fs-verity ioctls: enable and measure.
//!
//! These are the only `unsafe` calls in the store: two fixed-layout ioctls that rustix has
//! no wrapper for.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::os::fd::BorrowedFd;

use rustix::io::Errno;
use rustix::ioctl::{Opcode, Updater, ioctl, opcode};

use crate::digest::Digest;
use crate::verity::BLOCK_SIZE;

/// `struct fsverity_enable_arg` from `<linux/fsverity.h>`.
#[repr(C)]
struct EnableArg {
    version: u32,
    hash_algorithm: u32,
    block_size: u32,
    salt_size: u32,
    salt_ptr: u64,
    sig_size: u32,
    reserved1: u32,
    sig_ptr: u64,
    reserved2: [u64; 11],
}

/// `struct fsverity_digest` followed by room for a sha256 digest.
#[repr(C)]
struct MeasureArg {
    digest_algorithm: u16,
    digest_size: u16,
    digest: [u8; 32],
}

const FS_IOC_ENABLE_VERITY: Opcode = opcode::write::<EnableArg>(b'f', 133);
const FS_IOC_MEASURE_VERITY: Opcode = opcode::read_write::<[u16; 2]>(b'f', 134);
const FS_VERITY_HASH_ALG_SHA256: u32 = 1;

/// Enables fs-verity (sha256, 4 KiB blocks) on a file opened read-only with no writer.
///
/// `EOPNOTSUPP`/`ENOTTY` mean the kernel or filesystem has no fs-verity; `EEXIST` means it is
/// already enabled.
pub fn enable(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let mut arg = EnableArg {
        version: 1,
        hash_algorithm: FS_VERITY_HASH_ALG_SHA256,
        block_size: BLOCK_SIZE as u32,
        salt_size: 0,
        salt_ptr: 0,
        sig_size: 0,
        reserved1: 0,
        sig_ptr: 0,
        reserved2: [0; 11],
    };
    // SAFETY: FS_IOC_ENABLE_VERITY reads one `struct fsverity_enable_arg`, which `EnableArg`
    // mirrors exactly; the salt and signature pointers are null with zero sizes.
    unsafe {
        let ctl = Updater::<FS_IOC_ENABLE_VERITY, EnableArg>::new(&mut arg);
        ioctl(fd, ctl)
    }
}

/// The kernel's fs-verity digest of a file, or `ENODATA` if verity is not enabled on it.
pub fn measure(fd: BorrowedFd<'_>) -> Result<Digest, Errno> {
    let mut arg = MeasureArg {
        digest_algorithm: 0,
        digest_size: 32,
        digest: [0; 32],
    };
    // SAFETY: FS_IOC_MEASURE_VERITY reads `digest_size` and writes the algorithm, the size and
    // at most `digest_size` (32) digest bytes, all inside `MeasureArg`. Its opcode encodes only
    // the 4-byte header, as the kernel's does.
    unsafe {
        let ctl = Updater::<FS_IOC_MEASURE_VERITY, MeasureArg>::new(&mut arg);
        ioctl(fd, ctl)?;
    }
    if u32::from(arg.digest_algorithm) != FS_VERITY_HASH_ALG_SHA256 || arg.digest_size != 32 {
        return Err(Errno::PROTO);
    }
    Ok(Digest::from_bytes(arg.digest))
}
