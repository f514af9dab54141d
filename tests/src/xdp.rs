//! XDP verdicts as the tests name them.

/// `enum xdp_action` of include/uapi/linux/bpf.h, the value a program returns
/// and BPF_PROG_TEST_RUN reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum XdpAction {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl XdpAction {
    /// The verdict a test run returned; `None` for a value outside the enum.
    pub fn from_raw(value: u32) -> Option<Self> {
        [
            Self::Aborted,
            Self::Drop,
            Self::Pass,
            Self::Tx,
            Self::Redirect,
        ]
        .into_iter()
        .find(|a| *a as u32 == value)
    }
}
