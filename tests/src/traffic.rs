//! Client traffic: many short TCP connections and UDP exchanges, each from a
//! fresh socket (so a fresh source port), tallied by the backend that answered.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);

/// Who answered how often, and how many attempts got no answer.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    pub by_backend: BTreeMap<String, usize>,
    pub failures: usize,
}

impl Tally {
    pub fn attempts(&self) -> usize {
        self.failures + self.by_backend.values().sum::<usize>()
    }

    fn record(&mut self, answer: Option<String>) {
        match answer {
            Some(name) => *self.by_backend.entry(name).or_default() += 1,
            None => self.failures += 1,
        }
    }

    /// Backends whose share of answers is off its weight share by more than
    /// `tolerance` (relative), as `(name, share, expected)`.
    pub fn off_weight(&self, weights: &[(&str, u32)], tolerance: f64) -> Vec<(String, f64, f64)> {
        let answered: usize = self.by_backend.values().sum();
        let total: u32 = weights.iter().map(|w| w.1).sum();
        weights
            .iter()
            .filter_map(|&(name, w)| {
                let share =
                    *self.by_backend.get(name).unwrap_or(&0) as f64 / answered.max(1) as f64;
                let expected = w as f64 / total as f64;
                ((share - expected).abs() > tolerance * expected)
                    .then(|| (name.to_string(), share, expected))
            })
            .collect()
    }
}

/// `n` TCP connections to `to`, one after another; each reads the server's
/// answer until it closes. Must run inside the client's namespace.
pub fn tcp_connections(to: SocketAddr, n: usize) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..n {
        let answer = TcpStream::connect_timeout(&to, TIMEOUT)
            .ok()
            .and_then(|mut s| {
                s.set_read_timeout(Some(TIMEOUT)).ok()?;
                let mut name = String::new();
                s.read_to_string(&mut name).ok()?;
                (!name.is_empty()).then_some(name)
            });
        tally.record(answer);
    }
    tally
}

/// `n` UDP request/answer exchanges with `to`, each from a new socket. Must
/// run inside the client's namespace.
pub fn udp_exchanges(to: SocketAddr, n: usize) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..n {
        let answer = (|| {
            let s = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).ok()?;
            s.set_read_timeout(Some(TIMEOUT)).ok()?;
            s.send_to(b"who?", to).ok()?;
            let mut buf = [0u8; 256];
            let (len, from) = s.recv_from(&mut buf).ok()?;
            // Direct server return: the answer comes from the VIP itself.
            (from == to).then(|| String::from_utf8_lossy(&buf[..len]).into_owned())
        })();
        tally.record(answer);
    }
    tally
}
