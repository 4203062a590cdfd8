//! The operations an operator runs on a bad day, with the real binary (issue 18): a restore
//! onto a replacement machine, and the lockouts that used to need a hand-edited file. Each
//! test has its own 127.0.N.0/24.

use std::path::Path;

mod harness;
use harness::*;

/// The replication alarms: none may be left anywhere once a restored peer has caught up.
const REPLICATION_ALARMS: [u64; 6] = [20006, 20009, 20011, 20014, 20016, 20017];

fn alarm_ids(c: &TestCluster, k: usize) -> Vec<u64> {
    c.xstatus(k, "alarms")
        .and_then(|a| a["active"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a["id"].as_u64())
        .collect()
}

/// The alarms of peer `of` that peer `k` shows (OP-1: alarms visible cluster-wide).
fn alarms_of_shown_on(c: &TestCluster, of: usize, k: usize) -> Vec<u64> {
    c.xstatus(k, "alarms")
        .and_then(|a| a["peers"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|a| a["peer"].as_u64() == Some(of as u64))
        .filter_map(|a| a["id"].as_u64())
        .collect()
}

fn ok(c: &TestCluster, k: usize, args: &[&str]) -> String {
    let (ok, out, err) = c.cli(k, args);
    assert!(ok, "causeway {args:?} on Peer {k}: {out}{err}");
    out
}

fn restart(c: &mut TestCluster, k: usize) {
    c.kill9(k);
    c.launch(k);
}

/// Everything in `dir` but the node's certificate, key and CA: a replacement machine.
fn keep_only_identity(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if ["node.crt", "node.key", "ca.crt"].contains(&name.as_str()) {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn a_peer_restored_onto_a_replacement_machine_rejoins_with_every_value_and_no_stale_alarm() {
    let mut c = TestCluster::start(86, 3, "Enforce", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    ok(
        &c,
        1,
        &["xconfiguration", "set", "sip.domains", "before.example"],
    );
    wait_for(10, "replicated", || {
        c.get(2, "sip.domains").as_deref() == Some("before.example")
    });
    let keep = tempfile::tempdir().unwrap();
    let (backup, passphrase) = (keep.path().join("peer2.backup"), keep.path().join("pass"));
    std::fs::write(&passphrase, "correct horse battery staple\n").unwrap();
    ok(
        &c,
        2,
        &[
            "backup",
            "--out",
            backup.to_str().unwrap(),
            "--passphrase-file",
            passphrase.to_str().unwrap(),
        ],
    );
    // After the backup: a value set, and alarms Peer 2 raises (Peer 3 lost) that Peer 1
    // shows as Peer 2's.
    ok(&c, 1, &["xconfiguration", "set", "limits.calls.max", "9"]);
    c.kill9(3);
    wait_for(20, "Peer 2's 20004 shown on Peer 1", || {
        alarms_of_shown_on(&c, 2, 1).contains(&20004)
    });
    // Peer 2's machine is lost; a replacement has only its certificate and key.
    c.kill9(2);
    let dir = c.peers[1].dir.clone();
    keep_only_identity(&dir);
    let out = ok(
        &c,
        2,
        &[
            "restore",
            backup.to_str().unwrap(),
            "--passphrase-file",
            passphrase.to_str().unwrap(),
        ],
    );
    assert!(out.contains("Restored"), "{out}");
    c.launch(3);
    c.launch(2);
    wait_for(30, "every peer Active", || c.formed());
    wait_for(
        30,
        "no replication alarm anywhere, nothing of Peer 2's left",
        || {
            (1..=3).all(|k| {
                !alarm_ids(&c, k)
                    .iter()
                    .any(|id| REPLICATION_ALARMS.contains(id))
            }) && alarms_of_shown_on(&c, 2, 1).is_empty()
                && alarms_of_shown_on(&c, 2, 3).is_empty()
        },
    );
    assert_eq!(c.get(2, "sip.domains").as_deref(), Some("before.example"));
    assert_eq!(c.get(2, "limits.calls.max").as_deref(), Some("9"));
    let digest = |k: usize| {
        c.xstatus(k, "cluster")
            .map(|s| s["replication"]["digest"].clone())
    };
    assert_eq!(digest(2), digest(1));
}

#[test]
fn a_peer_that_missed_a_tls_mode_change_rejoins_after_a_restart_with_no_file_edited() {
    let mut c = TestCluster::start(87, 3, "Permissive", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    c.kill9(3);
    ok(
        &c,
        1,
        &[
            "xconfiguration",
            "set",
            "cluster.tls_verification",
            "Enforce",
        ],
    );
    wait_for(10, "Peer 2 has the change", || {
        c.get(2, "cluster.tls_verification").as_deref() == Some("Enforce")
    });
    restart(&mut c, 1);
    restart(&mut c, 2);
    // Peer 3 was down: it starts in Permissive and is refused for it.
    c.launch(3);
    let file = c.peers[2].dir.join("causeway.toml");
    wait_for(20, "Peer 3 takes the primary's mode into its file", || {
        std::fs::read_to_string(&file)
            .unwrap()
            .contains("tls_verification = \"Enforce\"")
    });
    assert!(c.alarm_raised(3, 20007, "cluster.tls_verification"));
    restart(&mut c, 3);
    wait_for(30, "every peer Active", || c.formed());
}

#[test]
fn a_peer_that_respells_its_own_entry_as_a_name_stays_in_the_cluster() {
    let mut c = TestCluster::start(88, 3, "Permissive", |_, _, _, _| {});
    wait_for(20, "cluster formed", || c.formed());
    ok(
        &c,
        1,
        &[
            "xconfiguration",
            "set",
            "cluster.address_mapping.peer2.lab",
            &addr(88, 2),
        ],
    );
    let list = format!("{},peer2.lab,{}", addr(88, 1), addr(88, 3));
    // One peer at a time, Peer 2 itself first.
    for k in [2, 1, 3] {
        wait_for(10, "the mapping reached the peer", || {
            c.get(k, "cluster.address_mapping.peer2.lab").as_deref() == Some(&addr(88, 2)[..])
        });
        ok(&c, k, &["xconfiguration", "set", "cluster.peers", &list]);
        restart(&mut c, k);
        wait_for(30, "every peer Active again", || c.formed());
    }
    assert_eq!(c.get(2, "system.address").as_deref(), Some("peer2.lab"));
    let file = std::fs::read_to_string(c.peers[1].dir.join("causeway.toml")).unwrap();
    assert!(
        file.contains(&format!("listen = \"{}\"", addr(88, 2))),
        "Peer 2 listens where it did: {file}"
    );
}
