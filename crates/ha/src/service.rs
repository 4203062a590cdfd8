//! The HA service of a node (docs/ha.md): one [`Instance`] per pair this node is in — as
//! primary, as secondary (one or two), or as the witness — and the pairing handshake.
//!
//! Every node of a clustered system runs it: a node without an `[ha]` section can be a
//! pair's witness, started when a pair member introduces the pair (`ha/hello`) and again
//! at every start from `DIR/ha/witness.json`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use causeway_cluster::{CapacityClass, HaRole, HaSection, Node};
use causeway_common::error::Refusal;
use causeway_mesh::BoxFuture;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::catalogue::{NO_WITNESS, PAIRING_REFUSED};
use crate::instance::{Instance, Role};
use crate::lease::{BeatLease, PairLease};
use crate::pair::{self, default_witness, Hello, HelloAnswer, Members, PairSettings};
use crate::LOG;

pub struct HaService {
    node: Arc<Node>,
    section: Option<HaSection>,
    dir: PathBuf,
    me: usize,
    peers: Vec<String>,
    instances: Mutex<BTreeMap<usize, Arc<Instance>>>,
    /// Says hello at once (the primary's settings changed).
    introduce_now: tokio::sync::Notify,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

fn section_interface(section: Option<&HaSection>) -> String {
    section
        .map(|s| s.health_monitor_interface.clone())
        .unwrap_or_default()
}

fn refuse_pairing(node: &Node, pair: usize, reason: String) -> String {
    node.alarms()
        .raise(PAIRING_REFUSED, &format!("pair {pair}"), &reason);
    warn!(target: LOG, event = "Pairing refused", pair = pair, reason = %reason, "");
    reason
}

impl HaService {
    /// Starts the service: the pairs of the `[ha]` section, and the witness of every pair
    /// that named this node before.
    pub async fn start(node: Arc<Node>, section: Option<HaSection>) -> anyhow::Result<Arc<Self>> {
        let config = node.config().clone();
        let dir = config.node.data_dir.join("ha");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let (me, peers) = match node.mesh() {
            Some(m) => (m.settings().self_index, m.settings().peers.clone()),
            None => anyhow::bail!(
                "an HA pair needs the peer cluster: list the primary, the secondary and the witness in cluster.peers"
            ),
        };
        let svc = Arc::new(Self {
            node: node.clone(),
            section: section.clone(),
            dir: dir.clone(),
            me,
            peers: peers.clone(),
            instances: Mutex::new(BTreeMap::new()),
            introduce_now: tokio::sync::Notify::new(),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        if let Some(s) = &section {
            // 0: no witness (none named, or no third peer to be one).
            let witness_of = |primary: usize, secondary: usize| -> anyhow::Result<usize> {
                match s.witness.as_deref() {
                    None => Ok(default_witness(peers.len(), primary, secondary).unwrap_or(0)),
                    Some("none") => Ok(0),
                    Some("cluster") => {
                        if peers.len() % 2 == 0 {
                            warn!(target: LOG, event = "HA witness", peers = peers.len(),
                                reason = "an even number of peers vote for the pair: losing half of them stops the virtual IP", "");
                        }
                        Ok(pair::CLUSTER_WITNESS)
                    }
                    Some(n) => n.parse().context("ha.witness"),
                }
            };
            match s.role {
                HaRole::Primary => {
                    let secondary = s.secondary.context("ha.secondary is missing")?;
                    let members = Members {
                        primary: me,
                        secondary,
                        witness: witness_of(me, secondary)?,
                        cluster: peers.len(),
                    };
                    let settings =
                        PairSettings::of_primary(s).context("ha.virtual_ip and ha.netmask")?;
                    // Unpaired earlier: it keeps the address on its own.
                    let members = if svc.unpaired(me) {
                        Members::standalone(me)
                    } else {
                        members
                    };
                    svc.add(Role::Primary, members, Some(settings))?;
                }
                HaRole::Secondary => {
                    for &p in &s.primaries {
                        let members = Members {
                            primary: p,
                            secondary: me,
                            witness: witness_of(p, me)?,
                            cluster: peers.len(),
                        };
                        if svc.unpaired(p) {
                            info!(target: LOG, event = "HA pair not started", pair = p,
                                reason = "unpaired: remove DIR/ha/unpaired-<pair> to pair again", "");
                            continue;
                        }
                        let settings = std::fs::read(svc.settings_file(p))
                            .ok()
                            .and_then(|b| serde_json::from_slice::<PairSettings>(&b).ok());
                        svc.add(Role::Secondary, members, settings)?;
                    }
                }
                HaRole::Witness => {}
            }
        }
        for members in svc.saved_witness_pairs() {
            if let Err(e) = svc.add(Role::Witness, members, None) {
                warn!(target: LOG, pair = members.primary, reason = %e, "Witness of a pair not started");
            }
        }
        node.metrics()
            .register(Box::new(Collector(Arc::downgrade(&svc))));
        svc.serve_hello();
        svc.serve_unpair();
        let s = svc.clone();
        svc.tasks.spawn(async move { s.introduce().await });
        Ok(svc)
    }

    fn settings_file(&self, pair: usize) -> PathBuf {
        self.dir.join(format!("pair-{pair}.json"))
    }

    fn saved_witness_pairs(&self) -> Vec<Members> {
        std::fs::read(self.dir.join("witness.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn capacity(&self) -> CapacityClass {
        self.section
            .as_ref()
            .map_or(CapacityClass::Standard, |s| s.capacity_class)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<usize, Arc<Instance>>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(
        &self,
        role: Role,
        members: Members,
        settings: Option<PairSettings>,
    ) -> anyhow::Result<()> {
        if self.lock().contains_key(&members.primary) {
            return Ok(());
        }
        let subject = format!("pair {}", members.primary);
        let lease = if members.witness == 0 {
            if members.secondary != 0 {
                self.node.alarms().raise(
                    NO_WITNESS,
                    &subject,
                    "no witness: a partition between primary and secondary can leave both holding the virtual IP",
                );
            }
            let peer = if role == Role::Primary {
                members.secondary
            } else {
                members.primary
            };
            PairLease::Beats(BeatLease::start(
                peer,
                section_interface(self.section.as_ref()),
                self.dir.join(format!("generation-{}", members.primary)),
            ))
        } else {
            self.node.alarms().lower(NO_WITNESS, &subject);
            PairLease::Group(
                self.node
                    .leases()
                    .start_group_with(&members.group(), members.voters(), pair::lease_timing())
                    .with_context(|| {
                        format!("starting the lease group of pair {}", members.primary)
                    })?,
            )
        };
        let section = self.section.as_ref();
        let local = crate::instance::Local {
            interface: section_interface(section),
            state_file: self.dir.join(format!("state-{}.json", members.primary)),
            keeper_program: std::env::current_exe()
                .context("finding this program for the address keeper")?,
            files_dir: section.and_then(|s| s.files_dir.clone()).map(|d| {
                // One copy per pair: a secondary of two primaries keeps each apart.
                if role == Role::Secondary && section.is_some_and(|s| s.primaries.len() > 1) {
                    d.join(format!("pair-{}", members.primary))
                } else {
                    d
                }
            }),
            direct: section
                .and_then(|s| s.direct_connect_interface.as_deref())
                .filter(|i| *i != "none")
                .map(|interface| {
                    crate::vip::interface_address(interface)
                        .map(|ip| {
                            std::net::SocketAddr::new(
                                ip,
                                pair::DIRECT_PORT_BASE + members.primary as u16,
                            )
                        })
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "ha.direct_connect_interface: '{interface}' has no address on this host"
                            )
                        })
                })
                .transpose()?,
            on_promote: section.and_then(|s| s.on_promote.clone()),
            on_demote: section.and_then(|s| s.on_demote.clone()),
            recovery_mode: section.is_some_and(|s| s.recovery_mode),
            sip_addresses: self.node.config().sip_addresses(),
        };
        let instance = Instance::new(
            role,
            members,
            self.me,
            local,
            lease,
            self.node.leases().rpc().clone(),
            self.node.alarms().clone(),
            settings,
        );
        instance.start();
        info!(target: LOG, event = "HA pair started", pair = members.primary, role = role.seed_name(),
            primary = members.primary, secondary = members.secondary, witness = members.witness, "");
        self.lock().insert(members.primary, instance);
        Ok(())
    }

    fn serve_hello(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.node
            .leases()
            .rpc()
            .serve(&pair::hello(), move |from, h: Hello| {
                let answer = match me.upgrade() {
                    Some(s) => s.answer_hello(from, h),
                    None => Err("stopping".into()),
                };
                async move { answer }
            });
    }

    fn answer_hello(&self, from: usize, h: Hello) -> Result<HelloAnswer, String> {
        let pair = h.members.primary;
        if h.version != causeway_common::SOFTWARE_VERSION {
            return Err(refuse_pairing(
                &self.node,
                pair,
                format!(
                    "different software versions: Peer {from} runs {}, this node {}",
                    h.version,
                    causeway_common::SOFTWARE_VERSION
                ),
            ));
        }
        if h.members.is_witness(self.me) {
            if !self.lock().contains_key(&pair) {
                let mut saved = self.saved_witness_pairs();
                saved.retain(|m| m.primary != pair);
                saved.push(h.members);
                if let Ok(b) = serde_json::to_vec(&saved) {
                    let _ = causeway_common::fsio::write_atomic(&self.dir.join("witness.json"), &b);
                }
                self.add(Role::Witness, h.members, None)
                    .map_err(|e| format!("{e:#}"))?;
            }
            return Ok(HelloAnswer {
                settings: None,
                capacity: self.capacity(),
                direct: None,
            });
        }
        let mine = self.lock().get(&pair).cloned();
        let Some(instance) = mine else {
            return Err(refuse_pairing(
                &self.node,
                pair,
                format!("this node (Peer {}) is not in a pair with primary Peer {pair}: check ha.primaries / ha.secondary", self.me),
            ));
        };
        if instance.members != h.members {
            return Err(refuse_pairing(
                &self.node,
                pair,
                format!(
                    "the pair differs: Peer {from} has primary {}, secondary {}, witness {}; this node has primary {}, secondary {}, witness {}",
                    h.members.primary, h.members.secondary, h.members.witness,
                    instance.members.primary, instance.members.secondary, instance.members.witness
                ),
            ));
        }
        if instance.role == Role::Primary && h.capacity < self.capacity() {
            return Err(refuse_pairing(
                &self.node,
                pair,
                format!(
                    "the secondary's capacity class ({:?}) is smaller than the primary's ({:?})",
                    h.capacity,
                    self.capacity()
                )
                .to_lowercase(),
            ));
        }
        self.node
            .alarms()
            .lower(PAIRING_REFUSED, &format!("pair {pair}"));
        if Some(from) == instance.pair_peer() {
            instance.set_direct_peer(h.direct);
        }
        if let (Role::Secondary, Some(s)) = (instance.role, h.settings) {
            self.take_settings(&instance, s);
        }
        Ok(HelloAnswer {
            settings: (instance.role == Role::Primary)
                .then(|| instance.settings())
                .flatten(),
            capacity: self.capacity(),
            direct: instance.direct_local(),
        })
    }

    /// Introduces each pair to its other members until both have answered, and keeps the
    /// secondary's copy of the primary's settings fresh (every 10 s).
    async fn introduce(self: Arc<Self>) {
        let rpc = self.node.leases().rpc().clone();
        loop {
            let instances: Vec<Arc<Instance>> = self.lock().values().cloned().collect();
            let mut all_done = true;
            for i in instances.iter().filter(|i| i.role != Role::Witness) {
                let hello = Hello {
                    members: i.members,
                    version: causeway_common::SOFTWARE_VERSION.to_string(),
                    capacity: self.capacity(),
                    direct: i.direct_local(),
                    settings: (i.role == Role::Primary).then(|| i.settings()).flatten(),
                };
                for peer in i.members.voters().into_iter().filter(|&p| p != self.me) {
                    match rpc
                        .call(&pair::hello(), peer, &hello, Duration::from_secs(1))
                        .await
                    {
                        Ok(answer) => {
                            if Some(peer) == i.pair_peer() {
                                i.set_direct_peer(answer.direct);
                            }
                            if let Some(s) = answer.settings {
                                self.take_settings(i, s);
                            }
                        }
                        Err(e) => {
                            all_done = false;
                            if let causeway_mesh::rpc::CallError::Remote { reason, .. } = &e {
                                refuse_pairing(&self.node, i.pair(), reason.clone());
                            }
                        }
                    }
                }
            }
            let pause = if all_done {
                Duration::from_secs(10)
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(pause) => {}
                _ = self.introduce_now.notified() => {}
            }
        }
    }

    fn instance(&self, pair: Option<usize>) -> Result<Arc<Instance>, Refusal> {
        let map = self.lock();
        match pair {
            Some(p) => map.get(&p).cloned().ok_or_else(|| {
                Refusal::invalid(format!("this node is in no pair with primary Peer {p}"))
            }),
            None => {
                let mut ours = map.values().filter(|i| i.role != Role::Witness);
                match (ours.next(), ours.next()) {
                    (Some(i), None) => Ok(i.clone()),
                    (None, _) => Err(Refusal::invalid("this node is not a member of an HA pair")),
                    (Some(_), Some(_)) => Err(Refusal::invalid(
                        "this secondary backs up two primaries: say which with --pair <primary's peer number>",
                    )),
                }
            }
        }
    }

    /// `ha switchover|failover|failback [--pair N] [--force]`.
    pub async fn command(
        &self,
        words: &[String],
        pair: Option<usize>,
        force: bool,
    ) -> Result<String, Refusal> {
        let instance = self.instance(pair)?;
        match words.first().map(String::as_str) {
            Some("switchover") => instance.switchover(force).await,
            Some("failover") => instance.failover(force),
            Some("failback") => instance.failback(force).await,
            Some("unpair") => self.unpair(&instance, force).await,
            Some("configure") => self.configure(&instance, &words[1..]),
            other => Err(Refusal::invalid(format!(
                "unknown command '{}': use switchover, failover, failback, unpair or configure",
                other.unwrap_or_default()
            ))),
        }
    }

    /// `ha configure failover=… failback=… failover_wait_ms=… guard_window_s=…` on the
    /// primary: written to its node file (so a restart keeps it), used at once, and given to
    /// the secondary at its next `ha/hello` (within 10 s; at once when it asks).
    fn configure(&self, instance: &Arc<Instance>, words: &[String]) -> Result<String, Refusal> {
        use causeway_cluster::HaMode;
        if instance.role != Role::Primary {
            return Err(Refusal::invalid(format!(
                "the pair's settings are the primary's: run 'ha configure' on Peer {}",
                instance.members.primary
            )));
        }
        let mut config = self.node.config().clone();
        let source = config.source.clone();
        // The file as it is now (an operator may have edited it since the start).
        if let Ok(now) = causeway_cluster::NodeConfig::load(&source) {
            config = now;
        }
        let ha = config
            .ha
            .as_mut()
            .ok_or_else(|| Refusal::invalid("this node's file has no [ha] section"))?;
        let mode = |v: &str, field: &str| match v.to_ascii_lowercase().as_str() {
            "automatic" => Ok(HaMode::Automatic),
            "manual" => Ok(HaMode::Manual),
            _ => Err(Refusal::invalid(format!(
                "{field}: '{v}' is neither automatic nor manual"
            ))),
        };
        let number = |v: &str, field: &str| {
            v.parse::<u64>()
                .map_err(|_| Refusal::invalid(format!("{field}: '{v}' is not a whole number")))
        };
        let mut remarks = vec![];
        for word in words {
            let (key, value) = word.split_once('=').ok_or_else(|| {
                Refusal::invalid(format!("'{word}': give setting=value (failover, failback, failover_wait_ms, guard_window_s)"))
            })?;
            match key {
                "failover" => {
                    ha.failover = mode(value, "ha.failover")?;
                    remarks.push(format!(
                        "Failover mode set to {}.",
                        value.to_ascii_uppercase()
                    ));
                }
                "failback" => {
                    ha.failback = mode(value, "ha.failback")?;
                    remarks.push(format!(
                        "Failback mode set to {}.",
                        value.to_ascii_uppercase()
                    ));
                }
                "failover_wait_ms" => {
                    ha.failover_wait_ms = number(value, "ha.failover_wait_ms")?;
                    remarks.push(format!("Failover wait set to {value} ms."));
                }
                "guard_window_s" => {
                    ha.guard_window_s = number(value, "ha.guard_window_s")?;
                    remarks.push(format!("Guard window set to {value} s."));
                }
                other => {
                    return Err(Refusal::invalid(format!(
                        "'{other}' is not a setting 'ha configure' changes"
                    )))
                }
            }
        }
        if remarks.is_empty() {
            return Err(Refusal::invalid("nothing to change: give failover=, failback=, failover_wait_ms= or guard_window_s="));
        }
        config
            .validate()
            .map_err(|e| Refusal::invalid(e.to_string()))?;
        let settings = config
            .ha
            .as_ref()
            .and_then(PairSettings::of_primary)
            .ok_or_else(|| Refusal::internal("the [ha] section lost its virtual IP"))?;
        config.save().map_err(Refusal::internal)?;
        instance.set_settings(settings);
        instance.record("Configuration updated", &remarks.join(" "));
        self.introduce_now.notify_one();
        Ok(format!("Configuration updated: {}", remarks.join(" ")))
    }

    /// A secondary keeps its primary's settings, on disk too: it must be able to take over
    /// a primary it cannot reach after a restart.
    fn take_settings(&self, instance: &Arc<Instance>, s: PairSettings) {
        if instance.settings().as_ref() == Some(&s) {
            return;
        }
        if let Ok(b) = serde_json::to_vec(&s) {
            let _ = causeway_common::fsio::write_atomic(&self.settings_file(instance.pair()), &b);
        }
        let first = instance.settings().is_none();
        info!(target: LOG, event = "HA pair settings received", pair = instance.pair(), vip = %s.vip,
            failover = ?s.failover, failback = ?s.failback, failover_wait_ms = s.failover_wait_ms, "");
        instance.set_settings(s);
        instance.record(
            if first {
                "Configuration successfully created"
            } else {
                "Configuration updated"
            },
            "from the primary",
        );
    }

    fn unpaired_file(&self, pair: usize) -> PathBuf {
        self.dir.join(format!("unpaired-{pair}"))
    }

    fn unpaired(&self, pair: usize) -> bool {
        self.unpaired_file(pair).exists()
    }

    fn serve_unpair(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.node
            .leases()
            .rpc()
            .serve(&pair::unpair(), move |from, pair: usize| {
                let me = me.clone();
                async move {
                    let svc = me.upgrade().ok_or("stopping")?;
                    let instance = svc.lock().get(&pair).cloned();
                    let instance = instance
                        .filter(|i| i.role != Role::Witness && i.members.voters().contains(&from))
                        .ok_or_else(|| {
                            format!("this node is in no pair {pair} with Peer {from}")
                        })?;
                    svc.leave(&instance).await.map_err(|r| r.message)
                }
            });
    }

    /// `ha unpair` (the seed's only clean way): never while the secondary serves; the other
    /// member leaves first (the secondary stops its instance, the primary keeps its address
    /// on its own), then this one.
    async fn unpair(&self, instance: &Arc<Instance>, force: bool) -> Result<String, Refusal> {
        let Some(peer) = instance.pair_peer() else {
            return Err(Refusal::invalid("this node is in no pair to unpair"));
        };
        if instance.secondary_serves() {
            return Err(Refusal::conflict(
                "the secondary holds the virtual IP: fail back first ('causeway ha failback' on the primary)",
            ));
        }
        if instance.role == Role::Primary && instance.holder_unknown() {
            // Just after a switchover or a restart the primary may not know yet that the
            // secondary holds it: unpairing then would leave the address to whichever
            // member the election favours.
            return Err(Refusal::conflict(
                "no member is known to hold the virtual IP at this moment (an election or a restart is under way): try again in a few seconds",
            ));
        }
        let asked = self
            .node
            .leases()
            .rpc()
            .call(
                &pair::unpair(),
                peer,
                &instance.pair(),
                Duration::from_secs(5),
            )
            .await;
        let note = match asked {
            Ok(_) => String::new(),
            Err(e) if force => format!(
                " (Peer {peer} was not told: {e}; it keeps its side until it is unpaired too)"
            ),
            Err(e) => {
                return Err(Refusal::unavailable(format!(
                    "Peer {peer} did not confirm: {e}. Use --force to leave on this side only"
                )))
            }
        };
        self.leave(instance).await?;
        Ok(format!("Unpaired from Peer {peer}{note}"))
    }

    /// This side's part of an unpair: the secondary stops the pair; the primary keeps its
    /// address on its own. Kept across restarts by `DIR/ha/unpaired-<pair>`.
    async fn leave(&self, instance: &Arc<Instance>) -> Result<String, Refusal> {
        let pair = instance.pair();
        causeway_common::fsio::write_atomic(&self.unpaired_file(pair), b"").map_err(|e| {
            Refusal::internal(format!(
                "writing {}: {e}",
                self.unpaired_file(pair).display()
            ))
        })?;
        let removed = self.lock().remove(&pair);
        if let Some(i) = removed {
            i.stop().await;
        }
        self.node
            .alarms()
            .lower(NO_WITNESS, &format!("pair {pair}"));
        info!(target: LOG, event = "HA pair unpaired", pair = pair, role = instance.role.seed_name(), "");
        if instance.role == Role::Primary {
            self.add(
                Role::Primary,
                Members::standalone(pair),
                instance.settings(),
            )
            .map_err(|e| Refusal::internal(format!("{e:#}")))?;
        } else {
            let _ = std::fs::remove_file(self.settings_file(pair));
        }
        Ok("unpaired".into())
    }

    pub fn status_json(&self) -> Value {
        let config = self.node.config();
        let pairs: Vec<Value> = self
            .lock()
            .values()
            .map(|i| i.status_json(&self.peers))
            .collect();
        json!({
            "running": true,
            "role": self.section.as_ref().map(|s| format!("{:?}", s.role)),
            "health_monitor_address": config.node.address,
            "health_monitor_interface": self.section.as_ref().map(|s| s.health_monitor_interface.clone()),
            "system_name": config.node.system_name,
            "version": causeway_common::SOFTWARE_VERSION,
            "me": self.me,
            "pairs": pairs,
        })
    }
}

impl causeway_cluster::Service for HaService {
    fn name(&self) -> &'static str {
        "ha"
    }

    fn status(&self) -> Value {
        self.status_json()
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.cancel.cancel();
            self.node.leases().rpc().unserve(pair::hello().path());
            let instances: Vec<Arc<Instance>> = self.lock().values().cloned().collect();
            for i in instances {
                i.stop().await;
            }
            self.tasks.close();
            self.tasks.wait().await;
        })
    }
}

