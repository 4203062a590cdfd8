//! The black-box harness: clusters of `causeway run` processes on loopback addresses (each
//! test its own 127.0.N.0/24, so nothing collides with a running lab), stopped by PID.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_causeway");

pub type Env = Vec<(String, String)>;

pub struct Peer {
    pub dir: PathBuf,
    pub child: Option<Child>,
    pub env: Env,
}

pub struct TestCluster {
    pub _tmp: tempfile::TempDir,
    pub peers: Vec<Peer>,
}

pub fn addr(net: u8, k: usize) -> String {
    format!("127.0.{net}.{k}")
}

impl TestCluster {
    /// Writes a CA, certificates and configs for `n` peers on 127.0.`net`.k and starts them.
    /// `setup(k, config, cn, env)` may change a peer before it starts; a CN of "untrusted"
    /// has the peer's certificate signed by another CA.
    pub fn start(
        net: u8,
        n: usize,
        mode: &str,
        setup: impl Fn(usize, &mut String, &mut String, &mut Env),
    ) -> Self {
        causeway_pki::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        // A database node's PostgreSQL runs as the postgres OS user: it must reach the
        // peers' directories.
        set_mode(tmp.path(), 0o755);
        let ca = causeway_pki::ca_init(&tmp.path().join("ca"), "test CA").unwrap();
        let other_ca = causeway_pki::ca_init(&tmp.path().join("other-ca"), "untrusted CA").unwrap();
        let list: Vec<String> = (1..=n).map(|k| format!("\"{}\"", addr(net, k))).collect();
        let mut peers = Vec::new();
        for k in 1..=n {
            let dir = tmp.path().join(format!("peer{k}"));
            std::fs::create_dir_all(&dir).unwrap();
            set_mode(&dir, 0o755);
            let mut config = format!(
                "[node]\nsystem_name = \"peer{k}\"\naddress = \"{}\"\ndata_dir = \"{}\"\n\n[cluster]\nname = \"test.lab.example\"\ntls_verification = \"{mode}\"\npeers = [{}]\n",
                addr(net, k),
                dir.display(),
                list.join(", ")
            );
            let mut cn = addr(net, k);
            let mut env = Vec::new();
            setup(k, &mut config, &mut cn, &mut env);
            let signer = if cn == "untrusted" {
                cn = addr(net, k);
                &other_ca
            } else {
                &ca
            };
            let subject = causeway_pki::parse_subject_args(&[format!("CN:{cn}")]).unwrap();
            let (_, csr) = causeway_pki::csr(&dir, "node", &subject).unwrap();
            causeway_pki::sign_csr(&csr, signer, 30, &dir.join("node.crt")).unwrap();
            std::fs::copy(&ca.cert, dir.join("ca.crt")).unwrap();
            std::fs::write(dir.join("causeway.toml"), config).unwrap();
            peers.push(Peer {
                dir,
                child: None,
                env,
            });
        }
        let mut c = TestCluster { _tmp: tmp, peers };
        for k in 1..=n {
            c.launch(k);
        }
        c
    }

    pub fn launch(&mut self, k: usize) {
        let p = &mut self.peers[k - 1];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p.dir.join("causeway.log"))
            .unwrap();
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(p.dir.join("causeway.toml"))
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        p.child = Some(child);
    }

    /// SIGKILL, by the PID we started.
    pub fn kill9(&mut self, k: usize) {
        if let Some(mut child) = self.peers[k - 1].child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn xstatus(&self, k: usize, what: &str) -> Option<Value> {
        let out = Command::new(BIN)
            .arg("--node")
            .arg(&self.peers[k - 1].dir)
            .args(["xstatus", what, "--json"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// (clustering state, its reason, "certificate state reason") of peer `of` seen by `k`.
    pub fn peer_state(&self, k: usize, of: usize) -> Option<(String, String, String)> {
        let s = self.xstatus(k, "cluster")?;
        let p = &s["peers"][of - 1];
        Some((
            p["clustering"]["state"].as_str()?.to_string(),
            p["clustering"]["reason"].as_str().unwrap_or("").to_string(),
            format!(
                "{} {}",
                p["certificate"]["state"].as_str()?,
                p["certificate"]["reason"].as_str().unwrap_or("")
            ),
        ))
    }

    pub fn alarm_raised(&self, k: usize, id: u64, subject: &str) -> bool {
        self.xstatus(k, "alarms")
            .and_then(|a| a["active"].as_array().cloned())
            .is_some_and(|active| {
                active
                    .iter()
                    .any(|a| a["id"] == id && a["subject"] == subject)
            })
    }

    pub fn formed(&self) -> bool {
        (1..=self.peers.len())
            .filter(|&k| self.peers[k - 1].child.is_some())
            .all(|k| {
                self.xstatus(k, "cluster")
                    .and_then(|s| s["peers"].as_array().cloned())
                    .is_some_and(|ps| {
                        ps.iter().all(|p| {
                            matches!(
                                p["clustering"]["state"].as_str(),
                                Some("Active" | "This system")
                            )
                        })
                    })
            })
    }

    /// Runs the CLI against peer `k`: (success, stdout, stderr).
    pub fn cli(&self, k: usize, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(BIN)
            .arg("--node")
            .arg(&self.peers[k - 1].dir)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// One configuration item's value on peer `k`.
    pub fn get(&self, k: usize, path: &str) -> Option<String> {
        let (ok, out, _) = self.cli(k, &["xconfiguration", "get", path]);
        ok.then(|| out.trim_end().to_string())
    }

    pub fn log(&self, k: usize) -> String {
        std::fs::read_to_string(self.peers[k - 1].dir.join("causeway.log")).unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // A failed test shows what each peer said last: the directory goes with the test.
        if std::thread::panicking() {
            for k in 1..=self.peers.len() {
                let log = self.log(k);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                eprintln!("--- peer {k}, last lines of causeway.log ---\n{tail}");
            }
        }
        for p in &mut self.peers {
            if let Some(mut c) = p.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Peer `k`'s `/metrics`, read over its admin socket.
pub fn metrics(c: &TestCluster, k: usize) -> String {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(c.peers[k - 1].dir.join("admin.sock"))
        .expect("the admin socket accepts");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: peer\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// `xconfiguration set` on peer `k`; the test fails with the CLI's error if it is refused.
pub fn set(c: &TestCluster, k: usize, path: &str, value: &str) {
    let out = Command::new(BIN)
        .arg("--node")
        .arg(&c.peers[k - 1].dir)
        .args(["xconfiguration", "set", path, value])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "xconfiguration set {path} {value}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP connection to `to` from `from` (bound first, so the node sees that source).
pub fn tcp_from(from: &str, to: &str) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    let remote: std::net::SocketAddr = to.parse().unwrap();
    socket
        .connect_timeout(&remote.into(), Duration::from_secs(5))
        .unwrap();
    socket.into()
}

/// TLS over `tcp` to `host`, trusting the cluster's CA (as Peer 1 holds it).
pub fn tls_over(
    c: &TestCluster,
    tcp: std::net::TcpStream,
    host: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in causeway_pki::load_certs(&c.peers[0].dir.join("ca.crt")).unwrap() {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_string()).unwrap();
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}
