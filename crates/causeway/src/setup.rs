//! `causeway setup` (OP-6): the seed's setup dialogue (the MSE `setup.sh`) for this node's
//! file, docs/ha.md section 10.
//!
//! It asks the seed's questions in the seed's order, each with the current value as its
//! default, shows the summary between `-----BEGIN-----` and `-----END-----`, asks
//! `Is the above information correct (yes, no, or ^):` and writes the node file. Only the
//! items it asks about change: every other line of the file (other sections, comments,
//! layout) stays as it was. The file is written to a temporary name, loaded with
//! `NodeConfig::load`, and only then renamed over the old one, so a value the node would
//! refuse never reaches it.
//!
//! Flags answer their questions; `--yes` answers the confirmation and reads nothing from
//! standard input (a question without a flag keeps its current value).
//!
//! The domain, DNS servers, time zone and NTP servers are the OS's: the node file has no
//! items for them and `NodeConfig` refuses unknown tables (`deny_unknown_fields`), so they
//! are kept as comments (`# host.dns = ["198.18.0.1"]`) for the next run to show.

use std::collections::HashSet;
use std::io::{BufRead, IsTerminal, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use causeway_cluster::config::valid_address;
use causeway_cluster::{ha_prefix_len, ConfigError, HaRole, NodeConfig};

const DEFAULT_CONFIG: &str = "/etc/causeway/causeway.toml";
const HOST_HEADER: &str =
    "# Host settings from 'causeway setup': Causeway does not manage these, the OS does.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The node file to write (default: /etc/causeway/causeway.toml).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Answer "yes" to the confirmation: nothing is read from standard input, and a
    /// question without a flag keeps its current value.
    #[arg(long)]
    yes: bool,
    /// This node's name (node.system_name).
    #[arg(long)]
    hostname: Option<String>,
    /// The host's domain name (the OS's; kept as a comment).
    #[arg(long)]
    domain: Option<String>,
    /// primary, secondary or witness (or 1, 2, 3).
    #[arg(long)]
    role: Option<String>,
    /// The interface that carries node.address.
    #[arg(long)]
    health_monitor_interface: Option<String>,
    /// An interface of its own to the pair peer, or "none".
    #[arg(long)]
    direct_connect_interface: Option<String>,
    /// A primary's virtual IP.
    #[arg(long)]
    virtual_ip: Option<String>,
    /// The virtual IP's netmask: dotted, or a prefix length.
    #[arg(long)]
    netmask: Option<String>,
    /// A primary's secondary, by peer number.
    #[arg(long)]
    secondary: Option<String>,
    /// A secondary's primaries, by peer number: one, or two as "1,3".
    #[arg(long)]
    primaries: Option<String>,
    /// The pair's witness: a peer number, "cluster" or "none".
    #[arg(long)]
    witness: Option<String>,
    /// Start this primary in HA recovery mode: yes or no.
    #[arg(long)]
    recovery_mode: Option<String>,
    /// DNS servers, comma-separated, or "none" (the OS's; kept as a comment).
    #[arg(long)]
    dns: Option<String>,
    /// NTP servers, comma-separated, or "none" (the OS's; kept as a comment).
    #[arg(long)]
    ntp: Option<String>,
    /// The time zone, e.g. UTC (the OS's; kept as a comment).
    #[arg(long)]
    timezone: Option<String>,
    /// This node's health-monitor address (node.address; default: the health-monitor
    /// interface's own address).
    #[arg(long)]
    address: Option<IpAddr>,
    /// The peer list, Peer 1 first (cluster.peers): the pair members and the witness are
    /// peers of one cluster.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
}

/// Why setup stopped without writing.
enum Stop {
    /// A value the node file cannot take (exit EX_USAGE).
    Invalid(String),
    /// Anything else: cancelled, the role switch refused, I/O.
    Failed(String),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Failed(format!("error: {e}"))
    }
}

pub fn run(args: &Args, node: &Path) -> ExitCode {
    match setup(args, node) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Invalid(message)) => {
            eprintln!("{message}");
            ExitCode::from(crate::EXIT_CONFIG)
        }
        Err(Stop::Failed(message)) => {
            eprintln!("{message}");
            ExitCode::FAILURE
        }
    }
}

fn setup(args: &Args, node: &Path) -> Result<(), Stop> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    let current = Current::read(&path, node)?;
    let interfaces = interfaces();
    let answers = Answers::from_current(&current, &interfaces);
    let stdin = std::io::stdin();
    let mut s = Setup {
        initial: answers.clone(),
        answers,
        current,
        interfaces,
        fixed: HashSet::new(),
        open: HashSet::new(),
        ntp_enabled: false,
        input: Input {
            echo: !stdin.is_terminal(),
            stdin: stdin.lock(),
        },
        text: String::new(),
    };
    s.apply_flags(args)?;
    s.initial = s.answers.clone();
    s.ntp_enabled = s.answers.ntp.as_ref().is_some_and(|n| !n.is_empty());
    if args.yes {
        s.text = s
            .check()
            .map_err(|(_, message)| Stop::Invalid(format!("{message}\nNothing was written.")))?;
        s.print_summary();
    } else {
        s.dialogue()?;
    }
    s.apply()
}

// ---------------------------------------------------------------------------------------
// What the file says now

/// The existing node file (everything empty for a new one).
struct Current {
    path: PathBuf,
    /// The file's text; `None` when there is no file yet.
    text: Option<String>,
    lines: Lines,
    /// The file as the node loads it; `None` when it is new or does not load.
    loaded: Option<NodeConfig>,
    role: Option<HaRole>,
    /// `node.data_dir`, or the `--node` directory for a new file.
    data_dir: PathBuf,
    address: String,
    peers: Vec<String>,
}

impl Current {
    fn read(path: &Path, node: &Path) -> Result<Self, Stop> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                return Err(Stop::Failed(format!(
                    "error: reading {}: {e}",
                    path.display()
                )))
            }
        };
        let lines = Lines::parse(text.as_deref().unwrap_or(""));
        let loaded = text.as_ref().and_then(|_| NodeConfig::load(path).ok());
        let string = |table: &str, key: &str| lines.get(table, key).and_then(|v| toml_string(&v));
        let role = string("ha", "role").and_then(|r| parse_role(&r).ok());
        let data_dir = string("node", "data_dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| match node.file_name() {
                Some(name) if name == "admin.sock" => {
                    node.parent().map(Path::to_path_buf).unwrap_or_default()
                }
                _ => node.to_path_buf(),
            });
        let peers = lines
            .get("cluster", "peers")
            .and_then(|v| toml_array(&v))
            .map(|items| items.iter().filter_map(|p| toml_string(p)).collect())
            .unwrap_or_default();
        Ok(Self {
            path: path.to_path_buf(),
            address: string("node", "address").unwrap_or_default(),
            text,
            loaded,
            role,
            data_dir,
            peers,
            lines,
        })
    }

    /// This node's peer number (0 when it is not in the list).
    fn me(&self) -> usize {
        self.peers
            .iter()
            .position(|p| p.eq_ignore_ascii_case(&self.address))
            .map_or(0, |i| i + 1)
    }

    /// The lowest peer number that is neither this node nor in `taken`.
    fn lowest_other_peer(&self, taken: &[usize]) -> Option<usize> {
        (1..=self.peers.len()).find(|p| *p != self.me() && !taken.contains(p))
    }

    fn peer_list(&self) -> String {
        if self.peers.is_empty() {
            return "this file lists no peers in cluster.peers: add the pair's nodes there".into();
        }
        let me = self.me();
        let peers: Vec<String> = self
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let this = if i + 1 == me { " (this node)" } else { "" };
                format!("Peer {} = {p}{this}", i + 1)
            })
            .collect();
        peers.join(", ")
    }
}

