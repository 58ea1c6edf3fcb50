//! `pastry-node`: run one Pastry node.
//!
//! ```text
//! pastry-node 127.0.0.1 4000                      # the first node of a network
//! pastry-node 127.0.0.1 5000 127.0.0.1 4000       # join through 127.0.0.1:4000
//! ```

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::ExitCode;
use std::time::Duration;

use pastry::pastry_node::{server, Config, RunningNode};

const USAGE: &str = "usage: pastry-node <ip> <port> [<bootstrap-ip> <bootstrap-port>] [--leaf-set N] [--replicas K] [--heartbeat-ms MS] [--timeout-ms MS] [--discovery-width N] [--log-level LEVEL] [limits: --max-line B --max-key B --max-value B --max-keys N --max-store-bytes B --max-connections N --max-hops N --line-timeout-ms MS --idle-timeout-ms MS]";

const HELP: &str = "\
pastry-node: one node of a Pastry distributed hash table.

USAGE:
    pastry-node <ip> <port> [<bootstrap-ip> <bootstrap-port>] [options]

    <ip> <port>                      the address this node listens on, and that
                                     other nodes dial; its id is SHA-1 of \"ip:port\".
                                     Port 0 picks a free port (logged at start).
    <bootstrap-ip> <bootstrap-port>  a node of the network to join through; without
                                     it, this node starts a new network.

OPTIONS:
    --leaf-set N       leaf set size |L| (even, 2..=64; default 16)
    --replicas K       nodes that hold each key, the root included (1..=|L|/2;
                       default 3)
    --heartbeat-ms MS  how often leaf sets are exchanged with neighbours, the
                       heartbeat (default 1000); a neighbour silent for 3
                       heartbeats is probed, and declared dead if it stays silent
    --timeout-ms MS    longest wait for another node's reply (default 5000)
    --discovery-width N  before joining, walk from the bootstrap toward a node
                       near this one, measuring at most N nodes a step
                       (default 2; 0: join through the bootstrap as given)
    --log-level LEVEL  off, error, warn, info, debug or trace (default info; or set
                       the PASTRY_LOG environment variable)

LIMITS (what a node accepts; see \"Limits and security\" in the README):
    --max-line B           longest request line, in bytes (default 1048576)
    --max-key B            longest key, in bytes (default 1024)
    --max-value B          largest value, in bytes as JSON (default 65536)
    --max-keys N           most entries stored, tombstones included (default 1000000)
    --max-store-bytes B    most bytes stored, keys plus values (default 268435456)
    --max-connections N    most connections served at once (default 900)
    --max-hops N           most forwards of one message (default 64)
    --line-timeout-ms MS   a begun line must be whole within this (default 10000)
    --idle-timeout-ms MS   a silent connection is closed after this (default 60000)
    -h, --help         this help
    -V, --version      the version

Talk to a node with one JSON object per line, for example:
    printf '{\"type\":\"put\",\"key\":\"apple\",\"value\":\"red\"}\\n' | nc -N 127.0.0.1 4000
    printf '{\"type\":\"help\"}\\n' | nc -N 127.0.0.1 4000
";

/// The parsed command line.
#[derive(Debug)]
struct Options {
    addr: SocketAddr,
    bootstrap: Option<SocketAddr>,
    leaf_set: usize,
    replicas: usize,
    tick_ms: u64,
    timeout_ms: u64,
    log_level: log::LevelFilter,
    /// The limits and the discovery width, as `Config` fields (the other fields
    /// are set in `run`).
    limits: Config,
}

enum Parsed {
    Run(Box<Options>),
    Help,
    Version,
}

fn parse_ip(s: &str, what: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not an IP address"))
}

fn parse_port(s: &str, what: &str) -> Result<u16, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not a port number (0-65535)"))
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("log level {s:?} is not one of off, error, warn, info, debug, trace"))
}

/// A whole number of at least `min`, for option `name`.
/// The longest period or timeout a flag takes: a day. Longer would be a typo
/// (and a heartbeat of 2^64 ms is a node that never checks its neighbours).
const MAX_MS: u64 = 86_400_000;

