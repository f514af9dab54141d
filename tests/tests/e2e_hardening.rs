//! End-to-end tier for the control plane under stress and attack, one test
//! per attack that once worked: a flood of idle and slow admin connections
//! under a 1024-descriptor limit, a pin directory created in advance by
//! another user, a pinned map of another capacity, and a second `lb run` on
//! an interface that is already attached. Needs root.
//!
//! The tests run one at a time: the flood measures timing and memory.

use std::{
    ffi::CString,
    io::Write as _,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_common::{MAX_VIPS, Traffic, map_names};
use lb_tests::{
    addresses::{HEALTH_PORT, TCP_PORT, VIP, backend_address},
    http,
    netns::Netns,
    root::root_or_skip,
    topology::{L2Topology, LbProcess, lb_binary},
    traffic::tcp_connections,
};
use lb_userspace::status::Status;

static SERIAL: Mutex<()> = Mutex::new(());

const ADMIN: &str = "10.77.0.3:9742";
const WEB: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(VIP), TCP_PORT);

/// One TCP VIP over `weights.len()` backends probed on the health port, with
/// `on_all_down: drop` (so a backend wrongly marked down costs traffic) and
/// the admin listener where the client namespace reaches it.
fn config(weights: &[u32]) -> String {
    let backends: String = weights
        .iter()
        .enumerate()
        .map(|(i, w)| {
            format!(
                "      - {{ address: {}, weight: {w} }}\n",
                backend_address(i)
            )
        })
        .collect();
    format!(
        "interface: eth0\nadmin: {{ listen: \"{ADMIN}\" }}\nvips:\n\
         \x20 - name: web\n    address: {VIP}\n    port: {TCP_PORT}\n    protocol: tcp\n    forwarding: l2\n\
         \x20   health_check: {{ port: {HEALTH_PORT}, interval: 300ms, timeout: 200ms, rise: 2, fall: 2 }}\n\
         \x20   on_all_down: drop\n    backends:\n{backends}"
    )
}

/// GET `http://{ADMIN}{path}` from inside `ns` within `timeout`: (status, body).
fn get(ns: &Netns, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    http::get_in(ns.name(), &format!("http://{ADMIN}{path}"), timeout)
}

/// The pin directory [`LbProcess`] gives the `lb` of `topology` (known
/// before it starts, so a test can prepare it).
fn pin_path_of(topology: &L2Topology) -> PathBuf {
    Path::new("/sys/fs/bpf").join(topology.lb.name())
}

/// Removes a directory a test prepared (with any pins in it) on drop, also
/// when the test fails.
struct Prepared(PathBuf);