/// The answers, starting from the file's values.
#[derive(Clone, Debug)]
struct Answers {
    hostname: String,
    domain: Option<String>,
    /// Whether the node file has an `[ha]` section.
    ha: bool,
    role: HaRole,
    hm_interface: String,
    dc_interface: String,
    virtual_ip: Option<IpAddr>,
    netmask: String,
    secondary: Option<usize>,
    primaries: Vec<usize>,
    /// `None`: not set (the node takes the lowest peer that is not in the pair).
    witness: Option<String>,
    recovery_mode: bool,
    dns: Option<Vec<String>>,
    timezone: Option<String>,
    ntp: Option<Vec<String>>,
    /// From `--address` and `--peers` only.
    address: Option<IpAddr>,
    peers: Vec<String>,
}

impl Answers {
    fn from_current(current: &Current, interfaces: &[String]) -> Self {
        let lines = &current.lines;
        let string = |table: &str, key: &str| lines.get(table, key).and_then(|v| toml_string(&v));
        let host_list = |key: &str| {
            lines
                .host(key)
                .and_then(|v| toml_array(&v))
                .map(|items| items.iter().filter_map(|s| toml_string(s)).collect())
        };
        Self {
            hostname: string("node", "system_name").unwrap_or_else(machine_hostname),
            domain: lines.host("domain").and_then(|v| toml_string(&v)),
            ha: lines.has_table("ha"),
            role: current.role.unwrap_or(HaRole::Primary),
            hm_interface: string("ha", "health_monitor_interface")
                .or_else(|| interfaces.first().cloned())
                .unwrap_or_else(|| "eth0".into()),
            dc_interface: string("ha", "direct_connect_interface").unwrap_or_else(|| "none".into()),
            virtual_ip: string("ha", "virtual_ip").and_then(|v| v.parse().ok()),
            netmask: string("ha", "netmask").unwrap_or_default(),
            secondary: lines
                .get("ha", "secondary")
                .and_then(|v| v.trim().parse().ok()),
            primaries: lines
                .get("ha", "primaries")
                .and_then(|v| toml_array(&v))
                .map(|items| items.iter().filter_map(|p| p.parse().ok()).collect())
                .unwrap_or_default(),
            witness: string("ha", "witness"),
            recovery_mode: lines.get("ha", "recovery_mode").as_deref() == Some("true"),
            dns: host_list("dns"),
            timezone: lines.host("timezone").and_then(|v| toml_string(&v)),
            ntp: host_list("ntp"),
            address: None,
            peers: vec![],
        }
    }

