//! The configuration as an operator changes it: `xconfiguration`, the peer-specific items in
//! the node file, and what follows from each replicated change (EX-2, EX-7, EX-13).

use super::peers::MAPPING_PREFIX;
use super::*;

impl Node {
    /// Every configuration item: peer-specific (†) first, then cluster-wide.
    pub fn configuration(&self) -> Vec<ConfigItem> {
        let file = NodeConfig::load(&self.config.source).unwrap_or_else(|_| self.config.clone());
        let entries: Vec<(String, String)> = self
            .engine
            .entries(&config_stream())
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let mut items = xconfig::peer_items(&self.config, &file, self.engine.primary());
        items.extend(xconfig::cluster_items(&entries, &self.config));
        items
    }

    /// `xconfiguration set` (`value: None` clears a cluster-wide item back to its default).
    pub async fn set_configuration(
        &self,
        path: &str,
        value: Option<&str>,
    ) -> Result<SetOutcome, NodeError> {
        self.set_configuration_with(path, value, false).await
    }

    /// `force`: set it even when a check says it would break something (switching to
    /// Enforce while a peer's certificate would be refused).
    pub async fn set_configuration_with(
        &self,
        path: &str,
        value: Option<&str>,
        force: bool,
    ) -> Result<SetOutcome, NodeError> {
        if xconfig::is_peer_specific(path) {
            let value =
                value.ok_or_else(|| format!("{path} is peer-specific (†): give a value"))?;
            return self.set_peer_item(path, value);
        }
        let canonical = xconfig::canonical(path, value)?;
        if path == "cluster.tls_verification" && canonical.as_deref() == Some("Enforce") && !force {
            self.check_enforce_would_hold()?;
        }
        if self.mesh.is_none() && !self.config.cluster.peers.is_empty() {
            return Err(NodeError::unavailable(format!(
                "this peer is not clustering ({}): fix cluster.peers first",
                self.config.membership_problem().unwrap_or_default()
            )));
        }
        let change = Change {
            key: path.to_string(),
            value: canonical.clone().map(String::into_bytes),
        };
        let out = self.engine.write(&config_stream(), vec![change]).await?;
        Ok(SetOutcome {
            path: path.to_string(),
            value: canonical
                .map(|v| xconfig::shown(path, &v))
                .unwrap_or_default(),
            revision: Some(out.seq),
            confirmed: Some((out.confirmed, out.peers)),
            restart_required: xconfig::restart_required(path),
            warning: None,
        })
    }

    /// EX-6: before switching to Enforce, every certificate this peer has seen must pass.
    pub(super) fn check_enforce_would_hold(&self) -> Result<(), NodeError> {
        let Some(mesh) = &self.mesh else {
            return Ok(());
        };
        let failing: Vec<String> = mesh
            .view()
            .peers
            .iter()
            .filter_map(|p| match &p.certificate {
                causeway_mesh::CertStatus::Invalid(why) => {
                    Some(format!("Peer {} ({}): {why}", p.index, p.address))
                }
                _ => None,
            })
            .collect();
        if failing.is_empty() {
            return Ok(());
        }
        Err(NodeError::conflict(format!(
            "cluster.tls_verification: under Enforce these certificates would be refused: {}. Issue certificates that name each peer's address, or set it anyway with --force",
            failing.join("; ")
        )))
    }

    pub(super) fn set_peer_item(&self, path: &str, value: &str) -> Result<SetOutcome, NodeError> {
        let _guard = self.observer.lock_file();
        let mut file = NodeConfig::load(&self.config.source).map_err(|e| {
            NodeError::internal(format!("{path}: reading the node file failed: {e}"))
        })?;
        let before = item_value(&file, path, self.engine.primary());
        xconfig::set_peer_item(&mut file, path, value)?;
        file.save()
            .map_err(|e| NodeError::internal(format!("{path}: saving the change failed: {e}")))?;
        let after = item_value(&file, path, self.engine.primary());
        log_change(path, &before, &after);
        // Back to what is running (a cancelled leave, an undone edit): nothing to restart for.
        let restart_required = after != item_value(&self.config, path, self.engine.primary());
        if restart_required {
            self.alarms.raise(
                20007,
                path,
                &format!("{path} changed from '{before}' to '{after}': restart this peer for it to take effect"),
            );
        } else {
            self.alarms.lower(20007, path);
        }
        Ok(SetOutcome {
            path: path.to_string(),
            value: after,
            revision: None,
            confirmed: None,
            restart_required,
            warning: self.leave_banner(),
        })
    }

