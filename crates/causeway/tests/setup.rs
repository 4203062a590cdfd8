//! Black-box tests of `causeway setup` (OP-6): the seed's dialogue through a pipe, the
//! unattended flags, the checks, and the role-switch refusal. No root, no network: each
//! test has its own temporary node file.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};

/// A node file of a three-peer cluster (198.18.0.11 … .13) with a `[sip]` section and a
/// comment, for this node at `address`; its data directory in the same temporary dir.
struct NodeFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    data_dir: PathBuf,
}

impl NodeFile {
    fn new(address: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir).unwrap();
        let path = dir.path().join("causeway.toml");
        std::fs::write(
            &path,
            format!(
                "# A node of the test cluster.\n\
                 [node]\nsystem_name = \"old-name\"\naddress = \"{address}\"\ndata_dir = \"{}\"\n\n\
                 [cluster]\nname = \"cluster.test.example\"\n\
                 peers = [\"198.18.0.11\", \"198.18.0.12\", \"198.18.0.13\"]\n\n\
                 {SIP}",
                data_dir.display()
            ),
        )
        .unwrap();
        Self {
            _dir: dir,
            path,
            data_dir,
        }
    }

    fn text(&self) -> String {
        std::fs::read_to_string(&self.path).unwrap()
    }

    /// `causeway setup --config FILE ARGS`, with `input` on standard input (none: /dev/null).
    fn setup(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_causeway"))
            .arg("setup")
            .arg("--config")
            .arg(&self.path)
            .args(args)
            .stdin(if input.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = input {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    fn check_config(&self) -> Output {
        Command::new(env!("CARGO_BIN_EXE_causeway"))
            .arg("check-config")
            .arg("--config")
            .arg(&self.path)
            .output()
            .unwrap()
    }
}

const SIP: &str = "[sip]\nlisten = \"198.18.0.11\"\nudp_port = 5060\ntls_port = 0\n";

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The lines of the (last) summary between `-----BEGIN-----` and `-----END-----`.
fn summary(out: &str) -> Vec<String> {
    let begin = out.rfind("-----BEGIN-----\n").expect("no summary") + 16;
    let end = begin
        + out[begin..]
            .find("-----END-----")
            .expect("no end of summary");
    out[begin..end].lines().map(str::to_string).collect()
}

/// The lines of table `[name]` in a node file, blank lines left out.
fn table(text: &str, name: &str) -> Vec<String> {
    let header = format!("[{name}]");
    text.lines()
        .skip_while(|l| *l != header)
        .skip(1)
        .take_while(|l| !l.starts_with('['))
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The answers of a primary's dialogue, in the seed's order: hostname, domain, HA (role,
/// HM interface, direct connect, VIP, netmask, secondary, witness, recovery mode), DNS,
/// time zone, NTP.
const PRIMARY_ANSWERS: [&str; 15] = [
    "y",
    "cwp1",
    "s",
    "y",
    "1",
    "eth0",
    "none",
    "198.18.0.10",
    "255.255.255.0",
    "2",
    "3",
    "no",
    "s",
    "s",
    "s",
];

fn lines(answers: &[&str]) -> String {
    answers.iter().map(|a| format!("{a}\n")).collect()
}

#[test]
fn a_primary_set_up_through_the_dialogue_shows_the_seed_summary_and_passes_check_config() {
    let node = NodeFile::new("198.18.0.11");
    let out = node.setup(&[], Some(&(lines(&PRIMARY_ANSWERS) + "yes\n")));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    // The seed's prompts, in the seed's order.
    let prompts = [
        "Current hostname=[old-name]",
        "Configure hostname? (Y)es/(S)kip/(U)se default [Yes]:",
        "Enter a host name [old-name]:",
        "Current domain=[]",
        "Configure domain name? (Y)es/(S)kip/(U)se default [Yes]:",
        "Current role=[none]",
        "Configure High Availability? (Y)es/(S)kip/(U)se default [Yes]:",
        "Select role [1 for Primary, 2 for Secondary] [1]:",
        "Select Health Monitor Interface [",
        "Select direct connect interface [",
        "/none] [none]:",
        "Enter Virtual IP address []:",
        "Enter the network mask for IP address 198.18.0.10.",
        "Enter network mask [255.255.255.0]:",
        "Enter the secondary's peer number [2]:",
        "Select the pair's witness [peer number/cluster/none] [3]:",
        "Do you wish to start this node in HA recovery mode ?: (yes/no) [no]:",
        "Domain Name Service (DNS) Setup",
        "Configure DNS related parameters? (Y)es/(S)kip/(U)se default [Yes]:",
        "Configure timezone? (Y)es/(S)kip/(U)se default [Yes]:",
        "Network Time Protocol (NTP) Setup.",
        "Configure NTP related parameters? (Y)es/(S)kip/(U)se default [Yes]:",
        "Please verify the following setup information.",
        "-----BEGIN-----",
        "-----END-----",
        "You may enter \"yes\" to proceed with configuration, \"no\" to make",
        "more changes, or \"^\" to go back to the previous step.",
        "Is the above information correct (yes, no, or ^): yes",
    ];
    let mut at = 0;
    for p in prompts {
        let found = text[at..]
            .find(p)
            .unwrap_or_else(|| panic!("'{p}' missing (or out of order) in:\n{text}"));
        at += found + p.len();
    }
    assert_eq!(
        summary(&text),
        [
            "Host name=cwp1",
            "Role=1 [Primary], Health Monitor Interface=eth0, Direct connect interface=none",
            "Virtual IP Address=198.18.0.10, Virtual IP Netmask=255.255.255.0",
            "Secondary=Peer 2, Witness=Peer 3",
            "Start in HA recovery mode=no",
        ]
    );
    let check = node.check_config();
    assert!(check.status.success(), "{}", stderr(&check));
    let file = node.text();
    let ha = table(&file, "ha");
    for line in [
        "role = \"primary\"",
        "health_monitor_interface = \"eth0\"",
        "direct_connect_interface = \"none\"",
        "virtual_ip = \"198.18.0.10\"",
        "netmask = \"255.255.255.0\"",
        "secondary = 2",
        "witness = \"3\"",
        "recovery_mode = false",
    ] {
        assert!(ha.iter().any(|l| l == line), "no '{line}' in [ha]:\n{file}");
    }
    assert!(table(&file, "node").contains(&"system_name = \"cwp1\"".to_string()));
    assert!(
        file.starts_with("# A node of the test cluster.\n"),
        "{file}"
    );
    assert!(file.contains(SIP), "{file}");
}

#[test]
fn a_caret_goes_back_one_question() {
    let node = NodeFile::new("198.18.0.11");
    // At the netmask, "^" goes back to the virtual IP, which is answered again.
    let mut answers = PRIMARY_ANSWERS.to_vec();
    answers.splice(8..8, ["^", "198.18.0.20"]);
    let out = node.setup(&[], Some(&(lines(&answers) + "yes\n")));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert_eq!(
        text.matches("Enter Virtual IP address [").count(),
        2,
        "{text}"
    );
    assert!(text.contains("Enter Virtual IP address [198.18.0.10]: 198.18.0.20"));
    assert!(summary(&text)
        .contains(&"Virtual IP Address=198.18.0.20, Virtual IP Netmask=255.255.255.0".into()));
    assert!(table(&node.text(), "ha").contains(&"virtual_ip = \"198.18.0.20\"".into()));

    // "^" at the confirmation goes back to the last question (NTP), then on again.
    let node = NodeFile::new("198.18.0.11");
    let out = node.setup(&[], Some(&(lines(&PRIMARY_ANSWERS) + "^\ns\nyes\n")));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert_eq!(text.matches("Configure NTP related parameters?").count(), 2);
    assert_eq!(text.matches("-----BEGIN-----").count(), 2);
}

#[test]
fn no_at_the_confirmation_starts_over_and_writes_nothing() {
    let node = NodeFile::new("198.18.0.11");
    let before = node.text();
    // "no", then standard input ends in the second round.
    let out = node.setup(&[], Some(&(lines(&PRIMARY_ANSWERS) + "no\n")));
    let text = stdout(&out);
    assert!(!out.status.success(), "{text}");
    assert_eq!(
        text.matches("Configure hostname? (Y)es/(S)kip/(U)se default [Yes]:")
            .count(),
        2,
        "'no' starts over:\n{text}"
    );
    assert!(
        stderr(&out).contains("nothing was written"),
        "{}",
        stderr(&out)
    );
    assert_eq!(node.text(), before);
    assert_eq!(
        std::fs::read_dir(node.path.parent().unwrap())
            .unwrap()
            .count(),
        2
    );
}

#[test]
fn flags_and_yes_set_up_a_secondary_unattended_and_a_rerun_keeps_the_other_sections() {
    let node = NodeFile::new("198.18.0.12");
    let sip = table(&node.text(), "sip");
    let cluster = table(&node.text(), "cluster");
    // Standard input is /dev/null: a read would cancel the setup.
    let out = node.setup(
        &[
            "--hostname",
            "cws1",
            "--role",
            "secondary",
            "--health-monitor-interface",
            "eth0",
            "--direct-connect-interface",
            "none",
            "--primaries",
            "1,3",
            "--witness",
            "none",
            "--yes",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        summary(&stdout(&out)),
        [
            "Host name=cws1",
            "Role=2 [Secondary], Health Monitor Interface=eth0, Direct connect interface=none",
            "Primaries=Peer 1 and Peer 3, Witness=none",
        ]
    );
    let check = node.check_config();
    assert!(check.status.success(), "{}", stderr(&check));
    let file = node.text();
    let ha = table(&file, "ha");
    assert!(ha.contains(&"role = \"secondary\"".into()), "{file}");
    assert!(ha.contains(&"primaries = [1, 3]".into()), "{file}");
    assert!(!file.contains("virtual_ip"), "{file}");

    // A re-run changes what it is told and keeps the rest: [sip], [cluster], the comment.
    let out = node.setup(
        &["--timezone", "UTC", "--ntp", "ntp.example.com", "--yes"],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let summary = summary(&text);
    assert!(summary.contains(&"Time zone=UTC".into()), "{text}");
    assert!(
        summary.contains(&"Enable NTP=yes, NTP servers=ntp.example.com".into()),
        "{text}"
    );
    assert!(summary
        .iter()
        .any(|l| l.contains("Causeway does not manage them, the OS does")));
    let rerun = node.text();
    assert_eq!(table(&rerun, "sip"), sip);
    assert_eq!(table(&rerun, "cluster"), cluster);
    assert_eq!(table(&rerun, "ha"), ha);
    assert!(
        rerun.starts_with("# A node of the test cluster.\n"),
        "{rerun}"
    );
    assert!(rerun.contains("# host.timezone = \"UTC\"\n"), "{rerun}");
    assert!(
        rerun.contains("# host.ntp = [\"ntp.example.com\"]\n"),
        "{rerun}"
    );
    assert!(node.check_config().status.success());

    // Nothing asked about: the file stays byte for byte, and the values are the defaults.
    let out = node.setup(&["--yes"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(node.text(), rerun);
    let out = node.setup(&[], Some(&lines(&["s", "s", "s", "s", "s", "s", "yes"])));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("Current hostname=[cws1]"));
    assert!(stdout(&out).contains("Current role=[Secondary]"));
    assert!(stdout(&out).contains("Current timezone=[UTC]"));
    assert_eq!(node.text(), rerun);
}

#[test]
fn a_virtual_ip_outside_the_health_monitor_subnet_is_refused_naming_ha_virtual_ip() {
    let node = NodeFile::new("198.18.0.11");
    let primary = [
        "--role",
        "primary",
        "--health-monitor-interface",
        "eth0",
        "--virtual-ip",
        "198.18.0.10",
        "--netmask",
        "24",
        "--secondary",
        "2",
        "--yes",
    ];
    let out = node.setup(&primary, None);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = node.text();

    let out = node.setup(&["--virtual-ip", "198.19.0.10", "--yes"], None);
    assert_eq!(out.status.code(), Some(64), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("ha.virtual_ip"), "{err}");
    assert!(
        err.contains(
            "198.19.0.10/24 is not in the subnet of the health-monitor address 198.18.0.11"
        ),
        "{err}"
    );
    assert!(err.contains("Nothing was written"), "{err}");
    assert_eq!(node.text(), before);
    // No temporary file left next to it.
    assert_eq!(
        std::fs::read_dir(node.path.parent().unwrap())
            .unwrap()
            .count(),
        2
    );

    // In the dialogue, the refusal goes back to the question.
    let mut answers = PRIMARY_ANSWERS.to_vec();
    answers[7] = "198.19.0.10";
    answers.extend(["198.18.0.30", "", "", "", "", "s", "s", "s", "yes"]);
    let out = node.setup(&[], Some(&lines(&answers)));
    let text = stdout(&out);
    assert!(out.status.success(), "{text}\n{}", stderr(&out));
    assert!(
        text.contains("ha.virtual_ip: 198.19.0.10/24 is not in the subnet"),
        "{text}"
    );
    assert!(table(&node.text(), "ha").contains(&"virtual_ip = \"198.18.0.30\"".into()));
}

/// A stand-in for a running node: answers every request on `socket` with 200 and `{}`,
/// and records the request lines.
fn fake_admin_socket(socket: &Path) -> Arc<Mutex<Vec<String>>> {
    let listener = UnixListener::bind(socket).unwrap();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(&request);
            seen.lock()
                .unwrap()
                .push(line.lines().next().unwrap_or("").to_string());
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
            );
        }
    });
    requests
}

#[test]
fn switching_roles_while_the_node_runs_is_refused_in_the_seeds_words() {
    let node = NodeFile::new("198.18.0.11");
    let out = node.setup(
        &[
            "--role",
            "primary",
            "--virtual-ip",
            "198.18.0.10",
            "--secondary",
            "2",
            "--yes",
        ],
        None,
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let before = node.text();
    let requests = fake_admin_socket(&node.data_dir.join("admin.sock"));

    let out = node.setup(&["--role", "secondary", "--primaries", "2", "--yes"], None);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "*** User has switched roles for this node. Causeway must be stopped before switching roles. ***\n\
             Please stop Causeway and then re-run setup."
        ),
        "{err}"
    );
    assert_eq!(node.text(), before);
    assert_eq!(
        requests.lock().unwrap().as_slice(),
        ["GET /api/v1/status/cluster HTTP/1.1"]
    );

    // The dialogue is refused the same way, after the confirmation.
    let mut answers = PRIMARY_ANSWERS.to_vec();
    answers.splice(4..12, ["3", "eth0"]);
    let out = node.setup(&[], Some(&(lines(&answers) + "yes\n")));
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("*** User has switched roles for this node."));
    assert_eq!(node.text(), before);

    // Keeping the role is fine while it runs.
    let out = node.setup(&["--hostname", "cwp2", "--yes"], None);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(node.text().contains("system_name = \"cwp2\""));
}

#[test]
fn a_new_node_file_gets_its_address_and_peer_list_from_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("new.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_causeway"))
        .arg("--node")
        .arg(dir.path())
        .args(["setup", "--config"])
        .arg(&path)
        .args([
            "--hostname",
            "cwp1",
            "--role",
            "primary",
            "--health-monitor-interface",
            "eth0",
            "--address",
            "10.0.0.11",
            "--peers",
            "10.0.0.11,10.0.0.12,10.0.0.13",
            "--virtual-ip",
            "10.0.0.10",
            "--netmask",
            "24",
            "--secondary",
            "2",
            "--yes",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let file = std::fs::read_to_string(&path).unwrap();
    assert!(
        table(&file, "node").contains(&"address = \"10.0.0.11\"".into()),
        "{file}"
    );
    assert!(
        table(&file, "cluster")
            .contains(&"peers = [\"10.0.0.11\", \"10.0.0.12\", \"10.0.0.13\"]".into()),
        "{file}"
    );
    let check = Command::new(env!("CARGO_BIN_EXE_causeway"))
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
}