    /// The netmask, or the usual one for the virtual IP's family.
    fn netmask(&self) -> String {
        match (self.netmask.is_empty(), self.virtual_ip) {
            (false, _) => self.netmask.clone(),
            (true, Some(IpAddr::V6(_))) => "64".into(),
            (true, _) => "255.255.255.0".into(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The dialogue

/// The questions, in the seed's order. A `…Gate` is the seed's
/// `Configure …? (Y)es/(S)kip/(U)se default [Yes]:` in front of its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    HostnameGate,
    Hostname,
    DomainGate,
    Domain,
    HaGate,
    Role,
    HmInterface,
    DcInterface,
    VirtualIp,
    Netmask,
    Secondary,
    Primaries,
    Witness,
    RecoveryMode,
    DnsGate,
    Dns,
    TimezoneGate,
    Timezone,
    NtpGate,
    NtpEnable,
    NtpServers,
    Confirm,
}

const STEPS: [Step; 22] = [
    Step::HostnameGate,
    Step::Hostname,
    Step::DomainGate,
    Step::Domain,
    Step::HaGate,
    Step::Role,
    Step::HmInterface,
    Step::DcInterface,
    Step::VirtualIp,
    Step::Netmask,
    Step::Secondary,
    Step::Primaries,
    Step::Witness,
    Step::RecoveryMode,
    Step::DnsGate,
    Step::Dns,
    Step::TimezoneGate,
    Step::Timezone,
    Step::NtpGate,
    Step::NtpEnable,
    Step::NtpServers,
    Step::Confirm,
];

impl Step {
    /// The gate that opens this question's group.
    fn gate(self) -> Step {
        match self {
            Step::Hostname => Step::HostnameGate,
            Step::Domain => Step::DomainGate,
            Step::Role
            | Step::HmInterface
            | Step::DcInterface
            | Step::VirtualIp
            | Step::Netmask
            | Step::Secondary
            | Step::Primaries
            | Step::Witness
            | Step::RecoveryMode => Step::HaGate,
            Step::Dns => Step::DnsGate,
            Step::Timezone => Step::TimezoneGate,
            Step::NtpEnable | Step::NtpServers => Step::NtpGate,
            gate => gate,
        }
    }

    /// The question a node-file field comes from, to go back to when it is refused.
    fn for_field(field: &str) -> Option<Step> {
        Some(match field {
            "node.system_name" => Step::Hostname,
            "ha.virtual_ip" => Step::VirtualIp,
            "ha.netmask" => Step::Netmask,
            "ha.secondary" => Step::Secondary,
            "ha.primaries" => Step::Primaries,
            "ha.witness" => Step::Witness,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Yes,
    Skip,
    UseDefault,
}

enum Flow {
    Next,
    /// `^`: the previous question.
    Back,
    /// `no` at the confirmation: from the first question again.
    Again,
    /// A refused value: back to its question.
    To(Step),
    Done,
}

struct Input {
    stdin: std::io::StdinLock<'static>,
    /// Standard input is not a terminal: echo the answers so the output reads as a dialogue.
    echo: bool,
}

impl Input {
    fn line(&mut self) -> Result<String, Stop> {
        std::io::stdout().flush()?;
        let mut line = String::new();
        if self.stdin.read_line(&mut line)? == 0 {
            println!();
            return Err(Stop::Failed(
                "setup cancelled: standard input ended before the setup was confirmed; nothing was written".into(),
            ));
        }
        let line = line.trim().to_string();
        if self.echo {
            println!("{line}");
        }
        Ok(line)
    }

    /// Asks `prompt [default]:` until `parse` accepts the answer (empty: the default).
    /// `None` is `^`, back to the previous question.
    fn ask<T>(
        &mut self,
        prompt: &str,
        default: &str,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<Option<T>, Stop> {
        loop {
            print!("{prompt} [{default}]: ");
            let line = self.line()?;
            if line == "^" {
                return Ok(None);
            }
            let answer = if line.is_empty() { default } else { &line };
            match parse(answer) {
                Ok(value) => return Ok(Some(value)),
                Err(why) => println!("{why}"),
            }
        }
    }
}

struct Setup {
    current: Current,
    /// The file's values with the flags applied: what "(S)kip" keeps.
    initial: Answers,
    answers: Answers,
    interfaces: Vec<String>,
    /// Questions answered by a flag: not asked.
    fixed: HashSet<Step>,
    /// Gates answered "(Y)es": their questions are asked.
    open: HashSet<Step>,
    ntp_enabled: bool,
    input: Input,
    /// The new file, once checked.
    text: String,
}

impl Setup {
    fn apply_flags(&mut self, args: &Args) -> Result<(), Stop> {
        fn bad(flag: &str, field: &str, why: String) -> Stop {
            Stop::Invalid(format!("error: --{flag} ({field}): {why}"))
        }
        let a = &mut self.answers;
        a.address = args.address;
        a.peers = args.peers.iter().map(|p| p.trim().to_string()).collect();
        let mut fix = |steps: &[Step]| self.fixed.extend(steps);
        if let Some(v) = &args.hostname {
            a.hostname = parse_hostname(v).map_err(|w| bad("hostname", "node.system_name", w))?;
            fix(&[Step::HostnameGate, Step::Hostname]);
        }
        if let Some(v) = &args.domain {
            a.domain = Some(parse_domain(v).map_err(|w| bad("domain", "host.domain", w))?);
            fix(&[Step::DomainGate, Step::Domain]);
        }
        let ha_steps = [
            (&args.role, Step::Role),
            (&args.health_monitor_interface, Step::HmInterface),
            (&args.direct_connect_interface, Step::DcInterface),
            (&args.virtual_ip, Step::VirtualIp),
            (&args.netmask, Step::Netmask),
            (&args.secondary, Step::Secondary),
            (&args.primaries, Step::Primaries),
            (&args.witness, Step::Witness),
            (&args.recovery_mode, Step::RecoveryMode),
        ];
        for (flag, step) in ha_steps {
            if flag.is_some() {
                a.ha = true;
                fix(&[Step::HaGate, step]);
                // The other HA questions are still asked (without --yes).
                self.open.insert(Step::HaGate);
            }
        }
        if let Some(v) = &args.role {
            a.role = parse_role(v).map_err(|w| bad("role", "ha.role", w))?;
        }
        if let Some(v) = &args.health_monitor_interface {
            a.hm_interface = parse_interface(v, &self.interfaces)
                .map_err(|w| bad("health-monitor-interface", "ha.health_monitor_interface", w))?;
        }
        if let Some(v) = &args.direct_connect_interface {
            a.dc_interface = parse_direct_connect(v, &a.hm_interface, &self.interfaces)
                .map_err(|w| bad("direct-connect-interface", "ha.direct_connect_interface", w))?;
        }
        if let Some(v) = &args.virtual_ip {
            a.virtual_ip = Some(parse_ip(v).map_err(|w| bad("virtual-ip", "ha.virtual_ip", w))?);
        }
        if let Some(v) = &args.netmask {
            a.netmask =
                parse_netmask(v, a.virtual_ip).map_err(|w| bad("netmask", "ha.netmask", w))?;
        }
        if let Some(v) = &args.secondary {
            a.secondary = Some(parse_peer(v).map_err(|w| bad("secondary", "ha.secondary", w))?);
        }
        if let Some(v) = &args.primaries {
            a.primaries = parse_peers(v).map_err(|w| bad("primaries", "ha.primaries", w))?;
        }
        if let Some(v) = &args.witness {
            a.witness = Some(parse_witness(v).map_err(|w| bad("witness", "ha.witness", w))?);
        }
        if let Some(v) = &args.recovery_mode {
            a.recovery_mode =
                parse_yes_no(v).map_err(|w| bad("recovery-mode", "ha.recovery_mode", w))?;
        }
        if let Some(v) = &args.dns {
            a.dns = Some(parse_servers(v, false).map_err(|w| bad("dns", "host.dns", w))?);
            fix(&[Step::DnsGate, Step::Dns]);
        }
        if let Some(v) = &args.timezone {
            a.timezone = Some(parse_timezone(v).map_err(|w| bad("timezone", "host.timezone", w))?);
            fix(&[Step::TimezoneGate, Step::Timezone]);
        }
        if let Some(v) = &args.ntp {
            a.ntp = Some(parse_servers(v, false).map_err(|w| bad("ntp", "host.ntp", w))?);
            fix(&[Step::NtpGate, Step::NtpEnable, Step::NtpServers]);
        }
        let primary_only = [
            ("virtual-ip", args.virtual_ip.is_some()),
            ("netmask", args.netmask.is_some()),
            ("secondary", args.secondary.is_some()),
            ("recovery-mode", args.recovery_mode.is_some()),
        ];
        if a.role != HaRole::Primary {
            if let Some((flag, _)) = primary_only.iter().find(|(_, given)| *given) {
                return Err(Stop::Invalid(format!(
                    "error: --{flag} is for a primary, and this node's role is {}: leave it out, or add --role primary",
                    role_name(a.role)
                )));
            }
        }
        if a.role != HaRole::Secondary && args.primaries.is_some() {
            return Err(Stop::Invalid(format!(
                "error: --primaries is for a secondary, and this node's role is {}: leave it out, or add --role secondary",
                role_name(a.role)
            )));
        }
        Ok(())
    }

    /// The questions, one after the other; `^` goes back one, `no` starts over.
    fn dialogue(&mut self) -> Result<(), Stop> {
        let mut asked: Vec<usize> = Vec::new();
        let mut i = 0;
        loop {
            let step = STEPS[i];
            if !self.applies(step) {
                i += 1;
                continue;
            }
            match self.ask(step)? {
                Flow::Next => {
                    asked.push(i);
                    i += 1;
                }
                Flow::Back => {
                    if let Some(previous) = asked.pop() {
                        i = previous;
                    }
                }
                Flow::Again => {
                    asked.clear();
                    i = 0;
                }
                Flow::To(step) => {
                    i = STEPS.iter().position(|s| *s == step).unwrap_or(0);
                    asked.retain(|&k| k < i);
                }
                Flow::Done => return Ok(()),
            }
        }
    }

    fn applies(&self, step: Step) -> bool {
        if self.fixed.contains(&step) {
            return false;
        }
        let open = self.open.contains(&step.gate());
        let role = self.answers.role;
        match step {
            Step::HostnameGate
            | Step::DomainGate
            | Step::HaGate
            | Step::DnsGate
            | Step::TimezoneGate
            | Step::NtpGate
            | Step::Confirm => true,
            Step::VirtualIp | Step::Netmask | Step::Secondary | Step::RecoveryMode => {
                open && role == HaRole::Primary
            }
            Step::Primaries => open && role == HaRole::Secondary,
            Step::DcInterface | Step::Witness => open && role != HaRole::Witness,
            Step::NtpServers => open && self.ntp_enabled,
            _ => open,
        }
    }

    /// A gate: "(Y)es" asks its questions, "(S)kip" keeps the group as it was, "(U)se
    /// default" takes the values in brackets without asking.
    fn gate(&mut self, step: Step, question: &str) -> Result<Flow, Stop> {
        let prompt = format!("{question} (Y)es/(S)kip/(U)se default");
        let Some(gate) = self.input.ask(&prompt, "Yes", parse_gate)? else {
            return Ok(Flow::Back);
        };
        self.open.remove(&step);
        let (a, initial) = (&mut self.answers, &self.initial);
        match (gate, step) {
            (Gate::Yes, _) => {
                self.open.insert(step);
                if step == Step::HaGate {
                    a.ha = true;
                }
            }
            (Gate::Skip, Step::HostnameGate) => a.hostname = initial.hostname.clone(),
            (Gate::Skip, Step::DomainGate) => a.domain = initial.domain.clone(),
            (Gate::Skip, Step::HaGate) => {
                let kept = initial.clone();
                *a = Answers {
                    hostname: a.hostname.clone(),
                    domain: a.domain.clone(),
                    dns: a.dns.clone(),
                    timezone: a.timezone.clone(),
                    ntp: a.ntp.clone(),
                    ..kept
                };
            }
            (Gate::Skip, Step::DnsGate) => a.dns = initial.dns.clone(),
            (Gate::Skip, Step::TimezoneGate) => a.timezone = initial.timezone.clone(),
            (Gate::Skip, Step::NtpGate) => a.ntp = initial.ntp.clone(),
            (Gate::UseDefault, Step::HaGate) => a.ha = true,
            (Gate::UseDefault, Step::DnsGate) => a.dns = Some(current_dns(a)),
            (Gate::UseDefault, Step::TimezoneGate) => a.timezone = Some(current_timezone(a)),
            (Gate::UseDefault, Step::DomainGate) => {
                a.domain = Some(a.domain.clone().unwrap_or_default())
            }
            _ => {}
        }
        Ok(Flow::Next)
    }

    fn ask(&mut self, step: Step) -> Result<Flow, Stop> {
        let peers = self.current.peer_list();
        let interfaces = self.interfaces.clone();
        let a = self.answers.clone();
        macro_rules! ask {
            ($prompt:expr, $default:expr, $parse:expr) => {
                match self.input.ask(&$prompt, &$default, $parse)? {
                    Some(value) => value,
                    None => return Ok(Flow::Back),
                }
            };
        }
        match step {
            Step::HostnameGate => {
                println!("Current hostname=[{}]", a.hostname);
                return self.gate(step, "Configure hostname?");
            }
            Step::Hostname => {
                println!("The host name should be a unique name that can identify");
                println!(
                    "the node on the network. Causeway's peers show it (\"Active as <name>\"):"
                );
                println!("1 to 64 letters, numbers, dashes, underscores or dots.");
                self.answers.hostname = ask!("Enter a host name", a.hostname, parse_hostname);
            }
            Step::DomainGate => {
                println!("Current domain=[{}]", a.domain.unwrap_or_default());
                return self.gate(step, "Configure domain name?");
            }
            Step::Domain => {
                let domain = ask!(
                    "Enter a domain name",
                    a.domain.unwrap_or_default(),
                    parse_domain
                );
                self.answers.domain = Some(domain);
            }
            Step::HaGate => {
                let role = if a.ha { role_title(a.role) } else { "none" };
                println!("Current role=[{role}]");
                return self.gate(step, "Configure High Availability?");
            }
            Step::Role => {
                println!("High availability role for this node (Primary/Secondary; 3 for the witness of a pair)");
                let number = role_number(a.role).to_string();
                self.answers.role = ask!(
                    "Select role [1 for Primary, 2 for Secondary]",
                    number,
                    parse_role
                );
            }
            Step::HmInterface => {
                println!("Health monitor interface holds physical IP address of this node (node.address).");
                println!("This IP address is used by the pair's primary, secondary and witness to communicate among themselves");
                let prompt = format!("Select Health Monitor Interface [{}]", interfaces.join("/"));
                self.answers.hm_interface = ask!(prompt, a.hm_interface, |v: &str| {
                    parse_interface(v, &interfaces)
                });
            }
            Step::DcInterface => {
                println!("Direct connect configuration facilitates use of a direct cable connection between");
                println!(
                    "the primary and secondary nodes. This can help reduce latencies in heartbeat"
                );
                println!(
                    "response times, data replication and failure detection times. Please choose a"
                );
                println!("network interface that you wish to use for direct connect. You should");
                println!("appropriately configure the respective interfaces. \"none\" implies you do not");
                println!("wish to use direct connect configuration.");
                let mut choices = interfaces.clone();
                choices.push("none".into());
                let prompt = format!("Select direct connect interface [{}]", choices.join("/"));
                self.answers.dc_interface = ask!(prompt, a.dc_interface, |v: &str| {
                    parse_direct_connect(v, &a.hm_interface, &interfaces)
                });
            }
            Step::VirtualIp => {
                println!("Enter a Virtual IP address for this primary");
                let vip = a.virtual_ip.map(|v| v.to_string()).unwrap_or_default();
                self.answers.virtual_ip = Some(ask!("Enter Virtual IP address", vip, parse_ip));
            }
            Step::Netmask => {
                let vip = a.virtual_ip;
                println!(
                    "Enter the network mask for IP address {}.",
                    vip.map(|v| v.to_string()).unwrap_or_default()
                );
                self.answers.netmask = ask!("Enter network mask", a.netmask(), |v: &str| {
                    parse_netmask(v, vip)
                });
            }
            Step::Secondary => {
                println!("The secondary that backs up this primary, by its peer number ({peers})");
                let default = a
                    .secondary
                    .or_else(|| self.current.lowest_other_peer(&[]))
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                self.answers.secondary = Some(ask!(
                    "Enter the secondary's peer number",
                    default,
                    parse_peer
                ));
            }
            Step::Primaries => {
                println!("The primaries this secondary backs up, by peer number: one, or two separated by a comma ({peers})");
                let default = if a.primaries.is_empty() {
                    self.current
                        .lowest_other_peer(&[])
                        .map(|p| p.to_string())
                        .unwrap_or_default()
                } else {
                    join(&a.primaries, ",")
                };
                self.answers.primaries =
                    ask!("Enter the primaries' peer numbers", default, parse_peers);
            }
            Step::Witness => {
                println!("The witness gives the pair a majority: a peer that is not in the pair,");
                println!("\"cluster\" (every peer of the cluster votes) or \"none\" ({peers})");
                let in_pair: Vec<usize> = match a.role {
                    HaRole::Primary => a.secondary.into_iter().collect(),
                    _ => a.primaries.clone(),
                };
                let default = a.witness.clone().unwrap_or_else(|| {
                    self.current
                        .lowest_other_peer(&in_pair)
                        .map_or("none".into(), |p| p.to_string())
                });
                self.answers.witness = Some(ask!(
                    "Select the pair's witness [peer number/cluster/none]",
                    default,
                    parse_witness
                ));
            }
            Step::RecoveryMode => {
                println!("Choose to start the server in recovery mode. You should choose yes only if this");
                println!("primary was paired earlier and you have now lost the configuration from this box.");
                println!("And, now you want to restore the configuration from the secondary.");
                self.answers.recovery_mode = ask!(
                    "Do you wish to start this node in HA recovery mode ?: (yes/no)",
                    yes_no(a.recovery_mode),
                    parse_yes_no
                );
            }
            Step::DnsGate => {
                println!("Domain Name Service (DNS) Setup");
                let dns = current_dns(&a);
                if dns.is_empty() {
                    println!("No DNS servers currently defined");
                } else {
                    println!("Current DNS servers=[{}]", dns.join(", "));
                }
                return self.gate(step, "Configure DNS related parameters?");
            }
            Step::Dns => {
                let default = current_dns(&a).join(",");
                let dns = ask!(
                    "Enter DNS server addresses, separated by commas (\"none\" for none)",
                    default,
                    |v: &str| parse_servers(v, true)
                );
                self.answers.dns = Some(dns);
            }
            Step::TimezoneGate => {
                println!("Current timezone=[{}]", current_timezone(&a));
                return self.gate(step, "Configure timezone?");
            }
            Step::Timezone => {
                let tz = ask!(
                    "Enter the time zone (UTC, or a name such as Europe/Paris)",
                    current_timezone(&a),
                    parse_timezone
                );
                self.answers.timezone = Some(tz);
            }
            Step::NtpGate => {
                println!("Network Time Protocol (NTP) Setup.");
                println!("If you choose to enable NTP, the system time will be configured from NTP servers");
                println!("that you select.");
                match a.ntp.as_deref() {
                    Some(servers) if !servers.is_empty() => {
                        println!(
                            "NTP is currently enabled, NTP servers=[{}].",
                            servers.join(", ")
                        )
                    }
                    _ => println!("NTP is currently disabled."),
                }
                return self.gate(step, "Configure NTP related parameters?");
            }
            Step::NtpEnable => {
                self.ntp_enabled = ask!(
                    "Enable NTP (yes/no)",
                    yes_no(self.ntp_enabled),
                    parse_yes_no
                );
                if !self.ntp_enabled {
                    self.answers.ntp = Some(Vec::new());
                }
            }
            Step::NtpServers => {
                let default = a.ntp.unwrap_or_default().join(",");
                let ntp = ask!(
                    "Enter NTP server name or address (several: separated by commas)",
                    default,
                    |v: &str| parse_servers(v, false)
                );
                self.answers.ntp = Some(ntp);
            }
            Step::Confirm => return self.confirm(),
        }
        Ok(Flow::Next)
    }

    fn confirm(&mut self) -> Result<Flow, Stop> {
        match self.check() {
            Ok(text) => self.text = text,
            Err((field, message)) => {
                println!("{message}");
                if let Some(step) = Step::for_field(&field) {
                    self.open.insert(step.gate());
                    if self.applies(step) {
                        return Ok(Flow::To(step));
                    }
                }
                return Err(Stop::Invalid("Nothing was written.".into()));
            }
        }
        self.print_summary();
        println!("You may enter \"yes\" to proceed with configuration, \"no\" to make");
        println!("more changes, or \"^\" to go back to the previous step.");
        if self.current.text.as_deref() != Some(self.text.as_str()) {
            println!("Configuration Changed");
        }
        loop {
            print!("Is the above information correct (yes, no, or ^): ");
            match self.input.line()?.to_ascii_lowercase().as_str() {
                "yes" | "y" => return Ok(Flow::Done),
                "no" | "n" => return Ok(Flow::Again),
                "^" => return Ok(Flow::Back),
                _ => {}
            }
        }
    }

    fn print_summary(&self) {
        let a = &self.answers;
        let mut lines = vec![format!("Host name={}", a.hostname)];
        if let Some(domain) = a.domain.as_ref().filter(|d| !d.is_empty()) {
            lines.push(format!("Domain name={domain}"));
        }
        if a.ha {
            let dc = if a.role == HaRole::Witness {
                "none"
            } else {
                &a.dc_interface
            };
            lines.push(format!(
                "Role={} [{}], Health Monitor Interface={}, Direct connect interface={dc}",
                role_number(a.role),
                role_title(a.role),
                a.hm_interface
            ));
            let witness = match a.witness.as_deref() {
                None => "the lowest peer not in the pair".to_string(),
                Some(w) if w.parse::<usize>().is_ok() => format!("Peer {w}"),
                Some(w) => w.to_string(),
            };
            let peer = |p: &usize| format!("Peer {p}");
            match a.role {
                HaRole::Primary => {
                    lines.push(format!(
                        "Virtual IP Address={}, Virtual IP Netmask={}",
                        a.virtual_ip.map(|v| v.to_string()).unwrap_or_default(),
                        a.netmask()
                    ));
                    let secondary = a.secondary.iter().map(peer).collect::<Vec<_>>();
                    lines.push(format!(
                        "Secondary={}, Witness={witness}",
                        secondary.join("")
                    ));
                    lines.push(format!(
                        "Start in HA recovery mode={}",
                        yes_no(a.recovery_mode)
                    ));
                }
                HaRole::Secondary => {
                    let primaries = a.primaries.iter().map(peer).collect::<Vec<_>>();
                    lines.push(format!(
                        "Primaries={}, Witness={witness}",
                        primaries.join(" and ")
                    ));
                }
                HaRole::Witness => {}
            }
        } else {
            lines.push("High Availability=not configured".into());
        }
        let mut host = a.domain.as_ref().is_some_and(|d| !d.is_empty());
        if let Some(dns) = &a.dns {
            let servers = if dns.is_empty() {
                "none".into()
            } else {
                dns.join(", ")
            };
            lines.push(format!("DNS servers={servers}"));
            host = true;
        }
        if let Some(tz) = &a.timezone {
            lines.push(format!("Time zone={tz}"));
            host = true;
        }
        match a.ntp.as_deref() {
            Some([]) => lines.push("Enable NTP=no".into()),
            Some(servers) => lines.push(format!(
                "Enable NTP=yes, NTP servers={}",
                servers.join(", ")
            )),
            None => {}
        }
        host |= a.ntp.is_some();
        if host {
            lines.push("(Domain name, DNS, time zone and NTP: Causeway does not manage them, the OS does; they are kept as comments in the node file.)".into());
        }
        println!("Node file: {}", self.current.path.display());
        println!("Please verify the following setup information.");
        println!("-----BEGIN-----");
        for line in lines {
            println!("{line}");
        }
        println!("-----END-----");
    }

    /// The new file, checked as the node checks it. `Err((field, message))`.
    fn check(&self) -> Result<String, (String, String)> {
        let text = self.render();
        let path = &self.current.path;
        let scratch =
            std::env::temp_dir().join(format!("causeway-setup-{}.toml", std::process::id()));
        let loaded = std::fs::write(&scratch, &text)
            .map_err(|e| {
                (
                    String::new(),
                    format!("error: writing {}: {e}", scratch.display()),
                )
            })
            .map(|()| NodeConfig::load(&scratch));
        let _ = std::fs::remove_file(&scratch);
        match loaded? {
            Ok(new) => {
                self.same_elsewhere(&new)?;
                Ok(text)
            }
            Err(ConfigError::Field { field, message, .. }) => {
                let message = format!("error: {}: {field}: {message}", path.display());
                Err((field, message))
            }
            Err(ConfigError::Syntax { message, .. }) => Err((
                String::new(),
                format!(
                    "error: {}: {message}: fix the file by hand, then run setup again",
                    path.display()
                ),
            )),
            Err(e) => Err((String::new(), format!("error: {e}"))),
        }
    }

    /// Everything setup does not ask about is as it was (when the old file loaded).
    fn same_elsewhere(&self, new: &NodeConfig) -> Result<(), (String, String)> {
        let Some(old) = &self.current.loaded else {
            return Ok(());
        };
        let mut expected = old.clone();
        expected.node.system_name = new.node.system_name.clone();
        expected.ha = new.ha.clone();
        if serde_json::to_value(&expected).ok() != serde_json::to_value(new).ok() {
            return Err((
                String::new(),
                format!(
                    "error: setup would have changed other items of {} than those it asks about; nothing was written (a bug in setup: please report it)",
                    self.current.path.display()
                ),
            ));
        }
        Ok(())
    }

    /// The old file with the answers in it.
    fn render(&self) -> String {
        let a = &self.answers;
        let mut file = self.current.lines.clone();
        file.set("node", "system_name", quoted(&a.hostname));
        if file.get("node", "data_dir").is_none() {
            file.set(
                "node",
                "data_dir",
                quoted(&self.current.data_dir.display().to_string()),
            );
        }
        if a.ha {
            // The node's address is its health-monitor address: the interface's own, unless
            // the file names one already.
            let unset = file
                .get("node", "address")
                .is_none_or(|v| v.trim_matches('"').is_empty());
            let derived = unset
                .then(|| causeway_ha::vip::interface_address(&a.hm_interface))
                .flatten();
            if let Some(ip) = a.address.or(derived) {
                file.set("node", "address", quoted(&ip.to_string()));
            }
            if !a.peers.is_empty() {
                let list: Vec<String> = a.peers.iter().map(|p| quoted(p)).collect();
                file.set("cluster", "peers", format!("[{}]", list.join(", ")));
            }
            file.set("ha", "role", quoted(role_name(a.role)));
            file.set("ha", "health_monitor_interface", quoted(&a.hm_interface));
            if a.role != HaRole::Witness {
                file.set("ha", "direct_connect_interface", quoted(&a.dc_interface));
                if let Some(w) = &a.witness {
                    file.set("ha", "witness", quoted(w));
                }
            }
            let mut remove = vec![];
            match a.role {
                HaRole::Primary => {
                    match a.virtual_ip {
                        Some(vip) => file.set("ha", "virtual_ip", quoted(&vip.to_string())),
                        None => remove.push("virtual_ip"),
                    }
                    file.set("ha", "netmask", quoted(&a.netmask()));
                    match a.secondary {
                        Some(p) => file.set("ha", "secondary", p.to_string()),
                        None => remove.push("secondary"),
                    }
                    file.set("ha", "recovery_mode", a.recovery_mode.to_string());
                    remove.push("primaries");
                }
                HaRole::Secondary => {
                    file.set("ha", "primaries", format!("[{}]", join(&a.primaries, ", ")));
                    remove.extend(["virtual_ip", "netmask", "secondary", "recovery_mode"]);
                }
                HaRole::Witness => remove.extend([
                    "direct_connect_interface",
                    "witness",
                    "virtual_ip",
                    "netmask",
                    "secondary",
                    "recovery_mode",
                    "primaries",
                ]),
            }
            for key in remove {
                file.remove("ha", key);
            }
        }
        let list = |items: &[String]| {
            let quoted: Vec<String> = items.iter().map(|s| quoted(s)).collect();
            format!("[{}]", quoted.join(", "))
        };
        let mut host = vec![];
        if let Some(d) = a.domain.as_ref().filter(|d| !d.is_empty()) {
            host.push(("domain", quoted(d)));
        }
        if let Some(dns) = a.dns.as_ref().filter(|d| !d.is_empty()) {
            host.push(("dns", list(dns)));
        }
        if let Some(tz) = &a.timezone {
            host.push(("timezone", quoted(tz)));
        }
        if let Some(ntp) = a.ntp.as_ref().filter(|n| !n.is_empty()) {
            host.push(("ntp", list(ntp)));
        }
        file.set_host(&host);
        file.text()
    }

    /// Refuses a role switch while the node runs; writes the file.
    fn apply(&self) -> Result<(), Stop> {
        let path = &self.current.path;
        let new_role = self.answers.ha.then_some(self.answers.role);
        if self.answers.ha || self.current.role.is_some() {
            println!("Applying High Availability configuration");
        }
        if self.current.text.is_some()
            && self.current.role != new_role
            && node_runs(&self.current.data_dir)
        {
            return Err(Stop::Failed(format!(
                "*** User has switched roles for this node. Causeway must be stopped before switching roles. ***\n\
                 Please stop Causeway and then re-run setup.\n\
                 ERROR: The configuration was not applied: {} is unchanged.",
                path.display()
            )));
        }
        write_checked(path, &self.text)?;
        println!(
            "Success: {} written. Causeway reads it at start: restart the node to apply it.",
            path.display()
        );
        Ok(())
    }
}

/// Whether the node of `data_dir` runs: its admin socket answers.
fn node_runs(data_dir: &Path) -> bool {
    causeway_admin::client::get_json(&data_dir.join("admin.sock"), "/api/v1/status/cluster").is_ok()
}

/// Writes `text` next to `path`, loads it as the node would, then renames it over `path`
/// (a crash leaves the old file or the new one, never half of one).
fn write_checked(path: &Path, text: &str) -> Result<(), Stop> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".setup-new");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(text.as_bytes())?;
        if let Ok(old) = std::fs::metadata(path) {
            file.set_permissions(old.permissions())?;
        }
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Stop::Failed(format!(
            "error: writing {}: {e}",
            tmp.display()
        )));
    }
    if let Err(e) = NodeConfig::load(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Stop::Invalid(format!(
            "error: {e} (nothing was written: {} is unchanged)",
            path.display()
        )));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Stop::Failed(format!(
            "error: renaming {} to {}: {e}",
            tmp.display(),
            path.display()
        ))
    })
}

// ---------------------------------------------------------------------------------------
// The machine

/// The machine's network interfaces, but `lo`.
fn interfaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name != "lo")
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "causeway".into())
}