    /// A subordinate refused by the configuration primary because it missed a change of the
    /// TLS verification mode (it was down) cannot learn the change by replication. The
    /// primary's hello says its mode: the node file takes it, and a restart (20007) rejoins.
    /// Only from the primary, which owns the setting, over a connection that passed the
    /// source-address and certificate checks of this peer's mode.
    pub(super) fn follow_primary_tls_mode(&self, view: &causeway_mesh::MeshView) {
        let primary = self.engine.primary();
        if primary == view.self_index || primary == 0 || primary > view.peers.len() {
            return;
        }
        let p = view.peer(primary);
        let refused_for_mode = matches!(
            p.failure,
            Some(causeway_mesh::FailureKind::Refused(
                causeway_mesh::RefuseField::TlsMode
            ))
        );
        let (Some(theirs), true) = (p.tls_mode, refused_for_mode) else {
            return;
        };
        if theirs == self.config.cluster.tls_verification {
            return;
        }
        let (was, now) = (
            xconfig::tls_text(self.config.cluster.tls_verification),
            xconfig::tls_text(theirs),
        );
        let changed = self.observer.edit_file("cluster.tls_verification", |f| {
            let changed = f.cluster.tls_verification != theirs;
            f.cluster.tls_verification = theirs;
            changed
        });
        if changed {
            log_change("cluster.tls_verification", &was, &now);
            self.alarms.raise(
                20007,
                "cluster.tls_verification",
                &format!(
                    "cluster.tls_verification: the configuration primary (Peer {primary}) runs '{now}' and refused this peer, which ran '{was}' (it missed the change): the node file now says '{now}'; restart this peer to rejoin"
                ),
            );
        }
    }

    /// EX-13 on a subordinate.
    pub async fn force_config_update(&self) -> Result<ReplicationStatus, NodeError> {
        self.clustered()?;
        self.engine.force_config_update().await?;
        Ok(self.engine.status())
    }

    /// EX-7: make `peer` the configuration primary on every reachable peer.
    pub async fn set_primary(&self, peer: usize) -> Result<ReplicationStatus, NodeError> {
        self.clustered()?;
        self.engine.set_primary(peer).await?;
        Ok(self.engine.status())
    }

    pub(super) fn clustered(&self) -> Result<(), NodeError> {
        match &self.mesh {
            Some(_) => Ok(()),
            None => Err(NodeError::conflict(
                match self.config.membership_problem() {
                    Some(p) => {
                        format!("this peer is not clustering ({p}): fix cluster.peers first")
                    }
                    None => "this system is not in a cluster (cluster.peers is empty)".to_string(),
                },
            )),
        }
    }
}

pub(super) fn item_value(config: &NodeConfig, path: &str, primary: usize) -> String {
    xconfig::peer_items(config, config, primary)
        .into_iter()
        .find(|i| i.path == path)
        .map(|i| i.value)
        .unwrap_or_default()
}

pub(super) fn log_change(path: &str, old: &str, new: &str) {
    let text = |v: &str| {
        if v.is_empty() {
            "(unset)".to_string()
        } else {
            xconfig::shown(path, v)
        }
    };
    info!(target: CONFIG_LOG, event = "System Configuration Changed",
        "xconfiguration {path} - changed from: {} to: {}", text(old), text(new));
}

