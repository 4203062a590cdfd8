//! `causeway lab ha up|down`: an HA pair and its witness in network namespaces (docs/ha.md,
//! section 10). Five namespaces: `<prefix>-br` holds a bridge; `<prefix>-p`, `-s`, `-w` run
//! the primary, secondary and witness on `<subnet>.11`, `.12`, `.13`; `<prefix>-c` is a
//! client on `.100`. The virtual IP is `<subnet>.10/24` and answers SIP on UDP 5060.
//!
//! Root only (namespaces and the virtual IP need CAP_SYS_ADMIN and CAP_NET_ADMIN). Traffic
//! stays inside the namespaces; `down` stops what `up` started, by PID, and removes them.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

const CLUSTER_NAME: &str = "ha.lab.example";
/// Every lab node with SIP listens on the standard ports, without TLS.
const SIP_PORTS: &str = "udp_port = 5060\ntcp_port = 5060\ntls_port = 0\n";
/// Role, namespace suffix, host number; Peer N is the Nth row.
const ROLES: [(&str, &str, u8); 4] = [
    ("primary", "p", 11),
    ("secondary", "s", 12),
    ("witness", "w", 13),
    // Only with --second-primary (N:1): a second pair, same secondary and witness.
    ("primary2", "p2", 14),
];

/// How `lab ha up` builds the pair (its command-line flags).
#[derive(clap::Args)]
pub struct Options {
    #[arg(long, default_value = "cwha")]
    pub prefix: String,
    #[arg(long, default_value = "198.18.0")]
    pub subnet: String,
    /// The pair's failover type: automatic or manual.
    #[arg(long, default_value = "automatic")]
    pub failover: String,
    /// Add a second primary (<subnet>.14, virtual IP <subnet>.20) that the same secondary
    /// backs up (N:1).
    #[arg(long)]
    pub second_primary: bool,
    /// The pair runs without a witness (split brain is then possible, and said).
    #[arg(long)]
    pub no_witness: bool,
    /// Every peer of the cluster votes for the pair (witness = "cluster").
    #[arg(long, conflicts_with = "no_witness")]
    pub cluster_witness: bool,
    /// A cable (eth1, in the other /15 half) between primary and secondary for
    /// direct-connect heartbeats.
    #[arg(long)]
    pub direct_connect: bool,
}

impl Options {
    fn roles(&self) -> &'static [(&'static str, &'static str, u8)] {
        if self.second_primary {
            &ROLES
        } else {
            &ROLES[..3]
        }
    }
}

/// What `up` made, for `down` and for tests (`DIR/lab-ha.json`).
#[derive(Serialize, Deserialize, Default)]
pub struct HaLab {
    pub prefix: String,
    pub subnet: String,
    pub vip: String,
    pub namespaces: Vec<String>,
    /// role → (namespace, address, PID)
    pub nodes: Vec<(String, String, String, i32)>,
    pub client_namespace: String,
}

fn run_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running 'ip' (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn existing_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn is_our_node(pid: i32, config: &Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let c = String::from_utf8_lossy(&c);
        c.contains("causeway") && c.contains(&*config.to_string_lossy())
    })
}

fn node_dir(dir: &Path, role: &str) -> PathBuf {
    dir.join(role)
}

