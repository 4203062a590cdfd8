//! `causeway pcap <interface>`: the cluster's traffic into a pcap file.

use std::path::Path;

pub fn capture(_interface: &str, _out: Option<&Path>, _duration: Option<u64>) -> anyhow::Result<()> {
    anyhow::bail!("not built yet")
}
