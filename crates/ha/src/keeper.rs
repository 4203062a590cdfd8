//! The address keeper (docs/ha.md, section 4): a small process of its own, `causeway
//! ha-keeper`, that adds and removes one virtual IP for the agent and takes it away by itself
//! when the agent stops extending its hold — dead (`kill -9`: its end of the pipe closes),
//! frozen (`SIGSTOP`: no `Hold` arrives before the deadline) or demoted.
//!
//! The agent writes one JSON message per line on the keeper's standard input and reads one
//! per line from its standard output. Deadlines are absolute `CLOCK_MONOTONIC` times, taken
//! by the agent when it computed them, so a freeze between computing and sending cannot
//! stretch them.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

use crate::vip::{NetlinkVip, Vip, VirtualIp};

/// Agent → keeper.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    /// Have the address until `until_ns` (CLOCK_MONOTONIC), held at `generation`.
    Hold { generation: u64, until_ns: u64 },
    /// Remove it now.
    Release { generation: u64 },
}

/// Keeper → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Report {
    /// Ready; the address was removed at start if a crashed keeper had left it.
    Ready { removed_leftover: bool },
    /// The address is on the interface (added now at `generation`).
    Added { generation: u64 },
    /// The address is gone: released, or the deadline passed (`expired`).
    Removed { generation: u64, expired: bool },
    /// A `Hold` that would extend an older generation, or that came too late.
    Refused { reason: String },
    /// Netlink failed.
    Failed { reason: String },
    /// Gratuitous ARP frames sent since the last add.
    Announced { frames: u32 },
    /// While this node held the address, another host (`mac`) claimed it in an ARP frame.
    Conflict { mac: String },
}

/// Now on CLOCK_MONOTONIC, in nanoseconds: the clock both processes share.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32))
        .unwrap_or_default();
    ts.as_nanos() as u64
}

/// `until` (tokio's clock) as CLOCK_MONOTONIC nanoseconds.
pub fn to_monotonic(until: tokio::time::Instant) -> u64 {
    let left = until.saturating_duration_since(tokio::time::Instant::now());
    monotonic_ns() + left.as_nanos() as u64
}

/// The keeper process: `causeway ha-keeper --interface IF --vip ADDR/PREFIX`. Returns the
/// process's exit status.
pub fn main(interface: &str, vip: &str) -> i32 {
    let vip = match parse_vip(interface, vip) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("error: ha-keeper: {e}");
            return 64;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: ha-keeper: starting the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(keep(vip))
}

fn parse_vip(interface: &str, vip: &str) -> Result<Vip, String> {
    let (addr, prefix) = vip
        .split_once('/')
        .ok_or_else(|| format!("'{vip}' is not ADDRESS/PREFIX"))?;
    let address: IpAddr = addr
        .parse()
        .map_err(|_| format!("'{addr}' is not an IP address"))?;
    let prefix: u8 = prefix
        .parse()
        .map_err(|_| format!("'{prefix}' is not a prefix length"))?;
    Ok(Vip {
        interface: interface.to_string(),
        address,
        prefix,
    })
}

async fn say(out: &mut tokio::io::Stdout, report: &Report) {
    if let Ok(mut line) = serde_json::to_vec(report) {
        line.push(b'\n');
        // The agent gone: nothing to tell; EOF on stdin ends the keeper.
        let _ = out.write_all(&line).await;
        let _ = out.flush().await;
    }
}