pub fn up(dir: &Path, options: &Options) -> anyhow::Result<()> {
    let (prefix, subnet) = (options.prefix.as_str(), options.subnet.as_str());
    if !matches!(options.failover.as_str(), "automatic" | "manual") {
        bail!("--failover is automatic or manual");
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("'lab ha up' makes network namespaces and moves a virtual IP: run it as root");
    }
    if prefix.len() > 8 || !prefix.chars().all(|c| c.is_ascii_alphanumeric()) {
        bail!("--prefix must be 1 to 8 letters or digits (interface names are short)");
    }
    let octets: Vec<u8> = subnet.split('.').filter_map(|o| o.parse().ok()).collect();
    if octets.len() != 3 || octets[0] != 198 || !(18..=19).contains(&octets[1]) {
        bail!("--subnet must be three octets inside 198.18.0.0/15, like 198.18.0");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    if dir.join("lab-ha.json").exists() {
        bail!(
            "{} holds an HA lab already: run 'causeway lab ha down --dir {}' first",
            dir.display(),
            dir.display()
        );
    }
    let ns = |x: &str| format!("{prefix}-{x}");
    let all: Vec<String> = ["br", "p", "s", "w", "c", "p2"]
        .iter()
        .map(|x| ns(x))
        .collect();
    let existing = existing_namespaces();
    if let Some(clash) = all.iter().find(|n| existing.contains(n)) {
        bail!("network namespace {clash} exists already: remove it, or use another --prefix");
    }
    let vip = format!("{subnet}.10");
    let mut lab = HaLab {
        prefix: prefix.to_string(),
        subnet: subnet.to_string(),
        vip: vip.clone(),
        namespaces: vec![],
        nodes: vec![],
        client_namespace: ns("c"),
    };
    let result = build(&dir, &mut lab, options, &ns);
    // Saved whatever happened, so `down` can remove what was made.
    std::fs::write(dir.join("lab-ha.json"), serde_json::to_vec_pretty(&lab)?)?;
    if let Err(e) = result {
        let _ = down(&dir);
        return Err(e);
    }
    println!();
    println!(
        "HA lab is up in {}: virtual IP {vip} answers SIP OPTIONS on UDP 5060.",
        dir.display()
    );
    for (role, n, addr, pid) in &lab.nodes {
        println!(
            "  {role:<9} netns {n:<10} {addr:<14} PID {pid:<7} log {}",
            node_dir(&dir, role).join("causeway.log").display()
        );
    }
    println!("  client    netns {}", lab.client_namespace);
    println!();
    println!(
        "  causeway --node {} gethainfo",
        node_dir(&dir, "primary").display()
    );
    println!(
        "  causeway --node {} ha switchover",
        node_dir(&dir, "primary").display()
    );
    println!("  causeway lab ha down --dir {}", dir.display());
    Ok(())
}

fn build(
    dir: &Path,
    lab: &mut HaLab,
    options: &Options,
    ns: &dyn Fn(&str) -> String,
) -> anyhow::Result<()> {
    let roles = options.roles();
    let subnet = lab.subnet.clone();
    let br = ns("br");
    run_ip(&["netns", "add", &br])?;
    lab.namespaces.push(br.clone());
    run_ip(&["-n", &br, "link", "set", "lo", "up"])?;
    run_ip(&[
        "-n",
        &br,
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "stp_state",
        "0",
        "forward_delay",
        "0",
    ])?;
    run_ip(&["-n", &br, "link", "set", "br0", "up"])?;
    let mut hosts: Vec<(&str, u8)> = roles.iter().map(|(_, x, h)| (*x, *h)).collect();
    hosts.push(("c", 100));
    for (x, host) in hosts {
        let n = ns(x);
        run_ip(&["netns", "add", &n])?;
        lab.namespaces.push(n.clone());
        run_ip(&["-n", &n, "link", "set", "lo", "up"])?;
        let outer = format!("v-{}-{x}", lab.prefix);
        run_ip(&[
            "-n", &br, "link", "add", &outer, "type", "veth", "peer", "name", "eth0", "netns", &n,
        ])?;
        run_ip(&["-n", &br, "link", "set", &outer, "master", "br0", "up"])?;
        run_ip(&[
            "-n",
            &n,
            "addr",
            "add",
            &format!("{subnet}.{host}/24"),
            "dev",
            "eth0",
        ])?;
        run_ip(&["-n", &n, "link", "set", "eth0", "up"])?;
    }
    if options.direct_connect {
        // The other half of 198.18.0.0/15, so the cable never shares the HM subnet.
        let cable = match subnet.strip_prefix("198.18.") {
            Some(rest) => format!("198.19.{rest}"),
            None => format!("198.18.{}", subnet.trim_start_matches("198.19.")),
        };
        let (p, s) = (ns("p"), ns("s"));
        run_ip(&[
            "-n", &p, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1", "netns", &s,
        ])?;
        run_ip(&[
            "-n",
            &p,
            "addr",
            "add",
            &format!("{cable}.1/30"),
            "dev",
            "eth1",
        ])?;
        run_ip(&[
            "-n",
            &s,
            "addr",
            "add",
            &format!("{cable}.2/30"),
            "dev",
            "eth1",
        ])?;
        run_ip(&["-n", &p, "link", "set", "eth1", "up"])?;
        run_ip(&["-n", &s, "link", "set", "eth1", "up"])?;
    }
    let ca_dir = dir.join("ca");
    let ca = causeway_pki::ca_init(&ca_dir, "Causeway HA lab CA")?;
    let exe = std::env::current_exe().context("finding the causeway binary")?;
    let peers: Vec<String> = roles
        .iter()
        .map(|(_, _, h)| format!("\"{subnet}.{h}\""))
        .collect();
    let witness = match (options.no_witness, options.cluster_witness) {
        (true, _) => "none",
        (_, true) => "cluster",
        _ => "3",
    };
    let primaries = if options.second_primary {
        "[1, 4]"
    } else {
        "[1]"
    };
    for &(role, x, host) in roles {
        let nd = node_dir(dir, role);
        std::fs::create_dir_all(&nd)?;
        let address = format!("{subnet}.{host}");
        let subject = causeway_pki::parse_subject_args(&[format!("CN:{address}")])?;
        let (_, csr) = causeway_pki::csr(&nd, "node", &subject)?;
        causeway_pki::sign_csr(&csr, &ca, 825, &nd.join("node.crt"))?;
        std::fs::copy(&ca.cert, nd.join("ca.crt"))?;
        let own_vip = if role == "primary2" {
            format!("{subnet}.20")
        } else {
            lab.vip.clone()
        };
        let files = nd.join("files");
        std::fs::create_dir_all(&files)?;
        let mut files = format!("files_dir = \"{}\"\n", files.display());
        if options.direct_connect && (role == "primary" || role == "secondary") {
            files.push_str("direct_connect_interface = \"eth1\"\n");
        }
        let ha = match role {
            "primary" | "primary2" => format!(
                "role = \"primary\"\nhealth_monitor_interface = \"eth0\"\nvirtual_ip = \"{own_vip}\"\n\
                 netmask = \"255.255.255.0\"\nsecondary = 2\nwitness = \"{witness}\"\n\
                 failover = \"{}\"\nfailback = \"manual\"\n{files}",
                options.failover
            ),
            "secondary" => format!("role = \"secondary\"\nhealth_monitor_interface = \"eth0\"\nprimaries = {primaries}\nwitness = \"{witness}\"\n{files}"),
            _ => "role = \"witness\"\nhealth_monitor_interface = \"eth0\"\n".to_string(),
        };
        let sip = match role {
            "witness" => String::new(),
            // The secondary answers on every primary's virtual IP it may take.
            "secondary" if options.second_primary => format!(
                "\n[sip]\nlisten = \"{}\"\nalso_listen = [\"{subnet}.20\"]\n{SIP_PORTS}",
                lab.vip
            ),
            "secondary" => format!("\n[sip]\nlisten = \"{}\"\n{SIP_PORTS}", lab.vip),
            _ => format!("\n[sip]\nlisten = \"{own_vip}\"\n{SIP_PORTS}"),
        };
        let config = format!(
            "# Generated by 'causeway lab ha up'.\n\
             [node]\nsystem_name = \"{}\"\naddress = \"{address}\"\ndata_dir = \"{}\"\n\n\
             [cluster]\nname = \"{CLUSTER_NAME}\"\nconfiguration_primary = 1\nip_version = \"IPv4\"\n\
             tls_verification = \"Enforce\"\npeers = [{}]\nport = {}\n{sip}\n[ha]\n{ha}",
            ns(x),
            nd.display(),
            peers.join(", "),
            causeway_cluster::config::DEFAULT_CLUSTER_PORT
        );
        std::fs::write(nd.join("causeway.toml"), config)?;
    }
    let mut children = vec![];
    for &(role, x, host) in roles {
        let nd = node_dir(dir, role);
        let log = std::fs::File::create(nd.join("causeway.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns(x)])
            .arg(&exe)
            .arg("run")
            .arg("--config")
            .arg(nd.join("causeway.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting the {role}"))?;
        // `ip netns exec` execs the program: the child's PID is the node's.
        let pid = child.id() as i32;
        std::fs::write(nd.join("causeway.pid"), format!("{pid}\n"))?;
        lab.nodes
            .push((role.to_string(), ns(x), format!("{subnet}.{host}"), pid));
        children.push(child);
    }
    wait_until_paired(dir, lab, &mut children)
}

/// Waits until the primary is `PRIMARY_ACTIVE`, the secondary `SECONDARY_ACTIVE` and the
/// virtual IP answers an OPTIONS from the client namespace.
fn wait_until_paired(
    dir: &Path,
    lab: &HaLab,
    children: &mut [std::process::Child],
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut shown = String::new();
    loop {
        let state = |role: &str| {
            causeway_admin::client::get_json(
                &node_dir(dir, role).join("admin.sock"),
                "/api/v1/ha/status",
            )
            .ok()
            .and_then(|v| {
                // The node's own pair: a node can also witness other pairs.
                v["status"]["pairs"].as_array().and_then(|pairs| {
                    pairs
                        .iter()
                        .find(|p| p["role"] != "Witness")
                        .and_then(|p| p["state"].as_str().map(str::to_string))
                })
            })
            .unwrap_or_else(|| "starting".into())
        };
        let (p, s) = (state("primary"), state("secondary"));
        let line = format!("  primary {p}, secondary {s}");
        let second_ok =
            !lab.nodes.iter().any(|n| n.0 == "primary2") || state("primary2") == "PRIMARY_ACTIVE";
        if line != shown {
            println!("{line} ({:.1} s)", started.elapsed().as_secs_f64());
            shown = line;
        }
        if p == "PRIMARY_ACTIVE"
            && s == "SECONDARY_ACTIVE"
            && second_ok
            && options_from(&lab.client_namespace, &lab.vip, Duration::from_millis(500)).is_ok()
        {
            println!(
                "  {}:5060 answers SIP OPTIONS from {}",
                lab.vip, lab.client_namespace
            );
            return Ok(());
        }
        // By its `Child`, not by /proc: a process in the middle of its exec shows no
        // command line for a moment.
        for ((role, ..), child) in lab.nodes.iter().zip(children.iter_mut()) {
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "the {role} exited during start-up ({status}); its log says:\n{}",
                    std::fs::read_to_string(node_dir(dir, role).join("causeway.log"))
                        .unwrap_or_default()
                );
            }
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "the pair did not form within 60 s: see the logs in {}",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends one SIP OPTIONS to `ip:5060` from inside `namespace` and waits for a 200.
pub fn options_from(namespace: &str, ip: &str, wait: Duration) -> anyhow::Result<()> {
    let ns_file = std::fs::File::open(format!("/run/netns/{namespace}"))
        .with_context(|| format!("opening network namespace {namespace}"))?;
    let ip = ip.to_string();
    std::thread::spawn(move || -> anyhow::Result<()> {
        nix::sched::setns(&ns_file, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("entering the client namespace")?;
        let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
        sock.set_read_timeout(Some(wait))?;
        let local = sock.local_addr()?;
        let msg = format!(
            "OPTIONS sip:{ip} SIP/2.0\r\nVia: SIP/2.0/UDP {local};branch=z9hG4bK-lab{}\r\n\
             Max-Forwards: 70\r\nFrom: <sip:lab@{ip}>;tag=lab\r\nTo: <sip:{ip}>\r\n\
             Call-ID: lab-{}@lab\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
            std::process::id(),
            std::process::id()
        );
        sock.send_to(msg.as_bytes(), (ip.as_str(), 5060))?;
        let mut buf = [0u8; 4096];
        let (n, _) = sock.recv_from(&mut buf).context("no answer")?;
        if buf[..n].starts_with(b"SIP/2.0 200") {
            Ok(())
        } else {
            bail!("answered: {}", String::from_utf8_lossy(&buf[..n.min(40)]))
        }
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
}

pub fn down(dir: &Path) -> anyhow::Result<()> {
    let file = dir.join("lab-ha.json");
    let lab: HaLab = serde_json::from_slice(
        &std::fs::read(&file).with_context(|| format!("no HA lab in {}", dir.display()))?,
    )
    .with_context(|| format!("reading {}", file.display()))?;
    for (role, _, _, started) in &lab.nodes {
        // The PID file is the truth: a node restarted by hand (or by a test) writes its own.
        let pid = &std::fs::read_to_string(node_dir(dir, role).join("causeway.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or(*started);
        let config = node_dir(dir, role).join("causeway.toml");
        if !is_our_node(*pid, &config) {
            println!("{role}: not running");
            continue;
        }
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while is_our_node(*pid, &config) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_our_node(*pid, &config) {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
            println!("{role} (PID {pid}) did not stop in 5 s: killed");
        } else {
            println!("{role} (PID {pid}) stopped");
        }
    }
    for n in lab.namespaces.iter().rev() {
        if let Err(e) = run_ip(&["netns", "del", n]) {
            println!("{e:#}");
        }
    }
    std::fs::remove_file(&file)?;
    println!("HA lab in {} removed", dir.display());
    Ok(())
}
