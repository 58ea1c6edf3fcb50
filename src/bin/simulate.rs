//! `simulate`: build a Pastry network of N nodes in one process with the node's own
//! code, route lookups through it and hold the figures against the paper's.
//!
//! ```text
//! cargo run --release --bin simulate -- --nodes 100000 --lookups 200000
//! cargo run --release --bin simulate -- --nodes 10000 --fail 0.1
//! cargo run --release --bin simulate -- --nodes 10000 --proximity none
//! cargo run --release --bin simulate -- --nodes 100000 --plot hops.svg --json
//! ```

use std::process::ExitCode;
use std::time::Instant;

use pastry::pastry_node::Config;
use pastry::simulator::{Lookup, Messages, Network, Proximity, Reference, Rng};
use pastry::utils::NodeId;
use serde_json::{json, Value};

const USAGE: &str = "usage: simulate [--nodes N] [--lookups L] [--seed S] [--leaf-set N] [--proximity plane|none] [--discovery-width N] [--fail FRACTION] [--churn ROUNDS] [--rounds N] [--reference] [--json] [--plot FILE.svg]";

const HELP: &str = "\
simulate: a Pastry network of N nodes in one process, built by the node's own join
protocol and measured against the paper (Rowstron and Druschel, 2001).

OPTIONS:
    --nodes N               nodes to join, one after another (default 10000)
    --lookups L             random lookups to route (default 100000)
    --seed S                seed of every random choice (default 1)
    --leaf-set N            leaf set size |L| (default 16)
    --proximity plane|none  plane: routing-table entries chosen by Euclidean distance
                            in a unit square, as in the paper (default); none: every
                            node equally near, to measure what locality buys
    --discovery-width N     most nodes a joiner measures at each step of its
                            nearest-neighbour discovery (default 2); 0: no
                            discovery, join through the random bootstrap
    --fail FRACTION         after the fresh measurement, that share of nodes fails
                            silently; lookups are measured right after, after leaf-set
                            repair and after routing-table repair
    --rounds N              run N maintenance rounds (heartbeats, routing-table
                            upkeep) after the build, before measuring
    --churn ROUNDS          store 1,000 keys, then for each round one node fails
                            silently and one joins; report keys lost and reads
                            that failed
    --reference             also route every lookup of the fresh network over ideal
                            state (exact leaf sets, every routing-table slot that
                            can be filled filled) with the same routing code: what
                            the paper's rule itself does on these ids
    --json                  print one JSON object instead of the table
    --plot FILE.svg         draw the hop distribution next to the paper's Fig. 5
    -h, --help              this help
";

const MAX_NODES: usize = 1_000_000;
const MAX_LOOKUPS: usize = 100_000_000;
const MAX_ROUNDS: usize = 100_000;

struct Options {
    nodes: usize,
    lookups: usize,
    seed: u64,
    leaf_set: usize,
    proximity: Proximity,
    discovery_width: usize,
    fail: Option<f64>,
    churn: Option<usize>,
    rounds: usize,
    reference: bool,
    json: bool,
    plot: Option<String>,
}