/// `/metrics` for HA pairs, from each pair's status.
pub(crate) struct Collector(pub std::sync::Weak<HaService>);

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ha")
    }
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut enc: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use causeway_cluster::metrics::{counter, gauge};
        let Some(svc) = self.0.upgrade() else {
            return Ok(());
        };
        let status = svc.status_json();
        let pairs = status["pairs"].as_array().cloned().unwrap_or_default();
        let (mut states, mut held, mut generation, mut up, mut rtt, mut moves, mut sync) =
            (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for p in &pairs {
            let pair = p["pair"].to_string();
            if let Some(current) = p["state"].as_str() {
                for s in crate::transitions::HaState::ALL {
                    states.push((
                        vec![("pair", pair.clone()), ("state", s.seed_name().to_string())],
                        f64::from(u8::from(s.seed_name() == current)),
                    ));
                }
                held.push((
                    vec![("pair", pair.clone())],
                    f64::from(u8::from(p["vip_held"] == true)),
                ));
                generation.push((
                    vec![("pair", pair.clone())],
                    p["generation"].as_f64().unwrap_or(0.0),
                ));
                moves.push((
                    vec![("pair", pair.clone())],
                    p["moves"].as_u64().unwrap_or(0),
                ));
                sync.push((
                    vec![("pair", pair.clone())],
                    p["data_replication"]["percent"].as_f64().unwrap_or(0.0) / 100.0,
                ));
            }
            for (peer, b) in p["heartbeats"].as_object().cloned().unwrap_or_default() {
                let labels = vec![("pair", pair.clone()), ("peer", format!("peer{peer}"))];
                up.push((labels.clone(), f64::from(u8::from(b["status"] == "Up"))));
                if let Some(ms) = b["mean_rtt_ms"].as_f64() {
                    rtt.push((labels, ms / 1000.0));
                }
            }
        }
        gauge(
            &mut enc,
            "causeway_ha_state",
            "This member's state per pair (1 for the current one)",
            &states,
        )?;
        gauge(
            &mut enc,
            "causeway_ha_vip_held",
            "1 while this node has the pair's virtual IP",
            &held,
        )?;
        gauge(
            &mut enc,
            "causeway_ha_generation",
            "Lease generation the virtual IP was last held at",
            &generation,
        )?;
        gauge(
            &mut enc,
            "causeway_ha_heartbeat_up",
            "1 while the member answers heartbeats",
            &up,
        )?;
        gauge(
            &mut enc,
            "causeway_ha_heartbeat_rtt_seconds",
            "Mean heartbeat response time over the last 40",
            &rtt,
        )?;
        gauge(
            &mut enc,
            "causeway_ha_sync_progress_ratio",
            "Copy of the holder's files: done / needed",
            &sync,
        )?;
        counter(
            &mut enc,
            "causeway_ha_moves",
            "Completed moves of the virtual IP (failover, switchover, failback)",
            &moves,
        )
    }
}