/// The DNS servers recorded in the node file, else the OS's (/etc/resolv.conf).
fn current_dns(a: &Answers) -> Vec<String> {
    if let Some(dns) = &a.dns {
        return dns.clone();
    }
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The time zone recorded in the node file, else the OS's, else UTC.
fn current_timezone(a: &Answers) -> String {
    if let Some(tz) = &a.timezone {
        return tz.clone();
    }
    let from_file = std::fs::read_to_string("/etc/timezone")
        .ok()
        .map(|t| t.trim().to_string());
    let from_link = || {
        let link = std::fs::read_link("/etc/localtime").ok()?;
        let link = link.to_string_lossy();
        Some(link.split_once("zoneinfo/")?.1.to_string())
    };
    from_file
        .filter(|t| !t.is_empty())
        .or_else(from_link)
        .unwrap_or_else(|| "UTC".into())
}

// ---------------------------------------------------------------------------------------
// Answers: each parser says what is wrong and what to enter instead

fn parse_gate(v: &str) -> Result<Gate, String> {
    match v.to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(Gate::Yes),
        "s" | "skip" => Ok(Gate::Skip),
        "u" | "use default" | "default" => Ok(Gate::UseDefault),
        _ => Err("Enter Y (yes), S (skip) or U (use default), or ^ to go back.".into()),
    }
}