impl Drop for Prepared {
    fn drop(&mut self) {
        let _ = lb_userspace::loader::remove_pins(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates `dir` on the host's bpffs (mounting it if needed), owned by root.
fn prepare_on_bpffs(dir: &Path) -> anyhow::Result<Prepared> {
    lb_userspace::pins::ensure_bpffs(dir)?;
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(Prepared(dir.to_owned()))
}

/// Waits (at most 30 s) for lb to exit; it must fail. Returns its log.
fn expect_refusal(lb: &mut LbProcess) -> String {
    let (status, log) = lb.wait_exit().unwrap();
    assert!(!status.success(), "lb must refuse to start:\n{log}");
    log
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Sets process `pid`'s open-file limit, soft and hard, like `ulimit -n`.
fn limit_open_files(pid: u32, n: u64) -> anyhow::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: n,
        rlim_max: n,
    };
    // SAFETY: prlimit reads the struct we own and writes nothing (old = null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    if rc != 0 {
        bail!("prlimit {pid}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the flood holds open: idle connections and connections that sent
/// part of an endless request head.
struct Flood {
    idle: Vec<TcpStream>,
    slow: Vec<TcpStream>,
}

/// Opens `idle` idle connections and `slow` connections that each send
/// `head_bytes` of a request head that never ends, to the admin listener
/// from inside `client`, from several threads. Connections the listener's
/// backlog cannot take fail to connect (quickly: their SYN goes unanswered)
/// and are left out.
fn flood(client: &Netns, idle: usize, slow: usize, head_bytes: usize) -> anyhow::Result<Flood> {
    const THREADS: usize = 32;
    let addr: SocketAddr = ADMIN.parse()?;
    client.enter(move || {
        let open = |n: usize, send: usize| -> Vec<TcpStream> {
            std::thread::scope(|scope| {
                let workers: Vec<_> = (0..THREADS)
                    .map(|t| {
                        let share = n / THREADS + usize::from(t < n % THREADS);
                        scope.spawn(move || {
                            (0..share)
                                .filter_map(|_| {
                                    let s = TcpStream::connect_timeout(
                                        &addr,
                                        Duration::from_millis(150),
                                    )
                                    .ok()?;
                                    if send > 0 {
                                        send_head(&s, send);
                                    }
                                    Some(s)
                                })
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| w.join().unwrap_or_default())
                    .collect()
            })
        };
        Flood {
            idle: open(idle, 0),
            slow: open(slow, head_bytes),
        }
    })
}

/// Writes up to `bytes` of a request head without its end, as far as the
/// socket takes it without blocking.
fn send_head(mut s: &TcpStream, bytes: usize) {
    let _ = s.set_nonblocking(true);
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: lb\r\nX-Pad: ".to_vec();
    head.resize(bytes, b'a');
    let mut sent = 0;
    while sent < head.len() {
        match s.write(&head[sent..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => sent += n,
        }
    }
}

/// Finding: 1100 idle admin connections under `ulimit -n 1024` made every
/// probe fail with EMFILE (all backends down, traffic dropped, a reload
/// rejected), and 300 connections sending 380 KB of unfinished headers each
/// grew RSS by 114 MB.
#[test]
fn an_admin_connection_flood_under_a_1024_descriptor_limit_harms_nothing() {
    if !root_or_skip("an_admin_connection_flood_under_a_1024_descriptor_limit_harms_nothing") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // This process holds the flood's client ends.
    lb_userspace::fd_limit::raise().unwrap();
    let topology = L2Topology::new(&["b1", "b2"]).unwrap();
    let lb = topology.start_lb(&config(&[1, 1])).unwrap();
    let pid = lb.pid().unwrap();
    // After start: lb raises its soft limit to the hard one at start, so
    // both are lowered, like a service started with a hard limit of 1024.
    limit_open_files(pid, 1024).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&topology.client, "/ready", Duration::from_secs(1))
        .ok()
        .map(|r| r.0)
        != Some(200)
    {
        assert!(Instant::now() < deadline, "not ready:\n{}", lb.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, _) = get(&topology.client, "/metrics", Duration::from_secs(5)).unwrap();
    assert_eq!(code, 200);
    let rss_before = rss_kib(pid);

    let attack = flood(&topology.client, 1100, 300, 380 * 1024).unwrap();
    println!(
        "flood: {} idle and {} slow connections open",
        attack.idle.len(),
        attack.slow.len()
    );
    // lb serves 64 at once and the kernel queues a backlog; the rest of the
    // flood cannot even connect, which costs lb nothing.
    assert!(
        attack.idle.len() > 64,
        "the flood saturates the listener: {} idle connections",
        attack.idle.len()
    );
    // Held longer than the probes' fall (2 x 300 ms) and than the listener's
    // header timeout (5 s), so accepted connections also turn over.
    let held = Instant::now();
    let mut rss_peak = rss_before;
    let tally = topology.client.enter(|| tcp_connections(WEB, 50)).unwrap();
    assert_eq!(tally.failures, 0, "forwarding during the flood: {tally:?}");
    let reloads = lb.log().matches("config reloaded").count();
    lb.write_config(&config(&[1, 2])).unwrap();
    lb.sighup().unwrap();
    while held.elapsed() < Duration::from_secs(7) {
        rss_peak = rss_peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = lb.log();
    assert!(
        log.matches("config reloaded").count() > reloads,
        "the reload during the flood was applied:\n{log}"
    );
    let tally = topology.client.enter(|| tcp_connections(WEB, 50)).unwrap();
    assert_eq!(tally.failures, 0, "forwarding late in the flood: {tally:?}");
    drop(attack);

    let ended = Instant::now();
    while get(&topology.client, "/status", Duration::from_secs(1))
        .ok()
        .map(|r| r.0)
        != Some(200)
    {
        assert!(
            ended.elapsed() < Duration::from_secs(5),
            "the admin listener answers again within 5 s of the flood's end:\n{}",
            lb.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "admin answered {:?} after the flood; RSS {rss_before} KiB before, {rss_peak} KiB at most",
        ended.elapsed()
    );
    let (_, body) = get(&topology.client, "/status", Duration::from_secs(5)).unwrap();
    let status: Status = serde_json::from_str(&body).unwrap();
    let backends = &status.vips[0].backends;
    assert!(
        backends.iter().all(|b| b.up),
        "no backend marked down: {backends:?}"
    );
    let log = lb.log();
    for never in [
        "backend is down",
        "no longer attached",
        "reload rejected",
        "Too many open files",
    ] {
        assert!(!log.contains(never), "lb logged `{never}`:\n{log}");
    }
    assert!(
        rss_peak < rss_before + 30 * 1024,
        "RSS grew from {rss_before} KiB to {rss_peak} KiB"
    );
}

/// Finding: a user who pre-created lb's pin directory (bpffs is 1777) could
/// later delete the `link` pin, detaching the program, or move the directory.
#[test]
fn a_pin_directory_another_user_created_is_refused() {
    if !root_or_skip("a_pin_directory_another_user_created_is_refused") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topology = L2Topology::new(&["b1"]).unwrap();
    let pin = pin_path_of(&topology);
    let _prepared = prepare_on_bpffs(&pin).unwrap();
    std::os::unix::fs::chown(&pin, Some(65534), Some(65534)).unwrap();

    let mut lb = topology.start_lb_unwaited(&config(&[1])).unwrap();
    let log = expect_refusal(&mut lb);
    assert!(
        log.contains(&pin.display().to_string()) && log.contains("uid 65534"),
        "the refusal names the directory and its owner:\n{log}"
    );
    assert_eq!(
        std::fs::read_dir(&pin).unwrap().count(),
        0,
        "nothing pinned in it"
    );
}

/// Creates a per-CPU array map and pins it at `path` (raw bpf(2): the test
/// wants exact control of its shape).
fn pin_per_cpu_array(path: &Path, value_size: u32, entries: u32) -> anyhow::Result<()> {
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    // union bpf_attr, zeroed beyond the fields used.
    let mut attr = [0u8; 128];
    for (i, v) in [BPF_MAP_TYPE_PERCPU_ARRAY, 4, value_size, entries, 0]
        .into_iter()
        .enumerate()
    {
        attr[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: `attr` is a valid, large enough bpf_attr for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), attr.len()) };
    if fd < 0 {
        bail!("BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    }
    let c = CString::new(path.as_os_str().as_encoded_bytes())?;
    let mut attr = [0u8; 128];
    attr[..8].copy_from_slice(&(c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: as above; `c` outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, attr.as_ptr(), attr.len()) };
    let pin_error = std::io::Error::last_os_error();
    // SAFETY: closing the descriptor BPF_MAP_CREATE gave us; the pin keeps
    // the map.
    unsafe { libc::close(fd as i32) };
    if rc != 0 {
        bail!("BPF_OBJ_PIN {}: {pin_error}", path.display());
    }
    Ok(())
}

/// Finding: a pinned `VIP_STATS` of another capacity was adopted; `/metrics`
/// and `/status` then answered 503 for good while `/ready` said 200.
#[test]
fn a_pinned_map_of_another_capacity_is_refused() {
    if !root_or_skip("a_pinned_map_of_another_capacity_is_refused") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topology = L2Topology::new(&["b1"]).unwrap();
    let pin = pin_path_of(&topology);
    let _prepared = prepare_on_bpffs(&pin).unwrap();
    std::fs::create_dir(pin.join("maps")).unwrap();
    let stats = lb_userspace::loader::map_pin(&pin, map_names::VIP_STATS);
    pin_per_cpu_array(&stats, size_of::<Traffic>() as u32, MAX_VIPS * 2).unwrap();

    let mut lb = topology.start_lb_unwaited(&config(&[1])).unwrap();
    let log = expect_refusal(&mut lb);
    assert!(
        log.contains(&stats.display().to_string()) && log.contains("max entries"),
        "the refusal names the map and what differs:\n{log}"
    );
    assert!(stats.exists(), "the foreign map is left as it was");
    assert!(
        !lb_userspace::loader::link_is_pinned(&pin),
        "nothing was attached"
    );
}

/// Finding: a second `lb run` with another pin_path on an interface that is
/// already attached failed with EBUSY after pinning 55 MiB of maps, and left
/// them behind.
#[test]
fn a_failed_second_run_leaves_nothing_pinned() {
    if !root_or_skip("a_failed_second_run_leaves_nothing_pinned") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topology = L2Topology::new(&["b1", "b2"]).unwrap();
    let first = topology.start_lb(&config(&[1, 1])).unwrap();

    let second_pin = PathBuf::from(format!("{}-second", pin_path_of(&topology).display()));
    let _cleanup = Prepared(second_pin.clone());
    let dir = std::env::temp_dir().join(format!("{}-second", topology.lb.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = Scratch(dir.clone());
    let text = config(&[1, 1]).replace(ADMIN, "127.0.0.1:9743");
    std::fs::write(
        dir.join("lb.yaml"),
        format!("{text}pin_path: {}\n", second_pin.display()),
    )
    .unwrap();
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/var/run/netns/{}", topology.lb.name()))
        .arg(lb_binary().unwrap())
        .args(["run", "--config"])
        .arg(dir.join("lb.yaml"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    lb_tests::netns::die_with_parent(&mut command);
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the second lb did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second lb must fail:\n{log}");
    assert!(
        log.contains("already runs XDP program"),
        "it says why:\n{log}"
    );
    assert!(
        !second_pin.exists(),
        "nothing of the second lb is left pinned: {:?}",
        std::fs::read_dir(&second_pin).map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
    );
    let tally = topology.client.enter(|| tcp_connections(WEB, 20)).unwrap();
    assert_eq!(tally.failures, 0, "the first lb forwards on: {tally:?}");
    drop(first);
}

/// Removes a scratch directory on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn under_ip_netns_exec_lb_refuses_pins_that_would_vanish_unless_allowed() {
    if !root_or_skip("under_ip_netns_exec_lb_refuses_pins_that_would_vanish_unless_allowed") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let topology = L2Topology::new(&["b1"]).unwrap();
    let pin = pin_path_of(&topology);
    let _cleanup = Prepared(pin.clone());
    let dir = std::env::temp_dir().join(format!("{}-private", topology.lb.name()));
    std::fs::create_dir_all(&dir).unwrap();
    let _scratch = ScratchDir(dir.clone());
    let file = dir.join("lb.yaml");
    std::fs::write(
        &file,
        format!("{}pin_path: {}\n", config(&[1]), pin.display()),
    )
    .unwrap();
    let lb = lb_binary().unwrap();
    // `ip netns exec` gives lb a /sys of its own; bounded by `timeout`.
    let run = |extra: &[&str], seconds: &str| {
        Command::new("timeout")
            .args([seconds, "ip", "netns", "exec", topology.lb.name()])
            .arg(&lb)
            .args(["run", "--config"])
            .arg(&file)
            .args(extra)
            .output()
            .unwrap()
    };

    let refused = run(&[], "20");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "refused at once:\n{stderr}");
    assert!(
        stderr.contains("private to this process") && stderr.contains("nsenter --net="),
        "says why and what to do:\n{stderr}"
    );
    assert!(!pin.join("link").exists(), "nothing pinned");

    // Allowed: it runs (until `timeout` ends it), warning that its pins
    // die with it; afterwards the host's bpffs holds none of them and the
    // program is gone with its private pins.
    let allowed = run(&["--allow-private-pins"], "6");
    let stderr = String::from_utf8_lossy(&allowed.stderr);
    assert_eq!(
        allowed.status.code(),
        Some(124),
        "ran until stopped:\n{stderr}"
    );
    assert!(stderr.contains("pins vanish when lb exits"), "{stderr}");
    assert!(stderr.contains("attached"), "{stderr}");
    assert!(
        !pin.join("link").exists(),
        "no pin reached the host's bpffs"
    );
    let link = topology.lb.ip(&["link", "show", "eth0"]).unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "the program left with its private pins"
    );
}

/// Removes a scratch directory on drop, also when the test fails.
struct ScratchDir(PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
