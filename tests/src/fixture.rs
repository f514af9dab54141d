//! Packet tests as fixtures: each case is a name, an input frame, the
//! verdict, the output and the counters the frame must move. [`check`] runs
//! the cases one after another and, after each, asserts the verdict, the
//! output byte for byte and every counter the program keeps: the listed ones
//! moved by exactly one, every other one did not move. Two swapped reasons,
//! a packet counted twice or a packet counted under the wrong VIP fail the
//! case that did it, by name.

use std::{collections::BTreeMap, net::IpAddr};

mod decap;
mod lb;

use lb_common::Stat;

use crate::{
    packet::{LB_MAC, Outcome, backend_mac},
    xdp::XdpAction,
};

/// The frame a case must leave behind.
#[derive(Clone, Debug)]
pub enum Expect {
    /// The input, byte for byte (passed or dropped).
    Unchanged,
    /// Forwarded at layer 2 to this backend: the input with the backend's MAC
    /// as destination and the load balancer's as source, nothing else
    /// changed.
    Backend(IpAddr),
    /// Forwarded to this backend as exactly these bytes (encapsulated).
    Encapsulated(IpAddr, Vec<u8>),
    /// Exactly these bytes, to no backend (an answer to the sender, a
    /// decapsulated packet).
    Bytes(Vec<u8>),
}

impl Expect {
    /// The backend the frame goes to, if it goes to one.
    pub fn backend(&self) -> Option<IpAddr> {
        match self {
            Expect::Backend(b) | Expect::Encapsulated(b, _) => Some(*b),
            Expect::Unchanged | Expect::Bytes(_) => None,
        }
    }

    /// The exact frame expected from `input`.
    fn frame(&self, input: &[u8]) -> Vec<u8> {
        match self {
            Expect::Unchanged => input.to_vec(),
            Expect::Backend(b) => {
                let mut p = input.to_vec();
                p[..6].copy_from_slice(&backend_mac(*b));
                p[6..12].copy_from_slice(&LB_MAC);
                p
            }
            Expect::Encapsulated(_, bytes) | Expect::Bytes(bytes) => bytes.clone(),
        }
    }
}

/// One frame and everything it must do. `C` names the program's counters
/// (the load balancer's [`Stat`], the decap program's `DecapStat`).
#[derive(Clone, Debug)]
pub struct Case<C = Stat> {
    pub name: String,
    pub input: Vec<u8>,
    pub verdict: XdpAction,
    pub output: Expect,
    /// The counters the frame moves, each by one. For the load balancer the
    /// action counter is not listed: it follows from the verdict.
    pub counters: Vec<C>,
}

impl<C: Copy> Case<C> {
    /// Passed to the kernel untouched.
    pub fn passed(name: impl Into<String>, input: Vec<u8>, counters: &[C]) -> Self {
        Self::new(name, input, XdpAction::Pass, Expect::Unchanged, counters)
    }

    /// Dropped untouched.
    pub fn dropped(name: impl Into<String>, input: Vec<u8>, counters: &[C]) -> Self {
        Self::new(name, input, XdpAction::Drop, Expect::Unchanged, counters)
    }

    /// Sent back out with XDP_TX to `backend` at layer 2.
    pub fn to_backend(
        name: impl Into<String>,
        input: Vec<u8>,
        backend: IpAddr,
        counters: &[C],
    ) -> Self {
        Self::new(
            name,
            input,
            XdpAction::Tx,
            Expect::Backend(backend),
            counters,
        )
    }

    pub fn new(
        name: impl Into<String>,
        input: Vec<u8>,
        verdict: XdpAction,
        output: Expect,
        counters: &[C],
    ) -> Self {
        Case {
            name: name.into(),
            input,
            verdict,
            output,
            counters: counters.to_vec(),
        }
    }
}

/// A program under test: runs frames and names every counter it keeps.
pub trait Subject {
    type Counter: Copy;

    fn run(&mut self, frame: &[u8]) -> anyhow::Result<Outcome>;

    /// Every counter the program keeps, by a name that says where it is.
    fn counters(&self) -> BTreeMap<String, u64>;

    /// How much `case` must move each counter, by the names of
    /// [`Subject::counters`]; a counter not named must stay.
    fn moves(&self, case: &Case<Self::Counter>) -> BTreeMap<String, u64>;
}

/// Runs `cases` in order through `subject` and asserts, after each, its
/// verdict, its output and that exactly its counters moved.
pub fn check<S: Subject>(subject: &mut S, cases: &[Case<S::Counter>]) {
    let mut before = subject.counters();
    for case in cases {
        let name = &case.name;
        let out = subject
            .run(&case.input)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(out.action, case.verdict, "{name}: verdict");
        assert_eq!(
            out.packet,
            case.output.frame(&case.input),
            "{name}: output ({:?})",
            case.output
        );
        let after = subject.counters();
        let mut expected = before.clone();
        for (counter, by) in subject.moves(case) {
            let value = expected
                .get_mut(&counter)
                .unwrap_or_else(|| panic!("{name}: moves {counter}, which the program lacks"));
            *value += by;
        }
        let wrong: Vec<String> = expected
            .iter()
            .filter(|&(k, v)| after.get(k) != Some(v))
            .map(|(k, v)| format!("{k}: expected {v}, got {:?}", after.get(k)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{name}: counters\n  {}",
            wrong.join("\n  ")
        );
        before = after;
    }
}