fn parse_hostname(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "'{v}' is not a host name: use 1 to 64 letters, numbers, '-', '_' or '.'"
        ))
    }
}

fn parse_domain(v: &str) -> Result<String, String> {
    if v.is_empty() || v == "none" {
        return Ok(String::new());
    }
    if valid_address(v) && v.parse::<IpAddr>().is_err() {
        Ok(v.to_string())
    } else {
        Err(format!("'{v}' is not a domain name (such as example.com)"))
    }
}

fn parse_role(v: &str) -> Result<HaRole, String> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "primary" => Ok(HaRole::Primary),
        "2" | "secondary" => Ok(HaRole::Secondary),
        "3" | "witness" => Ok(HaRole::Witness),
        _ => Err(format!(
            "'{v}' is not a role: enter 1 (primary), 2 (secondary) or 3 (witness)"
        )),
    }
}

fn parse_interface(v: &str, interfaces: &[String]) -> Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 15
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c));
    if !ok || v == "none" {
        return Err(format!("'{v}' is not an interface name (such as eth0)"));
    }
    if !interfaces.is_empty() && !interfaces.iter().any(|i| i == v) {
        eprintln!(
            "warning: this machine has no interface {v} (it has {}): the node will need it where it runs",
            interfaces.join(", ")
        );
    }
    Ok(v.to_string())
}

