//! A command whose reader has gone (`causeway xstatus cluster | true`, `… | head`) stops
//! quietly with 141, as a Unix tool stopped by SIGPIPE does: never a panic (exit 101).
//! One standalone node on 127.0.85.1: it opens its admin socket and no port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_causeway");

/// A standalone `causeway run`, stopped by its PID when dropped.
struct Standalone {
    child: Child,
    dir: tempfile::TempDir,
}

impl Standalone {
    fn start(address: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("causeway.toml");
        std::fs::write(
            &config,
            format!(
                "[node]\nsystem_name = \"pipes\"\naddress = \"{address}\"\ndata_dir = \"{}\"\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("causeway.log")).unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let node = Standalone { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !node.answers() {
            assert!(
                Instant::now() < deadline,
                "the node did not answer on its admin socket within 20 s: {}",
                std::fs::read_to_string(node.path().join("causeway.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        node
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn answers(&self) -> bool {
        Command::new(BIN)
            .arg("--node")
            .arg(self.path())
            .args(["xstatus", "cluster", "--json"])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `causeway [--node NODE] ARGS` with its standard output a pipe whose reader is
/// already gone, so its first line meets a closed pipe.
fn into_a_closed_pipe(node: Option<&Path>, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut cmd = Command::new(BIN);
    if let Some(node) = node {
        cmd.arg("--node").arg(node);
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap()
}

fn assert_stops_quietly(what: &str, out: &Output) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert_eq!(out.status.code(), Some(141), "{what}: {err}");
}

#[test]
fn xstatus_and_xconfiguration_into_a_closed_pipe_stop_with_141_not_a_panic() {
    let node = Standalone::start("127.0.85.1");
    for args in [
        &["xstatus", "cluster"][..],
        &["xstatus", "cluster", "--json"],
        &["xstatus", "alarms"],
        &["xstatus", "alarms", "--json"],
        &["xstatus", "services"],
        &["xconfiguration", "get"],
        &["xconfiguration", "get", "--json"],
        &["xconfiguration", "get", "system.name"],
    ] {
        assert_stops_quietly(
            &args.join(" "),
            &into_a_closed_pipe(Some(node.path()), args),
        );
    }
    // The node is unharmed and still answers.
    assert!(node.answers());
}

#[test]
fn a_command_without_a_node_into_a_closed_pipe_stops_with_141() {
    let dir = tempfile::tempdir().unwrap();
    let ca: PathBuf = dir.path().join("ca");
    let out = into_a_closed_pipe(None, &["pki", "ca", "init", "--dir", ca.to_str().unwrap()]);
    assert_stops_quietly("pki ca init", &out);
    // It did its work before its output met the closed pipe.
    assert!(ca.join("ca.key").exists());
}