/// A flag's value in milliseconds, `min..=MAX_MS`.
fn millis(name: &str, s: &str, min: u64) -> Result<u64, String> {
    s.parse()
        .ok()
        .filter(|n: &u64| (min..=MAX_MS).contains(n))
        .ok_or_else(|| format!("{name} {s:?}: expected milliseconds, {min} to {MAX_MS} (a day)"))
}

fn count(name: &str, s: &str, min: usize) -> Result<usize, String> {
    s.parse()
        .ok()
        .filter(|n: &usize| *n >= min)
        .ok_or_else(|| format!("{name} {s:?}: expected a whole number, at least {min}"))
}

fn parse(args: &[String]) -> Result<Parsed, String> {
    let mut positional = Vec::new();
    let mut leaf_set = pastry::utils::LEAF_SET_SIZE;
    let mut replicas = 3;
    let mut tick_ms = 1000;
    let mut timeout_ms = pastry::pastry_node::Config::default()
        .call_timeout
        .as_millis() as u64;
    let mut log_level = None;
    let mut limits = Config::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(Parsed::Help),
            "-V" | "--version" => return Ok(Parsed::Version),
            "--leaf-set" => {
                let v = value("--leaf-set")?;
                leaf_set = v
                    .parse()
                    .ok()
                    .filter(|n: &usize| (2..=64).contains(n) && n.is_multiple_of(2))
                    .ok_or_else(|| {
                        format!("--leaf-set {v:?}: expected an even number from 2 to 64")
                    })?;
            }
            "--replicas" => {
                let v = value("--replicas")?;
                replicas = v.parse().ok().filter(|n: &usize| *n >= 1).ok_or_else(|| {
                    format!("--replicas {v:?}: expected a number of nodes, at least 1")
                })?;
            }
            // --tick-ms is the older name.
            "--heartbeat-ms" | "--tick-ms" => {
                tick_ms = millis(arg, &value(arg)?, 10)?;
            }
            "--timeout-ms" => {
                timeout_ms = millis(arg, &value(arg)?, 10)?;
            }
            "--log-level" => log_level = Some(parse_level(&value("--log-level")?)?),
            "--discovery-width" => limits.discovery_width = count(arg, &value(arg)?, 0)?,
            "--max-line" => limits.max_line = count(arg, &value(arg)?, 64)?,
            "--max-key" => limits.max_key_bytes = count(arg, &value(arg)?, 1)?,
            "--max-value" => limits.max_value_bytes = count(arg, &value(arg)?, 1)?,
            "--max-keys" => limits.max_store_keys = count(arg, &value(arg)?, 1)?,
            "--max-store-bytes" => limits.max_store_bytes = count(arg, &value(arg)?, 1)?,
            "--max-connections" => limits.max_connections = count(arg, &value(arg)?, 1)?,
            "--max-hops" => {
                limits.max_hops = u32::try_from(count(arg, &value(arg)?, 1)?)
                    .map_err(|_| format!("{arg}: at most {}", u32::MAX))?
            }
            "--line-timeout-ms" => {
                limits.line_timeout = Duration::from_millis(millis(arg, &value(arg)?, 1)?)
            }
            "--idle-timeout-ms" => {
                limits.client_timeout = Duration::from_millis(millis(arg, &value(arg)?, 1)?)
            }
            // "-1" where a port goes is a bad port, not an unknown option.
            s if s.starts_with('-') && s[1..].parse::<i64>().is_ok() => {
                return Err(format!("{s} is not a port number (0-65535)"))
            }
            s if s.starts_with('-') && s.len() > 1 => return Err(format!("unknown option {s}")),
            _ => positional.push(arg.clone()),
        }
    }
    let (ip, port, bootstrap) = match positional.as_slice() {
        [ip, port] => (ip, port, None),
        [ip, port, bip, bport] => (
            ip,
            port,
            Some(SocketAddr::new(
                parse_ip(bip, "bootstrap address")?,
                parse_port(bport, "bootstrap port")?,
            )),
        ),
        [] => return Err("missing <ip> <port>".into()),
        _ => {
            return Err(format!(
                "expected 2 or 4 positional arguments, got {}",
                positional.len()
            ))
        }
    };
    let ip = parse_ip(ip, "address")?;
    if ip.is_unspecified() {
        return Err(format!(
            "{ip} cannot be a node's address: other nodes dial the address a node gives, so give one of this machine's interfaces (e.g. 127.0.0.1)"
        ));
    }
    if let Some(b) = bootstrap {
        if b.port() == 0 || b.ip().is_unspecified() {
            return Err(format!("cannot join through {b}: not a dialable address"));
        }
    }
    let log_level = match log_level {
        Some(l) => l,
        None => match std::env::var("PASTRY_LOG") {
            Ok(v) if !v.is_empty() => parse_level(&v).map_err(|e| format!("PASTRY_LOG: {e}"))?,
            _ => log::LevelFilter::Info,
        },
    };
    if replicas > leaf_set / 2 {
        return Err(format!(
            "--replicas {replicas}: at most |L|/2 = {} with a leaf set of {leaf_set}: a node sees only its leaf set, and nodes agree on who holds a key only if its k holders lie within |L|/2 of each other",
            leaf_set / 2
        ));
    }
    Ok(Parsed::Run(Box::new(Options {
        addr: SocketAddr::new(ip, parse_port(port, "port")?),
        bootstrap,
        leaf_set,
        replicas,
        tick_ms,
        timeout_ms,
        log_level,
        limits,
    })))
}

