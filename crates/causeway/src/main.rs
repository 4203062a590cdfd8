//! `causeway`: one binary for every node, and the CLI that talks to them.
#![forbid(unsafe_code)]

mod lab;
mod lab_ha;
mod pcap;
mod run;
mod sdnotify;
mod setup;
mod show;
mod syslog;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status for a bad configuration file or bad arguments (sysexits EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;
/// Exit status when a port or socket cannot be opened (sysexits EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;

#[derive(Parser)]
#[command(
    name = "causeway",
    version,
    about = "Clustering and high availability for real-time communication services"
)]
struct Cli {
    /// The node to talk to: its data directory, or its admin socket.
    #[arg(
        long,
        global = true,
        env = "CAUSEWAY_NODE",
        default_value = "/var/lib/causeway"
    )]
    node: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check a configuration file without starting anything.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
    },
    /// Keys, CSRs, and a lab CA.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
    /// Status of the node (`xstatus cluster`, `xstatus alarms`).
    Xstatus {
        #[command(subcommand)]
        what: Xstatus,
    },
    /// The configuration: `get [PATH]`, `set PATH VALUE`, `unset PATH` (EX-2).
    Xconfiguration {
        #[command(subcommand)]
        command: Xconfiguration,
    },
    /// Cluster operations: `ForceConfigUpdate` (EX-13), `SetPrimary <peer>` (EX-7).
    Xcommand {
        #[command(subcommand)]
        command: Xcommand,
    },
    /// Save the running node's file and cluster data to FILE (EX-17), sealed with the
    /// passphrase in --passphrase-file: it restores on any machine with the passphrase.
    Backup {
        #[arg(long)]
        out: PathBuf,
        /// A file holding the passphrase (at least 12 characters; a trailing newline is not
        /// part of it).
        #[arg(long)]
        passphrase_file: PathBuf,
    },
    /// Put a backup back on the stopped node in --node (a fresh directory with only its
    /// certificate and key will do); start it afterwards.
    Restore {
        file: PathBuf,
        /// The file holding the backup's passphrase (not needed for a causeway-backup-1 file).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
    },
    /// Destroy the cluster data of the stopped node in --node; on start it rejoins and takes
    /// the configuration from the primary. Needs --confirm.
    Purge {
        #[arg(long)]
        confirm: bool,
    },
    /// Admin accounts of the node's HTTPS API.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// The database cluster, in the seed's syntax: `database cluster localnode <interface>`,
    /// `certs …`, `initialize`, `join <master address>`, `status [--json]`, `clear error`,
    /// `upgrade_schema`, `remove`.
    Database {
        #[command(subcommand)]
        command: DatabaseCommand,
    },
    /// HA information in the seed's layout: role, addresses, and per paired peer the
    /// failover and failback types, wait time, heartbeat status and current state.
    Gethainfo {
        #[arg(long)]
        json: bool,
    },
    /// Server information in the seed's layout: HA role, services and their status.
    Getserverinfo {
        #[arg(long)]
        json: bool,
    },
    /// HA pair operations: `switchover`, `failover` (on the secondary), `failback` (on the
    /// primary), `status`.
    Ha {
        #[command(subcommand)]
        command: HaCommand,
    },
    /// The address keeper of an HA pair (started by the node itself).
    #[command(name = "ha-keeper", hide = true)]
    HaKeeper {
        #[arg(long)]
        interface: String,
        #[arg(long)]
        vip: String,
    },
    /// The seed's setup dialogue (OP-6): host name, domain, HA role and pair, recovery mode,
    /// DNS, time zone, NTP; writes the node file. Flags answer the questions, --yes confirms.
    Setup {
        #[command(flatten)]
        args: Box<setup::Args>,
    },
    /// The node's log: `syslog follow` prints its lines as they are written.
    Syslog {
        #[command(subcommand)]
        command: SyslogCommand,
    },
    /// Capture the cluster's traffic (mesh, SIP, database ports) on INTERFACE (`any` for
    /// every one) into a pcap file for Wireshark, until Ctrl-C or --duration. Needs root or
    /// CAP_NET_RAW.
    Pcap {
        interface: String,
        /// Where to write (default: causeway-<interface>-<time>.pcap in the current directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        /// A port to capture (repeat for more); default: 4372, 5060, 5061, 5432, 8008, 9899.
        #[arg(long = "port")]
        ports: Vec<u16>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// A local trial cluster on 127.0.0.x.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum HaCommand {
    /// The holder hands the virtual IP to the other member (run on either).
    Switchover {
        #[arg(long)]
        pair: Option<usize>,
        /// Move back within the guard window, or release with the peer unreachable.
        #[arg(long)]
        force: bool,
    },
    /// On the secondary: take the virtual IP now (manual failover).
    Failover {
        #[arg(long)]
        pair: Option<usize>,
        #[arg(long)]
        force: bool,
    },
    /// On the primary after a failover: take the virtual IP back.
    Failback {
        #[arg(long)]
        pair: Option<usize>,
        #[arg(long)]
        force: bool,
    },
    /// Leave the pair cleanly (the seed's unpair): the secondary stops serving the pair,
    /// the primary keeps its virtual IP on its own. Refused while the secondary holds it.
    Unpair {
        #[arg(long)]
        pair: Option<usize>,
        /// Leave on this side even if the other member cannot be told.
        #[arg(long)]
        force: bool,
    },
    /// On the primary: change the pair's settings (written to its node file; the secondary
    /// takes them at its next hello, within 10 s).
    Configure {
        #[arg(long)]
        pair: Option<usize>,
        /// automatic or manual
        #[arg(long)]
        failover: Option<String>,
        /// automatic or manual
        #[arg(long)]
        failback: Option<String>,
        #[arg(long)]
        failover_wait_ms: Option<u64>,
        #[arg(long)]
        guard_window_s: Option<u64>,
    },
    /// The seed's HA status page with the events log (`--json`: everything, as JSON).
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DatabaseCommand {
    /// `database cluster <command> [arguments]`
    Cluster {
        /// Print `status` as JSON.
        #[arg(long)]
        json: bool,
        #[arg(required = true, num_args = 1..)]
        words: Vec<String>,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Make a lab CA (ca.crt, ca.key) in DIR.
    #[command(name = "ca")]
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// `pki csr <key/cert basename> CN:<cn> [OU:…] [O:…] [subjectAltName:<a>,<b>]`: makes
    /// <name>.key and <name>.csr. Refuses when <name>.key exists (see --force).
    Csr {
        name: String,
        #[arg(required = true, num_args = 1..)]
        subject: Vec<String>,
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Replace an existing <name>.key with a new key: the certificate issued for the old
        /// key stops matching it, so the peer needs a certificate signed from the new CSR.
        #[arg(long)]
        force: bool,
    },
    /// Sign a CSR with the lab CA.
    Sign {
        csr: PathBuf,
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        #[arg(long, default_value_t = 825)]
        days: u32,
        /// Where to write the certificate (default: the CSR's name with .crt).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    Init {
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value = "Causeway lab CA")]
        cn: String,
    },
}

