//! Links the `velo` binary as a position-dependent executable (no PIE) when it links glibc
//! dynamically.
//!
//! `velo run` is on the critical path of every command it wraps, and a good part of a Rust
//! binary's start-up on a VM is the dynamic loader applying ~24,000 relative relocations (and
//! copying the pages they touch). A non-PIE executable has them resolved at link time: it
//! starts ~0.2 ms sooner here. A static build (`+crt-static`, as `deploy/build-image` makes)
//! stays static-pie: `-no-pie` there would ask for a dynamic loader the container lacks.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    if !features.split(',').any(|f| f == "crt-static") {
        println!("cargo:rustc-link-arg-bins=-no-pie");
    }
}