fn parse_direct_connect(v: &str, hm: &str, interfaces: &[String]) -> Result<String, String> {
    if v == "none" {
        return Ok(v.to_string());
    }
    if v == hm {
        return Err(format!(
            "{v} is the health-monitor interface: direct connect needs another interface, or \"none\""
        ));
    }
    parse_interface(v, interfaces)
}

fn parse_ip(v: &str) -> Result<IpAddr, String> {
    v.parse()
        .map_err(|_| format!("'{v}' is not an IP address (such as 198.18.0.10)"))
}

fn parse_netmask(v: &str, vip: Option<IpAddr>) -> Result<String, String> {
    let vip = vip.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    ha_prefix_len(v, vip)?;
    Ok(v.to_string())
}

fn parse_peer(v: &str) -> Result<usize, String> {
    match v.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "'{v}' is not a peer number: enter the node's position in cluster.peers (1, 2, …)"
        )),
    }
}

fn parse_peers(v: &str) -> Result<Vec<usize>, String> {
    let peers = v
        .split([',', ' '])
        .filter(|p| !p.is_empty())
        .map(parse_peer)
        .collect::<Result<Vec<_>, _>>()?;
    if peers.is_empty() || peers.len() > 2 || (peers.len() == 2 && peers[0] == peers[1]) {
        return Err(format!(
            "'{v}': a secondary backs up one or two primaries: enter one peer number, or two as 1,3"
        ));
    }
    Ok(peers)
}

