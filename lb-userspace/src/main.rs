//! `lb`: the load balancer's command-line entry point.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{
    config::{self, Config, ConfigError, Problem},
    reconcile,
};

/// Exit status for a configuration that cannot be used (EX_USAGE).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "XDP Maglev load balancer with direct server return"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the configured interface (or take over a pinned attachment)
    /// and manage it until SIGINT/SIGTERM. Forwarding continues after exit.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// On SIGINT/SIGTERM, detach and remove the pinned maps too.
        #[arg(long)]
        detach_on_exit: bool,
        /// Pin even into a bpffs that dies with this process (under a /sys
        /// private to its mount namespace, as `ip netns exec` makes).
        #[arg(long)]
        allow_private_pins: bool,
    },
    /// Detach the program and remove the pinned maps of a config's instance.
    Stop {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and show how each VIP's table is shared.
    CheckConfig {
        config: PathBuf,
        /// Also show what changing from this (running) config to CONFIG
        /// does to each VIP: backends added, removed, re-weighted, the share
        /// of table slots (new flows) that move, established flows kept or
        /// re-placed.
        #[arg(long, value_name = "OLD")]
        against: Option<PathBuf>,
    },
    /// On a backend: open IPIP packets addressed to this host in XDP, so the
    /// host needs no ipip module. Keeps running after exit, like `lb run`.
    Decap {
        #[arg(long)]
        interface: String,
        /// native or generic XDP.
        #[arg(long, default_value = "native")]
        xdp_mode: String,
        /// bpffs directory for its pins (default /sys/fs/bpf/lb-decap/IF).
        #[arg(long)]
        pin_path: Option<PathBuf>,
        /// On SIGINT/SIGTERM, detach and remove the pinned state.
        #[arg(long)]
        detach_on_exit: bool,
        /// Detach a running decap (from an earlier `lb decap`) and exit.
        #[arg(long)]
        stop: bool,
        /// As for `lb run`.
        #[arg(long)]
        allow_private_pins: bool,
    },
    /// Show the running instance's VIPs, backends and counters.
    Status {
        /// Admin listener to ask (default: the config's admin.listen, else
        /// 127.0.0.1:9742).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Config whose admin.listen to use.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Print the JSON of /status.
        #[arg(long)]
        json: bool,
    },
    /// Run by ExaBGP (a `process`): follow the running lb's /status and
    /// print `announce route` / `withdraw route` commands for its VIPs.
    BgpFeed {
        /// Admin listener to follow (default: the config's admin.listen,
        /// else 127.0.0.1:9742).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Config whose admin.listen and bgp.feed_grace to use.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    match cli.command {
        Command::CheckConfig { config, against } => match Config::load(&config) {
            Ok(c) => {
                print_plan(&config, &c);
                match against.map(|old| Config::load(&old)) {
                    None => ExitCode::SUCCESS,
                    Some(Ok(old)) => {
                        print_change(&old, &c);
                        ExitCode::SUCCESS
                    }
                    Some(Err(e)) => bad_config(&e),
                }
            }
            Err(e) => bad_config(&e),
        },
        Command::Decap {
            interface,
            xdp_mode,
            pin_path,
            detach_on_exit,
            stop,
            allow_private_pins,
        } => decap(
            interface,
            &xdp_mode,
            pin_path,
            detach_on_exit,
            stop,
            allow_private_pins,
        ),
        Command::Status {
            admin,
            config,
            json,
        } => {
            let addr = match admin_address(admin, config.as_deref()) {
                Ok((addr, _)) => addr,
                Err(code) => return code,
            };
            match lb_userspace::status::fetch(addr, std::time::Duration::from_secs(5)) {
                Ok(s) if json => {
                    println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    print!("{}", lb_userspace::status::render(&s));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lb: asking http://{addr}/status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::BgpFeed { admin, config } => {
            let (addr, c) = match admin_address(admin, config.as_deref()) {
                Ok(found) => found,
                Err(code) => return code,
            };
            // Until lb answers with its own: the config's, else the default.
            let grace = c
                .and_then(|c| c.bgp)
                .map_or(lb_userspace::bgp::feed::DEFAULT_GRACE, |b| b.feed_grace);
            match lb_userspace::bgp::feed::run(addr, grace) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("lb bgp-feed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Stop { config } => {
            let c = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return bad_config(&e),
            };
            // A running `lb run` holds the lock: stopping under it would leave
            // it managing maps that no longer exist.
            let _lock = match lb_userspace::loader::lock(&c.pin_path) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!(
                        "lb: {e}; stop it first (SIGTERM, with --detach-on-exit to detach as it exits)"
                    );
                    return ExitCode::FAILURE;
                }
            };
            match lb_userspace::loader::remove_pins(&c.pin_path) {
                Ok(true) => {
                    println!(
                        "detached from {} and removed {}",
                        c.interface,
                        c.pin_path.display()
                    );
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("nothing pinned at {}", c.pin_path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("lb: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            config,
            detach_on_exit,
            allow_private_pins,
        } => {
            let c = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return bad_config(&e),
            };
            // The interface can only be checked on the host that runs it.
            let ifindex = match interface_index(&c.interface) {
                Some(i) => i,
                None => {
                    return bad_config(&ConfigError::Invalid {
                        file: config,
                        problems: vec![Problem {
                            field: "interface".into(),
                            message: format!("`{}` does not exist on this host", c.interface),
                        }],
                    });
                }
            };
            if let Err(code) = check_pin_mount(&c.pin_path, allow_private_pins) {
                return code;
            }
            let options = lb_userspace::run::Options {
                config_path: config,
                detach_on_exit,
            };
            block_on(lb_userspace::run::run(c, ifindex, options))
        }
    }
}

/// Refuses a `pin_path` on a bpffs that would vanish when `lb` exits, unless
/// the operator accepts that.
fn check_pin_mount(pin_path: &std::path::Path, allow: bool) -> Result<(), ExitCode> {
    let Some(source) = lb_userspace::pins::private_sysfs_under(pin_path) else {
        return Ok(());
    };
    if allow {
        eprintln!(
            "lb: warning: pin_path {} is on a bpffs private to this process (sysfs `{source}`); \
             pins vanish when lb exits",
            pin_path.display()
        );
        return Ok(());
    }
    eprintln!(
        "lb: pin_path {} lies under a /sys private to this process's mount namespace \
         (sysfs `{source}`, as `ip netns exec` sets up): a bpffs there vanishes when lb exits, \
         so forwarding would stop after a crash and a restart could adopt nothing. \
         Start lb with `nsenter --net=/var/run/netns/NAME` (it keeps the host's mounts), \
         or set pin_path to a host bpffs outside /sys; --allow-private-pins accepts the loss.",
        pin_path.display()
    );
    Err(ExitCode::FAILURE)
}

/// `check-config --against`: what going from `old` to `new` does.
fn print_change(old: &Config, new: &Config) {
    println!("\nChange from the running config:");
    let fixed = old.fixed().changed(&new.fixed());
    if !fixed.is_empty() {
        println!(
            "  {} cannot change while lb runs: a reload would be rejected (restart to apply)",
            fixed.join(", ")
        );
    }
    for line in lb_userspace::change::render(&lb_userspace::change::diff(old, new)).lines() {
        println!("  {line}");
    }
}

fn decap(
    interface: String,
    xdp_mode: &str,
    pin_path: Option<PathBuf>,
    detach_on_exit: bool,
    stop: bool,
    allow_private_pins: bool,
) -> ExitCode {
    let pin_path = pin_path.unwrap_or_else(|| lb_userspace::decap::default_pin_path(&interface));
    if stop {
        return match lb_userspace::decap::stop(&pin_path) {
            Ok(true) => {
                println!(
                    "decap detached from {interface}; removed {}",
                    pin_path.display()
                );
                ExitCode::SUCCESS
            }
            Ok(false) => {
                println!("nothing pinned at {}", pin_path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lb: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let mode = match xdp_mode {
        "native" => aya::programs::XdpMode::Driver,
        "generic" => aya::programs::XdpMode::Skb,
        other => {
            eprintln!("lb decap: --xdp-mode `{other}` is not native or generic");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let Some(ifindex) = interface_index(&interface) else {
        eprintln!("lb decap: --interface `{interface}` does not exist on this host");
        return ExitCode::from(EXIT_BAD_CONFIG);
    };
    if let Err(code) = check_pin_mount(&pin_path, allow_private_pins) {
        return code;
    }
    let options = lb_userspace::decap::Options {
        interface,
        mode,
        pin_path,
        detach_on_exit,
    };
    block_on(lb_userspace::decap::run(options, ifindex))
}

/// Runs `work` on a single-threaded runtime; any error becomes exit code 1.
fn block_on(work: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    // Two workers: the admin listener and the probes keep answering while
    // the event loop writes a large change to the maps.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The admin listener to ask: `--admin`, else the config's `admin.listen`
/// (with the config), else the default.
fn admin_address(
    admin: Option<std::net::SocketAddr>,
    config: Option<&std::path::Path>,
) -> Result<(std::net::SocketAddr, Option<Config>), ExitCode> {
    let c = match config.map(Config::load).transpose() {
        Ok(c) => c,
        Err(e) => return Err(bad_config(&e)),
    };
    let addr = match (admin, &c) {
        (Some(a), _) => a,
        (None, Some(c)) => c.admin_listen,
        (None, None) => config::DEFAULT_ADMIN_LISTEN
            .parse()
            .map_err(|_| ExitCode::FAILURE)?,
    };
    Ok((addr, c))
}

fn bad_config(e: &ConfigError) -> ExitCode {
    eprintln!("Invalid configuration: {e}");
    ExitCode::from(EXIT_BAD_CONFIG)
}

fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the whole call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

fn print_plan(file: &std::path::Path, c: &Config) {
    println!("{}: valid", file.display());
    println!(
        "interface {} ({} XDP), Maglev table {} slots, seed {:#x}",
        c.interface, c.xdp_mode, c.table_size, c.seed
    );
    println!(
        "flow tables {} IPv4 and {} IPv6 flows, UDP idle timeout {}, pinned under {}, admin on {}",
        c.max_flows,
        c.max_flows_v6,
        humantime::format_duration(c.udp_idle_timeout),
        c.pin_path.display(),
        c.admin_listen
    );
    if let Some(b) = &c.bgp {
        println!(
            "bgp: a VIP is announced after {} with at least {} healthy active backend(s); \
             on SIGTERM drained for {}; med {}, communities [{}], next-hop {}; feed grace {}",
            humantime::format_duration(b.announce_after),
            b.min_healthy,
            humantime::format_duration(b.shutdown_delay),
            b.med,
            b.communities.join(" "),
            b.next_hop,
            humantime::format_duration(b.feed_grace),
        );
    }
    for (vip, table) in reconcile::plan(c) {
        let h = &vip.health_check;
        println!(
            "\nVIP {} {}/{} forwarding {}, health {} port {}{} every {} (timeout {}, rise {}, fall {}), all down: {}",
            vip.name,
            vip.endpoint(),
            vip.protocol,
            vip.forwarding,
            h.kind,
            h.port,
            if h.path.is_empty() {
                String::new()
            } else {
                format!(" {}", h.path)
            },
            humantime::format_duration(h.interval),
            humantime::format_duration(h.timeout),
            h.rise,
            h.fall,
            vip.on_all_down,
        );
        if c.bgp.is_some() && !vip.announce {
            println!("  not announced over BGP from this instance (announce: false)");
        }
        println!(
            "  {:<16} {:<8} {:>6} {:>8} {:>8} {:>9}",
            "backend", "state", "weight", "slots", "share", "expected"
        );
        // Every configured backend; draining and disabled ones hold no slots.
        let total_weight: u64 = table.backends.iter().map(|b| b.weight as u64).sum();
        let counts = table.slot_counts();
        for b in &vip.backends {
            let in_table = table.backends.iter().position(|t| t.address == b.address);
            let slots = in_table.map_or(0, |i| counts[i]);
            let expected = if in_table.is_some() {
                100.0 * b.weight as f64 / total_weight as f64
            } else {
                0.0
            };
            println!(
                "  {:<16} {:<8} {:>6} {:>8} {:>7.2}% {:>8.2}%",
                b.address.to_string(),
                b.state,
                b.weight,
                slots,
                100.0 * slots as f64 / c.table_size as f64,
                expected,
            );
        }
    }
}
