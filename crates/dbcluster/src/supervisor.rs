//! The `postgres` child: started as the PostgreSQL OS user in its own process group, with
//! SIGQUIT as its parent-death signal, and stopped fast (a clean stop), at once (`Fence`:
//! SIGQUIT, every backend exits without acknowledging anything more) or by SIGKILL of its
//! group when it does not go.
//!
//! The parent-death signal fires when the *thread* that forked exits, not the process: the
//! child is forked from one long-lived thread of the supervisor's own, never from a tokio
//! blocking thread (those end after 10 s idle, which would kill a healthy postgres).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::{oneshot, watch};

use crate::tools::Tools;

/// What runs, as the supervisor knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Child {
    None,
    Running {
        pid: u32,
        data: PathBuf,
    },
    /// The last child exited by itself (not stopped by us) with this status.
    Exited {
        data: PathBuf,
        status: String,
    },
}

type SpawnRequest = (
    std::process::Command,
    oneshot::Sender<std::io::Result<std::process::Child>>,
);

pub struct Supervisor {
    tools: Tools,
    spawner: Mutex<mpsc::Sender<SpawnRequest>>,
    child: watch::Sender<Child>,
    /// Set by `stop`: the exit that follows is ours, not a crash.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    log: PathBuf,
}

impl Supervisor {
    pub fn new(tools: Tools, log: PathBuf) -> anyhow::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("pg-spawner".into())
            .spawn(move || {
                // Lives as long as the process: its exit is what the death signal watches.
                while let Ok((mut cmd, answer)) = rx.recv() {
                    let _ = answer.send(cmd.spawn());
                }
                // The sender is gone (the service stopped): stay, so running children are
                // not signalled by this thread's end; the process exit still reaches them.
                loop {
                    std::thread::park();
                }
            })
            .context("starting the postgres spawner thread")?;
        Ok(Arc::new(Self {
            tools,
            spawner: Mutex::new(tx),
            child: watch::channel(Child::None).0,
            stopping: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            log,
        }))
    }

    pub fn watch(&self) -> watch::Receiver<Child> {
        self.child.subscribe()
    }

    pub fn current(&self) -> Child {
        self.child.borrow().clone()
    }

    pub fn running_pid(&self) -> Option<u32> {
        match &*self.child.borrow() {
            Child::Running { pid, .. } => Some(*pid),
            _ => None,
        }
    }

    /// Starts `postgres -D data`. Fails if one runs already.
    pub async fn start(&self, data: &Path) -> anyhow::Result<u32> {
        if let Some(pid) = self.running_pid() {
            return Err(anyhow!("postgres already runs (PID {pid})"));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let mut cmd = std::process::Command::new(self.tools.bin("postgres"));
        // systemd's socket is the node's to notify on, not PostgreSQL's.
        cmd.arg("-D").arg(data).env_remove("NOTIFY_SOCKET");
        if let Some((uid, gid)) = self.tools.run_as {
            use std::os::unix::process::CommandExt as _;
            cmd.uid(uid).gid(gid);
        }
        {
            use std::os::unix::process::CommandExt as _;
            cmd.process_group(0)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .env("LC_ALL", "C")
                .env_remove("PGDATA");
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of
            // the parent; it runs after the user change, which would otherwise clear it.
            unsafe {
                cmd.pre_exec(|| {
                    nix::sys::prctl::set_pdeathsig(Signal::SIGQUIT).map_err(std::io::Error::from)
                });
            }
        }
        let (tx, rx) = oneshot::channel();
        self.spawner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send((cmd, tx))
            .map_err(|_| anyhow!("the postgres spawner thread has ended"))?;
        let mut child = rx
            .await
            .map_err(|_| anyhow!("the postgres spawner thread has ended"))?
            .with_context(|| format!("starting {}", self.tools.bin("postgres").display()))?;
        let pid = child.id();
        self.stopping
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.child.send_replace(Child::Running {
            pid,
            data: data.to_path_buf(),
        });
        // Reaped on a plain thread: it only waits, so its end signals nobody.
        let (state, stopping, data) = (
            self.child.clone(),
            self.stopping.clone(),
            data.to_path_buf(),
        );
        std::thread::Builder::new()
            .name("pg-reaper".into())
            .spawn(move || {
                let status = child
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| e.to_string());
                let ours = stopping.swap(false, std::sync::atomic::Ordering::SeqCst);
                state.send_replace(if ours {
                    Child::None
                } else {
                    Child::Exited { data, status }
                });
            })
            .context("starting the postgres reaper thread")?;
        Ok(pid)
    }

    /// Stops the running postgres: `signal` to the postmaster (SIGINT: fast, SIGQUIT:
    /// immediate), then SIGKILL of its process group after `grace`. Done when it has exited.
    pub async fn stop(&self, signal: Signal, grace: Duration) {
        let Some(pid) = self.running_pid() else {
            return;
        };
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut w = self.child.subscribe();
        let _ = kill(Pid::from_raw(pid as i32), signal);
        let exited = |c: &Child| !matches!(c, Child::Running { pid: p, .. } if *p == pid);
        if tokio::time::timeout(grace, w.wait_for(exited))
            .await
            .is_err()
        {
            let _ = killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
            let _ = tokio::time::timeout(Duration::from_secs(5), w.wait_for(exited)).await;
        }
    }

    /// Sends SIGQUIT to the postmaster without waiting: the first step of fencing, called
    /// from the lease watcher the moment the lease is lost.
    pub fn quit_now(&self) -> bool {
        match self.running_pid() {
            Some(pid) => {
                self.stopping
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                kill(Pid::from_raw(pid as i32), Signal::SIGQUIT).is_ok()
            }
            None => false,
        }
    }

    /// Clears an `Exited` state once the loop has seen it.
    pub fn forget_exit(&self) {
        self.child.send_if_modified(|c| {
            if matches!(c, Child::Exited { .. }) {
                *c = Child::None;
                true
            } else {
                false
            }
        });
    }
}

/// A postmaster left running by an agent that died (its `postmaster.pid` names a live
/// postgres for `data`): stopped at once before anything else starts.
pub fn stop_leftover(data: &Path) {
    let Ok(text) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return;
    };
    let cmdline = String::from_utf8_lossy(&cmdline);
    if !cmdline.contains("postgres") || !cmdline.contains(&*data.to_string_lossy()) {
        return;
    }
    tracing::warn!(target: crate::LOG, pid, data = %data.display(), "Stopping a postgres left running by an earlier agent");
    let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    for _ in 0..50 {
        if !Path::new(&format!("/proc/{pid}")).exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
}
