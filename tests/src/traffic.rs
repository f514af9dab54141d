//! Client traffic: many short TCP connections and UDP exchanges, each from a
//! fresh socket (so a fresh source port), tallied by the backend that answered.
//! Every helper takes the VIP as a `SocketAddr` of either family.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::netns::Netns;

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

/// Connects to `to` and reads the server's name line; `None` on any failure.
fn connect_and_name(to: SocketAddr, timeout: Duration) -> Option<(String, TcpStream)> {
    let s = TcpStream::connect_timeout(&to, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let mut name = String::new();
    BufReader::new(s.try_clone().ok()?)
        .read_line(&mut name)
        .ok()?;
    let name = name.trim_end().to_string();
    (!name.is_empty()).then_some((name, s))
}

/// `n` TCP connections to `to`, one after another; each reads the server's
/// name and closes. Must run inside the client's namespace.
pub fn tcp_connections(to: SocketAddr, n: usize) -> Tally {
    let mut tally = Tally::default();
    for _ in 0..n {
        tally.record(connect_and_name(to, TIMEOUT).map(|(name, _)| name));
    }
    tally
}

/// One attempt of a [`NewConnections`] stream.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: Instant,
    /// The backend that answered, or `None` if the attempt failed.
    pub backend: Option<String>,
}

/// A steady stream of new TCP connections from the client's namespace, each
/// reading the backend's name and closing, until [`finish`](Self::finish).
pub struct NewConnections {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<Attempt>>>,
}

impl NewConnections {
    /// `every`: the pause between attempts (10ms gives about 100/s).
    pub fn start(
        client: &Netns,
        to: SocketAddr,
        every: Duration,
    ) -> anyhow::Result<NewConnections> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = client.spawn(move || {
            let mut attempts = Vec::new();
            // Bounded: at most 10 minutes of attempts even if never stopped.
            let deadline = Instant::now() + Duration::from_secs(600);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let at = Instant::now();
                let backend = connect_and_name(to, Duration::from_secs(1)).map(|(name, _)| name);
                attempts.push(Attempt { at, backend });
                std::thread::sleep(every.saturating_sub(at.elapsed()));
            }
            attempts
        })?;
        Ok(NewConnections { stop, thread })
    }

    pub fn finish(self) -> anyhow::Result<Vec<Attempt>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("stream thread panicked"))?
    }
}

/// What happened to one long-lived connection.
#[derive(Debug, Clone)]
pub struct Conn {
    pub backend: String,
    /// Why and when it broke, if it did.
    pub broken: Option<(Instant, String)>,
}

/// Long-lived TCP connections, each exchanging a byte with its backend every
/// 100 ms (or the pause given to [`open_paced`](Self::open_paced)) until
/// [`finish`](Self::finish); any error, wrong echo or 2 s without an answer
/// counts as broken.
pub struct LongLived {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Conn>>,
}

impl LongLived {
    pub fn open(client: &Netns, to: SocketAddr, n: usize) -> anyhow::Result<LongLived> {
        Self::open_patient(client, to, n, TIMEOUT)
    }

    /// [`open`](Self::open), but a connection counts as broken only after
    /// `patience` without an answer (TCP retransmits through an outage
    /// that a router takes its hold time to notice).
    pub fn open_patient(
        client: &Netns,
        to: SocketAddr,
        n: usize,
        patience: Duration,
    ) -> anyhow::Result<LongLived> {
        Self::open_paced(client, to, n, patience, Duration::from_millis(100))
    }

    /// [`open_patient`](Self::open_patient), with `every` between one
    /// exchange and the next: a long pause makes the connections idle, as
    /// interactive ones do, so their flow entries must survive long gaps.
    pub fn open_paced(
        client: &Netns,
        to: SocketAddr,
        n: usize,
        patience: Duration,
        every: Duration,
    ) -> anyhow::Result<LongLived> {
        let streams = client.enter(move || {
            (0..n)
                .map(|i| {
                    let (name, s) = connect_and_name(to, TIMEOUT)
                        .with_context(|| format!("opening long-lived connection {i}"))?;
                    s.set_read_timeout(Some(patience))?;
                    Ok((name, s))
                })
                .collect::<anyhow::Result<Vec<_>>>()
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = streams
            .into_iter()
            .map(|(backend, mut s)| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut byte = [0u8; 1];
                    let mut n: u8 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        n = n.wrapping_add(1);
                        let result = s
                            .write_all(&[n])
                            .and_then(|()| s.read_exact(&mut byte))
                            .and_then(|()| {
                                if byte[0] == n {
                                    Ok(())
                                } else {
                                    Err(std::io::Error::other("wrong echo"))
                                }
                            });
                        if let Err(e) = result {
                            return Conn {
                                backend,
                                broken: Some((Instant::now(), e.to_string())),
                            };
                        }
                        std::thread::sleep(every);
                    }
                    Conn {
                        backend,
                        broken: None,
                    }
                })
            })
            .collect();
        Ok(LongLived { stop, threads })
    }

    /// Stops exchanging and reports every connection.
    pub fn finish(self) -> Vec<Conn> {
        self.stop.store(true, Ordering::Relaxed);
        // A thread that panicked counts as a broken connection.
        self.threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| Conn {
                    backend: "?".into(),
                    broken: Some((Instant::now(), "exchange thread panicked".into())),
                })
            })
            .collect()
    }
}

/// `n` UDP request/answer exchanges with `to` (either family), each from a
/// new socket. Must run inside the client's namespace.
pub fn udp_exchanges(to: SocketAddr, n: usize) -> Tally {
    // Any local address of `to`'s family: an IPv4 socket cannot reach an
    // IPv6 VIP, and the kernel picks the source address.
    let any: IpAddr = match to {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let mut tally = Tally::default();
    for _ in 0..n {
        let answer = (|| {
            let s = UdpSocket::bind(SocketAddr::new(any, 0)).ok()?;
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