/// Removes the address, retrying every 5 ms for up to a second: an address that stays is a
/// second holder in the making.
async fn remove(net: &NetlinkVip, vip: &Vip) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..200 {
        match net.remove(vip).await {
            Ok(()) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Err(last)
}

async fn keep(vip: Vip) -> i32 {
    let mut out = tokio::io::stdout();
    let net = match NetlinkVip::connect() {
        Ok(n) => n,
        Err(e) => {
            say(
                &mut out,
                &Report::Failed {
                    reason: format!("opening netlink: {e}"),
                },
            )
            .await;
            return 1;
        }
    };
    // Whatever is there at start was left by a keeper that could not clean up.
    let leftover = matches!(net.present(&vip).await, Ok(true));
    if leftover {
        if let Err(reason) = remove(&net, &vip).await {
            say(&mut out, &Report::Failed { reason }).await;
        }
    }
    say(
        &mut out,
        &Report::Ready {
            removed_leftover: leftover,
        },
    )
    .await;

    let (order_tx, mut orders) = mpsc::channel::<Option<Order>>(64);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    // A line we cannot read is not an order; the deadline still holds.
                    if let Ok(order) = serde_json::from_str::<Order>(&line) {
                        if order_tx.send(Some(order)).await.is_err() {
                            return;
                        }
                    }
                }
                _ => {
                    let _ = order_tx.send(None).await;
                    return;
                }
            }
        }
    });

    let mut conflicts = watch_for_conflicts(&vip);
    // The last conflict reported, per MAC: one report a second at most.
    let mut reported: Option<(String, tokio::time::Instant)> = None;
    let mut highest = 0u64;
    // The generation the address is held at, and the monotonic deadline.
    let mut held: Option<(u64, u64)> = None;
    let mut announcer: Option<tokio::task::JoinHandle<()>> = None;
    let (garp_tx, mut garp_rx) = mpsc::unbounded_channel::<u32>();
    loop {
        let sleep = match held {
            Some((_, until)) => Duration::from_nanos(until.saturating_sub(monotonic_ns())),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            order = orders.recv() => match order.flatten() {
                None => {
                    // The agent is gone: nobody may extend the hold any more.
                    if held.is_some() || matches!(net.present(&vip).await, Ok(true)) {
                        let _ = remove(&net, &vip).await;
                    }
                    return 0;
                }
                Some(Order::Hold { generation, until_ns }) => {
                    if generation < highest {
                        say(&mut out, &Report::Refused {
                            reason: format!("generation {generation} is older than {highest}"),
                        }).await;
                        continue;
                    }
                    if until_ns <= monotonic_ns() {
                        say(&mut out, &Report::Refused { reason: "the hold had already ended".into() }).await;
                        continue;
                    }
                    highest = generation;
                    let was = held.replace((generation, until_ns));
                    if was.is_none() {
                        match net.add(&vip).await {
                            Ok(()) => {
                                say(&mut out, &Report::Added { generation }).await;
                                if let Some(a) = announcer.take() {
                                    a.abort();
                                }
                                announcer = Some(announce(vip.clone(), garp_tx.clone()));
                            }
                            Err(e) => {
                                held = None;
                                say(&mut out, &Report::Failed { reason: e.to_string() }).await;
                            }
                        }
                    }
                }
                Some(Order::Release { generation }) => {
                    highest = highest.max(generation);
                    if let Some(a) = announcer.take() {
                        a.abort();
                    }
                    let had = held.take();
                    match remove(&net, &vip).await {
                        Ok(()) => {
                            if had.is_some() {
                                say(&mut out, &Report::Removed { generation, expired: false }).await;
                            }
                        }
                        Err(reason) => say(&mut out, &Report::Failed { reason }).await,
                    }
                }
            },
            Some(frames) = garp_rx.recv() => {
                say(&mut out, &Report::Announced { frames }).await;
            }
            Some(mac) = conflicts.recv() => {
                // Another host claiming the address matters only while it is ours; before,
                // the claimant is the pair peer that held it.
                let repeat = reported.as_ref().is_some_and(|(m, at)| {
                    *m == mac && at.elapsed() < Duration::from_secs(1)
                });
                if held.is_some() && !repeat {
                    reported = Some((mac.clone(), tokio::time::Instant::now()));
                    say(&mut out, &Report::Conflict { mac }).await;
                }
            }
            _ = tokio::time::sleep(sleep), if held.is_some() => {
                if held.is_some_and(|(_, until)| until <= monotonic_ns()) {
                    let (generation, _) = held.take().unwrap_or_default();
                    if let Some(a) = announcer.take() {
                        a.abort();
                    }
                    match remove(&net, &vip).await {
                        Ok(()) => say(&mut out, &Report::Removed { generation, expired: true }).await,
                        Err(reason) => say(&mut out, &Report::Failed { reason }).await,
                    }
                }
            }
        }
    }
}