fn parse_witness(v: &str) -> Result<String, String> {
    let v = v.to_ascii_lowercase();
    if v == "cluster" || v == "none" || parse_peer(&v).is_ok() {
        Ok(v)
    } else {
        Err(format!(
            "'{v}' is not a witness: enter a peer number, \"cluster\" or \"none\""
        ))
    }
}

fn parse_yes_no(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "y" | "yes" => Ok(true),
        "n" | "no" => Ok(false),
        _ => Err(format!("'{v}': enter yes or no")),
    }
}

/// Comma-separated servers; "none" for none when `none_ok`.
fn parse_servers(v: &str, none_ok: bool) -> Result<Vec<String>, String> {
    if v == "none" {
        return Ok(vec![]);
    }
    let servers: Vec<String> = v
        .split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(bad) = servers.iter().find(|s| !valid_address(s)) {
        return Err(format!("'{bad}' is not an IP address or a host name"));
    }
    if servers.is_empty() && !none_ok {
        return Err("enter at least one server, or \"none\"".into());
    }
    Ok(servers)
}

fn parse_timezone(v: &str) -> Result<String, String> {
    let ok = !v.is_empty()
        && !v.starts_with('/')
        && !v.contains("..")
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_+-".contains(c));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "'{v}' is not a time zone: enter UTC or a name such as Europe/Paris"
        ))
    }
}

fn role_number(role: HaRole) -> u8 {
    match role {
        HaRole::Primary => 1,
        HaRole::Secondary => 2,
        HaRole::Witness => 3,
    }
}

/// As in the node file.
fn role_name(role: HaRole) -> &'static str {
    match role {
        HaRole::Primary => "primary",
        HaRole::Secondary => "secondary",
        HaRole::Witness => "witness",
    }
}

/// As the seed shows it.
fn role_title(role: HaRole) -> &'static str {
    match role {
        HaRole::Primary => "Primary",
        HaRole::Secondary => "Secondary",
        HaRole::Witness => "Witness",
    }
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn join(numbers: &[usize], separator: &str) -> String {
    let numbers: Vec<String> = numbers.iter().map(usize::to_string).collect();
    numbers.join(separator)
}

// ---------------------------------------------------------------------------------------
// The node file as lines
//
// (The `toml` crate is not a dependency of this binary, and its tables would not keep
// comments and layout anyway: setup edits the lines of the keys it asks about and leaves
// every other line alone. The result is checked with `NodeConfig::load` before it is used.)

/// A TOML file as its lines: tables (`[name]`), `key = value` entries, and values that run
/// over several lines (arrays, multi-line strings).
#[derive(Clone, Debug, Default)]
struct Lines {
    lines: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    /// `[name]`
    Header(String),
    /// The first line of `key = …`.
    Key(String),
    /// A later line of a value.
    More,
    /// Blank or a comment.
    Other,
}

impl Lines {
    fn parse(text: &str) -> Self {
        Self {
            lines: text.lines().map(str::to_string).collect(),
        }
    }

    fn text(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }

    fn kinds(&self) -> Vec<Kind> {
        let mut depth = 0usize;
        let mut open: Option<&'static str> = None;
        self.lines
            .iter()
            .map(|line| {
                if open.is_some() || depth > 0 {
                    scan(line, &mut depth, &mut open);
                    return Kind::More;
                }
                let t = line.trim();
                if t.is_empty() || t.starts_with('#') {
                    Kind::Other
                } else if t.starts_with('[') {
                    let name = t.trim_start_matches('[').split(']').next().unwrap_or("");
                    Kind::Header(name.trim().to_string())
                } else {
                    let (key, value) = t.split_once('=').unwrap_or((t, ""));
                    scan(value, &mut depth, &mut open);
                    Kind::Key(key.trim().trim_matches('"').to_string())
                }
            })
            .collect()
    }

    fn has_table(&self, name: &str) -> bool {
        self.table(&self.kinds(), name).is_some()
    }

    /// Table `name`'s lines after its header, up to the next header: `start..end`.
    fn table(&self, kinds: &[Kind], name: &str) -> Option<(usize, usize)> {
        let header = kinds
            .iter()
            .position(|k| matches!(k, Kind::Header(n) if n == name))?;
        let end = (header + 1..kinds.len())
            .find(|&i| matches!(kinds[i], Kind::Header(_)))
            .unwrap_or(kinds.len());
        Some((header + 1, end))
    }

    /// The lines of `key`'s entry in `table`: `start..end`.
    fn entry(&self, kinds: &[Kind], table: &str, key: &str) -> Option<(usize, usize)> {
        let (start, end) = self.table(kinds, table)?;
        let first = (start..end).find(|&i| matches!(&kinds[i], Kind::Key(k) if k == key))?;
        let last = (first + 1..end)
            .take_while(|&i| kinds[i] == Kind::More)
            .last()
            .unwrap_or(first);
        Some((first, last + 1))
    }

    /// The value of `key` in `table`, as written (comments removed).
    fn get(&self, table: &str, key: &str) -> Option<String> {
        let (start, end) = self.entry(&self.kinds(), table, key)?;
        let value: Vec<&str> = self.lines[start..end]
            .iter()
            .map(|l| strip_comment(l))
            .collect();
        Some(value.join("\n").split_once('=')?.1.trim().to_string())
    }

