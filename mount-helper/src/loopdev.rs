//! A read-only loop device over an image, for filesystems whose files EROFS cannot mount
//! directly (tmpfs has no `read_folio`, so file-backed EROFS answers ENOTBLK). The device is
//! configured with autoclear: it goes away by itself when the mount using it does.

#![allow(unsafe_code)] // system calls rustix does not wrap; each block says why it is sound

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Opcode, Setter, ioctl};

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const LOOP_CONFIGURE: Opcode = 0x4C0A;
const LOOP_CTL_GET_FREE: Opcode = 0x4C82;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `LOOP_CTL_GET_FREE` takes no argument and returns a device number.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE passes no pointer; its return value is the free device's number.
unsafe impl rustix::ioctl::Ioctl for GetFree {
    type Output = u32;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }
    unsafe fn output_from_ptr(
        out: rustix::ioctl::IoctlOutput,
        _: *mut std::ffi::c_void,
    ) -> rustix::io::Result<u32> {
        Ok(out as u32)
    }
}

/// Attaches `image` to a free loop device (read-only, autoclear) and returns the open device.
pub fn attach(image: BorrowedFd<'_>) -> Result<(OwnedFd, String), Errno> {
    let ctl = rustix::fs::open(
        "/dev/loop-control",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for _ in 0..16 {
        // SAFETY: see `GetFree`.
        let n = unsafe { ioctl(ctl.as_fd(), GetFree) }?;
        let path = format!("/dev/loop{n}");
        let dev = rustix::fs::open(
            path.as_str(),
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let config = LoopConfig {
            fd: image.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags: LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR,
                file_name: [0; 64],
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `LoopConfig` mirrors.
        match unsafe {
            ioctl(
                dev.as_fd(),
                Setter::<LOOP_CONFIGURE, LoopConfig>::new(config),
            )
        } {
            Ok(()) => return Ok((dev, path)),
            // Another process took this device between GET_FREE and CONFIGURE: try another.
            Err(Errno::BUSY) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::BUSY)
}

#[cfg(test)]
mod tests {
    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(std::mem::size_of::<super::LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<super::LoopConfig>(), 304);
        assert_eq!(
            super::LOOP_CONFIGURE,
            rustix::ioctl::opcode::none(0x4C, 0x0A)
        );
    }
}