fn parse(args: &[String]) -> Result<Option<Options>, String> {
    let mut o = Options {
        nodes: 10_000,
        lookups: 100_000,
        seed: 1,
        leaf_set: 16,
        proximity: Proximity::Plane,
        discovery_width: pastry::pastry_node::DISCOVERY_WIDTH,
        fail: None,
        churn: None,
        rounds: 0,
        reference: false,
        json: false,
        plot: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "-h" | "--help" => return Ok(None),
            "--nodes" => o.nodes = number(&value(a)?, a)?,
            "--lookups" => o.lookups = number(&value(a)?, a)?,
            "--seed" => o.seed = number(&value(a)?, a)?,
            "--leaf-set" => o.leaf_set = number(&value(a)?, a)?,
            "--proximity" => {
                o.proximity = match value(a)?.as_str() {
                    "plane" => Proximity::Plane,
                    "none" => Proximity::Ignored,
                    other => return Err(format!("--proximity {other:?}: use plane or none")),
                }
            }
            "--discovery-width" => o.discovery_width = number(&value(a)?, a)?,
            "--fail" => {
                let f: f64 = value(a)?
                    .parse()
                    .map_err(|_| "--fail needs a fraction such as 0.1".to_string())?;
                if !(0.0..1.0).contains(&f) {
                    return Err("--fail needs a fraction in [0, 1)".into());
                }
                o.fail = Some(f);
            }
            "--churn" => o.churn = Some(number(&value(a)?, a)?),
            "--rounds" => o.rounds = number(&value(a)?, a)?,
            "--reference" => o.reference = true,
            "--json" => o.json = true,
            "--plot" => o.plot = Some(value(a)?),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    // Each simulated node takes about 25 KiB (2.4 GiB at 100,000): past a million
    // the run would not fit in memory, so it is refused rather than left to abort.
    if !(2..=MAX_NODES).contains(&o.nodes) {
        return Err(format!("--nodes must be 2..={MAX_NODES}"));
    }
    if !(1..=MAX_LOOKUPS).contains(&o.lookups) {
        return Err(format!("--lookups must be 1..={MAX_LOOKUPS}"));
    }
    if o.rounds > MAX_ROUNDS || o.churn.is_some_and(|c| c > MAX_ROUNDS) {
        return Err(format!("--rounds and --churn must be at most {MAX_ROUNDS}"));
    }
    if o.leaf_set < 2 || !o.leaf_set.is_multiple_of(2) || o.leaf_set > 64 {
        return Err("--leaf-set must be even, 2..=64".into());
    }
    Ok(Some(o))
}

fn number<T: std::str::FromStr>(s: &str, name: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{name} needs a whole number, not {s:?}"))
}

/// The paper's average hop counts (Fig. 4, |L| = 16), interpolated in log N between
/// the published points; `None` outside 1,000..=100,000.
fn paper_average_hops(n: usize) -> Option<f64> {
    let points = [(1_000f64, 2.5), (10_000f64, 3.2), (100_000f64, 3.95)];
    let x = (n as f64).log10();
    points.windows(2).find_map(|w| {
        let (a, b) = (w[0], w[1]);
        (x >= a.0.log10() - 1e-9 && x <= b.0.log10() + 1e-9)
            .then(|| a.1 + (b.1 - a.1) * (x - a.0.log10()) / (b.0.log10() - a.0.log10()))
    })
}

/// The paper's Fig. 5: share of lookups taking 0..=5 hops at N = 100,000.
const PAPER_FIG5: [f64; 6] = [0.0, 0.0006, 0.016, 0.164, 0.645, 0.175];

/// Figures of one batch of lookups.
#[derive(Default)]
struct LookupStats {
    count: usize,
    hops: Vec<usize>,
    total_hops: u64,
    misdelivered: usize,
    failed: usize,
    rare_case: usize,
    travelled: f64,
    direct: f64,
    seconds: f64,
}

impl LookupStats {
    fn add(&mut self, l: &Lookup) {
        self.count += 1;
        if l.failed {
            self.failed += 1;
            return;
        }
        let h = l.hops as usize;
        if self.hops.len() <= h {
            self.hops.resize(h + 1, 0);
        }
        self.hops[h] += 1;
        self.total_hops += h as u64;
        self.misdelivered += usize::from(!l.correct);
        self.rare_case += usize::from(l.rare_case);
        if let Some((travelled, direct)) = l.stretch {
            self.travelled += travelled;
            self.direct += direct;
        }
    }

    fn delivered(&self) -> usize {
        self.count - self.failed
    }

    fn average(&self) -> f64 {
        self.total_hops as f64 / self.delivered().max(1) as f64
    }

    fn max(&self) -> usize {
        self.hops.len().saturating_sub(1)
    }

    /// Lookups that took more than `bound` hops.
    fn above(&self, bound: usize) -> usize {
        self.hops.iter().skip(bound + 1).sum()
    }

    fn share(&self, h: usize) -> f64 {
        self.hops.get(h).copied().unwrap_or(0) as f64 / self.delivered().max(1) as f64
    }

    /// Total distance travelled over total direct distance, as the paper's Fig. 8
    /// compares them (a mean of per-route ratios would be dominated by the few
    /// routes whose source and root happen to be neighbours in the plane).
    fn stretch(&self) -> f64 {
        self.travelled / self.direct.max(f64::MIN_POSITIVE)
    }

    fn json(&self) -> Value {
        json!({
            "lookups": self.count,
            "average_hops": self.average(),
            "max_hops": self.max(),
            "hop_distribution": (0..self.hops.len()).map(|h| self.share(h)).collect::<Vec<_>>(),
            "misdelivered": self.misdelivered,
            "failed": self.failed,
            "rare_case_lookups": self.rare_case,
            "stretch": self.stretch(),
            "seconds": self.seconds,
        })
    }
}

/// Routes `count` random lookups. With `reference`, each one is also routed over
/// the reference's ideal state, into the second figures.
fn run_lookups(
    net: &mut Network,
    count: usize,
    settle: bool,
    mut reference: Option<(&Reference, &mut LookupStats)>,
) -> LookupStats {
    let start = Instant::now();
    let mut stats = LookupStats::default();
    let ring = net.ring();
    net.reset_rare_case();
    for _ in 0..count {
        let from = ring[net.rng().below(ring.len())].1;
        let key = format!("key-{:016x}", net.rng().next_u64());
        stats.add(&net.lookup(&ring, from, &key));
        if let Some((r, r_stats)) = reference.as_mut() {
            let hops = r.lookup(from, &NodeId::for_key(&key));
            r_stats.add(&Lookup {
                hops: hops.unwrap_or(0),
                correct: hops.is_some(),
                rare_case: false,
                stretch: None,
                failed: false,
            });
        }
        if settle {
            net.settle();
        }
    }
    stats.seconds = start.elapsed().as_secs_f64();
    stats
}

/// Peak resident memory of this process (Linux), in bytes.
fn peak_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// One failure phase's figures.
struct Phase {
    name: String,
    stats: LookupStats,
    ideal_share: f64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = match parse(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = Config {
        leaf_set_size: o.leaf_set,
        discovery_width: o.discovery_width,
        ..Config::default()
    };
    let mut net = Network::new(o.seed, o.proximity, config);
    let log16n = (o.nodes as f64).log2() / 4.0;

    // Build: every node joins through the real protocol.
    let start = Instant::now();
    let mut join_hops = 0u64;
    let mut join_msgs: Vec<Messages> = Vec::with_capacity(o.nodes);
    let progress = !o.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    for k in 0..o.nodes {
        match net.add_node() {
            Ok((_, Some(cost))) => {
                join_hops += cost.hops as u64;
                join_msgs.push(cost.messages);
            }
            Ok((_, None)) => {}
            Err(e) => {
                eprintln!("error: join {k} failed: {e}");
                return ExitCode::FAILURE;
            }
        }
        if progress && (k + 1) % 1000 == 0 {
            eprint!("\rjoined {} of {} nodes", k + 1, o.nodes);
        }
    }
    if progress {
        eprint!("\r\x1b[K");
    }
    let build_seconds = start.elapsed().as_secs_f64();
    // Maintenance rounds before measuring, as a running network has had: each
    // node's heartbeat and its share of routing-table upkeep.
    for _ in 0..o.rounds {
        net.tick_all();
    }
    let joins = join_msgs.len().max(1) as f64;
    let mean = |f: &dyn Fn(&Messages) -> u64| join_msgs.iter().map(f).sum::<u64>() as f64 / joins;
    let join_total_mean = mean(&|m| m.total());
    let join_total_max = join_msgs.iter().map(|m| m.total()).max().unwrap_or(0);
    let join_protocol_mean = mean(&|m| m.routed + m.announce);
    let join_probe_mean = mean(&|m| m.probe);
    let join_discovery_mean = mean(&|m| m.discovery);
    let ideal_share = net.ideal_leaf_set_share();
    let rt_mean = (0..net.len())
        .map(|i| net.node(i).routing_table_len() as f64)
        .sum::<f64>()
        / net.len() as f64;

    let bound_hops = log16n.ceil() as usize;
    let reference = o.reference.then(|| {
        let mut rng = Rng::new(o.seed ^ 0x05ee_d0f1_dea1);
        Reference::build(&net, &mut rng)
    });
    let slots = reference.as_ref().map(|r| r.slots_filled(&net));
    let mut ideal = LookupStats::default();
    let fresh = run_lookups(
        &mut net,
        o.lookups,
        true,
        reference.as_ref().map(|r| (r, &mut ideal)),
    );
    drop(reference);

    let mut phases: Vec<Phase> = Vec::new();
    if let Some(f) = o.fail {
        let count = (o.nodes as f64 * f).round() as usize;
        net.fail_random(count);
        // Right after: nobody has noticed; lookups route around dead next hops
        // (per-hop retry), but no maintenance runs in between.
        let stats = run_lookups(&mut net, o.lookups, false, None);
        phases.push(Phase {
            name: format!("right after {count} nodes failed"),
            stats,
            ideal_share: net.ideal_leaf_set_share(),
        });
        // Leaf-set repair: the suspicions raised so far, then heartbeat rounds until
        // every leaf set is ideal again.
        net.settle();
        let mut rounds = 0;
        while net.ideal_leaf_set_share() < 1.0 && rounds < 10 {
            net.tick_all();
            rounds += 1;
        }
        // From here on maintenance runs as usual between lookups (a dead entry a
        // lookup runs into is dropped), but nobody has refreshed routing tables.
        let stats = run_lookups(&mut net, o.lookups, true, None);
        phases.push(Phase {
            name: format!("after leaf-set repair ({rounds} rounds)"),
            stats,
            ideal_share: net.ideal_leaf_set_share(),
        });
        net.settle();
        // Routing-table repair: enough maintenance rounds for every node to check
        // every row of its table.
        let rows = (log16n.ceil() as usize) + 2;
        for _ in 0..rows {
            net.tick_all();
        }
        let stats = run_lookups(&mut net, o.lookups, true, None);
        phases.push(Phase {
            name: format!("after routing-table repair ({rows} rounds)"),
            stats,
            ideal_share: net.ideal_leaf_set_share(),
        });
    }
    let churn = o.churn.map(|rounds| net.churn(rounds));
    let peak = peak_memory();
    let paper = paper_average_hops(o.nodes);
    let join_bound = 3.0 * 16.0 * log16n;
    let rt_paper = 15.0 * log16n;

    if let Some(path) = &o.plot {
        if let Err(e) = std::fs::write(path, svg(&fresh, o.nodes)) {
            eprintln!("error: cannot write {path}: {e}");
            return ExitCode::FAILURE;
        }
    }

    if o.json {
        let report = json!({
            "nodes": o.nodes,
            "seed": o.seed,
            "leaf_set": o.leaf_set,
            "proximity": match o.proximity { Proximity::Plane => "plane", Proximity::Ignored => "none" },
            "log16_n": log16n,
            "paper_average_hops": paper,
            "build_seconds": build_seconds,
            "join": {
                "average_hops": join_hops as f64 / joins,
                "messages_mean": join_total_mean,
                "messages_max": join_total_max,
                "protocol_messages_mean": join_protocol_mean,
                "probes_mean": join_probe_mean,
                "discovery_mean": join_discovery_mean,
                "discovery_width": o.discovery_width,
                "paper_bound": join_bound,
            },
            "routing_table_entries_mean": rt_mean,
            "paper_routing_table_entries": rt_paper,
            "ideal_leaf_set_share": ideal_share,
            "fresh": fresh.json(),
            "above_ceil": fresh.above(bound_hops),
            "reference": o.reference.then(|| json!({
                "slots_filled": slots.map(|s| s.0),
                "slots_fillable": slots.map(|s| s.1),
                "lookups": ideal.json(),
                "above_ceil": ideal.above(bound_hops),
            })),
            "failure": phases.iter().map(|p| json!({
                "phase": p.name, "ideal_leaf_set_share": p.ideal_share, "lookups": p.stats.json()
            })).collect::<Vec<_>>(),
            "churn": churn.as_ref().map(|c| json!({
                "rounds": c.rounds, "keys_acknowledged": c.acknowledged, "keys_lost": c.lost,
                "reads_during": c.reads_during, "failed_during": c.failed_during,
            })),
            "peak_memory_bytes": peak,
        });
        println!("{report}");
    } else {
        let proximity = match o.proximity {
            Proximity::Plane => "Euclidean distance in the plane",
            Proximity::Ignored => "ignored",
        };
        println!(
            "Pastry simulation: {} nodes, b = 4, |L| = {}, seed {}, proximity {proximity}",
            o.nodes, o.leaf_set, o.seed
        );
        println!(
            "built through the join protocol in {build_seconds:.1} s ({:.2} ms per join); {} lookups in {:.1} s; peak memory {}",
            build_seconds * 1000.0 / o.nodes as f64,
            fresh.count,
            fresh.seconds,
            peak.map(gib).unwrap_or_else(|| "unknown".into())
        );
        println!();
        println!("{:<34} {:>12}   paper / bound", "", "measured");
        let paper_s = paper
            .map(|p| format!("about {p:.2}"))
            .unwrap_or_else(|| "-".into());
        row(
            "average hops",
            format!("{:.3}", fresh.average()),
            format!("{paper_s} (log16 N = {log16n:.2})"),
        );
        row(
            "maximum hops",
            fresh.max().to_string(),
            format!("at most ceil(log16 N) = {bound_hops}"),
        );
        row(
            "lookups above ceil(log16 N)",
            format!(
                "{} ({:.4}%)",
                fresh.above(bound_hops),
                100.0 * fresh.above(bound_hops) as f64 / fresh.delivered().max(1) as f64
            ),
            if o.reference {
                format!(
                    "ideal state: {} ({:.4}%)",
                    ideal.above(bound_hops),
                    100.0 * ideal.above(bound_hops) as f64 / ideal.delivered().max(1) as f64
                )
            } else {
                "0 (--reference: the rule on ideal state)".into()
            },
        );
        for h in 0..fresh.hops.len().max(6) {
            let p = if o.nodes == 100_000 {
                PAPER_FIG5
                    .get(h)
                    .map(|s| format!("{:.2}% (Fig. 5)", s * 100.0))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            row(
                &format!("  {h} hops"),
                format!("{:.2}%", fresh.share(h) * 100.0),
                p,
            );
        }
        row(
            "misdelivered lookups",
            fresh.misdelivered.to_string(),
            "0".into(),
        );
        row("failed lookups", fresh.failed.to_string(), "0".into());
        row(
            "lookups using the rare case",
            format!(
                "{} ({:.3}%)",
                fresh.rare_case,
                100.0 * fresh.rare_case as f64 / fresh.count.max(1) as f64
            ),
            "rare".into(),
        );
        row(
            "ideal leaf sets",
            format!("{:.2}%", ideal_share * 100.0),
            "100%".into(),
        );
        row(
            "join hops (mean)",
            format!("{:.2}", join_hops as f64 / joins),
            String::new(),
        );
        row(
            "join messages (mean / max)",
            format!("{join_total_mean:.0} / {join_total_max}"),
            format!("3 x 2^b x log16 N = {join_bound:.0}"),
        );
        row(
            "  of which join + announce",
            format!("{join_protocol_mean:.0}"),
            String::new(),
        );
        row(
            "  of which proximity probes",
            format!("{join_probe_mean:.0}"),
            String::new(),
        );
        row(
            "  of which discovery (status)",
            format!("{join_discovery_mean:.0}"),
            format!("width {}", o.discovery_width),
        );
        row(
            "routing-table entries per node",
            format!("{rt_mean:.1}"),
            format!("(2^b - 1) x log16 N = {rt_paper:.1}"),
        );
        row(
            "route stretch",
            format!("{:.3}", fresh.stretch()),
            if o.proximity == Proximity::Plane {
                "1.3 to 1.4".into()
            } else {
                "(no locality)".into()
            },
        );
        if let Some((filled, fillable)) = slots {
            println!();
            println!(
                "routing-table slots that some node fits: {fillable}, filled {filled} ({:.3}%)",
                100.0 * filled as f64 / fillable.max(1) as f64
            );
            println!(
                "the same lookups over ideal state (the paper's rule, the same routing code):"
            );
            println!(
                "  average hops {:.3}, maximum {}, not at the root {}; hops 0..: {}",
                ideal.average(),
                ideal.max(),
                ideal.misdelivered,
                (0..ideal.hops.len())
                    .map(|h| format!("{:.2}%", ideal.share(h) * 100.0))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        if let Some(c) = &churn {
            println!();
            println!(
                "churn: {} rounds, in each one node fails silently, one joins, every node runs one maintenance round",
                c.rounds
            );
            println!(
                "  keys acknowledged {}, lost {}; reads during churn {}, failed {} ({:.2}%)",
                c.acknowledged,
                c.lost,
                c.reads_during,
                c.failed_during,
                100.0 * c.failed_during as f64 / c.reads_during.max(1) as f64
            );
        }
        if !phases.is_empty() {
            println!();
            println!(
                "{:<46} {:>9} {:>5} {:>12} {:>7} {:>8}",
                "failure", "avg hops", "max", "misdelivered", "failed", "ideal L"
            );
            let line = |name: &str, s: &LookupStats, ideal: f64| {
                println!(
                    "{:<46} {:>9.3} {:>5} {:>12} {:>7} {:>7.2}%",
                    name,
                    s.average(),
                    s.max(),
                    s.misdelivered,
                    s.failed,
                    ideal * 100.0
                );
            };
            line("fresh network", &fresh, ideal_share);
            for p in &phases {
                line(&p.name, &p.stats, p.ideal_share);
            }
        }
    }
    ExitCode::SUCCESS
}

fn row(name: &str, measured: String, paper: String) {
    println!("{name:<34} {measured:>12}   {paper}");
}

/// A bar chart of the hop distribution, measured next to the paper's Fig. 5.
fn svg(stats: &LookupStats, nodes: usize) -> String {
    let bars = stats.hops.len().max(6);
    let (w, h, left, bottom) = (640.0, 360.0, 60.0, 50.0);
    let plot_h = h - bottom - 40.0;
    let slot = (w - left - 20.0) / bars as f64;
    let y = |share: f64| h - bottom - share * plot_h;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"20\" font-size=\"14\">Hops per lookup, {nodes} nodes: measured (blue) and the paper's Fig. 5 at 100,000 (grey)</text>\n"
    );
    for tick in 0..=4 {
        let s = tick as f64 * 0.25;
        out += &format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{y0}\" y2=\"{y0}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}%</text>\n",
            w - 20.0,
            left - 6.0,
            y(s) + 4.0,
            (s * 100.0) as u32,
            y0 = y(s)
        );
    }
    for b in 0..bars {
        let x = left + b as f64 * slot;
        let bw = slot * 0.35;
        let m = stats.share(b);
        out += &format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"#3b6fb6\"><title>{:.2}%</title></rect>\n",
            x + slot * 0.12,
            y(m),
            m * plot_h,
            m * 100.0
        );
        if let Some(p) = PAPER_FIG5.get(b) {
            out += &format!(
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"#aaa\"><title>{:.2}%</title></rect>\n",
                x + slot * 0.12 + bw,
                y(*p),
                p * plot_h,
                p * 100.0
            );
        }
        out += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{b}</text>\n",
            x + slot * 0.47,
            h - bottom + 16.0
        );
    }
    out += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">hops</text>\n</svg>\n",
        left + (w - left) / 2.0,
        h - 12.0
    );
    out
}
