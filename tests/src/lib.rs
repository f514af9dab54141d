//! Support for the kernel-tier tests and the demo: root gating, network
//! namespaces, the L2 direct-server-return topology, backend servers, client
//! traffic, a BPF_PROG_TEST_RUN harness for the XDP programs, and packet
//! tests as fixtures.

pub mod addresses;
pub mod bench;
pub mod config_yaml;
pub mod decap;
pub mod fixture;
pub mod http;
pub mod netns;
pub mod packet;
pub mod root;
pub mod routing;
pub mod topology;
pub mod traffic;
pub mod xdp;