    /// Sets `key = value` in `table`: in place when the key is there, else after the
    /// table's last entry (a table that is missing is added at the end).
    fn set(&mut self, table: &str, key: &str, value: String) {
        let kinds = self.kinds();
        let line = format!("{key} = {value}");
        if let Some((start, end)) = self.entry(&kinds, table, key) {
            self.lines.splice(start..end, [line]);
            return;
        }
        match self.table(&kinds, table) {
            Some((start, end)) => {
                let at = (start..end)
                    .rev()
                    .find(|&i| matches!(kinds[i], Kind::Key(_) | Kind::More))
                    .map_or(start, |i| i + 1);
                self.lines.insert(at, line);
            }
            None => {
                if self.lines.last().is_some_and(|l| !l.trim().is_empty()) {
                    self.lines.push(String::new());
                }
                self.lines.push(format!("[{table}]"));
                self.lines.push(line);
            }
        }
    }

    fn remove(&mut self, table: &str, key: &str) {
        if let Some((start, end)) = self.entry(&self.kinds(), table, key) {
            self.lines.drain(start..end);
        }
    }

    /// A host setting kept as a comment: `# host.<key> = <value>`.
    fn host(&self, key: &str) -> Option<String> {
        let prefix = format!("# host.{key}");
        self.lines.iter().find_map(|l| {
            let (k, v) = l.trim().split_once('=')?;
            (k.trim() == prefix).then(|| v.trim().to_string())
        })
    }

    /// Replaces the host settings (comments) with `settings`, above the first table.
    fn set_host(&mut self, settings: &[(&str, String)]) {
        let before = self.lines.len();
        self.lines
            .retain(|l| !l.starts_with("# host.") && l != HOST_HEADER);
        if settings.is_empty() {
            return;
        }
        let kinds = self.kinds();
        let mut at = kinds
            .iter()
            .position(|k| matches!(k, Kind::Header(_)))
            .unwrap_or(kinds.len());
        // One blank line between the block and what is around it (not one more per run).
        if before != self.lines.len() {
            while at > 0 && self.lines[at - 1].trim().is_empty() {
                at -= 1;
                self.lines.remove(at);
            }
        }
        let mut block = vec![];
        if at > 0 && !self.lines[at - 1].trim().is_empty() {
            block.push(String::new());
        }
        block.push(HOST_HEADER.to_string());
        block.extend(settings.iter().map(|(k, v)| format!("# host.{k} = {v}")));
        if at < self.lines.len() {
            block.push(String::new());
        }
        self.lines.splice(at..at, block);
    }
}

/// Follows strings and brackets through `text`, the rest of a line after `key =`, so that
/// the next lines are known to continue the value while a bracket or a `"""` is open.
fn scan(text: &str, depth: &mut usize, open: &mut Option<&'static str>) {
    let mut rest = text;
    loop {
        if let Some(delimiter) = *open {
            match rest.find(delimiter) {
                Some(i) => {
                    rest = &rest[i + 3..];
                    *open = None;
                }
                None => return,
            }
        }
        let Some(i) = rest.find(['"', '\'', '#', '[', ']', '{', '}']) else {
            return;
        };
        rest = &rest[i..];
        match rest.as_bytes()[0] {
            b'#' => return,
            b'[' | b'{' => {
                *depth += 1;
                rest = &rest[1..];
            }
            b']' | b'}' => {
                *depth = depth.saturating_sub(1);
                rest = &rest[1..];
            }
            quote => {
                let triple = if quote == b'"' { "\"\"\"" } else { "'''" };
                if rest.starts_with(triple) {
                    *open = Some(triple);
                    rest = &rest[3..];
                    continue;
                }
                match string_end(rest) {
                    Some(end) => rest = &rest[end..],
                    None => return,
                }
            }
        }
    }
}

/// Where the one-line string at the start of `text` ends (after its closing quote).
fn string_end(text: &str) -> Option<usize> {
    let quote = text.chars().next()?;
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        if escaped {
            escaped = false;
        } else if c == '\\' && quote == '"' {
            escaped = true;
        } else if c == quote {
            return Some(i + 1);
        }
    }
    None
}

/// The line without its comment (a `#` outside strings).
fn strip_comment(line: &str) -> &str {
    let mut i = 0;
    while let Some(found) = line[i..].find(['"', '\'', '#']) {
        let at = i + found;
        if line.as_bytes()[at] == b'#' {
            return &line[..at];
        }
        match string_end(&line[at..]) {
            Some(end) => i = at + end,
            None => return line,
        }
    }
    line
}

/// A one-line TOML string's value.
fn toml_string(raw: &str) -> Option<String> {
    let raw = raw.trim();
    if let Some(literal) = raw.strip_prefix('\'') {
        return literal.strip_suffix('\'').map(str::to_string);
    }
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        out.push(match c {
            '\\' => match chars.next()? {
                'n' => '\n',
                't' => '\t',
                '"' => '"',
                '\\' => '\\',
                _ => return None,
            },
            c => c,
        });
    }
    Some(out)
}

/// The items of a TOML array of scalars, as written.
fn toml_array(raw: &str) -> Option<Vec<String>> {
    let inner = raw.trim().strip_prefix('[')?.strip_suffix(']')?;
    Some(
        inner
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
    )
}

fn quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# top\n[node]\nsystem_name = \"a\" # the name\ndata_dir = \"/d\"\n\n[cluster]\npeers = [\n  \"1.1.1.1\", # one\n  \"1.1.1.2\",\n]\nport = 4372\n\n[sip]\nudp_port = 5060\n";

    #[test]
    fn lines_change_only_the_keys_they_are_told() {
        let mut f = Lines::parse(FILE);
        assert_eq!(f.get("node", "system_name").as_deref(), Some("\"a\""));
        let peers = toml_array(&f.get("cluster", "peers").unwrap()).unwrap();
        assert_eq!(peers, ["\"1.1.1.1\"", "\"1.1.1.2\""]);
        assert_eq!(f.get("cluster", "port").as_deref(), Some("4372"));
        f.set("node", "system_name", quoted("b"));
        f.set("cluster", "name", quoted("c.example"));
        f.set("ha", "role", quoted("primary"));
        f.remove("cluster", "peers");
        assert_eq!(
            f.text(),
            "# top\n[node]\nsystem_name = \"b\"\ndata_dir = \"/d\"\n\n[cluster]\nport = 4372\n\
             name = \"c.example\"\n\n[sip]\nudp_port = 5060\n\n[ha]\nrole = \"primary\"\n"
        );
    }

    #[test]
    fn host_settings_are_comments_above_the_first_table_and_replaced_on_each_run() {
        let mut f = Lines::parse(FILE);
        f.set_host(&[("timezone", quoted("UTC"))]);
        f.set_host(&[
            ("timezone", quoted("UTC")),
            ("ntp", "[\"ntp.example\"]".into()),
        ]);
        let text = f.text();
        assert!(text.starts_with(&format!(
            "# top\n\n{HOST_HEADER}\n# host.timezone = \"UTC\"\n# host.ntp = [\"ntp.example\"]\n\n[node]\n"
        )), "{text}");
        assert_eq!(f.host("timezone").as_deref(), Some("\"UTC\""));
    }

    #[test]
    fn strings_and_comments() {
        assert_eq!(toml_string("\"a\\\"b\"").as_deref(), Some("a\"b"));
        assert_eq!(toml_string("'x'").as_deref(), Some("x"));
        assert_eq!(strip_comment("a = \"#x\" # c"), "a = \"#x\" ");
    }
}