fn init_logging(level: log::LevelFilter) {
    let color = if std::io::stderr().is_terminal() {
        simplelog::ColorChoice::Auto
    } else {
        simplelog::ColorChoice::Never
    };
    let config = simplelog::ConfigBuilder::new()
        .set_target_level(log::LevelFilter::Off)
        .set_thread_level(log::LevelFilter::Off)
        .build();
    // Fails only if a logger is already set, which cannot happen here.
    let _ = simplelog::TermLogger::init(level, config, simplelog::TerminalMode::Stderr, color);
}

/// Warns if the open-file limit is below what a node serving `max_connections`
/// may hold: at the limit it could neither accept nor call, and would fail
/// peers and clients with errors far from the cause.
fn warn_if_few_open_files(max_connections: usize) {
    let Some((soft, _)) = server::open_file_limits() else {
        return;
    };
    let need = max_connections as u64 + server::NODE_DESCRIPTORS;
    if soft < need {
        log::warn!(
            "the open-file limit is {soft}, and with --max-connections {max_connections} this node \
             may need {need}; raise it with `ulimit -n {need}` before starting the node, \
             or lower --max-connections"
        );
    }
}

fn run(opts: Box<Options>) -> Result<ExitCode, String> {
    init_logging(opts.log_level);
    let listener =
        TcpListener::bind(opts.addr).map_err(|e| format!("cannot listen on {}: {e}", opts.addr))?;
    let config = Config {
        leaf_set_size: opts.leaf_set,
        replicas: opts.replicas,
        tick: Duration::from_millis(opts.tick_ms),
        call_timeout: Duration::from_millis(opts.timeout_ms),
        ..opts.limits
    };
    warn_if_few_open_files(config.max_connections);
    let mut node = RunningNode::start(listener, config)
        .map_err(|e| format!("cannot start the node on {}: {e}", opts.addr))?;
    log::info!("listening on {} as node {}", node.addr(), node.id());

    let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
    let signals = std::sync::atomic::AtomicUsize::new(0);
    ctrlc::set_handler(move || {
        // The first signal asks for a clean stop; a second one exits at once.
        if signals.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            std::process::exit(1);
        }
        let _ = stop_tx.try_send(());
    })
    .map_err(|e| format!("cannot install the signal handler: {e}"))?;

    match opts.bootstrap {
        Some(b) => {
            node.join(b).map_err(|e| e.to_string())?;
        }
        None => log::info!(
            "started a new network; others join with: pastry-node <ip> <port> {} {}",
            node.addr().ip(),
            node.addr().port()
        ),
    }

    let _ = stop_rx.recv();
    // Leave gracefully: our keys go to the nodes that keep them once we are gone.
    // (A second Ctrl-C exits at once, see the handler above.)
    log::info!("stopping: handing our keys to the nodes that keep them");
    node.leave();
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match parse(&args) {
        Ok(Parsed::Help) => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Ok(Parsed::Version) => {
            println!("pastry-node {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Parsed::Run(opts)) => match run(opts) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}
