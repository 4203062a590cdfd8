//! Black-box tests of the real binary: clusters of `causeway run` processes on loopback
//! addresses (each test its own 127.0.N.0/24, so nothing collides with a running lab).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

mod harness;
use harness::*;

#[test]
fn three_processes_form_kill_9_raises_20004_and_a_restart_rejoins_by_itself() {
    let mut c = TestCluster::start(1, 3, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    let victim = addr(1, 3);
    c.kill9(3);
    wait_for(5, "20004 for peer 3 on both survivors", || {
        c.alarm_raised(1, 20004, &victim) && c.alarm_raised(2, 20004, &victim)
    });
    // A clustered peer lost: 20004 with 20006, as in the seed.
    wait_for(5, "20006 for peer 3", || c.alarm_raised(1, 20006, "Peer 3"));
    let (state, reason, _) = c.peer_state(1, 3).unwrap();
    assert_eq!(state, "Failed");
    assert!(!reason.is_empty());
    assert_eq!(c.xstatus(1, "cluster").unwrap()["port"], 4372);
    // The subordinate says where it stands soon after start, in the seed's words.
    wait_for(10, "the subordinate's synchronisation line", || {
        c.log(2).contains(
            "This peer is not the cluster master, local configuration is already up to date",
        )
    });
    assert!(
        c.log(1).contains(
            "Event=\"Alarm Raised\" Id=\"20004\" UUID=\"3bca6888-f622-11df-93be-07cc953d7b99\""
        ),
        "{}",
        c.log(1)
    );
    c.launch(3);
    wait_for(20, "peer 3 active again with no human action", || {
        c.formed()
    });
    wait_for(5, "20004 lowered", || {
        !c.alarm_raised(1, 20004, &victim) && !c.alarm_raised(2, 20004, &victim)
    });
    assert!(c.log(1).contains("Event=\"Alarm Lowered\" Id=\"20004\""));
}

#[test]
fn enforce_refuses_a_certificate_that_does_not_name_the_peer_and_permissive_accepts_it() {
    for (net, mode) in [(2u8, "Enforce"), (3, "Permissive")] {
        let c = TestCluster::start(net, 3, mode, |k, _, cn, _| {
            if k == 3 {
                *cn = format!("127.0.{net}.99");
            }
        });
        wait_for(20, "peers 1 and 2 see each other", || {
            c.peer_state(1, 2).is_some_and(|s| s.0 == "Active")
        });
        wait_for(10, "peer 3's certificate judged", || {
            c.peer_state(1, 3)
                .is_some_and(|s| s.2.starts_with("Invalid"))
        });
        let (state, reason, cert) = c.peer_state(1, 3).unwrap();
        assert!(
            cert.starts_with("Invalid Common Name in certificate does not match"),
            "{cert}"
        );
        if mode == "Enforce" {
            assert_eq!(state, "Failed", "{reason}");
            assert!(reason.contains("certificate"), "{reason}");
            std::thread::sleep(Duration::from_secs(1));
            assert_ne!(
                c.peer_state(2, 3).unwrap().0,
                "Active",
                "no peer accepts peer 3"
            );
            let (s3, r3, _) = c.peer_state(3, 1).unwrap();
            assert_eq!(s3, "Failed");
            assert!(
                r3.contains("refused by the peer"),
                "peer 3 is told why: {r3}"
            );
        } else {
            wait_for(10, "peer 3 active in Permissive", || {
                c.peer_state(1, 3).is_some_and(|s| s.0 == "Active")
            });
            wait_for(5, "Permissive still warns about the certificate", || {
                c.alarm_raised(1, 21004, &addr(net, 3))
            });
        }
    }
}

#[test]
fn untrusted_ca_wrong_cluster_name_other_version_and_other_order_are_refused_with_the_reason() {
    type Setup = Box<dyn Fn(usize, &mut String, &mut String, &mut Env)>;
    let cases: Vec<(u8, Setup, &str)> = vec![
        (
            4,
            Box::new(|k, _, cn, _| {
                if k == 2 {
                    *cn = "untrusted".into()
                }
            }),
            "trusted CA",
        ),
        (
            5,
            Box::new(|k, cfg, _, _| {
                if k == 2 {
                    *cfg = cfg.replace("test.lab.example", "other.lab.example")
                }
            }),
            "cluster name differs",
        ),
        (
            6,
            Box::new(|k, _, _, env| {
                if k == 2 {
                    env.push(("CAUSEWAY_ANNOUNCE_VERSION".into(), "99.0.0".into()))
                }
            }),
            "software version differs",
        ),
        (
            7,
            Box::new(|k, cfg, _, _| {
                if k == 2 {
                    *cfg = cfg.replace(
                        "peers = [\"127.0.7.1\", \"127.0.7.2\"]",
                        "peers = [\"127.0.7.2\", \"127.0.7.1\"]",
                    )
                }
            }),
            "peer list differs",
        ),
    ];
    for (net, setup, expected) in cases {
        let c = TestCluster::start(net, 2, "Enforce", setup);
        wait_for(10, &format!("peer 1 refuses peer 2 ({expected})"), || {
            c.peer_state(1, 2)
                .is_some_and(|(state, reason, _)| state == "Failed" && reason.contains(expected))
        });
        assert!(
            c.log(1).contains(expected),
            "the refusal is logged: {}",
            c.log(1)
        );
        if expected == "software version differs" {
            wait_for(5, "version mismatch alarm", || {
                c.alarm_raised(1, 21002, &addr(net, 2))
            });
        }
    }
}

#[test]
fn hostile_input_on_the_cluster_port_is_refused_and_the_peers_keep_working() {
    let mut c = TestCluster::start(8, 2, "Permissive", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    let target = format!("{}:4372", addr(8, 2));
    // A real TLS session (Permissive accepts any certificate) that sends an oversized frame,
    // then one that sends a truncated frame.
    for frame in [
        &[0xffu8, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 100, 1, 2, 3][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let ca = causeway_pki::ca_init(dir.path(), "attacker").unwrap();
        let subject = causeway_pki::parse_subject_args(&["CN:attacker.example".into()]).unwrap();
        let (_, csr) = causeway_pki::csr(dir.path(), "x", &subject).unwrap();
        causeway_pki::sign_csr(&csr, &ca, 1, &dir.path().join("x.crt")).unwrap();
        let id = causeway_pki::NodeIdentity::load(
            &dir.path().join("x.crt"),
            &dir.path().join("x.key"),
            &ca.cert,
        )
        .unwrap();
        let config = causeway_pki::client_config(causeway_pki::TlsMode::Permissive, &id).unwrap();
        let name = rustls::pki_types::ServerName::try_from(addr(8, 2)).unwrap();
        let conn = rustls::ClientConnection::new(config, name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(&target).unwrap());
        tls.write_all(frame).unwrap();
        tls.flush().unwrap();
        tls.sock
            .set_read_timeout(Some(Duration::from_secs(7)))
            .unwrap();
        // The node closes the connection (at once for the oversized frame, after the hello
        // timeout for the truncated one), without a byte of its own protocol.
        let closed = matches!(tls.read(&mut [0u8; 16]), Ok(0) | Err(_));
        assert!(closed, "the node must drop a hostile link");
    }
    wait_for(10, "oversized frame logged", || {
        c.log(2).contains("exceeds the 16384-byte limit")
    });
    // Garbage instead of a TLS ClientHello.
    for _ in 0..20 {
        let mut s = TcpStream::connect(&target).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n\x00\xff\xfe garbage");
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let _ = s.read(&mut [0u8; 64]);
    }
    // Slow-loris: connections that never finish a handshake. Past 8 from one source, new
    // ones are closed at once.
    let idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(&target).unwrap())
        .collect();
    let mut extra = TcpStream::connect(&target).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert!(
        matches!(extra.read(&mut [0u8; 8]), Ok(0) | Err(_)),
        "closed at once past the per-source cap"
    );
    // Real peers keep working, and a restarted real peer gets back in while the junk is open.
    assert!(c.formed());
    c.kill9(1);
    c.launch(1);
    wait_for(
        10,
        "peer 1 back while slow connections are held open",
        || c.formed(),
    );
    wait_for(10, "refusals logged", || {
        c.log(2).contains("Cluster connection refused")
    });
    drop(idle);
}

#[test]
fn a_bad_configuration_exits_64_naming_the_field_before_binding_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        format!("[node]\nsystem_name = \"p1\"\naddress = \"127.0.9.1\"\ndata_dir = \"{}\"\n[cluster]\npeers = [\"127.0.9.1\", \"not a host!\"]\n", dir.path().display()),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster.peers[1] (Peer 2 address)"), "{err}");
    // Nothing was bound: the admin socket does not exist.
    assert!(!Path::new(&dir.path().join("admin.sock")).exists());
}

/// `causeway … | head`: a command whose reader has gone stops with 141 (as SIGPIPE
/// would), never a panic.
#[test]
fn a_command_whose_output_pipe_is_closed_stops_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        format!(
            "[node]\nsystem_name = \"p1\"\naddress = \"127.0.9.1\"\ndata_dir = \"{}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    // The reader is gone before the command starts: its first line meets a closed pipe.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&path)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{err}");
}