#[derive(Subcommand)]
enum Xstatus {
    /// Every peer: address, certificate, clustering status, RTT, version, last contact.
    Cluster {
        #[arg(long)]
        json: bool,
    },
    /// Raised alarms and recent alarm events.
    Alarms {
        #[arg(long)]
        json: bool,
    },
    /// SIP registrations held by the cluster, whichever peer took them.
    Registrations {
        #[arg(long)]
        json: bool,
    },
    /// Neighbour zones as this peer sees them: each address up or down by its keep-alive,
    /// and the search rules that send requests there.
    Zones {
        #[arg(long)]
        json: bool,
    },
    /// Calls in progress and the cluster-wide call and bandwidth usage.
    Calls {
        #[arg(long)]
        json: bool,
    },
    /// The services this node hosts (SIP, …), each with its state.
    Services {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum Xconfiguration {
    /// Every item († peer-specific), the items under PATH, or one item's value.
    Get {
        path: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Set an item. Cluster-wide items go to every peer (through the primary); peer-specific
    /// (†) ones are written to this peer's file and need a restart.
    Set {
        path: String,
        value: String,
        /// Set it even when a check warns against it (Enforce with a failing certificate).
        #[arg(long)]
        force: bool,
    },
    /// Put a cluster-wide item back to its default (remove a named one).
    Unset { path: String },
}

#[derive(Subcommand)]
enum Xcommand {
    /// On a subordinate: discard its cluster-wide configuration and take the primary's.
    #[command(name = "ForceConfigUpdate", alias = "forceconfigupdate")]
    ForceConfigUpdate,
    /// Make Peer N the configuration primary on every reachable peer (works while the old
    /// primary is down).
    #[command(name = "SetPrimary", alias = "setprimary")]
    SetPrimary { peer: usize },
    /// Resolve the names of peers that are not Active and dial them now (EX-10).
    #[command(name = "ResolvePeers", alias = "resolvepeers")]
    ResolvePeers,
    /// Make a new system key for this peer and reseal its stored values with it (EX-14).
    #[command(name = "ForceSystemKeyUpdate", alias = "forcesystemkeyupdate")]
    ForceSystemKeyUpdate,
    /// Where a request for an alias (user@host, or a user of the cluster's domain; a port,
    /// `;transport=` or `sips:` as in a Request-URI) would go: the local registrations, then
    /// each search rule, and where it ends. Sends nothing.
    #[command(name = "Locate", alias = "locate")]
    Locate {
        alias: String,
        /// As for a request that did not authenticate: rules marked `auth` are skipped.
        #[arg(long)]
        unauthenticated: bool,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Set a user's password (read from standard input) on the node in --node.
    Passwd { user: String },
}

#[derive(Subcommand)]
enum SyslogCommand {
    /// Print the node's log lines as they are written, until Ctrl-C (the last --lines first).
    Follow {
        #[arg(long, default_value_t = 20)]
        lines: usize,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Make a CA, certificates and configs, start the peers, wait until they see each other.
    Up {
        #[arg(long, default_value_t = 3)]
        peers: usize,
        #[arg(long, default_value = "lab")]
        dir: PathBuf,
        /// Leave the database cluster off.
        #[arg(long)]
        no_database: bool,
    },
    /// Stop the lab's peers (by the PIDs in DIR/peerK/causeway.pid).
    Down {
        #[arg(long, default_value = "lab")]
        dir: PathBuf,
    },
    /// An HA pair and its witness in network namespaces (root).
    Ha {
        #[command(subcommand)]
        command: LabHaCommand,
    },
}

#[derive(Subcommand)]
enum LabHaCommand {
    /// Namespaces <prefix>-p, -s, -w (primary, secondary, witness) and -c (a client) on a
    /// bridge in <subnet>.0/24; the virtual IP <subnet>.10 answers SIP on UDP 5060.
    Up {
        #[arg(long, default_value = "lab-ha")]
        dir: PathBuf,
        #[command(flatten)]
        options: lab_ha::Options,
    },
    /// Stop the nodes by PID and remove the namespaces (from DIR/lab-ha.json).
    Down {
        #[arg(long, default_value = "lab-ha")]
        dir: PathBuf,
    },
}

/// The admin socket for `--node`: a directory means its `admin.sock`.
fn admin_socket(node: &Path) -> PathBuf {
    if node.is_dir() {
        node.join("admin.sock")
    } else {
        node.to_path_buf()
    }
}

/// The data directory for `--node`.
fn data_dir(node: &Path) -> PathBuf {
    if node.is_dir() {
        node.to_path_buf()
    } else {
        node.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

// Measured on the SIP REGISTER path (bench/sip.py): glibc's malloc was a third of the
// registrar's CPU time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A command whose reader went away (`xstatus alarms | head`) stops quietly with 141, as
/// a Unix tool stopped by SIGPIPE does, instead of panicking at its next line of output.
/// (Rust ignores SIGPIPE, so a closed pipe is an error on write; `println!` panics on it.)
fn stop_quietly_on_a_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.contains("Broken pipe") {
            std::process::exit(128 + 13);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    causeway_pki::install_crypto_provider();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run { .. }) {
        stop_quietly_on_a_closed_pipe();
    }
    let result = match cli.command {
        Command::Run { config } => return run::run(&config),
        Command::CheckConfig { config } => match causeway_cluster::NodeConfig::load(&config) {
            Ok(c) => {
                print!("{}", check_config_report(&config, &c));
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        Command::Pki { command } => pki(command),
        Command::Xstatus { what } => {
            let socket = admin_socket(&cli.node);
            match what {
                Xstatus::Cluster { json } => show::cluster(&socket, json),
                Xstatus::Alarms { json } => show::alarms(&socket, json),
                Xstatus::Registrations { json } => show::registrations(&socket, json),
                Xstatus::Calls { json } => show::calls(&socket, json),
                Xstatus::Zones { json } => show::zones(&socket, json),
                Xstatus::Services { json } => show::services(&socket, json),
            }
        }
        Command::Xconfiguration { command } => {
            let socket = admin_socket(&cli.node);
            match command {
                Xconfiguration::Get { path, json } => show::configuration(&socket, path, json),
                Xconfiguration::Set { path, value, force } => {
                    show::set_configuration(&socket, &path, Some(&value), force)
                }
                Xconfiguration::Unset { path } => {
                    show::set_configuration(&socket, &path, None, false)
                }
            }
        }
        Command::Xcommand { command } => {
            let socket = admin_socket(&cli.node);
            match command {
                Xcommand::ForceConfigUpdate => show::force_config_update(&socket),
                Xcommand::SetPrimary { peer } => show::set_primary(&socket, peer),
                Xcommand::ForceSystemKeyUpdate => {
                    show::simple_command(&socket, "forcesystemkeyupdate", "ForceSystemKeyUpdate")
                }
                Xcommand::ResolvePeers => {
                    show::simple_command(&socket, "resolvepeers", "ResolvePeers")
                }
                Xcommand::Locate {
                    alias,
                    unauthenticated,
                } => show::locate(&socket, &alias, !unauthenticated),
            }
        }
        Command::Backup {
            out,
            passphrase_file,
        } => show::backup(&admin_socket(&cli.node), &out, &passphrase_file),
        Command::Restore {
            file,
            passphrase_file,
        } => show::restore(&data_dir(&cli.node), &file, passphrase_file.as_deref()),
        Command::Purge { confirm } => show::purge(&data_dir(&cli.node), confirm),
        Command::Admin {
            command: AdminCommand::Passwd { user },
        } => passwd(&data_dir(&cli.node), &user),
        Command::Database {
            command: DatabaseCommand::Cluster { json, words },
        } => show::database_cluster(&admin_socket(&cli.node), &words, json),
        Command::Gethainfo { json } => show::ha_info(
            &admin_socket(&cli.node),
            &data_dir(&cli.node),
            "gethainfo",
            json,
        ),
        Command::Getserverinfo { json } => show::ha_info(
            &admin_socket(&cli.node),
            &data_dir(&cli.node),
            "getserverinfo",
            json,
        ),
        Command::Ha { command } => {
            let socket = admin_socket(&cli.node);
            match command {
                HaCommand::Switchover { pair, force } => {
                    show::ha_command(&socket, &["switchover".into()], pair, force)
                }
                HaCommand::Failover { pair, force } => {
                    show::ha_command(&socket, &["failover".into()], pair, force)
                }
                HaCommand::Failback { pair, force } => {
                    show::ha_command(&socket, &["failback".into()], pair, force)
                }
                HaCommand::Unpair { pair, force } => {
                    show::ha_command(&socket, &["unpair".into()], pair, force)
                }
                HaCommand::Configure {
                    pair,
                    failover,
                    failback,
                    failover_wait_ms,
                    guard_window_s,
                } => {
                    let mut words = vec!["configure".to_string()];
                    let settings = [
                        ("failover", failover),
                        ("failback", failback),
                        ("failover_wait_ms", failover_wait_ms.map(|v| v.to_string())),
                        ("guard_window_s", guard_window_s.map(|v| v.to_string())),
                    ];
                    for (key, value) in settings {
                        if let Some(v) = value {
                            words.push(format!("{key}={v}"));
                        }
                    }
                    show::ha_command(&socket, &words, pair, false)
                }
                HaCommand::Status { json } => {
                    show::ha_info(&socket, &data_dir(&cli.node), "ha_status", json)
                }
            }
        }
        Command::HaKeeper { interface, vip } => {
            return ExitCode::from(causeway_ha::keeper::main(&interface, &vip) as u8)
        }
        Command::Setup { args } => return setup::run(&args, &cli.node),
        Command::Syslog {
            command: SyslogCommand::Follow { lines },
        } => syslog::follow(&admin_socket(&cli.node), lines),
        Command::Pcap {
            interface,
            out,
            duration,
            ports,
        } => pcap::capture(&interface, out.as_deref(), duration, &ports),
        Command::Completions { shell } => {
            use clap::CommandFactory as _;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "causeway",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Lab { command } => match command {
            LabCommand::Up {
                peers,
                dir,
                no_database,
            } => lab::up(peers, &dir, !no_database),
            LabCommand::Down { dir } => lab::down(&dir),
            LabCommand::Ha {
                command: LabHaCommand::Up { dir, options },
            } => lab_ha::up(&dir, &options),
            LabCommand::Ha {
                command: LabHaCommand::Down { dir },
            } => lab_ha::down(&dir),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `check-config` prints for a valid file: that it is valid, the cluster port it will
/// listen on and dial the other peers on (`[cluster] port`), and a membership problem.
fn check_config_report(path: &Path, c: &causeway_cluster::NodeConfig) -> String {
    let mut out = format!("{}: valid\n", path.display());
    if c.cluster_settings().is_some() {
        out.push_str(&format!(
            "Cluster port: listens on TCP {} and dials the other peers on port {} ([cluster] port: the same on every peer)\n",
            std::net::SocketAddr::new(c.listen_ip(), c.cluster.port),
            c.cluster.port
        ));
    }
    if let Some(problem) = c.membership_problem() {
        out.push_str(&format!(
            "warning: {problem} (the node will raise alarm 20003)\n"
        ));
    }
    out
}

fn pki(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Ca {
            command: CaCommand::Init { dir, cn },
        } => {
            let files = causeway_pki::ca_init(&dir, &cn)?;
            println!(
                "CA certificate: {}\nCA key:         {}",
                files.cert.display(),
                files.key.display()
            );
        }
        PkiCommand::Csr {
            name,
            subject,
            dir,
            force,
        } => {
            let subject = causeway_pki::parse_subject_args(&subject)?;
            let existing = if force {
                causeway_pki::ExistingKey::Replace
            } else {
                causeway_pki::ExistingKey::Refuse
            };
            let (key, csr) = causeway_pki::csr_with(&dir, &name, &subject, existing)?;
            println!("Key: {}\nCSR: {}", key.display(), csr.display());
        }
        PkiCommand::Sign {
            csr,
            ca_dir,
            days,
            out,
        } => {
            let out = out.unwrap_or_else(|| csr.with_extension("crt"));
            causeway_pki::sign_csr(&csr, &causeway_pki::CaFiles::in_dir(&ca_dir), days, &out)?;
            println!("Certificate: {}", out.display());
        }
    }
    Ok(())
}

fn passwd(data_dir: &Path, user: &str) -> anyhow::Result<()> {
    use std::io::BufRead;
    eprintln!("New password for '{user}' (one line on standard input):");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    causeway_admin::users::set_password(data_dir, user, password)?;
    println!(
        "Password set for '{user}' in {}",
        causeway_admin::users::users_path(data_dir).display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> (tempfile::TempDir, PathBuf, causeway_cluster::NodeConfig) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            format!(
                "[node]\nsystem_name = \"p1\"\naddress = \"10.0.0.1\"\ndata_dir = \"{}\"\n{text}",
                dir.path().display()
            ),
        )
        .unwrap();
        let config = causeway_cluster::NodeConfig::load(&path).unwrap();
        (dir, path, config)
    }

    #[test]
    fn check_config_shows_the_configured_cluster_port() {
        let (_dir, path, c) =
            load("[cluster]\npeers = [\"10.0.0.1\", \"10.0.0.2\"]\nport = 4999\n");
        let text = check_config_report(&path, &c);
        assert!(
            text.starts_with(&format!("{}: valid\n", path.display())),
            "{text}"
        );
        assert!(text.contains("listens on TCP 10.0.0.1:4999"), "{text}");
        assert!(
            text.contains("dials the other peers on port 4999"),
            "{text}"
        );
        assert!(!text.contains("4372"), "{text}");
        let (_dir, path, c) = load("[cluster]\npeers = [\"10.0.0.1\", \"10.0.0.2\"]\n");
        assert!(check_config_report(&path, &c).contains("10.0.0.1:4372"));
        // A standalone node opens no cluster port.
        let (_dir, path, c) = load("");
        assert_eq!(
            check_config_report(&path, &c),
            format!("{}: valid\n", path.display())
        );
    }
}
