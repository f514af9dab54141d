//! Kernel-side programs of the load balancer. The programs are the binaries
//! (`src/main.rs`, `src/bin/baseline.rs`); this library only exists so that
//! lb-userspace can name this crate as a build dependency and be rebuilt when
//! it changes.
#![no_std]