impl TestCluster {
    fn database_status(&self, k: usize) -> Option<String> {
        self.xstatus(k, "cluster")?["replication"]["database_status"]
            .as_str()
            .map(str::to_string)
    }
}

#[test]
fn configuration_replicates_survives_kill_9_a_damaged_store_and_a_primary_move() {
    let mut c = TestCluster::start(9, 3, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    // Set on the primary, read on a subordinate.
    let (ok, out, err) = c.cli(
        1,
        &[
            "xconfiguration",
            "set",
            "sip.domains",
            "example.com,example.org",
        ],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(
        c.get(2, "sip.domains").as_deref(),
        Some("example.com,example.org")
    );
    assert!(c.log(3).contains(
        "Detail=\"xconfiguration sip.domains - changed from: (unset) to: example.com,example.org\" Event=\"System Configuration Changed\""
    ), "{}", c.log(3));
    // Invalid value: refused, field named, nothing changed.
    let (ok, _, err) = c.cli(2, &["xconfiguration", "set", "limits.calls.max", "lots"]);
    assert!(!ok);
    assert!(err.contains("limits.calls.max:"), "{err}");
    // The API answers each kind of refusal with its own status and code (docs/errors.md).
    let post = |k: usize, path: &str, body: &str| {
        let mut s =
            std::os::unix::net::UnixStream::connect(c.peers[k - 1].dir.join("admin.sock")).unwrap();
        let req = format!(
            "POST {path} HTTP/1.0\r\nHost: peer\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        std::io::Write::write_all(&mut s, req.as_bytes()).unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut s, &mut out).unwrap();
        out
    };
    let bad = post(
        2,
        "/api/v1/configuration",
        r#"{"path":"limits.calls.max","value":"lots"}"#,
    );
    assert!(
        bad.starts_with("HTTP/1.0 400") && bad.contains(r#""code":"invalid_argument""#),
        "{bad}"
    );
    let on_primary = post(1, "/api/v1/command/forceconfigupdate", "");
    assert!(
        on_primary.starts_with("HTTP/1.0 409") && on_primary.contains(r#""code":"conflict""#),
        "{on_primary}"
    );
    // Peer 3 killed; 50 changes through a subordinate; Peer 3 restarts and catches up.
    c.kill9(3);
    for n in 0..50 {
        let (ok, out, err) = c.cli(
            2,
            &["xconfiguration", "set", "limits.calls.max", &n.to_string()],
        );
        assert!(ok, "change {n}: {out}{err}");
    }
    c.launch(3);
    wait_for(20, "Peer 3 caught up", || {
        c.get(3, "limits.calls.max").as_deref() == Some("49")
    });
    // Peer 2's store damaged while it is down: kept aside, replaced, refilled, 20014 lowered.
    c.kill9(2);
    let store = c.peers[1].dir.join("node.redb");
    std::fs::write(&store, b"this is not a redb file").unwrap();
    c.launch(2);
    wait_for(20, "Peer 2 refilled from the primary", || {
        c.get(2, "sip.domains").as_deref() == Some("example.com,example.org")
            && c.get(2, "limits.calls.max").as_deref() == Some("49")
    });
    let kept = std::fs::read_dir(&c.peers[1].dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("node.redb.damaged-")
        });
    assert!(kept, "the damaged store is kept for a post-mortem");
    wait_for(10, "20014 lowered once in sync", || {
        !c.alarm_raised(2, 20014, "store") && c.database_status(2).as_deref() == Some("Active")
    });
    // Primary killed; the primary moved with one command on Peer 3; a write through Peer 2.
    c.kill9(1);
    let (ok, out, err) = c.cli(3, &["xcommand", "SetPrimary", "3"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = c.cli(2, &["xconfiguration", "set", "limits.calls.max", "77"]);
    assert!(ok, "{out}{err}");
    // The old primary returns, follows Peer 3, and takes the change made while it was down.
    c.launch(1);
    wait_for(20, "old primary follows", || {
        c.get(1, "limits.calls.max").as_deref() == Some("77")
            && c.get(1, "cluster.configuration_primary").as_deref() == Some("3")
    });
    assert_eq!(
        c.get(1, "sip.domains").as_deref(),
        Some("example.com,example.org")
    );
    let (ok, out, err) = c.cli(3, &["xcommand", "ForceConfigUpdate"]);
    assert!(
        !ok && err.contains("primary"),
        "ok={ok} out={out} err={err} status={:?}",
        c.xstatus(3, "cluster").map(|s| s["replication"].clone())
    );
    let (ok, out, err) = c.cli(1, &["xcommand", "ForceConfigUpdate"]);
    assert!(ok, "{out}{err}");
}

#[test]
fn leave_warns_cancels_and_resets_on_restart_and_backup_purge_restore_rejoin() {
    let mut c = TestCluster::start(10, 3, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    let (ok, out, err) = c.cli(1, &["xconfiguration", "set", "sip.domains", "example.com"]);
    assert!(ok, "{out}{err}");
    wait_for(5, "replicated", || {
        c.get(3, "sip.domains").as_deref() == Some("example.com")
    });
    let list = format!("{},{},{}", addr(10, 1), addr(10, 2), addr(10, 3));

    // Leave: clearing the list warns, restoring it cancels.
    let (ok, out, err) = c.cli(3, &["xconfiguration", "set", "cluster.peers", ""]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("factory defaults") && out.contains(&list),
        "{out}"
    );
    assert!(c.alarm_raised(3, 20007, "cluster.peers"));
    let banner = c.xstatus(3, "cluster").unwrap()["banner"].clone();
    assert!(
        banner.as_str().is_some_and(|b| b.contains("To cancel")),
        "{banner}"
    );
    let (ok, out, err) = c.cli(3, &["xconfiguration", "set", "cluster.peers", &list]);
    assert!(ok, "{out}{err}");
    assert!(!c.alarm_raised(3, 20007, "cluster.peers"), "cancelled");
    assert!(c.xstatus(3, "cluster").unwrap()["banner"].is_null());
    // Cancelled: a restart keeps the cluster data and rejoins.
    c.kill9(3);
    c.launch(3);
    wait_for(20, "Peer 3 back", || c.formed());
    assert_eq!(c.get(3, "sip.domains").as_deref(), Some("example.com"));
    // Cleared again and restarted: factory reset of the cluster data, standalone.
    let (ok, _, err) = c.cli(3, &["xconfiguration", "set", "cluster.peers", ""]);
    assert!(ok, "{err}");
    c.kill9(3);
    c.launch(3);
    wait_for(10, "Peer 3 standalone", || {
        c.xstatus(3, "cluster")
            .is_some_and(|s| s["peers"].as_array().is_some_and(|p| p.is_empty()))
    });
    assert_eq!(c.get(3, "sip.domains").as_deref(), Some(""));
    assert!(
        c.log(3).contains("Event=\"Cluster data reset\""),
        "{}",
        c.log(3)
    );

    // Backup of Peer 2, purge, rejoin, restore, rejoin. The backup and its passphrase
    // stay outside the data directory, as they would on a replacement machine.
    let outside = tempfile::tempdir().unwrap();
    let backup = outside.path().join("peer2.backup.json");
    let passphrase = outside.path().join("passphrase");
    let wrong = outside.path().join("wrong-passphrase");
    std::fs::write(&passphrase, "correct horse battery staple\n").unwrap();
    std::fs::write(&wrong, "incorrect donkey battery staple\n").unwrap();
    let short = outside.path().join("short-passphrase");
    std::fs::write(&short, "too short\n").unwrap();
    let (backup_file, pass, wrong, short) =
        (path(&backup), path(&passphrase), path(&wrong), path(&short));
    let (ok, _, err) = c.cli(
        2,
        &["backup", "--out", &backup_file, "--passphrase-file", &short],
    );
    assert!(!ok && err.contains("at least 12"), "{err}");
    let (ok, out, err) = c.cli(
        2,
        &["backup", "--out", &backup_file, "--passphrase-file", &pass],
    );
    assert!(ok, "{out}{err}");
    let text = std::fs::read_to_string(&backup).unwrap();
    assert!(
        text.contains("causeway-backup-2") && !text.contains("example.com"),
        "{text}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&backup).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let (ok, _, err) = c.cli(2, &["purge", "--confirm"]);
    assert!(
        !ok && err.contains("running"),
        "purge refused while running: {err}"
    );
    c.kill9(2);
    let (ok, _, err) = c.cli(2, &["purge"]);
    assert!(!ok && err.contains("--confirm"), "{err}");
    let (ok, out, err) = c.cli(2, &["purge", "--confirm"]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = c.cli(1, &["xconfiguration", "set", "limits.calls.max", "9"]);
    assert!(ok, "{out}{err}");
    c.launch(2);
    wait_for(
        20,
        "purged Peer 2 rejoins and takes the primary's configuration",
        || {
            c.get(2, "sip.domains").as_deref() == Some("example.com")
                && c.get(2, "limits.calls.max").as_deref() == Some("9")
        },
    );
    c.kill9(2);
    // A wrong passphrase: refused, and the data directory is as it was.
    let before = dir_contents(&c.peers[1].dir);
    let (ok, _, err) = c.cli(2, &["restore", &backup_file, "--passphrase-file", &wrong]);
    assert!(
        !ok && err.contains("the passphrase does not open this backup"),
        "{err}"
    );
    assert!(
        dir_contents(&c.peers[1].dir) == before,
        "the data directory changed"
    );
    let (ok, out, err) = c.cli(2, &["restore", &backup_file, "--passphrase-file", &pass]);
    assert!(ok, "{out}{err}");
    c.launch(2);
    // The backup predates limits.calls.max = 9: the primary's newer copy wins.
    // (Peer 3 left, so "Active" is out of reach: compare with the primary instead.)
    let digest = |c: &TestCluster, k: usize| {
        c.xstatus(k, "cluster")
            .map(|s| s["replication"]["digest"].clone())
    };
    wait_for(20, "restored Peer 2 rejoins and converges", || {
        c.get(2, "limits.calls.max").as_deref() == Some("9") && digest(&c, 2) == digest(&c, 1)
    });
    assert_eq!(c.get(2, "sip.domains").as_deref(), Some("example.com"));

    // A replacement machine: nothing left in the data directory but the node's certificate,
    // key and CA (no node file, no store, no system key): the restore makes a new key.
    c.kill9(2);
    let keep = ["node.crt", "node.key", "ca.crt"];
    for entry in std::fs::read_dir(&c.peers[1].dir).unwrap() {
        let entry = entry.unwrap();
        if keep.contains(&entry.file_name().to_str().unwrap()) {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            std::fs::remove_dir_all(entry.path()).unwrap();
        } else {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    let (ok, out, err) = c.cli(2, &["restore", &backup_file, "--passphrase-file", &pass]);
    assert!(ok && out.contains("new system key"), "{out}{err}");
    assert!(c.peers[1].dir.join("causeway.toml").exists(), "{out}");
    c.launch(2);
    wait_for(20, "Peer 2 on a new machine rejoins and converges", || {
        c.get(2, "limits.calls.max").as_deref() == Some("9") && digest(&c, 2) == digest(&c, 1)
    });
    assert_eq!(c.get(2, "sip.domains").as_deref(), Some("example.com"));
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

/// Every file in `dir` with its bytes, for "nothing changed" checks.
fn dir_contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn secrets_are_sealed_at_rest_and_force_system_key_update_reseals_or_raises_21005() {
    let mut c = TestCluster::start(11, 2, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    let (ok, out, err) = c.cli(
        1,
        &["xconfiguration", "set", "sip.users.alice", "Sup3rSecretPw"],
    );
    assert!(ok, "{out}{err}");
    let digest = |c: &TestCluster, k: usize| {
        c.xstatus(k, "cluster")
            .map(|s| s["replication"]["digest"].clone())
    };
    wait_for(5, "replicated", || digest(&c, 2) == digest(&c, 1));
    assert_eq!(c.get(2, "sip.users.alice").as_deref(), Some("********"));
    for k in 1..=2 {
        let raw = std::fs::read(c.peers[k - 1].dir.join("node.redb")).unwrap();
        assert!(
            !raw.windows(13).any(|w| w == b"Sup3rSecretPw"),
            "Peer {k}'s store holds the secret in clear"
        );
    }
    // A key change that cannot be written raises 21005; fixed and run again, it is lowered.
    let blocker = c.peers[1].dir.join("system.key.new");
    std::fs::create_dir(&blocker).unwrap();
    let (ok, _, err) = c.cli(2, &["xcommand", "ForceSystemKeyUpdate"]);
    assert!(!ok && err.contains("ForceSystemKeyUpdate"), "{err}");
    assert!(c.alarm_raised(2, 21005, "system key"));
    std::fs::remove_dir(&blocker).unwrap();
    let key_before = std::fs::read(c.peers[1].dir.join("system.key")).unwrap();
    let (ok, out, err) = c.cli(2, &["xcommand", "ForceSystemKeyUpdate"]);
    assert!(ok && out.contains("records"), "{out}{err}");
    assert!(!c.alarm_raised(2, 21005, "system key"));
    assert_ne!(
        std::fs::read(c.peers[1].dir.join("system.key")).unwrap(),
        key_before
    );
    // Restarted on the new key: its data reads back, still the primary's.
    c.kill9(2);
    c.launch(2);
    wait_for(20, "Peer 2 back", || c.formed());
    assert!(!c.log(2).contains("damaged"), "{}", c.log(2));
    assert_eq!(digest(&c, 2), digest(&c, 1));
    // Its key lost while stopped: the store cannot be opened, is kept aside, and refilled.
    c.kill9(2);
    std::fs::remove_file(c.peers[1].dir.join("system.key")).unwrap();
    c.launch(2);
    wait_for(20, "Peer 2 refilled after losing its key", || {
        c.formed() && digest(&c, 2) == digest(&c, 1)
    });
    assert!(c.log(2).contains("system key"), "{}", c.log(2));
}

/// The status line of one HTTPS request to the admin API from `from`.
fn https_status(c: &TestCluster, from: &str, to: &str, basic: &str) -> String {
    let tcp = tcp_from(from, to);
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let host = to.split(':').next().unwrap();
    let mut tls = tls_over(c, tcp, host);
    let request = format!("GET /api/v1/status/cluster HTTP/1.1\r\nHost: node\r\nAuthorization: Basic {basic}\r\nConnection: close\r\n\r\n");
    if tls.write_all(request.as_bytes()).is_err() {
        return "write failed".into();
    }
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("no answer")
        .to_string()
}

/// One address holding a hundred idle connections to the HTTPS admin port locks nobody
/// else out; and 40 concurrent wrong logins from one address get 5 password checks, the
/// rest refused before any check (counted before checking, not after).
#[test]
fn the_admin_https_port_survives_idle_connections_and_concurrent_guesses_are_capped() {
    let c = TestCluster::start(55, 2, "Enforce", |k, config, _, _| {
        config.push_str(&format!(
            "\n[admin]\nhttps_listen = \"127.0.55.{k}:8443\"\n"
        ));
    });
    wait_for(20, "cluster formed", || c.formed());
    causeway_admin::users::set_password(&c.peers[0].dir, "admin", "Adm1n-Pass").unwrap();
    let idle: Vec<TcpStream> = (0..100)
        .map(|_| tcp_from("127.0.55.21", "127.0.55.1:8443"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let ok = https_status(
        &c,
        "127.0.55.20",
        "127.0.55.1:8443",
        "YWRtaW46QWRtMW4tUGFzcw==",
    );
    assert!(ok.contains(" 200"), "an admin from elsewhere: {ok}");
    drop(idle);
    let statuses: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..40)
            .map(|_| {
                scope.spawn(|| {
                    https_status(&c, "127.0.55.22", "127.0.55.1:8443", "YWRtaW46d3Jvbmc=")
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Each guess is checked (401), refused before any check (429), or not let in at all
    // (the address's connection caps): never more than 5 checks.
    let checked = statuses.iter().filter(|s| s.contains(" 401")).count();
    assert!((1..=5).contains(&checked), "password checks: {statuses:?}");
    assert!(
        statuses.iter().all(|s| s.contains(" 401")
            || s.contains(" 429")
            || s == "write failed"
            || s == "no answer"),
        "{statuses:?}"
    );
}

/// A flood of silent connections to the cluster port from many addresses (every
/// stranger's handshake slot taken, and taken again as each times out) keeps no peer out:
/// the peers' own addresses have handshake slots of their own. Peer 2, killed and
/// restarted during the flood, is Active again on Peer 3 while the flood goes on.
#[test]
fn a_connection_flood_on_the_cluster_port_keeps_no_peer_out() {
    let mut c = TestCluster::start(56, 3, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooders: Vec<_> = (21..31)
        .map(|host| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // Up to 8 silent connections from this address (its share of the node's
                // handshake slots), each replaced as soon as the node closes it.
                let mut held: Vec<TcpStream> = Vec::new();
                let deadline = std::time::Instant::now() + Duration::from_secs(40);
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && std::time::Instant::now() < deadline
                {
                    held.retain_mut(|s| {
                        let mut one = [0u8; 1];
                        matches!(s.read(&mut one), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    });
                    while held.len() < 8 {
                        let s = tcp_from(&format!("127.0.56.{host}"), "127.0.56.3:4372");
                        s.set_nonblocking(true).unwrap();
                        held.push(s);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    c.kill9(2);
    c.launch(2);
    let active = || {
        c.peer_state(3, 2)
            .is_some_and(|(state, _, _)| state == "Active")
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !active() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let rejoined = active();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    assert!(
        rejoined,
        "Peer 2 kept out by the flood: {:?}",
        c.peer_state(3, 2)
    );
}