/// Watches the link for ARP frames that claim the address from another MAC (docs/ha.md,
/// 21026), on a thread of its own (a blocking packet socket), for the keeper's life. IPv4
/// only: IPv6 duplicate-address detection is the kernel's.
fn watch_for_conflicts(vip: &Vip) -> mpsc::UnboundedReceiver<String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let IpAddr::V4(ip) = vip.address else {
        return rx;
    };
    let socket = match crate::arp::ArpSocket::open(&vip.interface) {
        Ok(s) => s,
        Err(_) => return rx,
    };
    let _ = std::thread::Builder::new()
        .name("ha-arp-watch".into())
        .spawn(move || {
            let _ = socket.set_read_timeout(Duration::from_millis(500));
            let mut buf = [0u8; 1600];
            while !tx.is_closed() {
                let Ok(n) = socket.recv(&mut buf) else {
                    continue;
                };
                if let Some(mac) = crate::arp::claims_from_another(&buf[..n], ip, socket.mac) {
                    if tx.send(crate::arp::mac_text(mac)).is_err() {
                        return;
                    }
                }
            }
        });
    rx
}

/// Gratuitous ARP (IPv4) or unsolicited neighbour advertisements (IPv6) on the schedule of
/// section 4.
fn announce(vip: Vip, sent: mpsc::UnboundedSender<u32>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let socket = match crate::arp::ArpSocket::open(&vip.interface) {
            Ok(s) => s,
            Err(_) => return,
        };
        let frame: Vec<u8> = match vip.address {
            IpAddr::V4(ip) => crate::arp::garp_request(socket.mac, ip).to_vec(),
            IpAddr::V6(ip) => crate::arp::unsolicited_na(socket.mac, ip).to_vec(),
        };
        let start = tokio::time::Instant::now();
        let mut frames = 0;
        for at in crate::arp::SCHEDULE_MS {
            tokio::time::sleep_until(start + Duration::from_millis(at)).await;
            if socket.send(&frame).is_ok() {
                frames += 1;
            }
            if at == 0 || at == *crate::arp::SCHEDULE_MS.last().unwrap_or(&0) {
                let _ = sent.send(frames);
            }
        }
    })
}

/// The agent's side: the keeper child and its reports.
pub struct Keeper {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    pub reports: mpsc::UnboundedReceiver<Report>,
}

impl Keeper {
    /// Starts `program ha-keeper …` (the running binary) in its own process group, so a
    /// terminal's Ctrl-C reaches the agent and the keeper cleans up on the agent's exit.
    pub async fn spawn(program: &std::path::Path, vip: &Vip) -> std::io::Result<Self> {
        let mut child = tokio::process::Command::new(program)
            .arg("ha-keeper")
            .arg("--interface")
            .arg(&vip.interface)
            .arg("--vip")
            .arg(format!("{}/{}", vip.address, vip.prefix))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| std::io::Error::other("the keeper's stdin is not piped"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the keeper's stdout is not piped"))?;
        let (tx, reports) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(r) = serde_json::from_str::<Report>(&line) {
                    if tx.send(r).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self {
            child,
            stdin,
            reports,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends one order; an error means the keeper is gone.
    pub async fn send(&mut self, order: Order) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(&order).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await
    }

    /// Closes its input (it removes the address and exits) and waits up to a second.
    pub async fn stop(mut self) {
        drop(self.stdin);
        if tokio::time::timeout(Duration::from_secs(1), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_and_reports_travel_as_one_json_line_each() {
        let o = Order::Hold {
            generation: 7,
            until_ns: 123,
        };
        let s = serde_json::to_string(&o).unwrap();
        assert!(!s.contains('\n'));
        assert_eq!(serde_json::from_str::<Order>(&s).unwrap(), o);
        let r = Report::Removed {
            generation: 7,
            expired: true,
        };
        assert_eq!(
            serde_json::from_str::<Report>(&serde_json::to_string(&r).unwrap()).unwrap(),
            r
        );
    }

    #[test]
    fn the_vip_argument_is_address_and_prefix() {
        let v = parse_vip("eth0", "198.18.0.10/24").unwrap();
        assert_eq!(v.prefix, 24);
        assert!(parse_vip("eth0", "198.18.0.10")
            .unwrap_err()
            .contains("ADDRESS/PREFIX"));
        assert!(parse_vip("eth0", "x/24").unwrap_err().contains("not an IP"));
    }

    #[tokio::test]
    async fn a_monotonic_deadline_is_ahead_by_what_was_left() {
        let now = monotonic_ns();
        let later = to_monotonic(tokio::time::Instant::now() + Duration::from_millis(100));
        assert!(later >= now + 99_000_000 && later < now + 200_000_000);
    }
}