/// Checks configuration changes, logs them, applies what can be applied live, and keeps
/// the node's file in step with the replicated items it also holds.
pub(super) struct ConfigObserver {
    pub(super) alarms: Arc<AlarmTable>,
    pub(super) file: std::path::PathBuf,
    /// Every rewrite of the node's file goes through this lock.
    pub(super) file_lock: Mutex<()>,
    pub(super) addresses: Arc<AddressMap>,
    /// Redialled when the address mapping changes, so a mapped name is used at once.
    pub(super) mesh: Option<Arc<Mesh>>,
    /// Services that follow replicated streams of their own (`Node::watch`).
    pub(super) watchers: RwLock<Vec<Arc<dyn Observer>>>,
}

impl ConfigObserver {
    pub(super) fn lock_file(&self) -> std::sync::MutexGuard<'_, ()> {
        self.file_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rewrites one setting of the node's file; false (and a log line) when it cannot.
    pub(super) fn edit_file(&self, what: &str, edit: impl FnOnce(&mut NodeConfig) -> bool) -> bool {
        let _guard = self.lock_file();
        let mut file = match NodeConfig::load(&self.file) {
            Ok(f) => f,
            Err(e) => {
                warn!(target: CONFIG_LOG, reason = %e, setting = what, "Could not update the node's file");
                return false;
            }
        };
        if !edit(&mut file) {
            return false;
        }
        match file.save() {
            Ok(()) => true,
            Err(e) => {
                warn!(target: CONFIG_LOG, reason = %e, setting = what, "Could not update the node's file");
                false
            }
        }
    }
}

impl Observer for ConfigObserver {
    fn validate(&self, stream: &StreamId, changes: &[Change]) -> Result<(), String> {
        if *stream != config_stream() {
            return Ok(());
        }
        for c in changes {
            let value = match &c.value {
                None => None,
                Some(v) => {
                    Some(std::str::from_utf8(v).map_err(|_| format!("{}: not UTF-8 text", c.key))?)
                }
            };
            let canonical = xconfig::canonical(&c.key, value)?;
            if canonical.as_deref() != value {
                return Err(format!("{}: not in canonical form", c.key));
            }
        }
        Ok(())
    }

    fn applied(&self, stream: &StreamId, applied: &[Applied], origin: Origin) {
        for w in self
            .watchers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            w.applied(stream, applied, origin);
        }
        if *stream != config_stream() {
            return;
        }
        for a in applied {
            let text = |v: &Option<Vec<u8>>| {
                v.as_deref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default()
            };
            let (mut old, new) = (text(&a.old), text(&a.new));
            if old.is_empty() {
                // Never set cluster-wide: it was what the item shows when unset (the node
                // file's value, for an item the file also holds), not "(unset)".
                if let Ok(file) = NodeConfig::load(&self.file) {
                    old = xconfig::unset_value(&a.key, &file).unwrap_or_default();
                }
            }
            log_change(&a.key, &old, &new);
            if a.key.starts_with(MAPPING_PREFIX) {
                self.addresses.update(&a.key, a.new.as_deref());
                if let Some(mesh) = &self.mesh {
                    // Resolved again at once: a peer mapped elsewhere is reconnected there.
                    mesh.readdress();
                }
            }
            if a.key == "cluster.tls_verification" {
                let mode = match new.as_str() {
                    "Enforce" => TlsMode::Enforce,
                    _ => TlsMode::Permissive,
                };
                let changed = self.edit_file(&a.key, |f| {
                    let changed = f.cluster.tls_verification != mode;
                    f.cluster.tls_verification = mode;
                    changed
                });
                if changed {
                    self.alarms.raise(
                        20007,
                        &a.key,
                        &format!("{} changed from '{old}' to '{new}': restart this peer for it to take effect", a.key),
                    );
                }
            }
        }
    }

    fn primary_changed(&self, primary: usize, epoch: u64) {
        info!(target: CONFIG_LOG, event = "System Configuration Changed", epoch = epoch,
            "xconfiguration cluster.configuration_primary - changed to: {primary}");
        self.edit_file("cluster.configuration_primary", |f| {
            let changed = f.cluster.configuration_primary != primary;
            f.cluster.configuration_primary = primary;
            changed
        });
    }
}
